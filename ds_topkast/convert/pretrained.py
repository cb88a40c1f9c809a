"""Pretrained weights read tensor by tensor from safetensors files (one file, or a sharded folder).

`sparsify(model, config, pretrained=path)` streams each sparsified layer's weight from
the files into the dense store (only this rank's shard is kept), and loads every other
parameter and persistent buffer of the model, so a model built on the meta device never
exists whole on any rank. Files are memory-mapped by safetensors: reading one tensor reads
its bytes only. Keys are the model's own `state_dict()` names, as `save_pretrained` writes
them. Every failure names the file and the tensor: a shard the index names but that is
missing, a truncated or damaged file, a tensor the model has and the files lack, a shape
that differs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ds_topkast.convert.meta_init import replace_everywhere
from ds_topkast.errors import PretrainedWeightsError

INDEX_NAME = "model.safetensors.index.json"



class SafetensorsCheckpoint:
    """The tensors of a safetensors file, a folder of them, or a folder with `model.safetensors.index.json`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = self._locate(self.path)

    @staticmethod
    def _locate(path: Path) -> dict[str, Path]:
        """Which file holds each tensor."""
        if path.is_dir() and (path / INDEX_NAME).is_file():
            index = path / INDEX_NAME
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise PretrainedWeightsError(f"{index} is not a safetensors index ({err!r}); re-save the model with "
                                             "save_pretrained(..., safe_serialization=True).") from None
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if missing:
                raise PretrainedWeightsError(f"{index} names shard files that are missing: {missing}. Copy the "
                                             "whole checkpoint folder.")
            return {key: path / f for key, f in weight_map.items()}
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise PretrainedWeightsError(f"pretrained={str(path)!r} is neither a .safetensors file nor a folder "
                                         "holding them; give the folder save_pretrained wrote.")
        return {key: f for f in files for key in _keys(f)}

    def tensor(self, key: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The tensor saved under `key`, checked against the shape the model expects."""
        if key not in self.files:
            raise PretrainedWeightsError(f"The pretrained weights at {self.path} have no tensor {key!r}, which the "
                                         "model needs; they were saved from another model or architecture.")
        from safetensors import safe_open

        path = self.files[key]
        try:
            with safe_open(path, framework="pt") as reader:
                if key not in reader.keys():
                    raise PretrainedWeightsError(f"{path} does not hold tensor {key!r}, though the index names it "
                                                 "there: the file was replaced. Copy the whole checkpoint again.")
                value = reader.get_tensor(key)
        except PretrainedWeightsError:
            raise
        except Exception as err:  # safetensors reports damage with several exception types
            raise PretrainedWeightsError(f"Tensor {key!r} cannot be read from {path} ({type(err).__name__}: {err}): "
                                         "the file is truncated or damaged. Copy it again.") from None
        if tuple(value.shape) != tuple(shape):
            raise PretrainedWeightsError(f"Tensor {key!r} in {path} has shape {tuple(value.shape)}, the model's "
                                         f"has {tuple(shape)}: the weights belong to another configuration.")
        return value

    def load_into(self, model: nn.Module, keys: Iterable[str]) -> None:
        """Load the named entries of `model.state_dict()`, materialising those on the meta device.

        A tensor tied to another (one object under several names, e.g. GPT-2's `lm_head`
        and `wte`) is loaded once, from whichever of its names the files hold.
        """
        entries = model.state_dict(keep_vars=True)
        names_of: dict[int, list[str]] = {}
        for key, tensor in entries.items():
            names_of.setdefault(id(tensor), []).append(key)
        modules = list(model.modules())
        for group in {id(entries[key]): names_of[id(entries[key])] for key in keys}.values():
            key = next((k for k in group if k in self.files), group[0])
            tensor = entries[key]
            value = self.tensor(key, tensor.shape).to(tensor.dtype)
            if tensor.device.type != "meta":
                with torch.no_grad():
                    tensor.copy_(value)
                continue
            real = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
            replace_everywhere(modules, tensor, real)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as reader:
            return list(reader.keys())
    except Exception as err:
        raise PretrainedWeightsError(f"{path} cannot be read as safetensors ({type(err).__name__}: {err}): it is "
                                     "truncated or damaged. Copy it again.") from None
