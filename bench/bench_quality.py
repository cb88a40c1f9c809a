"""Quality: dense against Top-KAST 80/0 and 90/80 and a static-mask 90/80, for GPT-2 and Transformer-XL.

    python bench/bench_quality.py [--steps 400] [--out runs/quality] [--families gpt2 transformer_xl]

Each run is the training command (`deepspeed --module ds_topkast.train`) on one rank with
the same model, data, seed and steps; only the "topkast" section differs: absent (dense),
80/0, 90/80, and 90/80 with refresh and A re-selection disabled (the static-mask
baseline). Prints the final eval bits per byte, checks the issue's targets (80/0 within
5% of dense; 90/80 better than static), and writes quality.json and quality.png to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"gpt2": "configs/tiny_gpt2.json", "transformer_xl": "configs/tiny_transformer_xl.json"}
VARIANTS = {
    "dense": None,
    "80/0": {"forward_sparsity": 0.8, "backward_sparsity": 0.0},
    "90/80": {"forward_sparsity": 0.9, "backward_sparsity": 0.8},
    "90/80 static": {"forward_sparsity": 0.9, "backward_sparsity": 0.8, "refresh_interval": 0, "forward_interval": 0},
}


def variant_config(base: dict, topkast: dict | None, steps: int) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["train"].update(steps=steps, eval_interval=max(steps // 8, 1), eval_batches=32)
    if topkast is None:
        del cfg["topkast"]
    else:
        cfg["topkast"].update(topkast)
    return cfg


def train(cfg: dict, out: Path) -> list[dict]:
    """Run the training command on one rank; return its eval records."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.json"
    config.write_text(json.dumps(cfg, indent=1))
    run = out / "run"
    if not (run / "latest").exists():
        deepspeed = Path(sys.executable).parent / "deepspeed"
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        log = (out / "log.txt").open("w")
        subprocess.run([str(deepspeed), "--num_gpus", "1", "--module", "ds_topkast.train", "--config", str(config),
                        "--out", str(run)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (family, variants) in zip(axes[0], results.items()):
        for name, evals in variants.items():
            ax.plot([r["step"] for r in evals], [r["eval_bpb"] for r in evals], marker=".", label=name)
        ax.set(title=family, xlabel="optimizer step", ylabel="eval bits per byte")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, dict[str, list[dict]]] = {}
    for family in args.families:
        base = json.loads((REPO / FAMILIES[family]).read_text())
        results[family] = {name: train(variant_config(base, topkast, args.steps),
                                       out / family / name.replace("/", "_").replace(" ", "_"))
                           for name, topkast in VARIANTS.items()}
    print(f"{'family':<16}" + "".join(f"{name:>14}" for name in VARIANTS) + f"{'80/0 vs dense':>16}"
          + f"{'90/80 vs static':>18}")
    summary = {}
    for family, variants in results.items():
        final = {name: evals[-1]["eval_bpb"] for name, evals in variants.items()}
        gap = final["80/0"] / final["dense"] - 1
        summary[family] = {"final_eval_bpb": final, "gap_80_0": gap,
                           "target_80_0_within_5pct": gap <= 0.05,
                           "target_90_80_beats_static": final["90/80"] < final["90/80 static"]}
        print(f"{family:<16}" + "".join(f"{final[name]:>14.4f}" for name in VARIANTS)
              + f"{gap:>+15.2%} " + f"{'better' if summary[family]['target_90_80_beats_static'] else 'WORSE':>17}")
    (out / "quality.json").write_text(json.dumps({"steps": args.steps, "summary": summary, "evals": results},
                                                 indent=1))
    plot(results, out / "quality.png")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()
