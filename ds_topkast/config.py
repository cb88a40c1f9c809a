"""The "topkast" section of a DeepSpeed JSON config: typed, bounded, documented.

DeepSpeed keeps an unknown top-level section and ignores it, so the Top-KAST settings
live next to DeepSpeed's own in one file. Everything here is checked when the config is
read, before any model is touched: a typo or an impossible value fails at start with a
message naming the key and the fix, never after an hour of training.
"""
from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ds_topkast.algorithms import registry
from ds_topkast.errors import TopKASTConfigError

SECTION = "topkast"



class Distribution(str, Enum):
    """How the global density is spread over layers (fixed at start: B's size never changes)."""

    uniform = "uniform"
    erk = "erk"
    global_ = "global"


class MaskInit(str, Enum):
    """How the static algorithm's fixed masks are chosen at initialisation."""

    magnitude = "magnitude"
    random = "random"


class NewEntries(str, Enum):
    """What the optimizer state of an entry new to B starts as."""

    zero_moments = "zero_moments"
    per_entry_bias_correction = "per_entry_bias_correction"


class Selection(str, Enum):
    """How the backward set B is chosen beyond the forward set A (paper, Section 4.2)."""

    topk = "topk"
    random = "random"


class StoreDevice(str, Enum):
    cpu = "cpu"
    nvme = "nvme"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True)


class AioConfig(_Strict):
    """DeepSpeed async I/O settings for the NVMe store (same names as DeepSpeed's "aio" section)."""

    block_size: int = Field(1 << 20, ge=4096, description="Bytes per I/O request.")
    queue_depth: int = Field(8, ge=1, description="Requests in flight per handle.")
    intra_op_parallelism: int = Field(1, ge=1, description="I/O threads per handle.")
    single_submit: bool = Field(False, description="Submit requests one at a time.")
    overlap_events: bool = Field(True, description="Overlap submission and completion.")


class DenseStoreConfig(_Strict):
    """Where the full fp32 weights θ of the sparsified layers live, off the accelerator."""

    device: StoreDevice = Field(StoreDevice.cpu, description="cpu: host memory. nvme: files under nvme_path.")
    nvme_path: str | None = Field(None, description="Folder for the NVMe store's files (device 'nvme' only).")
    pin_memory: bool = Field(True, description="Pin host buffers so copies to the accelerator are asynchronous.")
    aio: AioConfig | None = Field(None, description="NVMe I/O settings; default: the DeepSpeed config's \"aio\" "
                                                    "section, else DeepSpeed's defaults.")
    buffers: int = Field(2, ge=2, le=8, description="Host buffers the NVMe store streams through (>= 2: double "
                                                  "buffering).")

    @model_validator(mode="after")
    def _nvme_needs_a_path(self) -> "DenseStoreConfig":
        if self.device == StoreDevice.nvme.value and not self.nvme_path:
            raise ValueError("dense_store.device 'nvme' needs dense_store.nvme_path, a folder on the NVMe device")
        return self


class TopKASTConfig(_Strict):
    """Top-KAST settings (Jayakumar et al. 2020, Section 2; names follow DESIGN.md, Section 5).

    Sparsities are fractions of zeros: forward_sparsity 0.9 keeps 10% of each layer's
    weights in the forward pass (set A); backward_sparsity 0.8 updates 20% (set B ⊇ A).
    """

    forward_sparsity: float = Field(0.9, ge=0.0, lt=1.0, description="Fraction of weights zero in the forward pass.")
    backward_sparsity: float = Field(0.8, ge=0.0, lt=1.0,
                                     description="Fraction of weights never updated between refreshes (<= forward).")
    refresh_interval: int = Field(100, ge=0, description="Optimizer steps between refreshes of A and B from the store "
                                                        "(0: never; with forward_interval 0, a static-mask baseline).")
    forward_interval: int = Field(1, ge=0, description="Optimizer steps between re-selections of A inside B (0: never).")
    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                               description="fnmatch patterns over module names to sparsify.")
    exclude: list[str] = Field(default_factory=lambda: ["*embed*", "*lm_head*"],
                               description="fnmatch patterns over module names never to sparsify.")
    distribution: Distribution = Field(Distribution.uniform, description="Per-layer density: uniform or erk.")
    exploration_l2: float = Field(0.0, ge=0.0, description="λ in λ·(Σ_A v² + Σ_{B\\A} v²/D); its gradient is applied in the layers' backward.")
    new_entries: NewEntries = Field(NewEntries.zero_moments, description=(
        "Entries new to B start with zero moments. zero_moments: Adam's bias correction uses the global step, as "
        "the paper does. per_entry_bias_correction: each entry's Adam update is bias-corrected by its own age in B, "
        "as a fresh optimizer would (Adam/AdamW only)."))
    dense_store: DenseStoreConfig = Field(default_factory=DenseStoreConfig)
    selection: Selection = Field(Selection.topk, description="topk: B by magnitude. random: B\\A drawn at random.")
    seed: int = Field(0, ge=0, description="Seed of every random draw (random B\\A, SET's growth, random static "
                                            "masks); the same on every rank and world size.")
    algorithm: str = Field("topkast", description=(
        "topkast: A and B by magnitude from the dense store. rigl: drop smallest, grow largest dense gradient. set: "
        "drop smallest, grow at random. static: masks fixed at start. gmp: prune from dense on the cubic schedule. "
        "Or an algorithm registered with ds_topkast.algorithms.register."))
    drop_fraction: float = Field(0.3, gt=0.0, le=1.0, description=(
        "rigl/set: fraction ζ0 of each layer's active weights replaced at the first update; it decays as "
        "ζ0/2·(1 + cos(π t / update_end_step))."))
    update_end_step: int | None = Field(None, ge=1, description=(
        "rigl/set: the last step at which masks change (RigL stops at 75% of training). Required for them."))
    mask_init: MaskInit = Field(MaskInit.magnitude, description="static: masks by initial magnitude or at random.")
    prune_start_step: int = Field(0, ge=0, description="gmp: the step at which pruning starts from dense.")
    prune_end_step: int | None = Field(None, ge=1, description=(
        "gmp: the step at which the forward sparsity reaches forward_sparsity. Required for gmp."))

    @model_validator(mode="after")
    def _backward_not_sparser_than_forward(self) -> "TopKASTConfig":
        if self.backward_sparsity > self.forward_sparsity:
            raise ValueError(
                f"backward_sparsity ({self.backward_sparsity}) must be <= forward_sparsity "
                f"({self.forward_sparsity}): the backward set B contains the forward set A. "
                "Lower backward_sparsity or raise forward_sparsity.")
        return self

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data: Any) -> Any:
        return registry.fill_defaults(dict(data)) if isinstance(data, Mapping) else data

    @field_validator("algorithm")
    @classmethod
    def _algorithm_registered(cls, name: str) -> str:
        registry.algorithm_class(name)
        return name

    @model_validator(mode="after")
    def _algorithm_settings_fit(self) -> "TopKASTConfig":
        registry.check_settings(self)
        return self

    @property
    def forward_density(self) -> float:
        return 1.0 - self.forward_sparsity

    @property
    def backward_density(self) -> float:
        return 1.0 - self.backward_sparsity

    def same_settings(self, other: "TopKASTConfig") -> bool:
        """Whether `other` trains the same way: every setting but the NVMe store's I/O tuning (`dense_store.aio`,
        which a DeepSpeed config's "aio" section fills in for a config read from it and not for a bare section)."""
        io_tuning = {"dense_store": {"aio"}}
        return self.model_dump(exclude=io_tuning) == other.model_dump(exclude=io_tuning)

    def explicitly_set(self, field: str) -> bool:
        """Whether the user wrote this key (defaults are not held to 'must match a layer')."""
        return field in self.model_fields_set

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "TopKASTConfig":
        """Validate a "topkast" section, turning pydantic's report into one readable error."""
        return validate_section(cls, section, SECTION)


def validate_section(model: type[BaseModel], section: Any, name: str) -> Any:
    """Validate one config section with `model`; every problem becomes a line naming its key."""
    if not isinstance(section, Mapping):
        raise TopKASTConfigError(f'The "{name}" section must be a JSON object, got {type(section).__name__}.')
    try:
        return model.model_validate(dict(section))
    except ValidationError as err:
        raise TopKASTConfigError(_explain(err, model, name)) from None


def _explain(err: ValidationError, model: type[BaseModel], name: str) -> str:
    lines = [f'Invalid "{name}" config:']
    for problem in err.errors():
        key = ".".join([name, *map(str, problem["loc"])])
        if problem["type"] == "extra_forbidden":
            known = ", ".join(sorted(_model_at(model, problem["loc"][:-1]).model_fields))
            lines.append(f"  {key}: unknown key; remove it or use one of: {known}.")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r}).")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel]:
    """The nested config model that a key path leads to (for listing its valid keys)."""
    for part in path:
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    return model


def load_deepspeed_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed config given as a path or a dict, as deepspeed.initialize accepts it."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise TopKASTConfigError(f"DeepSpeed config file {path} does not exist; pass an existing JSON file or a dict.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TopKASTConfigError(f"DeepSpeed config file {path} is not valid JSON: {err}.") from None


def refuse_loss_scaling(ds_config: dict[str, Any], trainer_fp16: bool = False) -> None:
    """Refuse fp16 in any form: its loss scale would not scale the regulariser's gradient (added in backward).

    `trainer_fp16` is the HF Trainer's own `fp16=True` (a GradScaler without DeepSpeed).
    """
    autocast = ds_config.get("torch_autocast", {})
    autocast_fp16 = autocast.get("enabled", False) is True and str(autocast.get("dtype", "")).removeprefix(
        "torch.") in ("float16", "fp16", "half")
    if ds_config.get("fp16", {}).get("enabled", False) is True or trainer_fp16 or autocast_fp16:
        raise TopKASTConfigError(
            "fp16 (DeepSpeed's fp16 section, torch_autocast with float16, or the Trainer's fp16=True) is not "
            "supported by ds_topkast: the regulariser's gradient is added in the sparse layers' backward, where a "
            "loss scale would not reach it, and loss-scale skipped steps are untested here. Use bf16 "
            '("bf16": {"enabled": true}, torch_autocast with "bfloat16", or the Trainer\'s bf16=True) or fp32.')


def topkast_section(ds_config: Mapping[str, Any]) -> TopKASTConfig:
    """The "topkast" section of a DeepSpeed config, validated and resolved; its absence is an error.

    Resolved: when the section's NVMe store sets no "aio" of its own, it takes the DeepSpeed
    config's "aio" section (the keys the store uses), so the resolved config is all the store
    needs and nothing else carries the raw section.
    """
    if SECTION not in ds_config:
        raise TopKASTConfigError(
            f'The DeepSpeed config has no "{SECTION}" section; add one, e.g. '
            '"topkast": {"forward_sparsity": 0.9, "backward_sparsity": 0.8, "refresh_interval": 100}.')
    cfg = TopKASTConfig.from_section(ds_config[SECTION])
    take_io_settings(cfg, ds_config)
    return cfg


def take_io_settings(cfg: TopKASTConfig, ds_config: Mapping[str, Any]) -> None:
    """Give an NVMe store that sets no "aio" of its own the DeepSpeed config's (the keys the store uses).

    `topkast_section` does it for the config it reads; the engine, the Trainer callback and
    accelerate's wrapper do it with the DeepSpeed config they train under, before the store
    is placed, so a model sparsified from a bare section still streams with that config's
    settings. A CPU store has no I/O settings: DeepSpeed's "aio" (ZeRO-Infinity's) is not
    read for it.
    """
    deepspeed_aio = ds_config.get("aio")
    store = cfg.dense_store
    if store.device == "nvme" and store.aio is None and isinstance(deepspeed_aio, Mapping):
        store.aio = validate_section(
            AioConfig, {key: value for key, value in deepspeed_aio.items() if key in AioConfig.model_fields}, "aio")


def resolved_config(config: TopKASTConfig | Mapping[str, Any] | str | os.PathLike) -> TopKASTConfig:
    """The resolved config from a TopKASTConfig (itself), a DeepSpeed config (dict or JSON path) holding a
    "topkast" section (`topkast_section`), or a bare "topkast" section."""
    if isinstance(config, TopKASTConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return topkast_section(load_deepspeed_config(config))
    if SECTION in config:
        return topkast_section(config)
    return TopKASTConfig.from_section(config)


def refuse_another_section(ds_config: Mapping[str, Any], sparsified_with: TopKASTConfig, whose: str) -> None:
    """Refuse a DeepSpeed config whose "topkast" section differs from the one the model was sparsified with (one
    without a section is fine: the model's is used). `whose` names the config, e.g. "the Trainer's"."""
    if SECTION in ds_config and not topkast_section(ds_config).same_settings(sparsified_with):
        raise TopKASTConfigError(f'The model was sparsified with a different "{SECTION}" section than {whose} '
                                 "DeepSpeed config holds; sparsify with the same config file.")
