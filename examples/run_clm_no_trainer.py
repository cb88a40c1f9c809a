"""Causal language modelling in a custom accelerate loop, as transformers' run_clm_no_trainer.py does it, plus Top-KAST.

    accelerate launch --use_deepspeed --deepspeed_config_file configs/accelerate_zero2.json --num_processes 2 \
        examples/run_clm_no_trainer.py --topkast_config configs/accelerate_zero2.json --model_type gpt2 \
        --config_overrides n_layer=4,n_embd=256,n_head=4 --tokenizer_name bytes --output_dir runs/clm_no_trainer \
        --max_train_steps 300 --checkpointing_steps 100
    accelerate launch --multi_gpu --num_processes 2 examples/run_clm_no_trainer.py \
        --topkast_config configs/accelerate_zero2.json ...          # DDP, no DeepSpeed

Our own script, written to drive accelerate exactly the way run_clm_no_trainer.py does, so
that what works here works there with the same three added lines (marked "Top-KAST"): an
`Accelerator` (with DeepSpeed when `accelerate launch` gives it a DeepSpeed config, any
ZeRO stage, `--zero3_init_flag true` building the model inside `deepspeed.zero.Init`), an
AdamW over weight-decay groups and a scheduler built by the script, `accelerator.prepare`,
`accelerator.accumulate` / `backward`, `save_state` every `--checkpointing_steps` into
`output_dir/step_N`, `--resume_from_checkpoint` through `load_state` (skipping the batches
already seen), evaluation, and the model saved with
`unwrap_model(model).save_pretrained(..., state_dict=accelerator.get_state_dict(model))`.
Two changes any exactly resumable accelerate run needs, whatever it trains: accelerate's
seedable sampler, so that the resumed run shuffles as the whole one did, and the training
loader's own generator, so that starting its iterator draws nothing from the global RNG
that dropout uses and `load_state` restores (with run_clm_no_trainer.py's loader, a resumed
run gets another shuffle and other dropout masks). The data, the byte tokenizer and the
model come from examples/run_clm.py (no network).
Rank 0 writes `results.json`: its loss at each optimizer step, the eval loss and each
refresh's mask dynamics.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from run_clm import DataTrainingArguments, ModelArguments, build_model, byte_tokenizer, grouped_blocks, load_texts
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, default_data_collator, get_scheduler

import ds_topkast  # Top-KAST, line 1

NO_DECAY = ("bias", "ln_", "norm")  # transformers' ("bias", "layer_norm.weight"), with GPT-2's and Llama's names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_type", default="gpt2")
    parser.add_argument("--config_overrides", default=None, help="Config fields, e.g. n_layer=4,n_embd=256")
    parser.add_argument("--tokenizer_name", default="bytes", help="A tokenizer folder or name; 'bytes': byte-level")
    parser.add_argument("--train_file", default=None, help="A .txt file; default: the embedded corpus")
    parser.add_argument("--validation_file", default=None)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--lr_scheduler_type", default="linear")
    parser.add_argument("--num_warmup_steps", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing_steps", type=int, default=None, help="save_state every N optimizer steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="A step_N folder save_state wrote")
    parser.add_argument("--topkast_config", default=None, help='A JSON file with the "topkast" section')
    parser.add_argument("--dense", action="store_true", help="Train without Top-KAST (the dense baseline)")
    return parser.parse_args(argv)


def without_gpus() -> dict:
    """accelerate's settings for ranks without GPUs (as on the test machine), empty with GPUs: DeepSpeed's ranks
    need gloo named, or accelerate counts them as one process (each reads every batch and thinks itself the main
    process); DDP's need `cpu=True`, or accelerate does not wrap the model."""
    if torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(k in n for k in NO_DECAY)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(k in n for k in NO_DECAY)], "weight_decay": 0.0}]


def evaluate(accelerator: Accelerator, model, loader) -> float:
    """The mean loss over the evaluation blocks of every rank (a rank's padding blocks, if any, count too)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # sum of block losses, blocks
    for batch in loader:
        with torch.no_grad():
            total += torch.stack([model(**batch).loss.float() * len(batch["input_ids"]),
                                  torch.tensor(float(len(batch["input_ids"])), device=total.device)])
    model.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # exact resumes
                              **without_gpus())
    set_seed(args.seed)

    raw = load_texts(DataTrainingArguments(train_file=args.train_file, validation_file=args.validation_file))
    tokenizer = byte_tokenizer() if args.tokenizer_name == "bytes" else AutoTokenizer.from_pretrained(
        args.tokenizer_name)
    model = build_model(ModelArguments(model_type=args.model_type, config_overrides=args.config_overrides),
                        len(tokenizer))
    if not args.dense:
        model = ds_topkast.sparsify(model, args.topkast_config)  # Top-KAST, line 2
    with accelerator.main_process_first():
        blocks = grouped_blocks(raw, tokenizer, args.block_size)
    eval_blocks = blocks["validation"]
    if args.max_eval_samples is not None:
        eval_blocks = eval_blocks.select(range(min(len(eval_blocks), args.max_eval_samples)))
    train_loader = DataLoader(blocks["train"], shuffle=True, collate_fn=default_data_collator,
                              batch_size=args.per_device_train_batch_size, generator=torch.Generator())
    eval_loader = DataLoader(eval_blocks, collate_fn=default_data_collator, batch_size=args.per_device_eval_batch_size)

    optimizer = torch.optim.AdamW(weight_decay_groups(model, args.weight_decay), lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    topkast = None if args.dense else ds_topkast.TopKASTAccelerate(accelerator, model, optimizer)  # Top-KAST, line 3
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    epochs = math.ceil(max_train_steps / steps_per_epoch)

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        completed_steps = int(Path(args.resume_from_checkpoint).name.removeprefix("step_"))
        start_epoch = completed_steps // steps_per_epoch
        skip_batches = completed_steps % steps_per_epoch * args.gradient_accumulation_steps
    step_losses: dict[int, float] = {}
    model.train()
    for epoch in range(start_epoch, epochs):
        loader = accelerator.skip_first_batches(train_loader, skip_batches) if epoch == start_epoch else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
                step_losses[completed_steps] = loss.item()  # this rank's, of the step's last micro-batch
                if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                    accelerator.save_state(os.path.join(args.output_dir, f"step_{completed_steps}"))
            if completed_steps >= max_train_steps:
                break
        if completed_steps >= max_train_steps:
            break

    eval_loss = evaluate(accelerator, model, eval_loader)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        refreshes = [dynamics.as_dict() for dynamics in topkast.history] if topkast else []
        Path(args.output_dir, "results.json").write_text(json.dumps(
            {"eval_loss": eval_loss, "step_losses": step_losses, "refreshes": refreshes}))


if __name__ == "__main__":
    main()
