"""Every benchmark at CPU-sized defaults, one after another, then the plots.

    python bench/run_all.py [--size cpu|gpt2-small] [--out runs/bench] [--skip-comm]

Runs bench_select.py (exact top-K vs torch.topk / kthvalue, 1M-64M entries),
bench_training.py (memory, step time, refresh: dense DeepSpeed, ZeRO-Offload, Top-KAST
80/0, 90/80, 95/90), bench_refresh.py (refresh vs the store floor at 4 sizes) and
bench_comm.py on 2 ranks (bytes all-reduced per step and per refresh), each in its own
process, printing its table; writes their JSON and benchmarks.png (step time and memory
against sparsity, refresh time against model size) to --out. Each script has flags for
larger sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(*command: str) -> None:
    print(f"\n$ {' '.join(command)}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(HERE)}
    subprocess.run(command, cwd=HERE.parent, env=env, check=True)


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = json.loads((out / "training.json").read_text())
    refresh = json.loads((out / "refresh.json").read_text())
    rows = training["rows"]
    names = [r["variant"].replace("Top-KAST ", "") for r in rows]
    fig, (steps, memory, growth) = plt.subplots(1, 3, figsize=(16, 4.2))
    dense = rows[0]["step_s"]
    steps.bar(names, [r["step_s"] / dense for r in rows], label="between refreshes")
    steps.plot(names, [r["amortised_step_s"] / dense for r in rows], "ko", label=f"amortised (refresh every "
               f"{training['interval']})")
    steps.axhline(1.15, color="red", linestyle="--", label="target at 90/80: 1.15")
    steps.set(ylabel="step time / dense DeepSpeed", title="step time")
    steps.legend(fontsize=8)
    mib = 2**20
    memory.bar(names, [r["accelerator_bytes"] / mib for r in rows], label="accelerator (trained tensors)")
    memory.bar(names, [r.get("store_host_bytes", 0) / mib + r["host_optimizer_bytes"] / mib for r in rows],
               bottom=[r["accelerator_bytes"] / mib for r in rows], alpha=0.4, label="host (store, offloaded state)")
    memory.set(ylabel="MiB per rank", title=f"memory ({training['size']} shape)")
    memory.legend(fontsize=8)
    for axis in (steps, memory):
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    entries = [r["entries"] / 1e6 for r in refresh]
    growth.plot(entries, [r["refresh_s"] for r in refresh], "o-", label="refresh")
    growth.plot(entries, [r["floor_s"] for r in refresh], "s--", label="store read+write floor")
    growth.plot(entries, [3 * r["floor_s"] for r in refresh], ":", color="red", label="3x floor (target)")
    growth.set(xlabel="stored entries (millions)", ylabel="seconds", title="refresh time against model size")
    growth.legend(fontsize=8)
    fig.tight_layout()
    path = out / "benchmarks.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="cpu", choices=["cpu", "gpt2-small"])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--skip-comm", action="store_true", help="Leave out the 2-rank communication benchmark.")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    python = sys.executable
    run(python, str(HERE / "bench_select.py"), "--out", str(out))
    run(python, str(HERE / "bench_training.py"), "--size", args.size, "--out", str(out))
    run(python, str(HERE / "bench_refresh.py"), "--out", str(out))
    if not args.skip_comm:
        run(str(Path(python).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
            os.environ.get("MASTER_PORT", "29733"), str(HERE / "bench_comm.py"), "--stage", "2")
    print(f"\nplot: {plot(out)}")


if __name__ == "__main__":
    main()
