"""Top-KAST in a custom `accelerate` training loop (transformers' `run_clm_no_trainer.py` pattern).

    model = ds_topkast.sparsify(model, "ds_config.json")            # + before building the optimizer
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    ds_topkast.TopKASTAccelerate(accelerator, model, optimizer)      # + after prepare
    ...                                                               # the loop, save_state/load_state as before
    accelerator.unwrap_model(model).save_pretrained(out, state_dict=accelerator.get_state_dict(model))

With DeepSpeed (a DeepSpeed plugin or `accelerate launch` with a DeepSpeed config, any
ZeRO stage), `prepare` returns DeepSpeed's engine and accelerate steps it inside
`accelerator.backward`: the engine is extended as `ds_topkast.initialize` extends its own
(engine/deepspeed_engine.py), so its steps drive the refreshes and its `save_checkpoint` /
`load_checkpoint`, which `save_state` / `load_state` call, carry the dense store and the
sets. Without DeepSpeed (one process or DDP), the prepared optimizer's `step` is hooked:
each step that really updated the weights (gradients synchronised, not skipped by the
fp16 scaler) counts and drives the schedule; `save_state` and `load_state` run with the
model's state dict in its sparse form (so that the run resumes exactly), `save_state`
writes each rank's store shard next to it and `load_state` restores them after the model,
as the object registered for checkpointing is loaded last.

Whatever saves the model for use (`save_pretrained`, `get_state_dict`, `save_model`)
writes the plain model (ds_topkast.convert.plain_save); `get_state_dict` builds it on the main
process only (the other ranks get the compact sparse form, which they do not save).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from ds_topkast.config import refuse_another_section
from ds_topkast.convert.plain_save import state_dict_form
from ds_topkast.engine.deepspeed_engine import check_engine_config, extend_engine
from ds_topkast.engine.optimizer_adapters import adapter_for_optimizer
from ds_topkast.errors import TopKASTConfigError
from ds_topkast.parallel.collectives import job_collectives
from ds_topkast.runtime.schedule import TopKASTRuntime
from ds_topkast.runtime.state import topkast_state


class TopKASTAccelerate:
    """Drives Top-KAST in a loop an `accelerate.Accelerator` prepared; see the module docstring.

    Create it once, after `accelerator.prepare`, on every rank, with the prepared model and
    optimizer. `runtime` is the run's TopKASTRuntime (its refresher's history holds each
    refresh's mask dynamics).
    """

    def __init__(self, accelerator, model: nn.Module, optimizer):
        self.accelerator = accelerator
        module = accelerator.unwrap_model(model)
        if getattr(module, "topkast_state", None) is None:
            raise TopKASTConfigError("TopKASTAccelerate needs a sparsified model: call ds_topkast.sparsify(model, "
                                     "config) before building the optimizer and accelerator.prepare.")
        self.module = module
        accelerator.get_state_dict = self._in_sparse_form(  # ranks that save nothing need no plain 7B copy
            accelerator.get_state_dict, when=lambda: not accelerator.is_main_process)
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            ds_config = plugin.deepspeed_config
            refuse_another_section(ds_config, topkast_state(module).config, "accelerate's")
            check_engine_config(ds_config)
            self.runtime = extend_engine(model, module, ds_config).topkast
            return
        self.steps = 0
        self.runtime = TopKASTRuntime(module, adapter_for_optimizer(optimizer), job_collectives(),
                                      accelerator.gradient_accumulation_steps)
        self._hook_step(optimizer)
        self._load_dir: Path | None = None
        accelerator.save_state = self._in_sparse_form(accelerator.save_state)
        accelerator.load_state = self._in_sparse_form(accelerator.load_state)
        accelerator.register_save_state_pre_hook(self._save_store)
        accelerator.register_load_state_pre_hook(self._remember_load_dir)
        accelerator.register_for_checkpointing(self)

    def _in_sparse_form(self, method, when=lambda: True):
        """`method` with the model's state dict in its sparse form whenever `when()`, else in the form it is in
        (save_state's own get_state_dict call must stay sparse): save_state and load_state always (to resume
        exactly), get_state_dict off the main process."""
        @functools.wraps(method)
        def in_form(*args, **kwargs):
            with state_dict_form(self.module, plain=False) if when() else nullcontext():
                return method(*args, **kwargs)

        return in_form

    @property
    def history(self):
        """Mask dynamics of every refresh so far (since the run started or resumed)."""
        return self.runtime.refresher.history

    def _hook_step(self, optimizer) -> None:
        """Count the prepared optimizer's real steps and run the schedule after each."""
        step = optimizer.step

        def step_and_refresh(*args, **kwargs):
            result = step(*args, **kwargs)
            if self.accelerator.sync_gradients and not getattr(optimizer, "step_was_skipped", False):
                self.steps += 1
                self.runtime.set_accumulation_steps(self.accelerator.gradient_accumulation_steps)
                self.runtime.after_optimizer_step(self.steps)
            return result

        optimizer.step = step_and_refresh

    def _save_store(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        """accelerate's save-state hook (every rank): this rank's store shard and sets next to the sparse model."""
        self.runtime.save(output_dir, self.steps)

    def _remember_load_dir(self, models: list[nn.Module], input_dir: str) -> None:
        """accelerate's load-state hook, before the models load: where `load_state_dict` finds the store."""
        self._load_dir = Path(input_dir)

    def state_dict(self) -> dict[str, Any]:
        """What accelerate pickles for this object (rank 0's file): the count of optimizer steps."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by `load_state` after the model, optimizer and schedulers: restore the store and sets."""
        if self._load_dir is None:
            raise TopKASTConfigError("TopKASTAccelerate.load_state_dict is called by accelerator.load_state(dir); "
                                     "load the checkpoint folder with it, not by hand.")
        self.steps = int(state["steps"])
        self.runtime.load(self._load_dir, self.steps)
        self._load_dir = None

