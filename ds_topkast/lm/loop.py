"""The training loop: fixed global batches per step, periodic validation, the test split at the end, checkpoints
with each rank's loop state, and the records of metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ds_topkast.lm.data.corpus_cache import PreparedCorpus
from ds_topkast.lm.run_files import RUN_FILE, train_state_path
from ds_topkast.lm.train_config import TrainConfig
from ds_topkast.parallel.collectives import ProcessGroupCollectives
from ds_topkast.runtime.checkpoint import load_file
from ds_topkast.runtime.regulariser import exploration_penalty

WIKITEXT103_VOCAB = 267_735  # the reference Corpus's word vocabulary of WikiText-103's train split


def quality(loss: float, unit: str) -> dict[str, float]:
    """Bits per byte (enwik8's bits per character) for byte corpora, perplexity for token corpora."""
    return {"bpb": loss / math.log(2)} if unit == "byte" else {"ppl": math.exp(min(loss, 50))}


class TrainingLoop:
    """The loop: fixed global batches per step, periodic validation, the test split at the end, checkpoints."""

    def __init__(self, engine, runner, cfg: TrainConfig, out: Path, unit: str, stop: int, end: int):
        """`stop`: the step this invocation trains to; `end`: the run's last step, where the test split is scored."""
        self.engine, self.runner, self.cfg, self.out, self.unit = engine, runner, cfg, out, unit
        self.stop, self.end = stop, end
        self.comm = ProcessGroupCollectives()  # moves host tensors to the accelerator for NCCL and back
        self.rank, self.world = self.comm.rank, self.comm.world
        self.accumulation = engine.gradient_accumulation_steps()
        self.tokens_per_step = engine.train_batch_size() * runner.tokens_per_row
        self.metrics = out / "metrics.jsonl"
        self.refresher = getattr(getattr(engine, "topkast", None), "refresher", None)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.engine.monitor.enabled:
                self.engine.monitor.write_events([(f"{record['kind']}/{k}", float(v), record["step"])
                                                  for k, v in record.items()
                                                  if k not in ("step", "kind") and isinstance(v, (int, float))])

    def say(self, message: str, bar=None) -> None:
        if self.rank == 0:
            (bar.write if bar is not None else print)(message)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the loss on the device, unsynchronised: this rank's mean over its
        micro-batches divided by the world size (the log interval sums it over ranks)."""
        losses = []
        for micro in range(self.accumulation):
            loss = self.runner.train_loss(self.engine, step, micro, self.rank, self.world)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        return torch.stack(losses).double().sum() / (self.world * self.accumulation)

    def evaluate(self, split: str, count: int | None) -> tuple[float, int]:
        """(mean loss in nats, predicted tokens) over every rank's share of the split."""
        self.engine.eval()
        sums = self.comm.all_reduce_sum(self.runner.eval_sums(self.engine, split, count, self.rank, self.world))
        self.engine.train()
        return float(sums[0] / sums[1]), int(sums[1])

    def validate(self) -> dict[str, float]:
        """Validation during training: eval_loss and eval_bpb / eval_ppl."""
        loss, _ = self.evaluate("valid", self.cfg.eval_batches)
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in quality(loss, self.unit).items()}}

    def score(self, split: str) -> dict[str, Any]:
        """A whole split's record: loss, bits per byte or perplexity, tokens, and the protocol used."""
        loss, tokens = self.evaluate(split, None)
        record = {"kind": split, "step": self.engine.global_steps, "loss": loss, **quality(loss, self.unit),
                  "tokens": tokens, "protocol": self.runner.protocol(None)}
        self.say(f"{split} at step {record['step']}: loss {loss:.4f}, " +
                 ", ".join(f"{k} {record[k]:.4f}" for k in ("bpb", "ppl") if k in record) + f" over {tokens} tokens")
        self.log(record)
        return record

    def save(self) -> None:
        """This rank's loop state first (random generators, Transformer-XL memory), then DeepSpeed's checkpoint.

        DeepSpeed checkpoints neither, and without the generators dropout would draw
        other masks after a resume; ds_topkast's engine writes `latest` last of all.
        """
        from deepspeed.accelerator import get_accelerator

        path = train_state_path(self.out, self.engine.global_steps, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"runner": self.runner.state_dict(), "cpu_rng": torch.get_rng_state(),
                 "accelerator_rng": get_accelerator().get_rng_state()}
        partial = path.with_suffix(".pt.partial")
        torch.save(state, partial)
        os.replace(partial, path)
        self.engine.save_checkpoint(str(self.out))

    def resume(self) -> None:
        from deepspeed.accelerator import get_accelerator

        tag = (self.out / "latest").read_text().strip()
        missing = [r for r in range(self.world) if not (self.out / tag / train_state_path(Path(), 0, r).name).is_file()]
        if missing:  # every rank sees the same files, so every rank stops here: none waits on a collective
            raise SystemExit(f"--resume: {self.out / tag} lacks the loop state of rank(s) {missing} (random generators, "
                             "Transformer-XL memory); resume from a complete checkpoint with the ranks that wrote it.")
        self.engine.load_checkpoint(str(self.out))
        state = load_file(train_state_path(self.out, self.engine.global_steps, self.rank))
        if "runner" not in state:
            raise SystemExit(f"--resume: {self.out / tag} was written before the training command's standard splits and "
                             "stream-chunk memories, so this run cannot continue exactly; start a new run from its "
                             f"weights with --init-from {self.out}.")
        self.runner.load_state_dict(state["runner"], self.engine.device)
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
        """Train to step `stop`; train records hold the interval's mean loss and the tokens/s of its timed steps.

        Losses stay on the device between records (one host sync per log interval);
        validation and checkpoint time is left out of tokens/s.
        """
        from deepspeed.accelerator import get_accelerator
        from tqdm import tqdm

        start = self.engine.global_steps
        bar = tqdm(total=self.stop, initial=start, disable=self.rank != 0, desc="train", unit="step")
        seen = len(self.refresher.history) if self.refresher else 0
        pending, timed, elapsed, tick = None, 0, 0.0, time.perf_counter()
        for step in range(start, self.stop):
            sums = self.train_step(step)
            pending = sums if pending is None else pending + sums
            timed += 1
            done = step + 1
            bar.update(1)
            seen = self.report_refreshes(seen, bar)
            if done % self.cfg.log_interval == 0 or done == self.stop:
                loss = float(self.comm.all_reduce_sum(pending) / timed)  # waits for the steps
                penalty = float(exploration_penalty(self.engine.module))  # at the last step, the same on every rank
                elapsed += time.perf_counter() - tick
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.engine.get_lr()[0]:.2e}")
                self.log({"kind": "train", "step": done, "loss": loss, "exploration_penalty": penalty,
                          "lr": self.engine.get_lr()[0], "tokens_per_s": self.tokens_per_step * timed / elapsed,
                          "peak_memory_bytes": get_accelerator().max_memory_allocated()})
                pending, timed, elapsed, tick = None, 0, 0.0, time.perf_counter()
            validate = done % self.cfg.eval_interval == 0 or done == self.stop
            checkpoint = bool(self.cfg.checkpoint_interval) and done % self.cfg.checkpoint_interval == 0 \
                and done < self.stop
            if (validate or checkpoint) and timed:  # the interval's steps so far count, the pause does not
                get_accelerator().synchronize()
                elapsed += time.perf_counter() - tick
            if validate:
                record = {"kind": "eval", "step": done, **self.validate()}
                self.say(f"step {done}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
                                                      if k.startswith("eval")), bar)
                self.log(record)
            if checkpoint:
                self.save()
            if validate or checkpoint:
                tick = time.perf_counter()
        bar.close()
        if self.engine.global_steps > start or not (self.out / "latest").exists():
            self.save()
        if self.cfg.test and self.engine.global_steps == self.cfg.steps:
            self.score("test")
        if self.cfg.plot and self.rank == 0:
            from ds_topkast.lm.plots import plot_run

            print(f"plot: {plot_run(self.metrics, self.out / 'training.png')}", flush=True)


def warn_if_the_corpus_changed(loop: TrainingLoop, corpus: PreparedCorpus) -> None:
    """A resumed run whose splits are not the ones it trained on says so: it goes on, but not exactly."""
    if loop.rank != 0 or not loop.metrics.is_file():
        return
    earlier = [r for r in map(json.loads, loop.metrics.read_text().splitlines()) if r["kind"] == "data"]
    now = corpus.record()["splits"]
    if earlier and earlier[-1]["splits"] != now:
        changed = [split for split in now if earlier[-1]["splits"].get(split) != now[split]]
        print(f"Warning: the {', '.join(changed)} split(s) differ from the ones this run trained on (files or token "
              "counts in metrics.jsonl's data records); it continues on the new ones.", flush=True)


def train(loop: TrainingLoop, engine, corpus: PreparedCorpus, runner, args, run: dict[str, Any]) -> None:
    """Resume or start, record the data, the schedule and the layout (run.json), report memory, run the loop."""
    import ds_topkast

    if args.resume:
        loop.resume()
        warn_if_the_corpus_changed(loop, corpus)
    data = loop.cfg.data
    if loop.rank == 0 and data.dataset == "wikitext-103" and data.tokenizer == "words" and not data.max_bytes \
            and corpus.vocab_size != WIKITEXT103_VOCAB:
        print(f"Warning: WikiText-103's word vocabulary here is {corpus.vocab_size} words, the reference's "
              f"{WIKITEXT103_VOCAB}: check the files (mixed .raw and .tokens, CRLF line ends); perplexities will not "
              "compare with the paper's.", flush=True)
    length = run["schedule_steps"]
    if loop.rank == 0:
        (loop.out / RUN_FILE).write_text(json.dumps(run))
        if args.resume and length is not None:
            print(f"Resuming at step {engine.global_steps} to step {loop.stop} on a learning-rate schedule of "
                  f"{length} steps" + (" (stretched by --reschedule)." if args.reschedule else
                                       " (the run's own; --reschedule changes it)."), flush=True)
    loop.log({"kind": "data", "step": engine.global_steps, **corpus.record(),
              "eval_protocol": runner.protocol(loop.cfg.eval_batches)})
    if loop.rank == 0 and loop.refresher is None:
        print('No "topkast" section: training the dense baseline with plain DeepSpeed.', flush=True)
    elif loop.rank == 0:
        report = ds_topkast.memory_report(engine)
        print(report.format(), flush=True)
        if engine.global_steps == 0:
            loop.log({"kind": "memory", "step": 0, **report.as_dict()})
    loop.run()
