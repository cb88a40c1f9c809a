"""Top-KAST's share of a checkpoint: each rank's dense-store shard, the sets and the mask history.

DeepSpeed's `save_checkpoint` keeps only rank 0's client_state, so each rank writes its
own file under `save_dir/tag/` holding its store shards. The file is written before
DeepSpeed's files, so DeepSpeed's `latest` pointer, written last, never names a
checkpoint without it. Files are plain tensors and numbers, read back with
`torch.load(weights_only=True)`: loading a checkpoint never executes code.

Resuming on another world size reshards: each rank reads the overlapping ranges of
every saved rank's file (memory-mapped, so only those bytes are read). All ranks'
files must then be reachable from every rank, as on a shared filesystem.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ds_topkast.config import TopKASTConfig
from ds_topkast.refresh import MaskDynamics, Refresher
from ds_topkast.store import shard_range

FORMAT_VERSION = 1
# Settings that fix each layer's k_A and k_B: a checkpoint is only valid under the same ones.
_SHAPE_SETTINGS = ("forward_sparsity", "backward_sparsity", "distribution", "include", "exclude")


class CheckpointError(RuntimeError):
    """A Top-KAST checkpoint file is missing or does not fit the running model."""


def _store_folder(rank: int) -> str:
    return f"topkast_store_rank{rank:05d}"


def checkpoint_file(tag_dir: str | os.PathLike, rank: int) -> Path:
    return Path(tag_dir) / f"topkast_rank{rank:05d}.pt"


def save(refresher: Refresher, tag_dir: str | os.PathLike, rank: int) -> Path:
    """Write this rank's Top-KAST state into the checkpoint folder (atomically, by rename)."""
    path = checkpoint_file(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = refresher.state.store
    payload = {
        "format": FORMAT_VERSION,
        "rank": store.rank,
        "world": store.world,
        "config": refresher.state.config.model_dump(mode="json"),
        "store_folder": _store_folder(rank),
        "store": store.checkpoint_entries(path.parent / _store_folder(rank)),
        "offsets": {name: store.layout(name)[0] for name in store.names()},
        "lengths": {name: store.layout(name)[1] for name in store.names()},
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


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint folder {path.parent} has no {path.name}: it was not written by ds_topkast "
                              "or was copied incompletely. Resume from a checkpoint saved by a ds_topkast engine.")
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {payload.get('format')!r}; this ds_topkast reads {FORMAT_VERSION}.")
    return payload


def _piece(payload: dict, tag_dir: Path, key: str, name: str) -> Tensor:
    """A saved rank's slice of a layer: a tensor in the file, or a store file linked next to it (NVMe)."""
    piece = payload[key][name]
    if isinstance(piece, str):
        path = tag_dir / payload["store_folder"] / piece
        if not path.is_file():
            raise CheckpointError(f"Checkpoint store file {path} is missing; the checkpoint was copied incompletely.")
        return torch.from_file(str(path), size=payload["lengths"][name], dtype=torch.float32)
    return piece


def _assemble(saved: list[dict], tag_dir: Path, key: str, name: str, start: int, end: int) -> Tensor:
    """Entries [start, end) of a layer's sharded `key` ("store" or "ever_in_backward") across saved ranks."""
    parts = []
    for payload in saved:
        offset = payload["offsets"][name]
        piece = _piece(payload, tag_dir, key, name)
        lo, hi = max(start, offset), min(end, offset + piece.numel())
        if lo < hi:
            parts.append(piece[lo - offset:hi - offset])
    return torch.cat(parts) if parts else _piece(saved[0], tag_dir, key, name)[:0]


def load(refresher: Refresher, tag_dir: str | os.PathLike, rank: int) -> None:
    """Restore this rank's store shards, the sets and the mask history; reshard if the world changed."""
    tag_dir = Path(tag_dir)
    own = _read(checkpoint_file(tag_dir, rank)) if checkpoint_file(tag_dir, rank).is_file() else None
    first = own if own is not None else _read(checkpoint_file(tag_dir, 0))
    _check_config(first["config"], refresher.state.config, checkpoint_file(tag_dir, first["rank"]))
    store = refresher.state.store
    if own is not None and own["world"] == store.world:
        saved = [own]
    else:
        saved = [_read(checkpoint_file(tag_dir, r)) for r in range(first["world"])]
    for name in refresher.layers:
        if name not in first["store"]:
            raise CheckpointError(f"Checkpoint {tag_dir} holds no dense-store layer {name!r}; it was written for a "
                                  f"model with layers {sorted(first['store'])}.")
        start, end = shard_range(store.numel(name), store.rank, store.world)
        store.load_shard(name, _assemble(saved, tag_dir, "store", name, start, end))
        refresher.ever_in_backward[name] = _assemble(saved, tag_dir, "ever_in_backward", name, start, end).clone()
    for name, layer in refresher.layers.items():
        sets = first["sets"][name]
        layer.assign_sets(sets["indices"].to(layer.indices.device), sets["forward_mask"].to(layer.indices.device))
    refresher.history = [MaskDynamics(**d) for d in first["history"]]
