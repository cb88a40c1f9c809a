"""The quality study: the sparse-training family against dense and small-dense, several seeds, mask overlap.

    python bench/bench_quality.py [--steps 200] [--seeds 0 1 2] [--families gpt2 transformer_xl]
                                  [--variants ...] [--out runs/quality]

Each run is the training command (`python -m ds_topkast.train`, one CPU process) with
the same model, data and steps; a variant changes only the "topkast" section (or, for
small-dense, the model's width) and each seed sets the model's initialisation, the data
order and every random draw. Variants (forward sparsity 90% unless named otherwise):
dense; small-dense (a dense model as wide as gives the 90% model's forward parameter
count); static; SET; RigL; GMP (pruned from dense between 10% and 75% of the steps);
Top-KAST 80/0, 90/80, 95/90, 95/80; Top-KAST 90/80 with a random B\\A; and Top-KAST
90/80 with per-entry bias correction for entries new to B. RigL and SET update every 20
steps with ζ0 = 0.3 until 75% of the steps, as Evci et al.

Reports, per family and variant, the mean and spread (sample standard deviation) of the
final eval loss over seeds; the mask overlap of the final forward sets A (Jaccard over
all sparsified weights) between seeds of the same variant and with RigL's of the same
seed; writes quality.json and quality.png (means with error bars) to --out. Runs already
finished in --out are reused, so an interrupted study continues.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"gpt2": "configs/tiny_gpt2.json", "transformer_xl": "configs/tiny_transformer_xl.json"}
SPARSITY = 0.9


def variants(steps: int) -> dict[str, dict | None]:
    """The "topkast" section of each variant (None: dense; small-dense is dense at another width)."""
    update_end = steps * 3 // 4
    drop_grow = dict(forward_sparsity=SPARSITY, drop_fraction=0.3, update_end_step=update_end)
    return {
        "dense": None,
        "small-dense": None,
        "static": dict(algorithm="static", forward_sparsity=SPARSITY),
        "SET": dict(algorithm="set", **drop_grow),
        "RigL": dict(algorithm="rigl", **drop_grow),
        "GMP": dict(algorithm="gmp", forward_sparsity=SPARSITY, prune_start_step=steps // 10,
                    prune_end_step=update_end),
        "Top-KAST 80/0": dict(forward_sparsity=0.8, backward_sparsity=0.0),
        "Top-KAST 90/80": dict(forward_sparsity=0.9, backward_sparsity=0.8),
        "Top-KAST 95/90": dict(forward_sparsity=0.95, backward_sparsity=0.9),
        "Top-KAST 95/80": dict(forward_sparsity=0.95, backward_sparsity=0.8),
        "Top-KAST 90/80 random-B": dict(forward_sparsity=0.9, backward_sparsity=0.8, selection="random"),
        "Top-KAST 90/80 per-entry": dict(forward_sparsity=0.9, backward_sparsity=0.8,
                                         new_entries="per_entry_bias_correction"),
    }


# Keys of the base configs' "topkast" sections that only Top-KAST takes.
_TOPKAST_ONLY = ("backward_sparsity", "forward_interval", "exploration_l2", "selection")


def variant_config(base: dict, topkast: dict | None, steps: int, seed: int, width: int | None = None) -> dict:
    """The base config with this variant's "topkast" section (or none), steps, seed and (small-dense) width."""
    cfg = json.loads(json.dumps(base))
    cfg["train"].update(steps=steps, eval_interval=max(steps // 2, 1), eval_batches=32, seed=seed, test=False)
    if topkast is None:
        del cfg["topkast"]
    else:
        section = dict(cfg["topkast"])
        if topkast.get("algorithm", "topkast") != "topkast":
            section = {k: v for k, v in section.items() if k not in _TOPKAST_ONLY}
        cfg["topkast"] = {**section, **topkast, "seed": seed}
    if width is not None:
        cfg["train"]["model"].update(width_fields(cfg["train"]["model"], width))
    return cfg


def width_fields(model: dict, width: int) -> dict:
    """The model fields that set its width (GPT-2's n_embd; Transformer-XL's d_model with d_inner = 4·d_model)."""
    return {"n_embd": width} if model["type"] == "gpt2" else {"d_model": width, "d_inner": 4 * width}


def build(cfg: dict) -> torch.nn.Module:
    """The config's model, as the training command builds it (byte vocabulary, its window length)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_topkast.lm.models.transformer_xl import TransformerXL, preset

    fields = {k: v for k, v in cfg["train"]["model"].items() if k != "type"}
    if cfg["train"]["model"]["type"] == "transformer_xl":
        return TransformerXL(preset(fields.pop("preset"), **fields))
    seq_len = cfg["train"].get("seq_len", 128)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=256, n_positions=seq_len, **fields))


def forward_parameters(cfg: dict) -> int:
    """Parameters the forward pass uses: every dense one, and k_A of each sparsified layer."""
    import ds_topkast
    from ds_topkast.core.layers import sparse_layers

    model = build(cfg)
    if "topkast" in cfg:
        model = ds_topkast.sparsify(model, {**cfg["topkast"], "dense_store": {"device": "cpu", "pin_memory": False}})
    layers = sparse_layers(model)
    compact = {id(layer.values) for layer in layers.values()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in compact)
    return dense + sum(layer.k_forward for layer in layers.values())


def small_dense_width(base: dict, sparse_cfg: dict) -> tuple[int, int, int]:
    """The width (a multiple of the head count) whose dense model's size is closest to the sparse forward count."""
    target = forward_parameters(sparse_cfg)
    heads = base["train"]["model"].get("n_head", 4)
    dense_cfg = json.loads(json.dumps(base))
    del dense_cfg["topkast"]
    sizes = {}
    for width in range(heads, 1025, heads):
        dense_cfg["train"]["model"].update(width_fields(dense_cfg["train"]["model"], width))
        sizes[width] = forward_parameters(dense_cfg)
        if sizes[width] > target:
            break
    width = min(sizes, key=lambda w: abs(sizes[w] - target))
    return width, sizes[width], target


def train(cfg: dict, out: Path) -> list[dict]:
    """Run the training command in one process (no launcher); return its eval records."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.json"
    config.write_text(json.dumps(cfg, indent=1))
    run = out / "run"
    if not (run / "latest").exists():
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        with (out / "log.txt").open("w") as log:
            subprocess.run([sys.executable, "-m", "ds_topkast.train", "--config", str(config), "--out", str(run)],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def final_forward_sets(run: Path) -> dict[str, torch.Tensor] | None:
    """Each sparsified layer's final A as sorted global flat indices, from the run's latest checkpoint (1 rank)."""
    from ds_topkast.runtime.checkpoint import checkpoint_file, joined_sets, load_file

    path = checkpoint_file(run / (run / "latest").read_text().strip(), 0)
    if not path.exists():
        return None
    saved = load_file(path)
    sets = {}
    for name, parts in saved["sets"].items():
        indices, forward = joined_sets([parts], saved["numel"][name])
        sets[name] = indices[forward]
    return sets


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| over all layers' weights."""
    both = sum(torch.isin(a[n], b[n]).sum().item() for n in a)
    return both / (sum(a[n].numel() + b[n].numel() for n in a) - both)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def overlaps(sets: dict[str, dict[int, dict]], seeds: list[int]) -> dict[str, dict[str, float]]:
    """Per variant: mean Jaccard of final A between pairs of seeds, and with RigL's of the same seed."""
    result = {}
    for name, per_seed in sets.items():
        pairs = [jaccard(per_seed[a], per_seed[b]) for a, b in itertools.combinations(seeds, 2)]
        rigl = sets.get("RigL", {})
        with_rigl = [jaccard(per_seed[s], rigl[s]) for s in seeds if s in rigl] if name != "RigL" else []
        result[name] = {"across_seeds": statistics.mean(pairs) if pairs else None,
                        "with_rigl": statistics.mean(with_rigl) if with_rigl else None}
    return result


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 4.5), squeeze=False)
    for ax, (family, rows) in zip(axes[0], summary.items()):
        names = list(rows)
        ax.errorbar(range(len(names)), [rows[n]["mean"] for n in names], yerr=[rows[n]["spread"] for n in names],
                    fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set(title=f"{family}: final eval loss, mean ± sd over seeds", ylabel="eval loss (nats per token)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_family(family: str, names: list[str], steps: int, seeds: list[int], out: Path) -> tuple[dict, dict, dict]:
    base = json.loads((REPO / FAMILIES[family]).read_text())
    sections = variants(steps)
    width = None
    if "small-dense" in names:
        width, size, target = small_dense_width(base, variant_config(base, sections["Top-KAST 90/80"], steps, 0))
        print(f"{family}: small-dense width {width} ({size} parameters; the 90% model's forward pass uses {target})")
    finals, sets = {}, {}
    for name in names:
        for seed in seeds:
            folder = out / family / name.replace("/", "_").replace(" ", "_") / f"seed{seed}"
            cfg = variant_config(base, sections[name], steps, seed, width if name == "small-dense" else None)
            evals = train(cfg, folder)
            finals.setdefault(name, []).append(evals[-1]["eval_loss"])
            if sections[name] is not None:
                sets.setdefault(name, {})[seed] = final_forward_sets(folder / "run")
            print(f"{family:<15} {name:<26} seed {seed}: final eval loss {evals[-1]['eval_loss']:.4f}", flush=True)
    summary = {name: dict(zip(("mean", "spread"), mean_and_spread(values)), runs=values)
               for name, values in finals.items()}
    return summary, overlaps(sets, seeds), {"small_dense_width": width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(variants(1)), choices=list(variants(1)))
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    out = Path(args.out)
    summary, mask_overlap, notes = {}, {}, {}
    for family in args.families:
        summary[family], mask_overlap[family], notes[family] = run_family(family, args.variants, args.steps,
                                                                          args.seeds, out)
    print(f"\nfinal eval loss (nats per token), mean ± sd over seeds {args.seeds}; Jaccard of the final A")
    print(f"{'family':<15} {'variant':<26} {'mean':>8} {'sd':>7} {'J seeds':>8} {'J RigL':>8}")
    for family, rows in summary.items():
        for name, row in rows.items():
            overlap = mask_overlap[family].get(name, {})
            cells = [f"{v:>8.3f}" if v is not None else f"{'-':>8}" for v in (overlap.get("across_seeds"),
                                                                             overlap.get("with_rigl"))]
            print(f"{family:<15} {name:<26} {row['mean']:>8.4f} {row['spread']:>7.4f} " + " ".join(cells))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "summary": summary,
                                                  "mask_overlap": mask_overlap, "notes": notes}, indent=1))
    plot(summary, out / "quality.png")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()
