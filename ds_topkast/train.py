"""The training command: a language model trained with Top-KAST under the deepspeed launcher.

    deepspeed --module ds_topkast.train --config configs/tiny_gpt2.json --out runs/tiny

One JSON file holds everything: DeepSpeed's own sections (batch sizes, gradient
accumulation and clipping, optimizer, warm-up + cosine scheduler, ZeRO, bf16, and its
"tensorboard" / "csv_monitor" monitors), the "topkast" section, and a "train" section for
this command (model, data, steps, evaluation, checkpoints; DeepSpeed ignores unknown
top-level sections). Without a "topkast" section the same command trains the model
dense with plain DeepSpeed, the baseline to compare against.

The run prints the memory report, a progress bar, periodic evaluation (bits per byte,
or perplexity for token corpora) and each refresh's mask dynamics; writes metrics.jsonl,
the monitor's events, checkpoints every `checkpoint_interval` steps and at the end, and
a plot of the losses and mask dynamics (training.png); `--resume` continues a stopped
run exactly where its latest checkpoint left it.
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

from ds_topkast.checkpoint import load_file
from ds_topkast.collectives import ProcessGroupCollectives, release_cpu_shm_buffer
from ds_topkast.config import SECTION, TopKASTConfigError, load_deepspeed_config, validate_section
from ds_topkast.data import DataConfig, load_corpus
from ds_topkast.families import make_family
from ds_topkast.init_from import tag_folder


class TrainConfig(BaseModel):
    """The "train" section: what the command trains and for how long."""

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any] = Field(default_factory=lambda: {"type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4},
                                  description='"type" (a transformers model_type, or "transformer_xl" with an '
                                              'optional "preset"), "config" or "pretrained", plus config fields.')
    data: DataConfig = Field(default_factory=DataConfig)
    seq_len: int | None = Field(None, gt=1, description="Tokens per window (GPT-style, default 128) or per "
                                                        "segment (Transformer-XL, default its tgt_len).")
    steps: int = Field(200, gt=0, description="Optimizer steps.")
    eval_interval: int = Field(50, gt=0)
    eval_batches: int | None = Field(8, gt=0, description="Eval batches (Transformer-XL: segments per stream); "
                                                          "null: the whole eval split for Transformer-XL.")
    log_interval: int = Field(10, gt=0, description="Steps between train-loss records.")
    checkpoint_interval: int | None = Field(None, gt=0, description="Also save every N steps (always at the end).")
    plot: bool = Field(True, description="Write training.png (losses, mask dynamics) next to the checkpoint.")
    seed: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with \"topkast\" and \"train\" sections.")
    parser.add_argument("--out", default="runs/tiny", help="Folder for checkpoints, metrics.jsonl and the plot.")
    parser.add_argument("--steps", type=int, help="Override train.steps.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in --out.")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="Start a new run from the weights of a checkpoint (a tag folder, or a run folder's "
                             "latest) at this config's sparsity: how a run changes its topkast settings. The "
                             "optimizer state and schedule start afresh.")
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


def micro_batch_per_rank(ds_config: dict[str, Any], world: int) -> int:
    """train_micro_batch_size_per_gpu, or train_batch_size / (gradient_accumulation_steps * world) as DeepSpeed does."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if isinstance(micro, int):
        return micro
    total, accumulation = ds_config.get("train_batch_size"), ds_config.get("gradient_accumulation_steps", 1)
    if isinstance(total, int) and isinstance(accumulation, int) and total % (accumulation * world) == 0:
        return total // (accumulation * world)
    raise TopKASTConfigError(
        f"The training command needs train_micro_batch_size_per_gpu, or a train_batch_size ({total}) divisible by "
        f"gradient_accumulation_steps ({accumulation}) x ranks ({world}), as numbers in the DeepSpeed config; "
        "set one of them.")


def train_state_path(out: Path, steps: int, rank: int) -> Path:
    return out / f"global_step{steps}" / f"train_state_rank{rank:05d}.pt"


class Trainer:
    """The loop: fixed global batches per step, periodic eval, checkpoints, metrics, plot."""

    def __init__(self, engine, family, cfg: TrainConfig, out: Path, unit: str):
        self.engine, self.family, self.cfg, self.out, self.unit = engine, family, cfg, out, unit
        self.comm = ProcessGroupCollectives()  # moves host tensors to the accelerator for NCCL and back
        self.rank, self.world = self.comm.rank, self.comm.world
        self.accumulation = engine.gradient_accumulation_steps()
        self.tokens_per_step = engine.train_batch_size() * family.tokens_per_row
        self.metrics = out / "metrics.jsonl"
        self.refresher = getattr(getattr(engine, "topkast", None), "refresher", None)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.engine.monitor.enabled:
                self.engine.monitor.write_events([(f"{record['kind']}/{k}", float(v), record["step"])
                                                  for k, v in record.items() if k not in ("step", "kind")])

    def say(self, message: str, bar) -> None:
        if self.rank == 0:
            bar.write(message)

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step; returns the loss averaged over micro-batches and ranks, and the exploration penalty.

        The penalty (its gradient is applied inside the sparse layers' backward) is the
        value at the last micro-batch, the same on every rank; one host sync per step.
        """
        from ds_topkast.layers import exploration_penalty

        losses = []
        for micro in range(self.accumulation):
            loss = self.family.train_loss(self.engine, step, micro, self.rank, self.world)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        total = torch.stack(losses).double().sum() / (self.world * self.accumulation)
        penalty = exploration_penalty(self.engine.module)
        penalty = penalty.double() / self.world if torch.is_tensor(penalty) else total.new_zeros(())
        total, penalty = self.comm.all_reduce_sum(torch.stack([total, penalty])).tolist()
        return total, penalty

    def evaluate(self) -> dict[str, float]:
        """Eval loss over every rank's share, as bits per byte (byte corpora) or perplexity (tokens)."""
        self.engine.eval()
        sums = self.comm.all_reduce_sum(self.family.eval_sums(self.engine, self.cfg.eval_batches, self.rank,
                                                              self.world))
        self.engine.train()
        loss = float(sums[0] / sums[1])
        quality = {"eval_bpb": loss / math.log(2)} if self.unit == "byte" else {"eval_ppl": math.exp(min(loss, 50))}
        return {"eval_loss": loss, **quality}

    def save(self) -> None:
        """This rank's loop state first (random generators, Transformer-XL memory), then DeepSpeed's checkpoint.

        DeepSpeed checkpoints neither, and without the generators dropout would draw
        other masks after a resume; ds_topkast's engine writes `latest` last of all.
        """
        from deepspeed.accelerator import get_accelerator

        path = train_state_path(self.out, self.engine.global_steps, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"family": self.family.state_dict(), "cpu_rng": torch.get_rng_state(),
                 "accelerator_rng": get_accelerator().get_rng_state()}
        partial = path.with_suffix(".pt.partial")
        torch.save(state, partial)
        os.replace(partial, path)
        self.engine.save_checkpoint(str(self.out))

    def resume(self) -> None:
        from deepspeed.accelerator import get_accelerator

        self.engine.load_checkpoint(str(self.out))
        path = train_state_path(self.out, self.engine.global_steps, self.rank)
        if not path.is_file():
            raise SystemExit(f"--resume: {path} is missing, so rank {self.rank}'s random generators (and "
                             "Transformer-XL memory) cannot be restored; resume from a complete checkpoint.")
        state = load_file(path)
        self.family.load_state_dict(state["family"], self.engine.device)
        torch.set_rng_state(state["cpu_rng"])
        get_accelerator().set_rng_state(state["accelerator_rng"])
        self.forget_metrics_after(self.engine.global_steps)

    def forget_metrics_after(self, step: int) -> None:
        """Drop records of the steps after the resumed checkpoint (a stopped run re-runs them) and torn lines."""
        if self.rank != 0 or not self.metrics.is_file():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                continue
        partial = self.metrics.with_suffix(".jsonl.partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, self.metrics)

    def report_refreshes(self, seen: int, bar) -> int:
        if self.refresher is None:
            return seen
        for dynamics in self.refresher.history[seen:]:
            self.say(f"step {dynamics.step}: refresh, A changed {dynamics.forward_changed:.2%}, "
                     f"B changed {dynamics.backward_changed:.2%}, ever in B {dynamics.ever_in_backward:.2%}", bar)
            self.log({"kind": "refresh", **dynamics.as_dict()})
        return len(self.refresher.history)

    def run(self) -> None:
        from tqdm import tqdm

        start = self.engine.global_steps
        bar = tqdm(total=self.cfg.steps, initial=start, disable=self.rank != 0, desc="train", unit="step")
        seen = len(self.refresher.history) if self.refresher else 0
        tick, ticked = time.perf_counter(), start
        for step in range(start, self.cfg.steps):
            loss, penalty = self.train_step(step)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.engine.get_lr()[0]:.2e}")
            seen = self.report_refreshes(seen, bar)
            if done % self.cfg.log_interval == 0 or done == self.cfg.steps:
                seconds, tick = time.perf_counter() - tick, time.perf_counter()
                self.log({"kind": "train", "step": done, "loss": loss, "exploration_penalty": penalty,
                          "lr": self.engine.get_lr()[0],
                          "tokens_per_s": self.tokens_per_step * (done - ticked) / seconds})
                ticked = done
            if done % self.cfg.eval_interval == 0 or done == self.cfg.steps:
                record = {"kind": "eval", "step": done, **self.evaluate()}
                self.say(f"step {done}: train loss {loss:.4f}, " + ", ".join(
                    f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items() if k.startswith("eval")), bar)
                self.log(record)
                tick = time.perf_counter()  # eval time does not count against throughput
            if self.cfg.checkpoint_interval and done % self.cfg.checkpoint_interval == 0 and done < self.cfg.steps:
                self.save()
        bar.close()
        if self.engine.global_steps > start or not (self.out / "latest").exists():
            self.save()
        if self.cfg.plot and self.rank == 0:
            from ds_topkast.plots import plot_run

            print(f"plot: {plot_run(self.metrics, self.out / 'training.png')}", flush=True)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """ds_topkast's engine when the config has a "topkast" section, else plain DeepSpeed (the dense baseline)."""
    import deepspeed

    import ds_topkast

    if SECTION in ds_config:
        engine, *_ = ds_topkast.initialize(model=model, config=ds_config)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def main(argv=None) -> None:
    import deepspeed
    import deepspeed.comm as dist

    import ds_topkast

    args = parse_args(argv)
    ds_config = load_deepspeed_config(args.config)
    cfg = train_section(ds_config, args.steps)
    fill_schedule_length(ds_config, cfg.steps)
    out = Path(args.out)
    if args.resume and args.init_from:
        raise SystemExit("--resume continues a run and --init-from starts a new one from a checkpoint's weights; "
                         "give one of them.")
    if args.init_from:
        tag_folder(args.init_from)  # a wrong path fails here, before any rank starts work
    if args.resume and not (out / "latest").exists():
        raise SystemExit(f"--resume: {out} holds no checkpoint (no 'latest' file); run without --resume first.")
    if not args.resume and (out / "latest").exists():
        raise SystemExit(f"{out} already holds a run (its 'latest' checkpoint); add --resume to continue it, or "
                         "give a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    deepspeed.init_distributed()
    corpus = load_corpus(cfg.data)
    world, accumulation = dist.get_world_size(), ds_config.get("gradient_accumulation_steps", 1)
    family = make_family(cfg.model, corpus, cfg.seq_len, micro_batch_per_rank(ds_config, world), cfg.seed, world,
                         accumulation)
    model = family.build_model()
    if args.init_from:
        ds_topkast.load_dense_weights(model, args.init_from)
    engine = build_engine(model, ds_config)
    trainer = Trainer(engine, family, cfg, out, corpus.unit)
    if args.resume:
        trainer.resume()
    if trainer.rank == 0 and trainer.refresher is None:
        print('No "topkast" section: training the dense baseline with plain DeepSpeed.', flush=True)
    elif trainer.rank == 0:
        report = ds_topkast.memory_report(engine)
        print(report.format(), flush=True)
        if engine.global_steps == 0:
            trainer.log({"kind": "memory", "step": 0, **report.as_dict()})
    trainer.run()
    dist.barrier()
    release_cpu_shm_buffer()


if __name__ == "__main__":
    main()
