"""The Top-KAST side of one training run, whoever drives the optimizer.

`TopKASTRuntime` owns what a run adds to a sparsified model: the dense store placed for
this rank (host memory or NVMe), the refresher with its optimizer-state adapter, the
schedule (the algorithm's updates, for Top-KAST a refresh every `refresh_interval`
optimizer steps and A re-selected inside B every `forward_interval`), checkpoint files
and the report of each refresh. The DeepSpeed engine (engine/deepspeed_engine.py), the
Hugging Face Trainer callback and accelerate's wrapper (integrations/) each build one and
call it after every optimizer step; none duplicates the schedule.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from torch import Tensor, nn

from ds_topkast.algorithms import due
from ds_topkast.config import TopKASTConfig
from ds_topkast.core.layers import TopKASTLinear, sparse_layers
from ds_topkast.core.select import Collectives
from ds_topkast.errors import CheckpointError
from ds_topkast.runtime import checkpoint
from ds_topkast.runtime.history import MaskDynamics
from ds_topkast.runtime.optimizer_state import OptimizerStateAdapter
from ds_topkast.runtime.refresh import Refresher
from ds_topkast.runtime.state import TopKASTState, topkast_state

logger = logging.getLogger("ds_topkast")


class TopKASTRuntime:
    """Store, refresher and schedule of one sparsified model; `monitor` is DeepSpeed's, when there is one."""

    def __init__(self, model: nn.Module, adapter: OptimizerStateAdapter, comm: Collectives, accumulation_steps: int = 1,
                 monitor: Any = None):
        self.state: TopKASTState = topkast_state(model)
        self.state.start_driving()
        self.config: TopKASTConfig = self.state.config
        self.comm, self.monitor = comm, monitor
        self.state.place_store(comm.rank, comm.world)
        self.refresher = Refresher(sparse_layers(model), self.state, adapter, comm)
        self.accumulation_steps = 0
        self.set_accumulation_steps(accumulation_steps)
        self.last_refresh_seconds = 0.0
        self.refresher.collect_gradients_for(1)

    def use_optimizer(self, adapter: OptimizerStateAdapter) -> None:
        """Train on with another optimizer (a later `trainer.train()` builds a new one)."""
        self.refresher.use_optimizer(adapter)

    def set_accumulation_steps(self, steps: int) -> None:
        """Backward passes per optimizer step, so that the layers apply the regulariser's gradient once per step.

        Cheap to call every step: the layers are told only when the count changes.
        """
        if steps != self.accumulation_steps:
            for layer in self.refresher.layers.values():
                layer.accumulation_steps = steps
            self.accumulation_steps = steps

    def after_optimizer_step(self, step: int) -> MaskDynamics | None:
        """The algorithm's update at its update steps; otherwise maybe re-select A inside B (Top-KAST)."""
        algorithm = self.refresher.algorithm
        dynamics = None
        self.refresher.correct_bias(step)
        if algorithm.updates_at(step):
            start = time.perf_counter()
            dynamics = self.refresher.refresh(step)
            self.last_refresh_seconds = time.perf_counter() - start  # the refresh ends in host syncs: its whole time
            self._report(dynamics)
        elif algorithm.reselects_forward and due(step, self.config.forward_interval):
            self.refresher.reselect_forward_sets()
        self.refresher.collect_gradients_for(step + 1)
        return dynamics

    def master(self, layer: TopKASTLinear) -> Tensor:
        """A layer's full fp32 master values (a collective under ZeRO: every rank calls it)."""
        return self.refresher.adapter.get_master(layer.values)

    def full_theta(self, name: str) -> Tensor:
        """A layer's whole dense store, flat fp32, on every rank (a collective when sharded)."""
        local = self.state.store.read(name)
        return local if self.comm.world == 1 else self.comm.all_gather_varlen(local)

    def save(self, tag_dir: str | os.PathLike, step: int, values: bool = False) -> None:
        """This rank's store shard and sets at `step` (and with `values`, B's values) into a checkpoint folder."""
        checkpoint.save(self.refresher, tag_dir, self.comm.rank, step, values)

    def verify(self, tag_dir: str | os.PathLike) -> checkpoint.SavedState:
        """Read and check this rank's checkpoint files (checksums, layers, settings) without changing anything."""
        return checkpoint.read(self.refresher, tag_dir, self.comm.rank)

    def load(self, tag_dir: str | os.PathLike, step: int, verified: checkpoint.SavedState | None = None) -> None:
        """Restore the store and sets saved at `step` (the framework's own state, with the values, is loaded).

        A is selected again from the restored master when step `step` re-selected it: that
        is what the saved mask already holds (the selection is a function of the master),
        and it also brings checkpoints that saved A before its re-selection up to date.
        """
        verified = verified if verified is not None else self.verify(tag_dir)
        saved_step = verified.first.get("step", step)  # files written before the step was recorded have none
        if saved_step != step:
            raise CheckpointError(
                f"{tag_dir} holds the Top-KAST state of step {saved_step}, but the run resumes at step {step}: the "
                "model and optimizer were loaded from another checkpoint than this folder. Resume from one folder "
                "(with the Trainer: set --resume_from_checkpoint, or TopKASTCallback(resume_from=...), to it).")
        checkpoint.restore(self.refresher, verified)
        algorithm = self.refresher.algorithm
        if (step > 0 and not algorithm.updates_at(step) and algorithm.reselects_forward
                and due(step, self.config.forward_interval)):
            self.refresher.reselect_forward_sets()
        self.refresher.collect_gradients_for(step + 1)

    def _report(self, dynamics: MaskDynamics) -> None:
        if self.comm.rank != 0:
            return
        logger.info("Top-KAST refresh " + ", ".join(f"{k}={v:.4g}" for k, v in dynamics.as_dict().items())
                    + f", seconds={self.last_refresh_seconds:.3f}")
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(f"TopKAST/{k}", float(v), dynamics.step)
                                       for k, v in dynamics.as_dict().items() if k != "step"]
                                      + [("TopKAST/refresh_seconds", self.last_refresh_seconds, dynamics.step)])
