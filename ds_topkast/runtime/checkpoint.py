"""Top-KAST's share of a checkpoint: each rank's dense-store shard, the sets and the mask history.

DeepSpeed's `save_checkpoint` keeps only rank 0's client_state, so each rank writes its
own file under `save_dir/tag/` holding its store shards. The file is written (by rename)
before DeepSpeed's files, and the engine points `latest` at a tag only once every rank
has written all of its files, so `latest` never names a checkpoint without it. Files
are plain tensors and numbers, read back with
`torch.load(weights_only=True)`: loading a checkpoint never executes code. Every tensor
(and every NVMe store file linked next to it) has a CRC-32 recorded at save; loading reads
and checks all of them, and the layers and settings, before it changes anything, so a
missing, truncated or corrupted file is refused by name and the running state is untouched.

Resuming on another world size reshards: each rank reads the overlapping ranges of
every saved rank's file (memory-mapped, so only those bytes are read). All ranks'
files must then be reachable from every rank, as on a shared filesystem.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ds_topkast.config import TopKASTConfig
from ds_topkast.core.bitmaps import pack_bits, unpack_bits
from ds_topkast.errors import CheckpointError
from ds_topkast.runtime.refresh import Refresher
from ds_topkast.store.shards import checksum, fsync_path, matches, piece_of, shard_range

FORMAT_VERSION = 3
# Settings that fix each layer's k_A and k_B and what the files hold: a checkpoint is only valid under the same ones.
_SHAPE_SETTINGS = ("forward_sparsity", "backward_sparsity", "distribution", "include", "exclude", "algorithm",
                   "new_entries")
_DEFAULTS_OF_OLDER_FILES = {"algorithm": "topkast", "new_entries": "zero_moments"}
_SET_KEYS = ("backward_bits", "forward_bits")



def _store_folder(rank: int) -> str:
    return f"topkast_store_rank{rank:05d}"


def checkpoint_file(tag_dir: str | os.PathLike, rank: int) -> Path:
    return Path(tag_dir) / f"topkast_rank{rank:05d}.pt"


def joined_sets(parts: list[dict[str, Tensor]], numel: int) -> tuple[Tensor, Tensor]:
    """B's indices and A's mask from every saved rank's part (rank order), as `own_sets` wrote them."""
    ranges = [shard_range(numel, r, len(parts)) for r in range(len(parts))]
    backward = [unpack_bits(part["backward_bits"], end - start) for part, (start, end) in zip(parts, ranges)]
    forward = [unpack_bits(part["forward_bits"], int(mask.sum())) for part, mask in zip(parts, backward)]
    return torch.cat(backward).nonzero().squeeze(1), torch.cat(forward)


def save(refresher: Refresher, tag_dir: str | os.PathLike, rank: int, step: int, values: bool = False) -> Path:
    """Write this rank's Top-KAST state at optimizer step `step` into the checkpoint folder (atomically, by rename).

    The file composes the parts' own state dicts: the store's (its shards, or links to its
    NVMe files, with their recorded checksums), the refresher's (sets, ever-in-B bitmaps,
    history, join steps), and the settings. `values`: also B's values of every layer
    (whole, as this rank holds them), for a run whose own checkpoint files hold only the
    plain model (the Trainer without DeepSpeed).
    """
    path = checkpoint_file(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = refresher.state.store.state_dict(path.parent / _store_folder(rank))
    parts = refresher.state_dict(values=values)
    sets = parts["sets"]
    payload = {
        "format": FORMAT_VERSION,
        "step": step,
        "rank": store["rank"],
        "world": store["world"],
        "config": refresher.state.config.model_dump(mode="json"),
        "store_folder": _store_folder(rank),
        "store": store["shards"],
        "numel": store["numel"],
        "k_backward": {name: layer.k_backward for name, layer in refresher.layers.items()},
        "offsets": store["offsets"],
        "lengths": store["lengths"],
        "sets": sets,
        "ever_in_backward": parts["ever_in_backward"],
        "history": parts["history"],
        **{key: parts[key] for key in ("values", "joined") if key in parts},
        "checksums": {"store": store["checksums"],
                      "ever_in_backward": {name: checksum(m) for name, m in parts["ever_in_backward"].items()},
                      **{key: {name: checksum(s[key]) for name, s in sets.items()} for key in _SET_KEYS}},
    }
    for key in ("values", "joined"):
        if key in payload:
            payload["checksums"][key] = {name: checksum(v) for name, v in payload[key].items()}
    partial = path.with_suffix(".pt.partial")
    torch.save(payload, partial)
    fsync_path(partial)
    os.replace(partial, path)
    return path


@dataclass
class SavedState:
    """The verified Top-KAST files of one checkpoint that a rank needs: its own, or every saved rank's."""

    tag_dir: Path
    payloads: list[dict]

    @property
    def first(self) -> dict:
        return self.payloads[0]


def _check_config(saved: dict, current: TopKASTConfig, path: Path) -> None:
    now = current.model_dump(mode="json")
    saved = {**_DEFAULTS_OF_OLDER_FILES, **saved}
    changed = [key for key in _SHAPE_SETTINGS if saved.get(key) != now[key]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"Checkpoint {path} was written with different topkast settings ({details}); "
                              "they fix every layer's k, so restore them in the config to resume this run. To "
                              "continue its weights under the new settings, start a new run from them: "
                              f"`ds_topkast.train ... --init-from {path.parent}` or "
                              "`ds_topkast.load_dense_weights(model, <that folder>)` before sparsify (the optimizer "
                              "state and schedule start afresh).")


def _check_model(saved: dict, refresher: Refresher, path: Path) -> None:
    """The checkpoint must hold exactly the model's sparsified layers, each with the same number of weights."""
    store = refresher.state.store
    missing = sorted(set(refresher.layers) - set(saved["numel"]))
    extra = sorted(set(saved["numel"]) - set(refresher.layers))
    if missing or extra:
        raise CheckpointError(f"Checkpoint {path} does not fit this model: sparsified layers missing from it "
                              f"{missing}, layers in it the model lacks {extra}. Resume with the model (and the "
                              "include/exclude patterns) the checkpoint was written with.")
    resized = [f"{name} ({saved['numel'][name]} -> {store.numel(name)})" for name in refresher.layers
               if saved["numel"][name] != store.numel(name)]
    resized += [f"{name}'s set B ({saved['k_backward'][name]} -> {layer.k_backward} entries)"
                for name, layer in refresher.layers.items()
                if saved.get("k_backward", {}).get(name, layer.k_backward) != layer.k_backward]
    if resized:
        raise CheckpointError(f"Checkpoint {path} does not fit this model: layers changed size {resized}. Resume "
                              "with the model configuration the checkpoint was written with (under distribution "
                              "'global' also the same initial weights: the same seed or pretrained files).")


def load_file(path: str | os.PathLike, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` of a checkpoint file, with errors that name the file and the way out.

    A pickle that names code is refused (the weights-only unpickler stops at it); a
    truncated or damaged archive is reported as such.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"{path} is corrupted ({err}); resume from an earlier checkpoint.") from None
        reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line), str(err))
        raise CheckpointError(f"{path} holds objects that would run code when loaded, so it is refused ({reason}). "
                              "Checkpoints hold only tensors, numbers and a few DeepSpeed records: the file was "
                              "replaced or tampered with. Resume from a checkpoint you trust.") from None
    except Exception as err:  # torch reports a damaged zip archive with several exception types
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}): it is "
                              "truncated or corrupted. Resume from an earlier checkpoint.") from None


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint folder {path.parent} has no {path.name}: it was not written by ds_topkast "
                              "or was copied incompletely. Resume from a checkpoint saved by a ds_topkast engine.")
    payload = load_file(path, mmap=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has format {found!r}; this ds_topkast reads {FORMAT_VERSION}.")
    return payload


def _store_file(payload: dict, tag_dir: Path, name: str) -> Path:
    return tag_dir / payload["store_folder"] / payload["store"][name]


def _piece(payload: dict, tag_dir: Path, key: str, name: str) -> Tensor:
    """A saved rank's slice of a layer: a tensor in the file, or a store file linked next to it (NVMe)."""
    piece = payload[key][name]
    if not isinstance(piece, str):
        return piece
    path, length = _store_file(payload, tag_dir, name), payload["lengths"][name]
    if not path.is_file():
        raise CheckpointError(f"Checkpoint store file {path} is missing; the checkpoint was copied incompletely. "
                              "Resume from a complete checkpoint.")
    if path.stat().st_size < 4 * length:
        raise CheckpointError(f"Checkpoint store file {path} is truncated ({path.stat().st_size} bytes, layer "
                              f"{name!r} needs {4 * length}). Resume from an earlier checkpoint.")
    return torch.from_file(str(path), size=length, dtype=torch.float32)


def _verify(payload: dict, path: Path, tag_dir: Path) -> None:
    """Every tensor and linked store file of one rank's file matches the checksum written with it."""
    sums = payload["checksums"]
    for key in ("store", "ever_in_backward"):
        for name, expected in sums[key].items():
            if not matches(_piece(payload, tag_dir, key, name), expected):
                where = _store_file(payload, tag_dir, name) if isinstance(payload[key][name], str) else path
                raise CheckpointError(f"{where} is corrupted: layer {name!r}'s {key} does not match the checksum "
                                      "written with it. Resume from an earlier checkpoint.")
    for key in _SET_KEYS:
        for name, sets in payload["sets"].items():
            if checksum(sets[key]) != sums[key][name]:
                raise CheckpointError(f"{path} is corrupted: layer {name!r}'s {key} does not match the checksum "
                                      "written with it. Resume from an earlier checkpoint.")
    for key in ("values", "joined"):
        for name, tensor in payload.get(key, {}).items():
            if checksum(tensor) != sums[key][name]:
                raise CheckpointError(f"{path} is corrupted: layer {name!r}'s {key} do not match the checksum "
                                      "written with them. Resume from an earlier checkpoint.")


def read_verified(path: Path) -> dict:
    """One rank's file, read and checked against its checksums."""
    payload = _read(path)
    try:
        _verify(payload, path, path.parent)
    except CheckpointError:
        raise
    except (KeyError, TypeError, RuntimeError) as err:  # entries missing or of the wrong kind
        raise CheckpointError(f"{path} is corrupted (its contents are incomplete: {err!r}); resume from an earlier "
                              "checkpoint.") from None
    return payload


def read(refresher: Refresher, tag_dir: str | os.PathLike, rank: int) -> SavedState:
    """Read and check every file this rank's restore needs; raises before anything is changed."""
    tag_dir = Path(tag_dir)
    store = refresher.state.store
    own_path = checkpoint_file(tag_dir, rank)
    own = read_verified(own_path) if own_path.is_file() else None
    first = own if own is not None else read_verified(checkpoint_file(tag_dir, 0))
    first_path = checkpoint_file(tag_dir, first["rank"])
    _check_config(first["config"], refresher.state.config, first_path)
    _check_model(first, refresher, first_path)
    if own is not None and own["world"] == store.world:
        return SavedState(tag_dir, [own])
    return every_rank(tag_dir, first)


def every_rank(tag_dir: Path, first: dict) -> SavedState:
    """The verified files of every rank that wrote the checkpoint `first` (one of them, already read) belongs to."""
    others = [read_verified(checkpoint_file(tag_dir, r)) for r in range(first["world"]) if r != first["rank"]]
    return SavedState(tag_dir, sorted([first, *others], key=lambda p: p["rank"]))


def assemble(saved: SavedState, key: str, name: str, start: int, end: int) -> Tensor:
    """Entries [start, end) of a layer's sharded `key` ("store" or "ever_in_backward") across saved ranks."""
    parts = []
    for payload in saved.payloads:
        offset = payload["offsets"][name]
        piece = _piece(payload, saved.tag_dir, key, name)
        if key == "ever_in_backward":  # saved as a bitmap
            piece = unpack_bits(piece, payload["lengths"][name])
        part = piece_of(piece, offset, start, end)
        if part.numel():
            parts.append(part)
    return torch.cat(parts) if parts else _piece(saved.first, saved.tag_dir, key, name)[:0]


def restore(refresher: Refresher, saved: SavedState) -> None:
    """Restore this rank's store shards, the sets and the mask history; reshard if the world changed."""
    store = refresher.state.store
    ranges = {name: shard_range(store.numel(name), store.rank, store.world) for name in refresher.layers}
    store.load_state_dict((name, assemble(saved, "store", name, start, end)) for name, (start, end) in ranges.items())
    state = {"sets": ((name, joined_sets(_set_parts(refresher, saved, name), store.numel(name)))
                      for name in refresher.layers),  # one layer at a time, in the same order on every rank
             "ever_in_backward": {name: pack_bits(assemble(saved, "ever_in_backward", name, start, end))
                                  for name, (start, end) in ranges.items()},
             "history": saved.first["history"],
             **{key: saved.first[key] for key in ("values", "joined") if key in saved.first}}
    refresher.load_state_dict(state)


def _set_parts(refresher: Refresher, saved: SavedState, name: str) -> list[dict[str, Tensor]]:
    """Every saved rank's part of a layer's sets: from the files read, or, when each rank read only its own file
    (same world size), from the other ranks over the process group."""
    if len(saved.payloads) > 1 or saved.first["world"] == 1:
        return [payload["sets"][name] for payload in saved.payloads]
    own = saved.first["sets"][name]
    gathered = {key: refresher.comm.all_gather_parts(own[key]) for key in _SET_KEYS}
    return [{key: gathered[key][r] for key in _SET_KEYS} for r in range(refresher.comm.world)]
