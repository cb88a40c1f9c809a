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
- when the Trainer is about to save a checkpoint (`control.should_save`), each rank's
  store shard and sets go into `checkpoint-N/` first, so a checkpoint folder never lacks
  them; resuming (`global_step > 0` at `on_train_begin`) loads them back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ds_topkast.collectives import job_collectives
from ds_topkast.config import (SECTION, TopKASTConfigError, load_deepspeed_config, refuse_loss_scaling,
                               topkast_section)
from ds_topkast.optimizer_state import adapter_for_optimizer
from ds_topkast.runtime import TopKASTRuntime
from ds_topkast.sparsify import topkast_state


def _deepspeed_config(args) -> dict[str, Any]:
    """The DeepSpeed config the Trainer uses ("auto" values filled), or {} without DeepSpeed."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    return load_deepspeed_config(args.deepspeed) if getattr(args, "deepspeed", None) else {}


class TopKASTCallback(TrainerCallback):
    """Refreshes, exploration penalty and checkpoint files of a sparsified model trained by the HF Trainer.

    `resume_from`: the checkpoint folder to take the dense store from when resuming from a
    folder outside `output_dir` (default: `output_dir/checkpoint-<global_step>`).
    """

    def __init__(self, resume_from: str | None = None):
        self.resume_from = resume_from
        self.runtime: TopKASTRuntime | None = None

    def on_train_begin(self, args, state, control, model: nn.Module = None, optimizer=None, **kwargs):
        ds_config = _deepspeed_config(args)
        refuse_loss_scaling(ds_config, trainer_fp16=bool(getattr(args, "fp16", False)))
        cfg = topkast_state(model).config
        if SECTION in ds_config and topkast_section(ds_config) != cfg:
            raise TopKASTConfigError('The model was sparsified with a different "topkast" section than the '
                                     "Trainer's DeepSpeed config holds; sparsify with the same config file.")
        if self.runtime is None:
            self.runtime = TopKASTRuntime(model, adapter_for_optimizer(optimizer), job_collectives(),
                                          args.gradient_accumulation_steps, ds_config.get("aio"))
        else:  # a later trainer.train() call builds a new optimizer, maybe under other arguments
            self.runtime.refresher.adapter = adapter_for_optimizer(optimizer)
            self.runtime.set_accumulation_steps(args.gradient_accumulation_steps)
        if state.global_step > 0:
            self.runtime.load(self._resume_folder(args, state.global_step), state.global_step)

    def _resume_folder(self, args, step: int) -> Path:
        folder = Path(self.resume_from) if self.resume_from else Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not folder.is_dir():
            raise TopKASTConfigError(
                f"Resuming at step {step}, but {folder} does not exist, so the dense store cannot be restored. "
                "When resuming from a checkpoint outside output_dir, pass TopKASTCallback(resume_from=<that folder>).")
        return folder

    def on_step_end(self, args, state, control, **kwargs):
        self.runtime.after_optimizer_step(state.global_step)
        self._save_if_due(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save_if_due(args, state, control)

    def _save_if_due(self, args, state, control) -> None:
        if control.should_save:
            self.runtime.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    @property
    def history(self):
        """Mask dynamics of every refresh so far."""
        return self.runtime.refresher.history if self.runtime else []
