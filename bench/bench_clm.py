"""examples/run_clm.py with Top-KAST against the same script dense: tokens/s, accelerator memory, eval loss.

    python bench/bench_clm.py [--size gpt2-small] [--steps 300] [--config configs/hf_trainer_zero2.json]
    python bench/bench_clm.py --smoke     # CPU accelerator, a tiny model and a few steps

Both runs are the same command under the deepspeed launcher on one rank (the config's
ZeRO stage, bf16 on a GPU), on the embedded corpus with the byte-level tokenizer, one
after the other; `--dense` is the only difference. The script runs through
bench/clm_timed.py, which times every optimizer step with CUDA events (no extra sync) and
records the peak accelerator memory, without transformers' memory tracker (a busy thread
that contends for the GIL; it made the Top-KAST run look 3.6x slower on an H100). Reported:
tokens/s between refreshes (tokens per step over the median step time, refresh steps and
the first 10% of steps left out), the same over the whole run (the Trainer's
train_samples_per_second times the block size: refreshes, logging and evaluation
included), peak accelerator memory (the engine, built inside train(), included),
eval_loss (nats per byte) on the held-out 5%, and the refresh apart: the mean refresh time
the callback logs and its share of training (that mean times the refreshes over
train_runtime). Writes a table and runs/bench/clm.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {  # GPT-2 shapes (n_layer, n_embd, n_head); the vocabulary is the byte tokenizer's 257
    "tiny": (2, 64, 2),
    "gpt2-small": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
}


def refresh_interval(args) -> int:
    """Optimizer steps between refreshes in the config's "topkast" section (0: none)."""
    return json.loads(Path(REPO / args.config).read_text()).get("topkast", {}).get("refresh_interval", 0)


def step_seconds_between_refreshes(times: dict, interval: int) -> float:
    """Median time of the steps that are not refresh steps, after the first 10% (warm-up, JIT, allocator)."""
    pairs = list(zip(times["steps"], times["seconds"]))
    kept = [s for step, s in pairs[len(pairs) // 10:] if not interval or step % interval]
    return statistics.median(kept)


def run(variant: str, args, out: Path) -> dict:
    layers, width, heads = SIZES[args.size]
    folder = out / variant
    cuda = not args.smoke
    command = [
        "deepspeed", "--num_gpus", "1", "--master_port", os.environ.get("MASTER_PORT", "29613"),
        str(REPO / "bench" / "clm_timed.py"), "--deepspeed", args.config, "--model_type", "gpt2",
        "--config_overrides", f"n_layer={layers},n_embd={width},n_head={heads},n_positions={args.block_size}",
        "--tokenizer_name", "bytes", "--max_bytes", str(args.max_bytes), "--block_size", str(args.block_size),
        "--do_train", "--do_eval", "--output_dir", str(folder), "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size", str(args.batch),
        "--max_eval_samples", str(args.eval_samples), "--learning_rate", "6e-4", "--warmup_steps",
        str(args.steps // 10), "--save_strategy", "no", "--logging_steps", "50", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "True",
        *(["--bf16"] if cuda else ["--use_cpu"]), *(["--dense"] if variant == "dense" else []),
    ]
    env = dict(os.environ, **({} if cuda else {"DS_ACCELERATOR": "cpu"}))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    (out / f"{variant}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {result.returncode}); see {out / f'{variant}.log'}:\n"
                         + result.stderr[-3000:])
    train = json.loads((folder / "train_results.json").read_text())
    evaluation = json.loads((folder / "eval_results.json").read_text())
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    logged = [e["topkast/refresh_seconds"] for e in history if "topkast/refresh_seconds" in e]  # the latest per log
    mean_refresh = sum(logged) / len(logged) if logged else 0.0
    times = json.loads((folder / "step_times.json").read_text())
    interval = 0 if variant == "dense" else refresh_interval(args)
    step_s = step_seconds_between_refreshes(times, interval)
    refreshes = args.steps // interval if interval else 0
    return {"variant": variant, "step_s": step_s, "tokens_per_s": args.batch * args.block_size / step_s,
            "run_tokens_per_s": train["train_samples_per_second"] * args.block_size,
            "train_runtime_s": train["train_runtime"], "peak_accelerator_bytes": times["peak_accelerator_bytes"],
            "eval_loss": evaluation["eval_loss"], "eval_bits_per_byte": evaluation["eval_loss"] / math.log(2),
            "refresh_s": mean_refresh, "refresh_share": mean_refresh * refreshes / train["train_runtime"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="gpt2-small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--eval_samples", type=int, default=256)
    parser.add_argument("--max_bytes", type=int, default=5_000_000)
    parser.add_argument("--config", default="configs/hf_trainer_zero2.json")
    parser.add_argument("--smoke", action="store_true", help="CPU accelerator, tiny sizes.")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "clm"))
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.batch, args.block_size, args.eval_samples, args.max_bytes = \
            "tiny", 4, 2, 32, 8, 100_000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(variant, args, out) for variant in ("dense", "topkast")]
    dense = rows[0]
    print(f"run_clm.py, {args.size}, {args.steps} steps of {args.batch}x{args.block_size} tokens, {args.config}")
    print(f"{'variant':<10}{'step ms':>9}{'tokens/s':>11}{'vs dense':>10}{'run tok/s':>11}{'vs dense':>10}"
          f"{'peak MiB':>10}{'vs dense':>10}{'eval bpb':>10}{'refresh s':>11}{'refresh %':>11}")
    for row in rows:
        peak, dense_peak = row["peak_accelerator_bytes"], dense["peak_accelerator_bytes"]
        memory = f"{peak / 2**20:>10.0f}{peak / dense_peak:>10.3f}" if peak is not None else f"{'-':>10}{'-':>10}"
        print(f"{row['variant']:<10}{row['step_s'] * 1e3:>9.1f}{row['tokens_per_s']:>11.0f}"
              f"{row['tokens_per_s'] / dense['tokens_per_s']:>10.3f}{row['run_tokens_per_s']:>11.0f}"
              f"{row['run_tokens_per_s'] / dense['run_tokens_per_s']:>10.3f}{memory}"
              f"{row['eval_bits_per_byte']:>10.4f}{row['refresh_s']:>11.3f}{100 * row['refresh_share']:>10.1f}%")
    print("tokens/s: between refreshes (median step); run tok/s: the Trainer's, over the whole run (refreshes, "
          "logging and evaluation included); peak: max_memory_allocated (GPU only)")
    (out / "clm.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
