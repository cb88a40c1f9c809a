"""The training command's own speed and memory: a paper setup, dense against Top-KAST, side by side.

    python bench/bench_lm.py [--config configs/paper/enwik8_txl69m_90_80.json] [--variants dense 90_80]
                             [--seconds 150] [--out DIR]

Each variant is the config with its "topkast" section removed ("dense") or set to the
forward/backward sparsity the name gives ("90_80": 0.9 / 0.8), run by the training command
(`python -m ds_topkast.train`, one process) on the embedded corpus (no network needed)
for about --seconds, with no validation, test or checkpoint on the way; the run is then
stopped. From its train records (every 10 steps) it reports the median tokens/s after
the first record (start-up, JIT builds and the first refresh left out) and the peak
accelerator memory (max_memory_allocated), and the ratios of each variant to the first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


SPEED_ONLY = dict(data={"max_bytes": 8_000_000}, steps=1_000_000, eval_interval=1_000_000, log_interval=10,
                  checkpoint_interval=None, test=False, plot=False)  # the embedded corpus, only train records


def variant_config(base: Path, variant: str, out: Path, train: dict = SPEED_ONLY) -> Path:
    """The config at this variant's sparsity ("dense", or "F_B" percent), its "train" section updated by `train`."""
    cfg = json.loads(base.read_text())
    cfg.pop("csv_monitor", None)
    if train is SPEED_ONLY and cfg["train"].get("data", {}).get("tokenizer", "bytes") != "bytes":
        raise SystemExit(f"{base} is word- or token-level; bench_lm.py runs byte-level setups (enwik8's) on the "
                         "embedded corpus, which has no word vocabulary of the right size.")
    if variant == "dense":
        del cfg["topkast"]
    else:
        forward, backward = (int(p) / 100 for p in variant.split("_"))
        cfg["topkast"].update(forward_sparsity=forward, backward_sparsity=backward)
    cfg["train"].update(train)
    path = out / f"{variant}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run(base: Path, variant: str, seconds: int, out: Path) -> dict:
    config = variant_config(base, variant, out)
    run_dir = out / variant
    log = (out / f"{variant}.log").open("w")
    try:
        subprocess.run([sys.executable, "-m", "ds_topkast.train", "--config", str(config), "--out", str(run_dir)],
                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=seconds, env=os.environ)
    except subprocess.TimeoutExpired:
        pass  # stopped on purpose: the records so far are the measurement
    metrics = run_dir / "metrics.jsonl"
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"] \
        if metrics.is_file() else []
    if len(train) < 2:
        return {"variant": variant, "records": len(train), "error": f"fewer than 2 train records; see {log.name}"}
    memory = next((r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "memory"), None)
    return {"variant": variant, "steps": train[-1]["step"], "tokens_per_s": statistics.median(
        r["tokens_per_s"] for r in train[1:]), "peak_memory_bytes": max(r["peak_memory_bytes"] for r in train),
        "loss": train[-1]["loss"], "memory_report": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/paper/enwik8_txl69m_90_80.json")
    parser.add_argument("--variants", nargs="+", default=["dense", "90_80"])
    parser.add_argument("--seconds", type=int, default=150)
    parser.add_argument("--out", default="runs/bench_lm")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.config).resolve()
    results = [run(base, variant, args.seconds, out) for variant in args.variants]
    (out / "bench_lm.json").write_text(json.dumps(results, indent=1))
    name = base.stem
    base = results[0]
    print(f"{name}: {'variant':<10}{'steps':>8}{'tokens/s':>12}{'vs first':>10}{'peak GiB':>10}{'vs first':>10}"
          f"{'loss':>8}")
    for r in results:
        if "error" in r or "error" in base:
            print(f"{r['variant']:<10} {r.get('error', 'no baseline')}")
            continue
        print(f"{'':<{len(name) + 2}}{r['variant']:<10}{r['steps']:>8}{r['tokens_per_s']:>12.0f}"
              f"{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}x{r['peak_memory_bytes'] / 2**30:>10.2f}"
              f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:>9.2f}x{r['loss']:>8.3f}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
