"""Plots of a training run from its metrics.jsonl: losses, and mask dynamics as in the paper's Figure 3.

Left: train and eval loss (nats per token) against optimizer steps. Right, for Top-KAST
runs: at each refresh, the fraction of A and of B that changed, and the cumulative
fraction of all weights that have ever been in B (how much of the dense store training
has explored).
"""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """metrics.jsonl records grouped by kind ("train", "eval", "refresh", "memory")."""
    grouped: dict[str, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        grouped.setdefault(record["kind"], []).append(record)
    return grouped


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    return [r["step"] for r in records], [r[key] for r in records]


def plot_run(metrics_path: Path, png_path: Path) -> Path:
    """Write the run's plot to `png_path` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(metrics_path)
    refreshes = metrics.get("refresh", [])
    fig, axes = plt.subplots(1, 2 if refreshes else 1, figsize=(11 if refreshes else 5.5, 4), squeeze=False)
    losses = axes[0][0]
    for kind, key, label in (("train", "loss", "train"), ("eval", "eval_loss", "eval")):
        if metrics.get(kind):
            losses.plot(*_series(metrics[kind], key), marker="o" if kind == "eval" else None, label=label)
    losses.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="loss")
    losses.legend()
    if refreshes:
        dynamics = axes[0][1]
        for key, label in (("forward_changed", "A changed at refresh"), ("backward_changed", "B changed at refresh"),
                           ("ever_in_backward", "ever in B (cumulative)")):
            dynamics.plot(*_series(refreshes, key), marker=".", label=label)
        dynamics.set(xlabel="optimizer step", ylabel="fraction of weights", title="mask dynamics", ylim=(0, 1))
        dynamics.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
