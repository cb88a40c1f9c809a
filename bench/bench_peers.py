"""Top-KAST against what users pick instead, at equal memory: GaLore, APOLLO, 8-bit AdamW, a smaller dense model.

    python bench/bench_peers.py [--steps 1200] [--seeds 0 1 2] [--confirm-steps 2400 [4800 ...]]
                                [--confirm-seeds 0] [--methods ...] [--jobs 2] [--out runs/peers]
    python bench/bench_peers.py --smoke        # 4, 8 and 12 steps of every method, one learning rate (95 s)

One Llama-style byte-level model (4 layers, width 128, intermediate 344, 128 tokens per row,
16 rows per step; 0.86M parameters), trained from the same initialisation on the embedded corpus
(the Python standard library's source; the last 5% held out) for the same token budget and the
same schedule (linear warm-up over 10% of the steps, cosine decay to 10%), fp32 on the CPU.
The methods:
  dense AdamW      DeepSpeed engine (ZeRO-0), torch's AdamW;
  small dense      the same, at the width whose sparsified layers hold as many weights as
                   Top-KAST 90/80's A (about 10%);
  Top-KAST         80/0, 90/80, 95/90: ds_topkast's engine (ZeRO-0), refresh every 50 steps;
  GaLore           galore-torch's GaLoreAdamW (32-bit: its 8-bit optimizer needs CUDA), rank 32 on
                   the projections (a quarter of the width: its moments and projector, 0.375 of a
                   weight matrix, are then about Top-KAST 90/80's moments over B, 0.4), projection
                   updated every 100 steps, scale 0.25;
  APOLLO           apollo-torch's APOLLOAdamW, random projection of rank 32, channel-wise scaling;
  APOLLO-Mini      the same at rank 1, tensor-wise scaling, scale 128 (its paper's setting);
  8-bit AdamW      bitsandbytes' AdamW8bit (it runs on this CPU), else torchao's AdamW8bit.
Each method's learning rate is tuned at --steps on seed 0 over a grid of 3x steps that grows
while its best value is at an edge (recorded); then every seed trains at that rate, and
--confirm-seeds train at it for each of --confirm-steps too. Reported per method: held-out loss
(mean and sample standard deviation over seeds, nats per byte; also at half the steps and at each
of --confirm-steps, with the pairs of methods whose order changes from each length to the next
where a lead is clear: see changed_pairs), the trained state's bytes as the method holds them
on the accelerator (weights, gradients, optimizer state: the tensors measured, and for Top-KAST
memory_report's accelerator bytes, its dense store off the accelerator reported apart), the
median step time against dense AdamW's (timed after the study, one method at a time), and the
fraction of the weights its forward pass uses (the inference cost). Runs train --jobs at a time
(RunPool). Writes peers.json, the table (peers.md) and peers.png (held-out loss against
accelerator bytes, error bars over seeds) to --out; finished runs in --out are reused, so an
interrupted study continues, and a longer check (--confirm-steps 2400 4800) trains only the new
lengths. At 1,200 steps no pair with a Top-KAST setting changes order at 2,400 or at 4,800 steps
(at 600 steps five pairs still turned by 1,200; docs/RESULTS.md). On 2 cores the defaults take
about three hours from an empty --out, with 4,800-step runs about five; at width 256 (3.3M
parameters) a step takes about three times as long.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import multiprocessing
import os
import queue
import statistics
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from importlib import metadata
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
from common import eight_bit_adamw, free_port, single_rank_environment  # noqa: E402

VOCAB, SEQ, ROWS, LAYERS = 256, 128, 16, 4
TOP_KAST = {"Top-KAST 80/0": (0.8, 0.0), "Top-KAST 90/80": (0.9, 0.8), "Top-KAST 95/90": (0.95, 0.9)}
METHODS = ("dense AdamW", "small dense", *TOP_KAST, "GaLore", "APOLLO", "APOLLO-Mini", "8-bit AdamW")
PACKAGES = {"GaLore": ("galore-torch",), "APOLLO": ("apollo-torch",), "APOLLO-Mini": ("apollo-torch",),
            "8-bit AdamW": ("bitsandbytes", "torchao")}  # each peer's package: any one of them runs it
PEER_RANK = 32
REFRESH_INTERVAL = 50  # Top-KAST's steps between refreshes of A and B from the store
# Each method's best rate at 1,200 steps (docs/RESULTS.md): its grid starts a 3x step either side of it and grows
# by 3x past an edge while the best value sits there, so where it starts changes how many runs the tuning takes,
# not the rate it finds (where the loss has one minimum over the rates).
STARTING_RATES = {"dense AdamW": 1e-3, "small dense": 9e-3, "Top-KAST 80/0": 1e-3, "Top-KAST 90/80": 1e-2,
                  "Top-KAST 95/90": 3e-2, "GaLore": 1e-2, "APOLLO": 1e-2, "APOLLO-Mini": 9e-3, "8-bit AdamW": 1e-3}


def llama(width: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    heads = width // 32  # heads of 32: any width that is a multiple of 32
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=width, intermediate_size=(width * 8 // 3 + 7) // 8 * 8, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB, max_position_embeddings=SEQ,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False))


@functools.cache
def parameter_count(width: int) -> int:
    """The dense model's parameters at this width (Top-KAST's engine replaces its layers' parameters)."""
    return sum(p.numel() for p in llama(width, 0).parameters())


def projection_weights(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))


def small_dense_width(width: int) -> int:
    """The width (a multiple of 32) whose projections hold closest to 10% of the full model's: Top-KAST 90/80's A."""
    target = 0.1 * projection_weights(llama(width, 0))
    return min(range(32, width, 32), key=lambda w: abs(projection_weights(llama(w, 0)) - target))


class Corpus:
    """The embedded corpus as bytes: training windows drawn at random, a fixed set of held-out windows."""

    def __init__(self, max_bytes: int, eval_windows: int):
        from ds_topkast.lm.data.corpus_sources import default_corpus_bytes

        data = torch.frombuffer(bytearray(default_corpus_bytes(max_bytes)), dtype=torch.uint8).long()
        cut = int(0.95 * data.numel())
        self.train, self.held_out = data[:cut], data[cut:]
        starts = torch.linspace(0, self.held_out.numel() - SEQ - 1, eval_windows).long()
        self.eval_rows = torch.stack([self.held_out[s:s + SEQ] for s in starts])

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, self.train.numel() - SEQ - 1, (ROWS,), generator=generator)
        return torch.stack([self.train[s:s + SEQ] for s in starts])


def schedule(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, quantisation scales, projectors)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += tensor_bytes([value])
            elif hasattr(value, "ortho_matrix"):  # GaLore's / APOLLO's projector object
                total += tensor_bytes([value.ortho_matrix])
    return total


class DeepSpeedRun:
    """Dense AdamW or Top-KAST through a DeepSpeed engine (ZeRO-0, fp32, torch's AdamW)."""

    def __init__(self, method: str, width: int, lr: float, seed: int):
        import deepspeed

        import ds_topkast

        config = {"train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": 1,
                  "steps_per_print": 10**9, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
                  "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}}}
        model = llama(width, seed)
        self.sparse = method in TOP_KAST
        if self.sparse:
            forward, backward = TOP_KAST[method]
            config["topkast"] = {"forward_sparsity": forward, "backward_sparsity": backward,
                                 "refresh_interval": REFRESH_INTERVAL,
                                 "include": ["*proj"], "seed": seed, "dense_store": {"device": "cpu"}}
            self.engine, *_ = ds_topkast.initialize(model=model, config=config)
        else:
            self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        self.model = self.engine.module

    def step(self, batch: torch.Tensor, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss = self.engine(input_ids=batch, labels=batch).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def accounting(self) -> dict:
        import ds_topkast
        from ds_topkast.core.layers import sparse_layers
        from ds_topkast.engine.memory_accounting import trained_bytes

        if not self.sparse:
            trained = trained_bytes(self.engine)
            return {"accelerator_bytes": sum(v for k, v in trained.items() if k != "host_optimizer_state"),
                    "store_bytes": 0, "forward_fraction": 1.0}
        report = ds_topkast.memory_report(self.engine)
        layers = sparse_layers(self.model).values()
        dense = sum(p.numel() for p in self.model.parameters() if p.requires_grad) - sum(
            layer.values.numel() for layer in layers)
        forward = sum(layer.k_forward for layer in layers) + dense
        full = sum(layer.in_features * layer.out_features for layer in layers) + dense
        return {"accelerator_bytes": report.sparse_total + report.other_parameters,
                "store_bytes": report.dense_store_bytes, "forward_fraction": forward / full}

    def close(self) -> None:
        self.engine.destroy()


class PlainRun:
    """A peer optimizer over the dense model in a plain PyTorch loop (what their repositories do)."""

    def __init__(self, method: str, width: int, lr: float, seed: int):
        self.model = llama(width, seed)
        projections = [p for n, p in self.model.named_parameters() if n.endswith("proj.weight")]
        chosen = {id(p) for p in projections}
        rest = [p for p in self.model.parameters() if id(p) not in chosen]
        if method == "GaLore":
            from galore_torch import GaLoreAdamW

            self.package = "galore-torch GaLoreAdamW"
            groups = [{"params": rest}, {"params": projections, "rank": PEER_RANK, "update_proj_gap": 100,
                                         "scale": 0.25, "proj_type": "std"}]
            self.optimizer = GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
        elif method in ("APOLLO", "APOLLO-Mini"):
            from apollo_torch import APOLLOAdamW

            self.package = "apollo-torch APOLLOAdamW"
            mini = method == "APOLLO-Mini"
            groups = [{"params": rest}, {"params": projections, "rank": 1 if mini else PEER_RANK, "proj": "random",
                                         "scale_type": "tensor" if mini else "channel", "scale": 128 if mini else 1,
                                         "update_proj_gap": 100, "proj_type": "std"}]
            self.optimizer = APOLLOAdamW(groups, lr=lr, weight_decay=0.0)
        else:
            self.package, adamw8bit = eight_bit_adamw()
            self.optimizer = adamw8bit(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.model.train()

    def step(self, batch: torch.Tensor, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # the gradients' memory stays, as it is held in training
        return loss.item()

    def accounting(self) -> dict:
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        return {"accelerator_bytes": tensor_bytes(params) + tensor_bytes(grads)
                + optimizer_state_bytes(self.optimizer), "store_bytes": 0, "forward_fraction": 1.0,
                "package": self.package}

    def close(self) -> None:
        pass


@torch.no_grad()
def held_out_loss(model, corpus: Corpus) -> float:
    model.eval()
    losses = [model(input_ids=rows, labels=rows).loss.item() for rows in corpus.eval_rows.split(16)]
    model.train()
    return statistics.fmean(losses)


def new_run(method: str, width: int, lr: float, seed: int):
    """The method's model and optimizer: through a DeepSpeed engine (dense, small dense, Top-KAST) or a plain loop."""
    run_type = DeepSpeedRun if method in ("dense AdamW", "small dense", *TOP_KAST) else PlainRun
    return run_type(method, width, lr, seed)


def train(method: str, lr: float, seed: int, steps: int, corpus: Corpus, width: int) -> dict:
    """One run to its end; its record (held-out loss at the end and at half the steps, bytes, wall time)."""
    started = time.perf_counter()
    run = new_run(method, width, lr, seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    losses, halfway = [], None
    for step in range(steps):
        losses.append(run.step(corpus.batch(generator), schedule(step, steps, lr)))
        if step + 1 == steps // 2:
            halfway = held_out_loss(run.model, corpus)
    record = {"method": method, "lr": lr, "seed": seed, "steps": steps, "train_loss": losses[-1],
              "held_out_loss": held_out_loss(run.model, corpus), "held_out_halfway": halfway,
              "parameters": parameter_count(width), **run.accounting()}
    run.close()
    for key in ("held_out_loss", "held_out_halfway"):
        if record[key] is not None and not math.isfinite(record[key]):
            record[key] = float("inf")
    record["seconds"] = time.perf_counter() - started
    return record


def step_seconds(method: str, lr: float, width: int, corpus: Corpus, steps: int) -> float:
    """The median wall time of a training step, the first few (warm-up) apart, in a process that has the cores alone."""
    run = new_run(method, width, lr, 0)
    generator, times = torch.Generator().manual_seed(1000), []
    for _ in range(steps + 3):
        batch = corpus.batch(generator)
        start = time.perf_counter()
        run.step(batch, lr)
        times.append(time.perf_counter() - start)
    run.close()
    return statistics.median(times[3:])


_corpus: Corpus | None = None  # a worker's copy, read once when it starts


def start_worker(threads: int, max_bytes: int, eval_windows: int) -> None:
    """A worker process: its share of the cores, the corpus, and a DeepSpeed world of one on a port of its own."""
    global _corpus
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*without a Top-KAST runtime.*")
    os.environ["MASTER_PORT"] = str(free_port())
    single_rank_environment()
    import deepspeed

    from ds_topkast.parallel.collectives import release_cpu_shm_buffer

    deepspeed.init_distributed()
    release_cpu_shm_buffer()  # mapped already; in a world of one no other rank opens it, so nothing is left in RAM
    _corpus = Corpus(max_bytes, eval_windows)


def train_in_worker(method: str, lr: float, seed: int, steps: int, width: int) -> dict:
    return train(method, lr, seed, steps, _corpus, width)


def time_in_worker(method: str, lr: float, width: int, steps: int) -> float:
    return step_seconds(method, lr, width, _corpus, steps)


def worker_pool(workers: int, threads: int, args) -> ProcessPoolExecutor:
    """Processes that train or time runs, each with `threads` of the cores, the corpus and a DeepSpeed world of one."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=(threads, args.corpus_bytes, args.eval_windows))


STOPPED = "the study stopped before this run started"


class RunPool:
    """The study's runs in `jobs` worker processes that share the cores, longest runs first, each kept in --out.

    On 2 cores two single-threaded runs side by side train about 1.3x as many steps an hour
    as one run on both cores (this model's matrices are too small to keep two threads busy,
    and the Python between its kernels runs on one), so a study finishes sooner. Any thread
    may call run(); at most `jobs` runs train at once, the one with the most steps first (a
    long run started last would leave the other worker idle at the end), and a run asked for
    twice trains once. A run whose record is in --out is not trained again, so an interrupted
    study continues where it stopped; stop() fails the runs not yet started.
    """

    def __init__(self, jobs: int, args, widths: dict, runs: Path):
        self.widths, self.runs, self.queue = widths, runs, queue.PriorityQueue()
        self.pool = worker_pool(jobs, max(1, (os.cpu_count() or 1) // jobs), args)
        self.order, self.lock, self.asked, self.stopping = itertools.count(), threading.Lock(), {}, threading.Event()
        self.dispatchers = [threading.Thread(target=self._dispatch, daemon=True) for _ in range(jobs)]
        for dispatcher in self.dispatchers:
            dispatcher.start()

    def run(self, method: str, lr: float, seed: int, steps: int) -> dict:
        path = self.runs / f"{method}_{lr:g}_{seed}_{steps}.json".replace(" ", "_").replace("/", "-")
        with self.lock:
            if self.stopping.is_set():
                raise RuntimeError(STOPPED)
            if path.is_file():
                return json.loads(path.read_text())
            first = path not in self.asked
            if first:
                self.asked[path] = Future()
                self.queue.put((-steps, method not in TOP_KAST, next(self.order), (method, lr, seed, steps),
                                self.asked[path]))
        record = self.asked[path].result()
        if first:
            written = path.with_suffix(".part")
            written.write_text(json.dumps(record))
            written.replace(path)  # whole or absent: a study killed while writing does not leave half a record
            print(f"  {method} lr {lr:g} seed {seed} {steps} steps: held-out {record['held_out_loss']:.4f} "
                  f"({record['seconds']:.0f} s)", flush=True)
        return record

    def _dispatch(self) -> None:
        while True:
            *_, request, done = self.queue.get()
            if request is None:
                return
            try:
                if self.stopping.is_set():
                    raise RuntimeError(STOPPED)
                method, lr, seed, steps = request
                done.set_result(self.pool.submit(train_in_worker, method, lr, seed, steps,
                                                 self.widths[method]).result())
            except BaseException as error:  # noqa: BLE001 - the caller's thread raises it
                done.set_exception(error)

    def stop(self) -> None:
        """Fail every run not yet started, so that the threads waiting on them return; runs in flight end as usual."""
        self.stopping.set()
        while True:
            try:
                *_, request, done = self.queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                done.set_exception(RuntimeError(STOPPED))

    def close(self) -> None:
        for _ in self.dispatchers:
            self.queue.put((-math.inf, True, next(self.order), None, None))
        for dispatcher in self.dispatchers:
            dispatcher.join()
        self.pool.shutdown()


def tune(method: str, grid: list[float], max_grid: int, steps: int, pool: RunPool) -> tuple[float, list[dict]]:
    """The best learning rate on seed 0 over a grid that grows past an edge while the best value sits there."""
    tried = {}
    while True:
        todo = [lr for lr in grid if lr not in tried]
        with ThreadPoolExecutor(len(todo)) as threads:
            tried.update(zip(todo, threads.map(lambda lr: pool.run(method, lr, 0, steps), todo)))
        best = min(tried, key=lambda lr: tried[lr]["held_out_loss"])
        ordered = sorted(tried)
        if len(ordered) >= max_grid or (best != ordered[0] and best != ordered[-1]):
            return best, [tried[lr] for lr in ordered]
        grid = [best / 3 if best == ordered[0] else best * 3]


def study(method: str, args, pool: RunPool) -> dict:
    """One method's row: its rate tuned at --steps, every seed there, the longer runs at that rate."""
    centre = args.grid or [STARTING_RATES[method] * f for f in (1 / 3, 1, 3)]
    lr, grid = tune(method, centre, args.max_grid, args.steps, pool)
    requests = [(seed, args.steps) for seed in args.seeds] + [
        (seed, steps) for steps in args.confirm_steps for seed in args.confirm_seeds]
    with ThreadPoolExecutor(len(requests)) as threads:
        done = list(threads.map(lambda request: pool.run(method, lr, *request), requests))
    row = summary(method, lr, done[:len(args.seeds)], grid)
    for steps in args.confirm_steps:
        longer = {r["seed"]: r["held_out_loss"] for r in done[len(args.seeds):] if r["steps"] == steps}
        row["longer"][steps] = {"mean": statistics.fmean(longer.values()), "std": spread(longer.values()),
                                "seeds": len(longer), "losses": longer}
    print(json.dumps(row), flush=True)
    return row


def spread(values) -> float:
    """The sample standard deviation over seeds; 0 for one seed."""
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summary(method: str, lr: float, records: list[dict], grid: list[dict]) -> dict:
    losses, halfway = [r["held_out_loss"] for r in records], [r["held_out_halfway"] for r in records]
    first = records[0]
    return {"method": method, "lr": lr, "grid": {f"{r['lr']:g}": r["held_out_loss"] for r in grid},
            "held_out_mean": statistics.fmean(losses), "held_out_std": spread(losses),
            "halfway_mean": statistics.fmean(halfway), "halfway_std": spread(halfway), "seeds": len(records),
            "losses": {r["seed"]: r["held_out_loss"] for r in records},
            "halfway_losses": {r["seed"]: r["held_out_halfway"] for r in records}, "longer": {},
            "accelerator_bytes": first["accelerator_bytes"], "store_bytes": first["store_bytes"],
            "forward_fraction": first["forward_fraction"], "parameters": first["parameters"],
            "package": first.get("package", "ds_topkast" if method in TOP_KAST else "deepspeed")}


def losses_at(row: dict, length: int | str) -> dict:
    """A row's held-out loss per seed at `length`: "halfway", "steps" (--steps) or one of --confirm-steps."""
    if length == "halfway":
        return row["halfway_losses"]
    return row["losses"] if length == "steps" else row["longer"][length]["losses"]


def changed_pairs(rows: list[dict], shorter: int | str, longer: int | str) -> list[tuple[str, str]]:
    """The pairs of methods whose order at the `longer` length is not their order at the `shorter` one (each
    "halfway", "steps" or one of --confirm-steps), where the change is clear.

    Both lengths are compared on the seeds they share, so one seed's own offset is not taken
    for a change. A pair counts when its gap turns sign between the two lengths and the turn is
    clear: more than twice its standard error, with each length's gap given the spread over
    seeds at --steps (sqrt(sd_a^2 + sd_b^2) / sqrt(seeds); the longer lengths train fewer
    seeds). A pair level at both lengths may swap by chance and is not counted; a clear lead
    that closed to level and turned by a little more than noise is.
    """
    changed = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            a_short, a_long, b_short, b_long = (losses_at(row, length) for row in (a, b) for length in
                                                (shorter, longer))
            seeds = [seed for seed in a_long if seed in a_short]
            before = statistics.fmean(a_short[seed] - b_short[seed] for seed in seeds)
            after = statistics.fmean(a_long[seed] - b_long[seed] for seed in seeds)
            error = math.hypot(a["held_out_std"], b["held_out_std"]) / math.sqrt(len(seeds))
            if (before > 0) != (after > 0) and abs(after - before) > 2 * math.sqrt(2) * error:
                changed.append((a["method"], b["method"]))
    return changed


def table(rows: list[dict], confirm_steps: list[int], confirm_seeds: list[int]) -> str:
    seeds = " ".join(map(str, confirm_seeds))
    longer = "".join(f" at {steps} steps (seeds {seeds}) |" for steps in confirm_steps)
    lines = [f"| method | lr (grid: held-out loss) | held-out loss | at half the steps |{longer} accelerator MiB "
             "| store MiB | forward weights | step / dense |", "|" + " --- |" * (8 + len(confirm_steps))]
    for r in sorted(rows, key=lambda r: r["held_out_mean"]):
        grid = ", ".join(f"{lr}: {loss:.3f}" for lr, loss in r["grid"].items())
        step = f"{r['step_vs_dense']:.2f}" if r["step_vs_dense"] else "-"
        longer = "".join(f" {at['mean']:.4f}" + (f" ± {at['std']:.4f} |" if at["seeds"] > 1 else " |")
                         for at in (r["longer"][steps] for steps in confirm_steps))  # one seed has no spread to show
        lines.append(f"| {r['method']} | {r['lr']:g} ({grid}) | {r['held_out_mean']:.4f} ± {r['held_out_std']:.4f} "
                     f"| {r['halfway_mean']:.4f} |{longer} {r['accelerator_bytes'] / 2**20:.1f} "
                     f"| {r['store_bytes'] / 2**20:.1f} | {r['forward_fraction']:.0%} | {step} |")
    return "\n".join(lines)


LONGER_MARKERS = "sD^v"  # --confirm-steps' open markers in turn: square, diamond, triangles


def plot(rows: list[dict], steps: int, confirm_steps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for i, r in enumerate(sorted(rows, key=lambda r: r["accelerator_bytes"])):
        sparse = r["method"] in TOP_KAST
        color = "tab:red" if sparse else "tab:blue"
        x = r["accelerator_bytes"] / 2**20
        axes.errorbar(x, r["held_out_mean"], yerr=r["held_out_std"], fmt="o", capsize=3, color=color,
                      label=f"{steps} steps" if i == 0 else None)
        longer = [r["longer"][length] for length in confirm_steps]
        if longer:  # the same method trained longer: open markers, joined to its point by a line
            axes.plot([x] * (1 + len(longer)), [r["held_out_mean"], *(at["mean"] for at in longer)], ":", lw=0.8,
                      color=color)
            for length, at, marker in zip(confirm_steps, longer, itertools.cycle(LONGER_MARKERS)):
                axes.errorbar(x, at["mean"], yerr=at["std"], fmt=marker, mfc="none", capsize=3, color=color,
                              label=f"{length} steps" if i == 0 else None)
            axes.annotate(r["method"], (x, longer[-1]["mean"]), textcoords="offset points", xytext=(6, -3),
                          fontsize=6, color="dimgray")
        axes.annotate(r["method"], (x, r["held_out_mean"]), textcoords="offset points", xytext=(6, 5 if i % 2 else -12),
                      fontsize=8)  # neighbours' labels above and below
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.set_xlabel("accelerator bytes of trained state (MiB; weights, gradients, optimizer state)")
    axes.set_ylabel("held-out loss (nats per byte)")
    axes.set_title("Same model, data, schedule and tuned rate; mean ± std over seeds (red: Top-KAST)", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--width", type=int, default=128, help="the model's width (a multiple of 32)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--grid", type=float, nargs="+", default=None,
                        help="the starting learning rates of every method (default: each method's own, a 3x step "
                             "either side of its best rate at 1,200 steps)")
    parser.add_argument("--max-grid", type=int, default=5, help="the most learning rates tried per method")
    parser.add_argument("--corpus-bytes", type=int, default=8 * 2**20)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--confirm-steps", type=int, nargs="+", default=None,
                        help="train each method at its tuned rate this long too, one or more lengths (default: "
                             "twice --steps; 0: none), to show whether the ordering still changes with more steps")
    parser.add_argument("--confirm-seeds", type=int, nargs="+", default=[0], help="the seeds of those longer runs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained side by side, each on its share of the cores")
    parser.add_argument("--time-steps", type=int, default=40,
                        help="steps timed per method, one method at a time on every core, after the study")
    parser.add_argument("--smoke", action="store_true",
                        help="4 steps (and 8 and 12), one rate, one seed: every code path")
    parser.add_argument("--out", default="runs/peers")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.grid, args.max_grid, args.eval_windows, args.time_steps = 4, [0], [3e-3], 1, 16, 3
        args.confirm_steps = [8, 12]
    if args.confirm_steps is None:
        args.confirm_steps = [2 * args.steps]
    args.confirm_steps = sorted(set(args.confirm_steps) - {0})
    if args.confirm_steps and args.confirm_steps[0] <= args.steps:
        parser.error(f"--confirm-steps {args.confirm_steps[0]} is not longer than --steps {args.steps}: each longer "
                     "length checks whether the ordering at --steps holds with more steps (0: no longer runs)")
    if args.width % 32:
        parser.error("--width must be a multiple of 32 (heads of 32)")
    if args.jobs < 1 or args.time_steps < 1:
        parser.error("--jobs and --time-steps must be at least 1")
    if not set(args.confirm_seeds) <= set(args.seeds):
        parser.error("--confirm-seeds must be among --seeds: each longer run is compared with its own seed's run")
    out, started = Path(args.out), time.perf_counter()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    settings = {"width": args.width, "corpus_bytes": args.corpus_bytes, "eval_windows": args.eval_windows,
                "rows": ROWS, "seq": SEQ, "layers": LAYERS, "peer_rank": PEER_RANK,
                "refresh_interval": REFRESH_INTERVAL}
    kept = out / "settings.json"
    if kept.is_file() and json.loads(kept.read_text()) != settings:  # its runs would be reused as if they were ours
        parser.error(f"{out} holds runs made with {kept.read_text().strip()}, not {json.dumps(settings)}: "
                     "pass another --out, or remove that folder")
    if not kept.is_file() and any(runs.iterdir()):
        parser.error(f"{runs} holds runs whose settings are not recorded (an older bench_peers made them): "
                     "pass another --out, or remove that folder")
    kept.write_text(json.dumps(settings))
    widths = {**{method: args.width for method in METHODS}, "small dense": small_dense_width(args.width)}
    versions = {name: metadata.version(name) for name in
                ("torch", "deepspeed", "transformers", *sorted({n for names in PACKAGES.values() for n in names}))
                if _installed(name)}
    print(f"{LAYERS} layers, width {args.width} (small dense: {widths['small dense']}), {ROWS} x {SEQ} tokens per "
          f"step, {args.steps} steps, seeds {args.seeds}, {args.jobs} runs at a time; {versions}", flush=True)
    skipped = {method: f"{' or '.join(PACKAGES[method])} is not installed (pip install -e '.[bench]')"
               for method in args.methods if method in PACKAGES and not any(map(_installed, PACKAGES[method]))}
    for method, why in skipped.items():
        print(f"{method}: {why}; skipped", flush=True)
    methods = [method for method in args.methods if method not in skipped]
    pool = RunPool(args.jobs, args, widths, runs)
    try:
        with ThreadPoolExecutor(len(methods)) as threads:
            studies = [threads.submit(study, method, args, pool) for method in methods]
            try:
                for finished in as_completed(studies):
                    finished.result()  # the first method that fails (or Ctrl-C) stops the study; its runs are kept
            except BaseException:
                pool.stop()
                raise
        rows = [finished.result() for finished in studies]
    finally:
        pool.close()
    trained = time.perf_counter() - started
    add_step_times(rows, args, widths)
    lengths = ["halfway", "steps", *args.confirm_steps]
    names = {"halfway": f"{args.steps // 2} (halfway)", "steps": str(args.steps)}
    changed = {f"{names.get(shorter, shorter)} to {names.get(longer, longer)}": changed_pairs(rows, shorter, longer)
               for shorter, longer in itertools.pairwise(lengths)}
    (out / "peers.json").write_text(json.dumps({"steps": args.steps, "width": args.width, "seeds": args.seeds,
                                                "versions": versions, "jobs": args.jobs,
                                                "small_dense_width": widths["small dense"], "rows": rows,
                                                "confirm_steps": args.confirm_steps,
                                                "confirm_seeds": args.confirm_seeds,
                                                "changed": changed, "skipped": skipped,
                                                "train_seconds": trained,
                                                "seconds": time.perf_counter() - started}, indent=1))
    text = table(rows, args.confirm_steps, args.confirm_seeds)
    (out / "peers.md").write_text(text + "\n")
    plot(rows, args.steps, args.confirm_steps, out / "peers.png")
    print(text)
    for span, pairs in changed.items():
        print(f"order changed from {span} steps (clear turns only): {pairs or 'none'}")
    print(f"{time.perf_counter() - started:.0f} s ({trained:.0f} s training); wrote {out / 'peers.json'}, peers.md, "
          "peers.png")


def add_step_times(rows: list[dict], args, widths: dict) -> None:
    """Each method's median step at its tuned rate, timed one method at a time in one process on every core.

    The study's runs share the cores, so their own timings would say as much about their
    neighbour as about the method; these are taken apart from them, in the same process, so
    the ratios to dense compare like with like."""
    with worker_pool(1, os.cpu_count() or 1, args) as timer:
        for row in rows:
            row["step_s"] = timer.submit(time_in_worker, row["method"], row["lr"], widths[row["method"]],
                                         args.time_steps).result()
    dense = next((row["step_s"] for row in rows if row["method"] == "dense AdamW"), None)
    for row in rows:
        row["step_vs_dense"] = row["step_s"] / dense if dense else None


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
