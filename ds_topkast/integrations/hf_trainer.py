"""Top-KAST inside the Hugging Face Trainer, with DeepSpeed (any ZeRO stage) or without it.

    model = ds_topkast.sparsify(AutoModelForCausalLM.from_config(config), "ds_config.json")
    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                      train_dataset=data, callbacks=[ds_topkast.TopKASTCallback()])
    trainer.train()          # or trainer.train(resume_from_checkpoint=True)

The Trainer builds the DeepSpeed engine itself (inside `accelerator.prepare`) and hands
callbacks the unwrapped model and accelerate's optimizer wrapper, so the callback works
from those two: the optimizer (DeepSpeed's ZeRO/bf16 wrapper, or a plain torch optimizer
without DeepSpeed) gives the optimizer-state adapter, and the process group gives the
collectives. Then, through one `TopKASTRuntime`:
- after every optimizer step (`on_step_end`; the Trainer counts gradient accumulation)
  the refresh or the re-selection of A inside B runs on schedule;
- the exploration regulariser needs nothing from the Trainer: each sparse layer adds its
  gradient in backward, once per optimizer step (the callback tells the layers the
  accumulation steps), so it is exact on any number of ranks and with any loss;
- when the Trainer is about to save a checkpoint (`control.should_save` at the end of a
  step or epoch), each rank's store shard and sets go into `checkpoint-N/` first, so a
  checkpoint folder never lacks them; a checkpoint decided after evaluation
  (`save_strategy="best"`) gets them in `on_save`, just after the Trainer's files;
- resuming (`global_step > 0` at `on_train_begin`) loads them back from the checkpoint the
  Trainer resumed from; `load_best_model_at_end` restores the best checkpoint's with its
  values (`on_train_end`);
- the model files the Trainer writes are the plain model (see ds_topkast.convert.plain_save), so
  without DeepSpeed, whose checkpoint holds the values, B's values go into the
  `topkast_rankN.pt` files too; with DeepSpeed, the model's state dict is the sparse form
  from `on_train_begin` to `on_train_end`, so that DeepSpeed's checkpoints resume exactly;
  the plain form is back after training;
- each refresh's mask dynamics and, at the first log, the memory report go into the
  Trainer's logs (`on_log`) as `topkast/...`: the console, `trainer_state.json` and the
  reporting integrations (TensorBoard, W&B, ...) receive them.
"""
from __future__ import annotations

import gc
import logging
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ds_topkast.config import load_deepspeed_config, refuse_another_section, refuse_loss_scaling, take_io_settings
from ds_topkast.convert.plain_save import state_dict_form
from ds_topkast.engine.memory_accounting import trainer_memory_report
from ds_topkast.engine.optimizer_adapters import adapter_for_optimizer
from ds_topkast.errors import TopKASTConfigError
from ds_topkast.parallel.collectives import job_collectives
from ds_topkast.runtime.schedule import TopKASTRuntime
from ds_topkast.runtime.state import topkast_state

logger = logging.getLogger("ds_topkast")


def _deepspeed_config(args) -> dict[str, Any]:
    """The DeepSpeed config the Trainer uses ("auto" values filled), or {} without DeepSpeed."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    plugin = getattr(args, "deepspeed_plugin", None)  # `accelerate launch` with a DeepSpeed config file
    if plugin is not None:
        return plugin.deepspeed_config
    return load_deepspeed_config(args.deepspeed) if getattr(args, "deepspeed", None) else {}


class TopKASTCallback(TrainerCallback):
    """Refreshes, checkpoint files and logs of a sparsified model trained by the Hugging Face Trainer.

    `resume_from`: the checkpoint folder to take the dense store from when resuming. By
    default it is `args.resume_from_checkpoint` when that names a folder (what run_clm.py
    and `--resume_from_checkpoint PATH` set), else `output_dir/checkpoint-<global_step>`
    (what `trainer.train(resume_from_checkpoint=True)` resumes from).
    """

    def __init__(self, resume_from: str | None = None):
        self.resume_from = resume_from
        self.runtime: TopKASTRuntime | None = None
        self._unlogged: list[dict[str, float]] = []
        self._memory_logged = False
        self._deepspeed = False
        self._ds_config: dict[str, Any] = {}
        self._optimizer = None
        self._model: nn.Module | None = None
        self._saved_step: int | None = None  # the step this callback last wrote checkpoint files for
        self._sparse_saves: ExitStack | None = None  # holds the sparse state-dict form while training with DeepSpeed

    def on_train_begin(self, args, state, control, model: nn.Module = None, optimizer=None, **kwargs):
        ds_config = _deepspeed_config(args)
        refuse_loss_scaling(ds_config, trainer_fp16=bool(getattr(args, "fp16", False)))
        refuse_another_section(ds_config, topkast_state(model).config, "the Trainer's")
        _require_gathered_saves(ds_config)
        self._deepspeed, self._ds_config, self._optimizer, self._model = bool(ds_config), ds_config, optimizer, model
        if self.runtime is None:
            take_io_settings(topkast_state(model).config, ds_config)
            self.runtime = TopKASTRuntime(model, adapter_for_optimizer(optimizer), job_collectives(),
                                          args.gradient_accumulation_steps)
        else:  # a later trainer.train() call builds a new optimizer, maybe under other arguments
            self.runtime.use_optimizer(adapter_for_optimizer(optimizer))
            self.runtime.set_accumulation_steps(args.gradient_accumulation_steps)
        _report_before_integrations(self)
        self._restore_plain_form()  # left on by a train() that raised, maybe for another model (model_init)
        if self._deepspeed:  # DeepSpeed's checkpoints hold the module's values
            self._sparse_saves = ExitStack()
            self._sparse_saves.enter_context(state_dict_form(model, plain=False))
        if state.global_step > 0:
            self.runtime.load(self._resume_folder(args, state.global_step), state.global_step)

    def _resume_folder(self, args, step: int) -> Path:
        named = self.resume_from or args.resume_from_checkpoint
        if named and named != "True":
            if not Path(named).is_dir():
                raise TopKASTConfigError(f"Resuming at step {step} from {named}, which is not a folder, so the dense "
                                         "store cannot be restored; name the checkpoint folder the run resumes from.")
            return Path(named)
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not folder.is_dir():
            raise TopKASTConfigError(
                f"Resuming at step {step}, but {folder} does not exist, so the dense store cannot be restored. "
                "When resuming from a checkpoint outside output_dir, set --resume_from_checkpoint to it (or pass "
                "TopKASTCallback(resume_from=<that folder>)).")
        return folder

    def on_step_end(self, args, state, control, **kwargs):
        dynamics = self.runtime.after_optimizer_step(state.global_step)
        if dynamics is not None:
            self._unlogged.append({**dynamics.as_dict(), "refresh_seconds": self.runtime.last_refresh_seconds})
        self._save_if_due(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save_if_due(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint decided after evaluation (save_strategy="best") gets the files now, after the Trainer's."""
        if self._saved_step != state.global_step:
            self._save(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        """After `load_best_model_at_end` reloaded the best checkpoint's model, restore its store and sets too."""
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None and Path(best).is_dir():
            found = re.search(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)$", str(best).rstrip("/"))
            self.runtime.load(best, int(found.group(1)) if found else state.global_step)
        self._restore_plain_form()  # after training, model.state_dict() is the plain model again

    def _restore_plain_form(self) -> None:
        """End the sparse state-dict form this callback entered, if it did."""
        if self._sparse_saves is not None:
            self._sparse_saves.close()
            self._sparse_saves = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Each refresh's mask dynamics since the last log, and once the memory report, as topkast/... entries."""
        if logs is None or self.runtime is None:
            return
        entries = {}
        for dynamics in self._unlogged:  # several refreshes between two logs: the latest wins
            entries.update({f"topkast/{k}": float(v) for k, v in dynamics.items() if k != "step"})
            entries["topkast/refresh_step"] = dynamics["step"]
        self._unlogged.clear()
        if not self._memory_logged:
            report = trainer_memory_report(self._model, self._ds_config, self._optimizer,
                                           self.runtime.comm.world)
            entries.update({f"topkast/memory_{k}": float(v) for k, v in report.as_dict().items()})
            self._memory_logged = True
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)  # the Trainer appended its copy before calling on_log

    def _save_if_due(self, args, state, control) -> None:
        if control.should_save:
            self._save(args, state)

    def _save(self, args, state) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.runtime.save(folder, state.global_step, values=not self._deepspeed)
        self._saved_step = state.global_step

    @property
    def history(self):
        """Mask dynamics of every refresh so far."""
        return self.runtime.refresher.history if self.runtime else []


def _require_gathered_saves(ds_config: dict[str, Any]) -> None:
    """Under ZeRO-3 the Trainer saves the model only if DeepSpeed gathers it; else the saved model lacks the layers."""
    zero = ds_config.get("zero_optimization", {})
    gathered = ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
                "stage3_gather_fp16_weights_on_model_save")  # the last one DeepSpeed's deprecated name
    if zero.get("stage") == 3 and not any(zero.get(key) is True for key in gathered):
        raise TopKASTConfigError(
            "ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save: the Trainer would save the "
            "model without its sparse layers' weights (DeepSpeed's partitions only). Set it to true in the "
            "DeepSpeed config, so that save_model() writes the plain model.")


def _report_before_integrations(callback: TrainerCallback) -> None:
    """Move the callback ahead of the Trainer's reporting integrations, so their on_log sees its entries.

    The Trainer puts the integrations (TensorBoard, W&B, ...) before the callbacks a user
    passes and gives callbacks no handle on its list; the list is found as the one object
    holding this callback. Moving an entry earlier while the Trainer iterates the list
    (this runs inside on_train_begin) skips and repeats nothing: the moved entries have
    all been visited.
    """
    from transformers.trainer_callback import DefaultFlowCallback

    found = False
    for holder in gc.get_referrers(callback):  # every Trainer's list, should one callback serve several
        if isinstance(holder, list) and any(isinstance(c, DefaultFlowCallback) for c in holder):
            found = True
            first_integration = next((i for i, c in enumerate(holder)
                                      if type(c).__module__.startswith("transformers.integrations")), None)
            if first_integration is not None and first_integration < holder.index(callback):
                holder.remove(callback)
                holder.insert(first_integration, callback)
    if not found:
        logger.warning("TopKASTCallback could not find the Trainer's callback list: its topkast/ log entries reach "
                       "the console and trainer_state.json but not reporting integrations placed before it.")
