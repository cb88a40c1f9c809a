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

from dataclasses import dataclass, field

import torch

from ds_topkast.core.layers import sparse_layers
from ds_topkast.parallel.zero3 import full_numel
from ds_topkast.runtime.state import topkast_state

_FP32 = 4


@dataclass
class MemoryReport:
    """Bytes per rank. `sparse` and `dense` cover the sparsified layers only."""

    sparse: dict[str, int] = field(default_factory=dict)
    dense: dict[str, int] = field(default_factory=dict)
    other_parameters: int = 0
    dense_store_bytes: int = 0
    host_optimizer_state: int = 0  # ZeRO-Offload keeps master and moments on the host

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
                "dense_store": self.dense_store_bytes, "host_optimizer_state": self.host_optimizer_state}

    def format(self) -> str:
        mib = 2**20
        rows = [f"{'accelerator bytes per rank':<28}{'Top-KAST':>12}{'dense':>12}"]
        for key in self.sparse:
            rows.append(f"  {key:<26}{self.sparse[key] / mib:>10.2f}Mi{self.dense.get(key, 0) / mib:>10.2f}Mi")
        rows.append(f"  {'sparsified layers total':<26}{self.sparse_total / mib:>10.2f}Mi"
                    f"{self.dense_total / mib:>10.2f}Mi  (ratio {self.ratio:.3f})")
        rows.append(f"  {'other parameters':<26}{self.other_parameters / mib:>10.2f}Mi")
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
    offloaded: bool  # ZeRO-Offload: master and moments on the host

    @classmethod
    def of_engine(cls, engine, world: int | None = None) -> "TrainingSetup":
        from ds_topkast.engine.optimizer_adapters import per_entry_state_keys

        model_dtype, grad_dtype = engine.get_data_types()
        return cls(engine.module, engine.zero_optimization_stage(), engine.dp_world_size if world is None else world,
                   model_dtype, grad_dtype, len(per_entry_state_keys(engine.basic_optimizer)),
                   bool(engine.zero_use_cpu_optimizer()))

    @classmethod
    def of_trainer(cls, model: torch.nn.Module, ds_config: dict, optimizer, world: int) -> "TrainingSetup":
        """The Hugging Face Trainer's setup: its DeepSpeed config ("auto" filled), or none (fp32 torch optimizer)."""
        from ds_topkast.engine.optimizer_adapters import adapter_for_optimizer

        zero = ds_config.get("zero_optimization", {})
        model_dtype = next(iter(sparse_layers(model).values())).values.dtype
        grad_dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                      "float32": torch.float32}.get(ds_config.get("data_types", {}).get("grad_accum_dtype"), model_dtype)
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

    def optimizer_state(self, n: int) -> int:
        """fp32 master and moments of n entries on this rank, wherever they live."""
        master = round(n * _FP32 * self.state_share) if self.separate_master else 0
        return master + round(n * _FP32 * self.moments * self.state_share)

    def trained(self, n: int) -> dict[str, int]:
        """Accelerator bytes of n trained entries by category."""
        on_device = not self.offloaded
        return {
            "values": round(n * self.param_bytes * self.param_share),
            "gradients": round(n * self.grad_bytes * self.grad_share),
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
    return {**rules.trained(n), "host_optimizer_state": rules.optimizer_state(n) if rules.offloaded else 0}


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
    rules = _Rules(setup)
    layers = sparse_layers(setup.module)
    compact = sum(layer.k_backward for layer in layers.values())
    dense_n = sum(layer.in_features * layer.out_features for layer in layers.values())
    report = MemoryReport(sparse=rules.trained(compact), dense=rules.trained(dense_n))
    report.sparse["set_bitmaps"] = sum(l.backward_bits.numel() + l.forward_bits.numel() for l in layers.values())
    values = {id(layer.values) for layer in layers.values()}
    other_n = sum(full_numel(p) for p in setup.module.parameters()
                  if p.requires_grad and id(p) not in values)
    report.other_parameters = sum(rules.trained(other_n).values())
    if rules.offloaded:
        report.host_optimizer_state = rules.optimizer_state(compact + other_n)
    report.dense_store_bytes = topkast_state(setup.module).store.nbytes()
    return report
