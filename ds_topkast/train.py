"""The training command: a GPT-style byte-level LM trained with Top-KAST under the deepspeed launcher.

    deepspeed --module ds_topkast.train --config configs/tiny_gpt2.json

One JSON file holds everything: DeepSpeed's own sections, the "topkast" section and a
"train" section for this command (model, data, steps, evaluation, checkpoints;
DeepSpeed ignores unknown top-level sections). Flags override the few things people
change per run. The run prints a progress bar, periodic eval bits per byte, each
refresh's mask dynamics and the memory report, writes metrics.jsonl and a checkpoint
to --out, and continues a stopped run exactly with --resume.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ds_topkast.config import TopKASTConfigError, load_deepspeed_config, validate_section
from ds_topkast.data import BYTE_VOCAB, ByteBatches, load_bytes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    path: str | None = Field(None, description="Text file or folder; none: the embedded stdlib-source corpus.")
    max_bytes: int | None = Field(None, gt=0, description="Read at most this many bytes of the corpus.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Trailing fraction of the bytes held out for eval.")


class TrainConfig(_Strict):
    """The "train" section: what the command trains and for how long."""

    model: dict[str, Any] = Field(default_factory=lambda: {"type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4},
                                  description="transformers model_type plus its config fields (random init).")
    data: DataConfig = Field(default_factory=DataConfig)
    seq_len: int = Field(128, gt=1)
    steps: int = Field(200, gt=0, description="Optimizer steps.")
    eval_interval: int = Field(50, gt=0)
    eval_batches: int = Field(4, gt=0)
    checkpoint_interval: int | None = Field(None, gt=0, description="Also save every N steps (always at the end).")
    seed: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with \"topkast\" and \"train\" sections.")
    parser.add_argument("--out", default="runs/tiny", help="Folder for checkpoints and metrics.jsonl.")
    parser.add_argument("--steps", type=int, help="Override train.steps.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in --out.")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="Set by the deepspeed launcher.")
    return parser.parse_args(argv)


def train_section(ds_config: dict[str, Any], steps: int | None) -> TrainConfig:
    cfg = validate_section(TrainConfig, ds_config.get("train", {}), "train")
    return cfg.model_copy(update={"steps": steps}) if steps is not None else cfg


def fill_schedule_length(ds_config: dict[str, Any], steps: int) -> None:
    """Give DeepSpeed's warm-up/decay schedulers train.steps as their length unless the config sets one."""
    scheduler = ds_config.get("scheduler", {})
    if scheduler.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        scheduler.setdefault("params", {}).setdefault("total_num_steps", steps)


def build_model(spec: dict[str, Any], seq_len: int, seed: int) -> torch.nn.Module:
    """A randomly initialised causal LM from a transformers model_type and config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(spec)
    model_type = fields.pop("type", None)
    if model_type is None:
        raise TopKASTConfigError('train.model needs a "type" (a transformers model_type such as "gpt2", "llama").')
    fields.setdefault("vocab_size", BYTE_VOCAB)
    position_key = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    fields.setdefault(position_key, seq_len)
    fields.update(bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)  # identical initial weights (and so identical dense stores) on every rank
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))


class Trainer:
    """The loop: fixed global batches per step, periodic eval, checkpoints, metrics."""

    def __init__(self, engine, data: ByteBatches, cfg: TrainConfig, out: Path):
        import deepspeed.comm as dist

        self.engine, self.data, self.cfg, self.out = engine, data, cfg, out
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rows = engine.train_micro_batch_size_per_gpu()
        self.metrics = out / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            monitor = self.engine.monitor
            if monitor.enabled:
                monitor.write_events([(f"Train/{k}", float(v), record["step"]) for k, v in record.items()
                                      if k not in ("step", "kind")])

    def say(self, message: str, bar) -> None:
        if self.rank == 0:
            bar.write(message)

    def train_step(self, step: int) -> float:
        """One optimizer step; returns the loss averaged over micro-batches and ranks."""
        import deepspeed.comm as dist

        total = torch.zeros(1, dtype=torch.float64)
        for micro in range(self.engine.gradient_accumulation_steps()):
            batch = self.data.train_batch(step, micro, self.rows, self.rank, self.world)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        dist.all_reduce(total)
        return float(total) / (self.world * self.engine.gradient_accumulation_steps())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Eval bits per byte over the eval batches, split across ranks and all-reduced."""
        import deepspeed.comm as dist

        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(self.data.eval_batches(self.rows, self.cfg.eval_batches)):
            if i % self.world == self.rank:
                total += torch.tensor([self.engine(input_ids=batch, labels=batch).loss.item(), 1.0])
        dist.all_reduce(total)
        self.engine.train()
        return float(total[0] / total[1]) / math.log(2)

    def save(self) -> None:
        self.engine.save_checkpoint(str(self.out))

    def run(self) -> None:
        from tqdm import tqdm

        start = self.engine.global_steps
        bar = tqdm(total=self.cfg.steps, initial=start, disable=self.rank != 0, desc="train", unit="step")
        seen_refreshes = len(self.engine.topkast.refresher.history)
        tick = time.perf_counter()
        for step in range(start, self.cfg.steps):
            loss = self.train_step(step)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{loss / math.log(2):.3f}")
            history = self.engine.topkast.refresher.history
            for dynamics in history[seen_refreshes:]:
                self.say(f"step {dynamics.step}: refresh, A changed {dynamics.forward_changed:.2%}, "
                         f"B changed {dynamics.backward_changed:.2%}, ever in B {dynamics.ever_in_backward:.2%}", bar)
                self.log({"kind": "refresh", **dynamics.as_dict()})
            seen_refreshes = len(history)
            if done % self.cfg.eval_interval == 0 or done == self.cfg.steps:
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                record = {"kind": "eval", "step": done, "train_loss": loss, "eval_bpb": self.evaluate(),
                          "lr": self.engine.get_lr()[0], "seconds": elapsed}
                self.say(f"step {done}: train loss {loss:.4f}, eval bits/byte {record['eval_bpb']:.4f}", bar)
                self.log(record)
            if self.cfg.checkpoint_interval and done % self.cfg.checkpoint_interval == 0 and done < self.cfg.steps:
                self.save()
        bar.close()
        if self.engine.global_steps > start or not (self.out / "latest").exists():
            self.save()


def main(argv=None) -> None:
    import ds_topkast

    args = parse_args(argv)
    ds_config = load_deepspeed_config(args.config)
    cfg = train_section(ds_config, args.steps)
    fill_schedule_length(ds_config, cfg.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and not (out / "latest").exists():
        raise SystemExit(f"--resume: {out} holds no checkpoint (no 'latest' file); run without --resume first.")
    data = ByteBatches(load_bytes(cfg.data.path, cfg.data.max_bytes), cfg.seq_len, cfg.data.eval_fraction, cfg.seed)
    model = build_model(cfg.model, cfg.seq_len, cfg.seed)
    engine, *_ = ds_topkast.initialize(model=model, config=ds_config)
    if args.resume:
        engine.load_checkpoint(str(out))
    trainer = Trainer(engine, data, cfg, out)
    if trainer.rank == 0:
        print(ds_topkast.memory_report(engine).format(), flush=True)
    trainer.run()


if __name__ == "__main__":
    main()
