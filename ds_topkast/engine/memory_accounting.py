"""`memory_report(engine)`: accelerator bytes per rank by category, next to dense training's.

Counts what DeepSpeed allocates on each rank for every trained tensor, following its
partitioning rules (ZeRO-1 partitions master and moments, ZeRO-2 also gradients,
ZeRO-3 also parameters), from the engine's real shapes, dtypes and optimizer. The
"dense" column is the same engine configuration holding the sparsified layers as
ordinary dense weights. The set bitmaps (one bit per weight for B, one per entry of B
for A) are never partitioned. The
benchmarks (bench/) measure peak device memory; this report explains where it goes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ds_topkast.config import load_deepspeed_config, topkast_section
from ds_topkast.core.bitmaps import bitmap_bytes
from ds_topkast.core.layers import sparse_layers
from ds_topkast.errors import TopKASTConfigError
from ds_topkast.parallel.zero3 import full_numel
from ds_topkast.runtime.state import topkast_state
from ds_topkast.store.shards import shard_range

_FP32 = 4
# DeepSpeed config spellings of data_types.grad_accum_dtype.
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


@dataclass
class MemoryReport:
    """Bytes per rank. `sparse` and `dense` cover the sparsified layers only."""

    sparse: dict[str, int] = field(default_factory=dict)
    dense: dict[str, int] = field(default_factory=dict)
    other_parameters: int = 0
    dense_store_bytes: int = 0
    host_optimizer_state: int = 0  # ZeRO-Offload: master, moments, fp32 gradients and a staging copy on the host
    layer_scratch: int = 0  # the sparse layers' shared α and dL/dα buffers (core/layers.LayerScratch)

    @property
    def sparse_total(self) -> int:
        return sum(self.sparse.values())

    @property
    def dense_total(self) -> int:
        return sum(self.dense.values())

    @property
    def ratio(self) -> float:
        """Accelerator bytes of the sparsified layers relative to dense training of them."""
        return self.sparse_total / self.dense_total

    def as_dict(self) -> dict[str, float]:
        return {**{f"sparse_{k}": v for k, v in self.sparse.items()}, "sparse_total": self.sparse_total,
                "dense_total": self.dense_total, "ratio": self.ratio, "other_parameters": self.other_parameters,
                "layer_scratch": self.layer_scratch, "dense_store": self.dense_store_bytes,
                "host_optimizer_state": self.host_optimizer_state}

    def format(self) -> str:
        mib = 2**20
        rows = [f"{'accelerator bytes per rank':<28}{'Top-KAST':>12}{'dense':>12}"]
        for key in self.sparse:
            rows.append(f"  {key:<26}{self.sparse[key] / mib:>10.2f}Mi{self.dense.get(key, 0) / mib:>10.2f}Mi")
        rows.append(f"  {'sparsified layers total':<26}{self.sparse_total / mib:>10.2f}Mi"
                    f"{self.dense_total / mib:>10.2f}Mi  (ratio {self.ratio:.3f})")
        rows.append(f"  {'other parameters':<26}{self.other_parameters / mib:>10.2f}Mi")
        rows.append(f"  {'layer scratch (α, dL/dα)':<26}{self.layer_scratch / mib:>10.2f}Mi")
        rows.append(f"{'dense store (host, fp32)':<28}{self.dense_store_bytes / mib:>10.2f}Mi")
        if self.host_optimizer_state:
            rows.append(f"{'optimizer state (host)':<28}{self.host_optimizer_state / mib:>10.2f}Mi")
        return "\n".join(rows)


@dataclass
class TrainingSetup:
    """What fixes DeepSpeed's per-rank bytes: ZeRO stage, data-parallel size, dtypes, optimizer moments, offload."""

    module: torch.nn.Module
    stage: int
    world: int
    model_dtype: torch.dtype
    grad_dtype: torch.dtype
    moments: int
    offloaded: bool  # ZeRO-Offload: master, moments and gradients on the host

    @classmethod
    def of_engine(cls, engine, world: int | None = None) -> "TrainingSetup":
        from ds_topkast.engine.optimizer_adapters import per_entry_state_keys

        model_dtype, grad_dtype = engine.get_data_types()
        return cls(engine.module, engine.zero_optimization_stage(), engine.dp_world_size if world is None else world,
                   model_dtype, grad_dtype, len(per_entry_state_keys(engine.basic_optimizer)),
                   bool(engine.zero_use_cpu_optimizer()))

    @classmethod
    def of_config(cls, module: torch.nn.Module, ds_config: dict, world: int) -> "TrainingSetup":
        """The setup a DeepSpeed config asks for, before an engine exists (estimate_memory).

        Every value it reads must be concrete: the Hugging Face integration's "auto" is
        filled in only when the Trainer builds the engine, so it is refused here by name.
        """
        def concrete(value, where: str):
            if value == "auto":
                raise TopKASTConfigError(f"estimate_memory needs {where} set in the DeepSpeed config, not \"auto\" "
                                         "(the Trainer fills that in later); give the value the run will use.")
            return value

        if not isinstance(world, int) or world < 1:
            raise TopKASTConfigError(f"estimate_memory: world is the number of data-parallel ranks, >= 1 "
                                     f"(got {world!r}).")
        zero = ds_config.get("zero_optimization", {})
        stage = concrete(zero.get("stage", 0), "zero_optimization.stage")
        fp16 = concrete(ds_config.get("fp16", {}).get("enabled", False), "fp16.enabled") is True
        bf16 = concrete(ds_config.get("bf16", ds_config.get("bfloat16", {})).get("enabled", False),
                        "bf16.enabled") is True
        model_dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
        grad_accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
        if grad_accum is not None and grad_accum not in _DTYPES:
            raise TopKASTConfigError(f"data_types.grad_accum_dtype {grad_accum!r} is not one of {sorted(_DTYPES)}.")
        grad_dtype = _DTYPES.get(grad_accum, model_dtype)
        optimizer = ds_config.get("optimizer")
        name = str(optimizer.get("type", "")).lower() if isinstance(optimizer, dict) else ""
        if name not in _CONFIG_MOMENTS:
            raise TopKASTConfigError(
                f"estimate_memory needs the optimizer in the DeepSpeed config to count its state: "
                f"\"optimizer\": {{\"type\": ...}} with one of Adam, AdamW, SGD (got {optimizer!r}).")
        moments = _CONFIG_MOMENTS[name]
        if name == "sgd" and not optimizer.get("params", {}).get("momentum", 0):
            moments = 0
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        return cls(module, int(stage), world, model_dtype, grad_dtype, moments, offload)

    @classmethod
    def of_trainer(cls, model: torch.nn.Module, ds_config: dict, optimizer, world: int) -> "TrainingSetup":
        """The Hugging Face Trainer's setup: its DeepSpeed config ("auto" filled), or none (fp32 torch optimizer)."""
        from ds_topkast.engine.optimizer_adapters import adapter_for_optimizer

        zero = ds_config.get("zero_optimization", {})
        model_dtype = next(iter(sparse_layers(model).values())).values.dtype
        grad_dtype = _DTYPES.get(ds_config.get("data_types", {}).get("grad_accum_dtype"), model_dtype)
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        return cls(model, int(zero.get("stage", 0)), world, model_dtype, grad_dtype,
                   len(adapter_for_optimizer(optimizer).state_keys), offload)


class _Rules:
    """DeepSpeed's per-rank bytes for n trained entries under one training setup."""

    def __init__(self, setup: TrainingSetup):
        self.param_bytes = torch.finfo(setup.model_dtype).bits // 8
        self.grad_bytes = torch.finfo(setup.grad_dtype).bits // 8
        self.param_share = 1 / setup.world if setup.stage >= 3 else 1.0
        self.grad_share = 1 / setup.world if setup.stage >= 2 else 1.0
        self.state_share = 1 / setup.world if setup.stage >= 1 else 1.0
        self.separate_master = setup.stage >= 1 or setup.model_dtype != torch.float32
        self.moments = setup.moments
        self.offloaded = setup.offloaded

    def host_state(self, n: int) -> int:
        """ZeRO-Offload's host bytes of n entries on this rank (DeepSpeed's stage_1_and_2): the fp32 master, the
        moments, the fp32 gradient partition and a low-precision copy of the partition staged for the accelerator."""
        share = n * self.state_share
        return round(share * (_FP32 * (2 + self.moments) + self.param_bytes))

    def trained(self, n: int) -> dict[str, int]:
        """Accelerator bytes of n trained entries by category (offloaded: the gradients go to the host too, through
        DeepSpeed's reduce bucket, a fixed cost not counted here)."""
        on_device = not self.offloaded
        return {
            "values": round(n * self.param_bytes * self.param_share),
            "gradients": round(n * self.grad_bytes * self.grad_share) if on_device else 0,
            "fp32_master": round(n * _FP32 * self.state_share) if self.separate_master and on_device else 0,
            "moments": round(n * _FP32 * self.moments * self.state_share) if on_device else 0,
        }


def trained_bytes(engine) -> dict[str, int]:
    """Bytes per rank of all of an engine's trained parameters by category, for any engine (dense ones too).

    The categories are on the accelerator; "host_optimizer_state" is what ZeRO-Offload
    keeps in host memory instead.
    """
    rules = _Rules(TrainingSetup.of_engine(engine))
    n = sum(full_numel(p) for p in engine.module.parameters() if p.requires_grad)
    return {**rules.trained(n), "host_optimizer_state": rules.host_state(n) if rules.offloaded else 0}


def memory_report(engine, world: int | None = None) -> MemoryReport:
    """Accelerator and dense-store bytes per rank of a ds_topkast engine (see the module docstring).

    `world`: the same run projected onto another data-parallel size (partitioned bytes
    scale as 1/world, the bitmaps and the unpartitioned state do not; the dense store
    is this rank's as built).
    """
    return setup_memory_report(TrainingSetup.of_engine(engine, world))


def trainer_memory_report(model: torch.nn.Module, ds_config: dict, optimizer, world: int) -> MemoryReport:
    """`memory_report` of a sparsified model trained by the Hugging Face Trainer (TopKASTCallback logs it)."""
    return setup_memory_report(TrainingSetup.of_trainer(model, ds_config, optimizer, world))


def setup_memory_report(setup: TrainingSetup) -> MemoryReport:
    layers = sparse_layers(setup.module)
    values = {id(layer.values) for layer in layers.values()}
    other_n = sum(full_numel(p) for p in setup.module.parameters()
                  if p.requires_grad and id(p) not in values)
    return _report(setup, [(layer.in_features * layer.out_features, layer.k_backward) for layer in layers.values()],
                   other_n, topkast_state(setup.module).store.nbytes())


def _report(setup: TrainingSetup, layers: list[tuple[int, int]], other_n: int, store_bytes: int) -> MemoryReport:
    """The report of sparsified layers given as (weights, k_B), `other_n` other trained entries and the store."""
    rules = _Rules(setup)
    compact = sum(k_backward for _, k_backward in layers)
    report = MemoryReport(sparse=rules.trained(compact), dense=rules.trained(sum(n for n, _ in layers)))
    report.sparse["set_bitmaps"] = sum(bitmap_bytes(n) + bitmap_bytes(k_backward) for n, k_backward in layers)
    report.other_parameters = sum(rules.trained(other_n).values())
    if rules.offloaded:
        report.host_optimizer_state = rules.host_state(compact + other_n)
    report.dense_store_bytes = store_bytes
    report.layer_scratch = 2 * (torch.finfo(setup.model_dtype).bits // 8) * sum({n for n, _ in layers})
    return report


# Per-entry optimizer state tensors of the optimizers a DeepSpeed config can name (see optimizer_adapters).
_CONFIG_MOMENTS = {"adam": 2, "adamw": 2, "sgd": 1}


def estimate_memory(model: torch.nn.Module, config: dict | str | os.PathLike, world: int = 1) -> MemoryReport:
    """memory_report's bytes per rank for `model` trained under DeepSpeed `config` on `world` ranks, before any of it.

    The model may be on the meta device (a 7B model costs nothing to describe); nothing is
    sparsified or allocated. `config` is the DeepSpeed config with its "topkast" section:
    its ZeRO stage, bf16/fp16, data_types.grad_accum_dtype, optimizer (Adam, AdamW or SGD;
    SGD's momentum decides its state) and offload_optimizer fix the rules memory_report
    applies to a built engine, and the section's include/exclude, sparsities and
    distribution fix each layer's k_B. `dense_store_bytes` is this rank's share of the
    store in fp32 (host memory for a CPU store; on NVMe the host holds only its I/O
    buffers). Equal, field by field, to memory_report of the engine that config builds
    (tests/test_memory_accounting.py), so what fits a card can be checked before a run.
    The "global" distribution needs the initial weights, so it is refused here.
    """
    from ds_topkast.convert.sparsify import planned_layers

    ds_config = load_deepspeed_config(config)
    plan = planned_layers(model, topkast_section(ds_config))
    chosen = {id(module.weight) for module in plan.modules.values()}
    other_n = sum(full_numel(p) for p in model.parameters() if p.requires_grad and id(p) not in chosen)
    setup = TrainingSetup.of_config(model, ds_config, world)
    store_bytes = sum(_FP32 * (end - start) for start, end in (shard_range(n, 0, world) for n, _ in plan.counts))
    return _report(setup, plan.counts, other_n, store_bytes)
