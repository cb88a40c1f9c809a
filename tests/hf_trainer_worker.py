"""The Hugging Face Trainer with TopKASTCallback, as the tests run it in-process and on 2 launched ranks.

    deepspeed --num_gpus 2 tests/hf_trainer_worker.py --out DIR [--deepspeed]   # ZeRO-2 bf16
    accelerate launch --multi_gpu --num_processes 2 tests/hf_trainer_worker.py --out DIR [--deepspeed]  # DDP or ZeRO-2
    accelerate launch --multi_gpu --num_processes 2 tests/hf_trainer_worker.py --out DIR --regulariser  # DDP

Each rank trains 4 optimizer steps with gradient accumulation 2 (refresh every 2 steps,
checkpoints every 2), then trains again from checkpoint-2 in a second folder, and writes
its masks, values and store shard of both runs to DIR/rankN.pt for the test to compare.
With --regulariser it instead writes the exploration regulariser's gradient of the first
optimizer step (gradient with λ minus gradient without, same data) with the values it was
taken at, to DIR/regulariser_rankN.pt.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import batches, ds_config, tiny_gpt2  # noqa: E402

TOPKAST = {"forward_sparsity": 0.8, "backward_sparsity": 0.6, "refresh_interval": 2, "exploration_l2": 1e-3}


class Windows(torch.utils.data.Dataset):
    def __init__(self, rows: int, seq: int = 16, seed: int = 1):
        self.data = torch.cat(batches(rows // 4, micro_batch=4, seq=seq, seed=seed))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def deepspeed_trainer_config(gas: int, stage: int = 2) -> dict:
    """A ZeRO config the way Trainer users write it: "auto" wherever the Trainer knows the value (bf16 too)."""
    cfg = ds_config(stage=stage, bf16=True, gas=gas, **TOPKAST)
    cfg.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", train_batch_size="auto",
               gradient_clipping="auto")
    cfg["bf16"] = {"enabled": "auto"}
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}
    if stage == 3:  # so that the Trainer's save_model gathers the model (TopKASTCallback refuses ZeRO-3 without)
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def training_args(out: Path, *, steps: int, gas: int, micro: int, deepspeed: dict | None, save_steps: int | None,
                  lr: float = 1e-2, bf16: bool = True, label_smoothing: float = 0.0):
    from transformers import TrainingArguments

    if deepspeed is None:  # TrainingArguments(deepspeed=...) of an earlier test in this process set it for good
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=micro, gradient_accumulation_steps=gas,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, logging_steps=1, report_to="none", seed=0, use_cpu=not torch.cuda.is_available(),
        bf16=bf16 and (deepspeed is not None or torch.cuda.is_available()), deepspeed=deepspeed, dataloader_num_workers=0, disable_tqdm=True,
        label_smoothing_factor=label_smoothing)


def train(out: Path, *, steps: int = 4, gas: int = 2, micro: int = 2, deepspeed: bool = False,
          save_steps: int | None = 2, resume: str | None = None, stage: int = 2, bf16: bool = True,
          exploration_l2: float | None = None, callbacks: tuple = (), arguments_first: bool = False,
          label_smoothing: float = 0.0, topkast: dict | None = None):
    """One Trainer run of the sparsified tiny GPT-2; returns (model, callback). `topkast` replaces the section.

    `arguments_first`: create the TrainingArguments before the model, as run_clm.py does
    (under a ZeRO-3 config the model is then built inside deepspeed.zero.Init).
    """
    from transformers import Trainer

    import ds_topkast

    config = deepspeed_trainer_config(gas, stage) if deepspeed else {"topkast": dict(TOPKAST)}
    if exploration_l2 is not None:
        config["topkast"]["exploration_l2"] = exploration_l2
    if topkast is not None:
        config["topkast"] = dict(topkast)

    def arguments():
        return training_args(out, steps=steps, gas=gas, micro=micro, deepspeed=config if deepspeed else None,
                             save_steps=save_steps, bf16=bf16, label_smoothing=label_smoothing)

    args = arguments() if arguments_first else None
    model = ds_topkast.sparsify(tiny_gpt2(), config)
    if arguments_first and stage == 3:  # values included: sparsify partitioned them like the weights they replace
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "the model was not built under zero.Init"
    callback = ds_topkast.TopKASTCallback()
    args = args or arguments()
    trainer = Trainer(model=model, args=args, train_dataset=Windows(64), callbacks=[callback, *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return model, callback


def first_step_gradients(out: Path, exploration_l2: float) -> tuple[dict, dict]:
    """Values and their (all-reduced) gradients just before the first optimizer step (DDP or one process)."""
    from transformers import TrainerCallback

    from ds_topkast.core.layers import sparse_layers

    class Catch(TrainerCallback):
        grads: dict = {}
        values: dict = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                for name, layer in sparse_layers(model).items():
                    Catch.grads[name] = layer.values.grad.detach().clone()
                    Catch.values[name] = layer.values.detach().clone()

    # with label smoothing the Trainer computes the loss itself (the model returns none): λ must still apply once
    train(out, steps=1, gas=2, save_steps=None, exploration_l2=exploration_l2, bf16=False, callbacks=(Catch(),),
          label_smoothing=0.1)
    return dict(Catch.values), dict(Catch.grads)


def regulariser_gradient(out: Path, exploration_l2: float) -> dict:
    """The regulariser's gradient of one optimizer step: the same step's gradient with λ minus without λ."""
    values, with_l2 = first_step_gradients(out / "with", exploration_l2)
    _, without = first_step_gradients(out / "without", 0.0)
    return {"values": values, "gradient": {name: with_l2[name] - without[name] for name in with_l2}}


def snapshot(model, callback) -> dict:
    from ds_topkast.core.layers import sparse_layers

    store = callback.runtime.state.store
    layers = sparse_layers(model)
    return {"indices": {n: l.indices.clone() for n, l in layers.items()},
            "forward_mask": {n: l.forward_mask.clone() for n, l in layers.items()},
            "values": {n: l.values.detach().float().clone() for n, l in layers.items()},
            "store": {n: store.read(n).clone() for n in layers},
            "refresh_steps": [d.step for d in callback.history]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--regulariser", type=float, metavar="LAMBDA", help="Write the regulariser's gradient.")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    rank = int(os.environ.get("RANK", 0))
    if args.regulariser is not None:
        torch.save(regulariser_gradient(out, args.regulariser), out / f"regulariser_rank{rank}.pt")
        return
    whole = snapshot(*train(out / "whole", deepspeed=args.deepspeed))
    if rank == 0:
        (out / "resumed").mkdir(parents=True, exist_ok=True)
        shutil.copytree(out / "whole" / "checkpoint-2", out / "resumed" / "checkpoint-2")
    torch.distributed.barrier()
    resumed = snapshot(*train(out / "resumed", deepspeed=args.deepspeed, resume=True))
    torch.save({"whole": whole, "resumed": resumed, "world": torch.distributed.get_world_size()},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
