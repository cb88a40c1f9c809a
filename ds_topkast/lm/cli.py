"""The training command: a language model trained with Top-KAST, under the deepspeed launcher or alone.

    deepspeed --module ds_topkast.train --config configs/tiny_gpt2.json --out runs/tiny
    ds-topkast-train --config configs/tiny_gpt2.json --out runs/tiny        # one process, no launcher

One JSON file holds everything: DeepSpeed's own sections (batch sizes, gradient
accumulation and clipping, optimizer, warm-up + cosine scheduler, ZeRO, bf16, and its
"tensorboard" / "csv_monitor" monitors), the "topkast" section, and a "train" section for
this command (model, data, steps, evaluation, checkpoints; DeepSpeed ignores unknown
top-level sections). Without a "topkast" section the same command trains the model
dense with plain DeepSpeed, the baseline to compare against.

The corpus is prepared once (tokenised into a memory-mapped cache, by one process per
node) with its standard train / valid / test splits. The run prints the memory report, a
progress bar, validation during training (bits per byte, or perplexity for token
corpora), each refresh's mask dynamics, and the test split's result at the end; writes
metrics.jsonl (a "data" record naming each split's files and tokens first, a "test"
record last), the monitor's events, checkpoints every `checkpoint_interval` steps and at
the end, and a plot of the losses and mask dynamics (training.png). `--resume` continues
a stopped run exactly where its latest checkpoint left it, on its original learning-rate
schedule; `--evaluate valid|test` scores a run's latest checkpoint on a whole split.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ds_topkast.checkpoint import load_file
from ds_topkast.collectives import ProcessGroupCollectives, release_cpu_shm_buffer
from ds_topkast.config import SECTION, TopKASTConfigError, load_deepspeed_config, validate_section
from ds_topkast.dense_weights import tag_folder
from ds_topkast.layers import exploration_penalty
from ds_topkast.lm.corpus_cache import PreparedCorpus, open_corpus, prepare_corpus
from ds_topkast.lm.corpus_sources import CorpusError, DataConfig
from ds_topkast.lm.model_runners import make_runner

WIKITEXT103_VOCAB = 267_735  # the reference Corpus's word vocabulary of WikiText-103's train split
RUN_FILE = "run.json"  # what a resume must keep: the learning-rate schedule's length
SCHEDULES_WITH_LENGTH = ("WarmupCosineLR", "WarmupDecayLR")


class TrainConfig(BaseModel):
    """The "train" section: what the command trains and for how long."""

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any] = Field(default_factory=lambda: {"type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4},
                                  description='"type" (a transformers model_type, or "transformer_xl" with an '
                                              'optional "preset"), "config" or "pretrained", plus config fields.')
    data: DataConfig = Field(default_factory=DataConfig)
    seq_len: int | None = Field(None, gt=1, description="Tokens per window (GPT-style, default 128) or per "
                                                        "segment (Transformer-XL, default its tgt_len).")
    steps: int = Field(200, gt=0, description="Optimizer steps of the whole run; the learning-rate schedule's "
                                              "length.")
    eval_interval: int = Field(50, gt=0, description="Steps between validations.")
    eval_batches: int | None = Field(8, gt=0, description="Validation during training: batches (Transformer-XL: "
                                                          "segments per stream; the reference's max_eval_steps); "
                                                          "null: the whole valid split.")
    eval_streams: int = Field(10, gt=0, description="Transformer-XL: streams an eval split is cut into (the "
                                                    "reference's eval batch size, 10).")
    test: bool = Field(True, description="Evaluate the whole test split at the end of training.")
    log_interval: int = Field(10, gt=0, description="Steps between train-loss records (the mean over them).")
    checkpoint_interval: int | None = Field(None, gt=0, description="Also save every N steps (always at the end).")
    plot: bool = Field(True, description="Write training.png (losses, mask dynamics) next to the checkpoint.")
    seed: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with \"topkast\" and \"train\" sections.")
    parser.add_argument("--out", default="runs/tiny", help="Folder for checkpoints, metrics.jsonl and the plot.")
    parser.add_argument("--steps", type=int, help="Stop at this step (default train.steps); the learning-rate "
                                                  "schedule keeps its length.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in --out.")
    parser.add_argument("--reschedule", action="store_true",
                        help="With --resume: make the learning-rate schedule end at the new last step (--steps, or "
                             "train.steps) instead of where the run's schedule was first set to end.")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="Start a new run from the weights of a checkpoint (a tag folder, or a run folder's "
                             "latest) at this config's sparsity: how a run changes its topkast settings. The "
                             "optimizer state and schedule start afresh.")
    parser.add_argument("--evaluate", choices=("valid", "test"),
                        help="Score the latest checkpoint in --out on this whole split, append the record to "
                             "metrics.jsonl, and exit.")
    parser.add_argument("--prepare-only", action="store_true",
                        help="Prepare the corpus (tokenise it into the cache), print its splits, and exit.")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="Set by the deepspeed launcher.")
    return parser.parse_args(argv)


def train_section(ds_config: dict[str, Any]) -> TrainConfig:
    return validate_section(TrainConfig, ds_config.get("train", {}), "train")


def schedule_length(ds_config: dict[str, Any], out: Path, cfg: TrainConfig, stop: int, args) -> int | None:
    """The length DeepSpeed's warm-up/decay scheduler gets, unless the config sets its own; None when none applies.

    A new run's schedule spans train.steps, whatever --steps stops it at. A resumed run
    keeps the length it started with (run.json), unless --reschedule asks for one ending
    at `stop`. Training past the schedule's end is refused: the cosine would climb back up.
    """
    scheduler = ds_config.get("scheduler", {})
    if scheduler.get("type") not in SCHEDULES_WITH_LENGTH or "total_num_steps" in scheduler.get("params", {}):
        return None
    if args.reschedule:
        return stop
    run_file = out / RUN_FILE
    kept = args.resume and run_file.is_file()
    length = (json.loads(run_file.read_text()).get("schedule_steps") if kept else None) or cfg.steps
    if stop > length:
        where = "the run's learning-rate schedule" if kept else f"train.steps ({cfg.steps}), the schedule's length,"
        fix = f"add --reschedule to stretch it to {stop}" if args.resume else "raise train.steps instead"
        asked = f"--steps {stop}" if args.steps else f"train.steps {stop}"
        raise SystemExit(f"{asked}: {where} ends at step {length}, past which {scheduler['type']} does not "
                         f"decay; {fix}.")
    return length


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


def accumulation_steps(ds_config: dict[str, Any], world: int) -> int:
    """gradient_accumulation_steps, or train_batch_size / (micro batch x ranks) as DeepSpeed derives it."""
    accumulation = ds_config.get("gradient_accumulation_steps")
    if isinstance(accumulation, int):
        return accumulation
    total, micro = ds_config.get("train_batch_size"), ds_config.get("train_micro_batch_size_per_gpu")
    if isinstance(total, int) and isinstance(micro, int) and micro * world and total % (micro * world) == 0:
        return total // (micro * world)
    return 1


def run_layout(ds_config: dict[str, Any]) -> dict[str, int]:
    """What a resumed run must keep: ranks, rows per micro-batch, micro-batches per step (they fix the streams)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {"world": world, "micro_batch_per_rank": micro_batch_per_rank(ds_config, world),
            "gradient_accumulation_steps": accumulation_steps(ds_config, world)}


def check_resumed_layout(out: Path, layout: dict[str, int]) -> None:
    """Every rank refuses, before any collective, a resume under another layout than the run's (run.json)."""
    run_file = out / RUN_FILE
    saved = json.loads(run_file.read_text()) if run_file.is_file() else {}
    changed = {key: (saved[key], value) for key, value in layout.items() if key in saved and saved[key] != value}
    if changed:
        raise SystemExit("--resume: this run was started with " + ", ".join(
            f"{key} {was} (now {now})" for key, (was, now) in changed.items()) + "; its per-rank state (random "
            "generators, Transformer-XL memories) fits only that layout. Resume with it, or start a new run from "
            f"its weights with --init-from {out}.")


def train_state_path(out: Path, steps: int, rank: int) -> Path:
    return out / f"global_step{steps}" / f"train_state_rank{rank:05d}.pt"


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


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """ds_topkast's engine when the config has a "topkast" section, else plain DeepSpeed (the dense baseline)."""
    import deepspeed

    import ds_topkast

    if SECTION in ds_config:
        engine, *_ = ds_topkast.initialize(model=model, config=ds_config)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def gather_with_the_whole_forward(model: torch.nn.Module, ds_config: dict[str, Any]) -> None:
    """Under ZeRO-3, register the parameters a model reads outside their own module's forward (Transformer-XL's
    tied adaptive softmax) as external parameters of the model, so DeepSpeed gathers them for its whole forward."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for parameter in getattr(model, "parameters_read_outside_their_forward", list)():
        register_external_parameter(model, parameter)


def launched_alone() -> None:
    """Give a process started without a launcher (the console script) the environment of a world of one."""
    if any(key in os.environ for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")):
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def corpus_prepared_once_per_node(data: DataConfig) -> PreparedCorpus:
    """Local rank 0 of each node prepares the corpus (when the cache lacks it) while the others wait, then all map it.

    Every rank learns whether a preparation failed, so a bad corpus ends the job at once
    instead of leaving the other ranks waiting for a collective that never comes. They
    wait in a gloo collective of their own with a day's timeout: tokenising a large
    corpus can outlast NCCL's 30-minute watchdog.
    """
    waiting = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    failure = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            prepare_corpus(data)
        except Exception as err:  # re-raised below, after the others have heard of it
            failure = err
    failed = [False] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failed, failure is not None, group=waiting)
    torch.distributed.destroy_process_group(waiting)
    if failure is not None:
        raise failure
    if any(failed):
        raise SystemExit(f"Rank {failed.index(True)} could not prepare the corpus; its error is in its output.")
    return open_corpus(data)


def require_application_extra(cfg: TrainConfig) -> None:
    """The "lm" install extra's packages this run needs, or an error that says how to get them."""
    needed = ["tqdm"] + ["matplotlib"] * cfg.plot + ["datasets"] * (cfg.data.dataset is not None and not cfg.data.path)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"The training command needs {', '.join(missing)}: pip install 'ds_topkast[lm]'.")


def check_arguments(args, out: Path) -> None:
    """Refuse contradictory flags and a wrong --out before any rank starts work."""
    if sum(map(bool, (args.resume, args.init_from, args.evaluate))) > 1:
        raise SystemExit("--resume continues a run, --init-from starts a new one from a checkpoint's weights, and "
                         "--evaluate scores a run's checkpoint; give one of them.")
    if args.reschedule and not args.resume:
        raise SystemExit("--reschedule changes a resumed run's learning-rate schedule; add --resume.")
    if args.init_from:
        tag_folder(args.init_from)  # a wrong path fails here
    has_run = (out / "latest").exists()
    if (args.resume or args.evaluate) and not has_run:
        flag = "--resume" if args.resume else "--evaluate"
        raise SystemExit(f"{flag}: {out} holds no checkpoint (no 'latest' file); train a run there first.")
    if not (args.resume or args.evaluate or args.prepare_only) and has_run:
        raise SystemExit(f"{out} already holds a run (its 'latest' checkpoint); add --resume to continue it, or "
                         "give a new --out.")


def main(argv=None) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    import ds_topkast

    args = parse_args(argv)
    ds_config = load_deepspeed_config(args.config)
    cfg = train_section(ds_config)
    stop, out = args.steps or cfg.steps, Path(args.out)
    check_arguments(args, out)
    require_application_extra(cfg)
    if args.prepare_only:
        try:
            print(json.dumps(open_corpus(cfg.data).record(), indent=1), flush=True)
        except CorpusError as err:
            raise SystemExit(f"train.data: {err}") from None
        return
    out.mkdir(parents=True, exist_ok=True)
    length = schedule_length(ds_config, out, cfg, stop, args)
    if length is not None:
        ds_config["scheduler"].setdefault("params", {})["total_num_steps"] = length
    layout = run_layout(ds_config)
    if args.resume:
        check_resumed_layout(out, layout)
    launched_alone()
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        corpus = corpus_prepared_once_per_node(cfg.data)
    except CorpusError as err:
        raise SystemExit(f"train.data: {err}") from None
    runner = make_runner(cfg.model, corpus, cfg.seq_len, layout["micro_batch_per_rank"], cfg.seed,
                         dist.get_world_size(), layout["gradient_accumulation_steps"], cfg.eval_streams)
    model = runner.build_model()
    if args.init_from:
        ds_topkast.load_dense_weights(model, args.init_from)
    gather_with_the_whole_forward(model, ds_config)
    engine = build_engine(model, ds_config)
    check_engine_layout(engine, layout)
    loop = TrainingLoop(engine, runner, cfg, out, corpus.unit, stop, length or cfg.steps)
    if args.evaluate:
        engine.load_checkpoint(str(out), load_optimizer_states=False, load_lr_scheduler_states=False)
        loop.score(args.evaluate)
    else:
        train(loop, engine, corpus, runner, args, {"schedule_steps": length, **layout})
    dist.barrier()
    release_cpu_shm_buffer()


def check_engine_layout(engine, layout: dict[str, int]) -> None:
    """The batch layout the runner was built for is the one DeepSpeed derived from the config."""
    derived = {"micro_batch_per_rank": engine.train_micro_batch_size_per_gpu(),
               "gradient_accumulation_steps": engine.gradient_accumulation_steps()}
    if any(layout[key] != value for key, value in derived.items()):
        raise SystemExit(f"DeepSpeed derived {derived} from the batch sizes, the training command {layout}; set "
                         "train_micro_batch_size_per_gpu and gradient_accumulation_steps explicitly.")


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


if __name__ == "__main__":
    main()
