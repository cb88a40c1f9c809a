"""Top-KAST's share of a checkpoint: the dense store, the sets and the mask history.

DeepSpeed's `save_checkpoint` keeps only rank 0's client_state, so each rank writes its
own file under `save_dir/tag/` (its store shard, once data parallelism shards it). The
file is written before DeepSpeed's files, so DeepSpeed's `latest` pointer, written last,
never names a checkpoint without it. Files are plain tensors and numbers, read back
with `torch.load(weights_only=True)`: loading a checkpoint never executes code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ds_topkast.config import TopKASTConfig
from ds_topkast.refresh import MaskDynamics, Refresher

FORMAT_VERSION = 1
# Settings that fix each layer's k_A and k_B: a checkpoint is only valid under the same ones.
_SHAPE_SETTINGS = ("forward_sparsity", "backward_sparsity", "distribution", "include", "exclude")


class CheckpointError(RuntimeError):
    """A Top-KAST checkpoint file is missing or does not fit the running model."""


def checkpoint_file(tag_dir: str | os.PathLike, rank: int) -> Path:
    return Path(tag_dir) / f"topkast_rank{rank:05d}.pt"


def save(refresher: Refresher, tag_dir: str | os.PathLike, rank: int) -> Path:
    """Write this rank's Top-KAST state into the checkpoint folder (atomically, by rename)."""
    path = checkpoint_file(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "config": refresher.state.config.model_dump(mode="json"),
        "store": {name: theta.clone() for name, theta in refresher.state.store},
        "sets": {name: {"indices": layer.indices.cpu().clone(), "forward_mask": layer.forward_mask.cpu().clone()}
                 for name, layer in refresher.layers.items()},
        "ever_in_backward": {name: m.clone() for name, m in refresher.ever_in_backward.items()},
        "history": [d.as_dict() for d in refresher.history],
    }
    partial = path.with_suffix(".pt.partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path


def _check_config(saved: dict, current: TopKASTConfig, path: Path) -> None:
    now = current.model_dump(mode="json")
    changed = [key for key in _SHAPE_SETTINGS if saved.get(key) != now[key]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"Checkpoint {path} was written with different topkast settings ({details}); "
                              "they fix every layer's k, so restore them in the config to resume this run.")


def load(refresher: Refresher, tag_dir: str | os.PathLike, rank: int) -> None:
    """Restore this rank's store, sets and mask history from a checkpoint folder."""
    path = checkpoint_file(tag_dir, rank)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint folder {tag_dir} has no {path.name}: it was not written by ds_topkast "
                              "or was copied incompletely. Resume from a checkpoint saved by a ds_topkast engine.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {payload.get('format')!r}; this ds_topkast reads {FORMAT_VERSION}.")
    _check_config(payload["config"], refresher.state.config, path)
    refresher.state.store.load_state_dict(payload["store"])
    for name, layer in refresher.layers.items():
        sets = payload["sets"][name]
        layer.assign_sets(sets["indices"].to(layer.indices.device), sets["forward_mask"].to(layer.indices.device))
    refresher.ever_in_backward = {name: m.clone() for name, m in payload["ever_in_backward"].items()}
    refresher.history = [MaskDynamics(**d) for d in payload["history"]]
