"""Our RigL and SET against sparsimony's (a masked-dense PyTorch library), on the tiny GPT-2 at 90% sparsity.

    pip install --no-deps sparsimony==0.1.0   # it pins numpy 1.x, which would break datasets (pyarrow)
    python bench/bench_sparsimony.py [--steps 400] [--out runs/sparsimony]

Our side is the training command (`deepspeed --module ds_topkast.train`, one rank) on
configs/tiny_gpt2.json with topkast.algorithm rigl or set: forward = backward sparsity
0.9, ΔT = 20 steps, drop fraction 0.3 decaying as a cosine, mask updates until 75% of the
steps. The peer side trains the same GPT-2 (same seed) in a plain PyTorch loop on the
same batches (the training command's corpus, windows and batch size), with the same
AdamW, warm-up + cosine learning rate (DeepSpeed's own scheduler class) and gradient
clipping, under sparsimony's RigL or SET on the same layers at the same settings (uniform
distribution, CosineDecayScheduler), and scores the same validation batches.

Every run is its own process, so their peak memories compare: the resident-set
high-water mark (ru_maxrss) of the process tree. On DeepSpeed's CPU accelerator the
"accelerator memory" is this process memory. Step times are means over the steps after
the first log interval (validation excluded); on a shared CPU, OMP_NUM_THREADS=1 (both
sides inherit it) keeps other jobs from stretching them. Prints a table with
ours/sparsimony ratios (below 1: ours lower) and writes sparsimony.json to --out.

What sparsimony does differently: it keeps every weight dense and multiplies it by a
mask (torch.ao.pruning parametrizations), so compute, gradients and AdamW state stay
dense; RigL's first mask is random (ours and its SET's: by magnitude); its RigL grows
from the dense gradient summed over all steps before the first update, later from the
update step's alone; mask changes leave AdamW's moments as they are (ours: new entries start at zero);
and its SET computes the zero init of grown weights but discards it, so they regrow with
their dense values. sparsimony 0.1.0's SET never changes a mask as released (its step
counter advances twice per call, so an even ΔT never fires, and its sparsity check
compares with numel·sparsity instead of numel·(1 - sparsity)); PatchedSET below fixes
those two lines only.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_quality import variant_config
from common import run_with_peak_rss, training_command

try:
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.base import DSTMixin
    from sparsimony.dst.rigl import RigL
    from sparsimony.dst.set import SET
    from sparsimony.schedulers.base import CosineDecayScheduler
except ImportError:
    raise SystemExit("bench_sparsimony.py needs sparsimony 0.1.0: pip install --no-deps sparsimony==0.1.0 "
                     "(without --no-deps it downgrades numpy to 1.x, which breaks datasets' pyarrow).") from None

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs/tiny_gpt2.json"
ALGORITHMS = {"rigl": "RigL", "set": "SET"}
SPARSITY, INTERVAL, DROP_FRACTION, UPDATE_END = 0.9, 20, 0.3, 0.75
NOTES = ["Peak memory: resident-set high-water mark (ru_maxrss) of each run's process tree; on DeepSpeed's CPU "
         "accelerator the 'accelerator memory' is this process memory.",
         "sparsimony SET: 0.1.0 with its step count and sparsity check fixed (as released it never changes a mask)."]
MiB = 2**20


class PatchedSET(SET):
    """sparsimony 0.1.0's SET with its two blocking bugs fixed (see the module docstring); otherwise as released."""

    _assert_sparsity_level = DSTMixin._assert_sparsity_level  # kept weights == int(numel * (1 - sparsity))

    def _step(self) -> None:
        super()._step()
        self._step_count -= 1  # the released _step adds 1 before and after its schedule check


def topkast_section(algorithm: str, steps: int) -> dict:
    return {"algorithm": algorithm, "forward_sparsity": SPARSITY, "backward_sparsity": SPARSITY,
            "refresh_interval": INTERVAL, "forward_interval": 0, "drop_fraction": DROP_FRACTION,
            "update_end_step": int(UPDATE_END * steps)}


def run_config(algorithm: str, steps: int) -> dict:
    """bench_quality's variant of the tiny GPT-2 config (its 32 validation batches), validated only at the end,
    without the test split and plot."""
    base = json.loads(BASE_CONFIG.read_text())
    cfg = variant_config(base, topkast_section(algorithm, steps), steps, seed=base["train"]["seed"])
    cfg["train"].update(eval_interval=steps, test=False, plot=False)
    return cfg


def child_environment() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def measured(command: list[str], folder: Path) -> int:
    """Run one side's process, output in folder/log.txt; its peak RSS in bytes. A failure ends the benchmark."""
    try:
        return run_with_peak_rss(command, folder / "log.txt", cwd=REPO, env=child_environment())
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{' '.join(command)}\nexited with {err.returncode}; the end of {folder / 'log.txt'}:\n"
                         f"{err.output}") from None


def fresh_folder(folder: Path, cfg: dict) -> Path:
    """An emptied folder holding the run's config.json (an earlier result there is replaced)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = folder / "config.json"
    config.write_text(json.dumps(cfg, indent=1))
    return config


def tokens_per_step(cfg: dict) -> int:
    return cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * cfg["train"]["seq_len"]


def run_ours(cfg: dict, folder: Path) -> dict:
    """The training command; final eval loss, and the mean step time of the train records after the first."""
    config = fresh_folder(folder, cfg)
    peak = measured(training_command(config, folder / "run"), folder)
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    train = [r for r in records if r["kind"] == "train"]
    steps = [b["step"] - a["step"] for a, b in zip(train, train[1:])]
    seconds = [n * tokens_per_step(cfg) / r["tokens_per_s"] for n, r in zip(steps, train[1:])]
    return {**{k: v for k, v in final.items() if k.startswith("eval_")}, "eval_step": final["step"],
            "step_ms": 1000 * sum(seconds) / sum(steps), "peak_rss_bytes": peak}


def run_peer(cfg: dict, algorithm: str, folder: Path) -> dict:
    """This script's peer mode in a process of its own; its result.json with the process's peak RSS."""
    config = fresh_folder(folder, cfg)
    result = folder / "result.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--peer", algorithm, "--config", str(config),
               "--result", str(result)]
    peak = measured(command, folder)
    return {**json.loads(result.read_text()), "peak_rss_bytes": peak}


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def sparsified_weights(model: torch.nn.Module, topkast: dict) -> list[str]:
    """The weights ds_topkast sparsifies: Linear and Conv1D modules matching include and not exclude."""
    from transformers.pytorch_utils import Conv1D

    return [f"{name}.weight" for name, module in model.named_modules()
            if name and isinstance(module, (torch.nn.Linear, Conv1D)) and matches(name, topkast["include"])
            and not matches(name, topkast["exclude"])]


def sparsifier(algorithm: str, optimizer: torch.optim.Optimizer, topkast: dict):
    """sparsimony's RigL or SET at the topkast section's sparsity, interval, drop fraction and end step.

    init_method=None keeps the model's own initial weights (sparsimony's default re-draws
    the active ones), so both sides start from the same GPT-2.
    """
    schedule = CosineDecayScheduler(topkast["drop_fraction"], topkast["update_end_step"], topkast["refresh_interval"])
    kind = RigL if algorithm == "rigl" else PatchedSET
    return kind(scheduler=schedule, distribution=UniformDistribution(), optimizer=optimizer,
                sparsity=topkast["forward_sparsity"], init_method=None)


def train_peer(config: Path, algorithm: str, result: Path) -> None:
    """The peer side: the training command's model, batches, optimizer, schedule and validation, under sparsimony."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from ds_topkast.config import load_deepspeed_config
    from ds_topkast.lm.data.corpus_cache import open_corpus
    from ds_topkast.lm.loop import quality
    from ds_topkast.lm.models.runners import CausalLMRunner
    from ds_topkast.lm.run_files import accumulation_steps, micro_batch_per_rank
    from ds_topkast.lm.train_config import train_section

    ds_config = load_deepspeed_config(config)
    cfg, topkast = train_section(ds_config), ds_config["topkast"]
    corpus = open_corpus(cfg.data)
    runner = CausalLMRunner(cfg.model, corpus, cfg.seq_len, micro_batch_per_rank(ds_config, 1), cfg.seed)
    accumulation = accumulation_steps(ds_config, 1)
    model = runner.build_model()
    adamw = ds_config["optimizer"]["params"]
    optimizer = torch.optim.AdamW(model.parameters(), **{k: adamw[k] for k in ("lr", "betas", "eps", "weight_decay")
                                                          if k in adamw})
    schedule = WarmupCosineLR(optimizer, **{"total_num_steps": cfg.steps, **ds_config["scheduler"]["params"]})
    sparse = sparsifier(algorithm, optimizer, topkast)
    sparse.prepare(model, [{"tensor_fqn": name} for name in sparsified_weights(model, topkast)])
    model.train()
    times = []
    for step in range(cfg.steps):
        start = time.perf_counter()
        for micro in range(accumulation):
            (runner.train_loss(model, step, micro, 0, 1) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ds_config["gradient_clipping"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        sparse.step()
        times.append(time.perf_counter() - start)
    model.eval()
    nll, tokens = runner.eval_sums(model, "valid", cfg.eval_batches, 0, 1).tolist()
    result.write_text(json.dumps({
        "eval_loss": nll / tokens, **{f"eval_{k}": v for k, v in quality(nll / tokens, corpus.unit).items()},
        "eval_step": cfg.steps, "step_ms": 1000 * statistics.fmean(times[cfg.log_interval:]),
        "sparsity": float(sparse.calculate_global_sparsity())}, indent=1))


def ratios(ours: dict, peer: dict) -> dict:
    return {key: ours[key] / peer[key] for key in ("eval_loss", "peak_rss_bytes", "step_ms")}


def print_table(results: dict, steps: int, cfg: dict) -> None:
    print(f"\nGPT-2 {cfg['train']['model']['n_layer']}x{cfg['train']['model']['n_embd']}, {steps} steps of "
          f"{tokens_per_step(cfg)} tokens; sparsity {SPARSITY}, ΔT {INTERVAL}, drop fraction {DROP_FRACTION} "
          f"(cosine) to step {int(UPDATE_END * steps)}; step time: mean after the first log interval")
    print(f"{'':<20}{'eval loss':>12}{'peak RSS MiB':>15}{'step ms':>10}")
    for algorithm, sides in results.items():
        for side in ("ours", "sparsimony"):
            row = sides[side]
            print(f"{side + ' ' + ALGORITHMS[algorithm]:<20}{row['eval_loss']:>12.4f}"
                  f"{row['peak_rss_bytes'] / MiB:>15.1f}{row['step_ms']:>10.2f}")
        ratio = sides["ours/sparsimony"]
        print(f"{'  ours/sparsimony':<20}{ratio['eval_loss']:>12.3f}{ratio['peak_rss_bytes']:>15.3f}"
              f"{ratio['step_ms']:>10.3f}")
    print("\n".join(NOTES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/sparsimony")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--peer", choices=list(ALGORITHMS), help=argparse.SUPPRESS)  # one peer run, in its process
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        train_peer(args.config, args.peer, args.result)
        return
    if int(UPDATE_END * args.steps) < INTERVAL:
        parser.error(f"--steps {args.steps}: masks change every {INTERVAL} steps until {UPDATE_END:.0%} of the steps, "
                     f"so none would; give at least {math.ceil(INTERVAL / UPDATE_END)}")
    out = Path(args.out).resolve()
    results = {}
    for algorithm in args.algorithms:
        cfg = run_config(algorithm, args.steps)
        sides = {"sparsimony": run_peer(cfg, algorithm, out / f"sparsimony_{algorithm}"),
                 "ours": run_ours(cfg, out / f"ours_{algorithm}")}
        results[algorithm] = {**sides, "ours/sparsimony": ratios(sides["ours"], sides["sparsimony"])}
    print_table(results, args.steps, cfg)
    report = {"steps": args.steps, "topkast": {a: topkast_section(a, args.steps) for a in args.algorithms},
              "notes": NOTES, "results": results}
    (out / "sparsimony.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'sparsimony.json'}")


if __name__ == "__main__":
    main()
