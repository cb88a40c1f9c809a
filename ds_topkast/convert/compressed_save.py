"""`save_compressed`: a sparsified model saved in compressed-tensors' sparse-bitmask format, a fraction of its size.

    from ds_topkast.convert.compressed_save import from_compressed, load_compressed, save_compressed

    save_compressed(engine, "out/")       # every rank calls it (ZeRO-3: a collective); rank 0 writes
    model = from_compressed("out/")       # the plain model, as from_pretrained of save_pretrained's folder
    load_compressed(model, "out/")        # or into a model you built (plain or sparsified): names and shapes checked

What it writes: the folder `save_pretrained` writes for the plain model
(`ds_topkast.plain_state_dict`: each Top-KAST layer's `weight` is α, zeros outside A, in
the layout of the layer it replaced), except that each Top-KAST layer's weight is stored
as compressed-tensors' sparse-bitmask compressor stored it: `<layer>.compressed` (the
nonzero entries in row-major order, in the weight's dtype), `<layer>.bitmask` (uint8,
8 entries a byte along each row, compressed-tensors' `pack_bitmasks`), `<layer>.shape`
and `<layer>.row_offsets` (int64), of the weight in the replaced layer's layout (GPT-2's
Conv1D: (in, out), so its rows are the inputs). Every other tensor stays dense.
config.json gets the `quantization_config` that compressed-tensors' own
`ModelCompressor.update_config` wrote for a sparse model: `quant_method`
"compressed-tensors", the package's version and `sparsity_config`, compressed-tensors'
`BitmaskConfig` (format "sparse-bitmask", `targets` the Top-KAST layers by name,
`sparsity_structure` "unstructured" and `global_sparsity`, the fraction of zeros over all
the model's parameters, as llm-compressor computes it). At 90% sparsity a sparse layer
takes about 0.18x of its bf16 bytes (0.14x of fp32: the nonzeros, 1 bit an entry, 8
bytes a row); embeddings and the other dense weights keep theirs
(bench/compressed_sizes.py).

Why this module also reads it: compressed-tensors 0.15 removed its sparse compressors
(only `BitmaskConfig` and the bitmask packing helpers remain), and transformers 5's
compressed-tensors quantizer, which needs compressed-tensors >= 0.15, no longer reads
`sparsity_config`. So `AutoModelForCausalLM.from_pretrained(folder)` (also with
`CompressedTensorsConfig(run_compressed=False)` / `dequantize=True`) loads the dense
tensors and initialises every compressed weight at random, reporting them MISSING and
their entries UNEXPECTED. `from_compressed` and `load_compressed` decompress it with
compressed-tensors' `unpack_bitmasks`. The tensors are byte for byte what
compressed-tensors 0.14's BitmaskCompressor writes from the plain weights, and its
`ModelCompressor.decompress` (what transformers 4 calls) reads them back.

A failed save leaves nothing half-written: everything is computed in memory, written to
a sibling temporary folder and renamed into place (into an existing folder file by file,
config.json last, removing the previous save's weight files and keeping its other
files). compressed-tensors is an optional dependency (`pip install compressed-tensors`);
without it each function says so before doing anything.
"""
from __future__ import annotations

import json
import os
import shutil
import types
import uuid
from pathlib import Path

import torch
from torch import Tensor, nn

from ds_topkast.convert.plain_save import plain_state_dict, unwrapped, writes_on_this_rank
from ds_topkast.core.layers import SPARSE_ENTRIES, sparse_layers
from ds_topkast.parallel.zero3 import is_partitioned

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# What takes the place of one compressed `<layer>.weight`, named as compressed-tensors' BitmaskCompressor names them.
ENTRIES = ("shape", "compressed", "bitmask", "row_offsets")


def _compressed_tensors() -> types.SimpleNamespace:
    """compressed-tensors' pieces this module uses (its config model, bitmask packing and config key names), or an
    ImportError that says how to install it."""
    try:
        import compressed_tensors
    except ImportError as error:
        raise ImportError("ds_topkast.convert.compressed_save reads and writes the compressed-tensors format and needs its "
                          "package: pip install compressed-tensors (or pip install ds_topkast[compressed])") from error
    try:
        from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME,
                                             QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME, TRANSFORM_CONFIG_NAME)
        from compressed_tensors.config import BitmaskConfig, CompressionFormat
        from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
    except ImportError as error:  # the sparse-bitmask pieces are "legacy" there: a later release may drop them
        raise ImportError(f"compressed-tensors {getattr(compressed_tensors, '__version__', '?')} lacks the "
                          "sparse-bitmask pieces ds_topkast.convert.compressed_save uses (tested with 0.14 to 0.20.1): "
                          "pip install 'compressed-tensors>=0.15,<0.21'") from error
    return types.SimpleNamespace(
        version=compressed_tensors.__version__, BitmaskConfig=BitmaskConfig,
        sparse_bitmask=CompressionFormat.sparse_bitmask.value, pack_bitmasks=pack_bitmasks,
        unpack_bitmasks=unpack_bitmasks, quantization_key=QUANTIZATION_CONFIG_NAME, sparsity_key=SPARSITY_CONFIG_NAME,
        transform_key=TRANSFORM_CONFIG_NAME, version_key=COMPRESSION_VERSION_NAME, method_key=QUANTIZATION_METHOD_NAME)


def _bitmask_entries(prefix: str, weight: Tensor, pack_bitmasks) -> dict[str, Tensor]:
    """One weight as compressed-tensors' BitmaskCompressor stores it: nonzeros, their bitmask, shape, row offsets."""
    mask = weight != 0
    row_counts = mask.sum(dim=-1)
    return {f"{prefix}.shape": torch.tensor(list(weight.shape)), f"{prefix}.compressed": weight[mask],
            f"{prefix}.bitmask": pack_bitmasks(mask), f"{prefix}.row_offsets": torch.cumsum(row_counts, 0) - row_counts}


def _global_sparsity(model: nn.Module, plain: dict[str, Tensor], targets: set[str]) -> float:
    """Fraction of zeros over the model's parameters (each once, as llm-compressor's `global_sparsity` counts them),
    a Top-KAST layer's values counted as the plain weight they make."""
    zeros = total = 0
    for name, _ in model.named_parameters():
        layer = name.removesuffix(".values")
        tensor = plain[f"{layer}.weight" if layer in targets else name]
        total += tensor.numel()
        zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    return zeros / total


def _retie(model: nn.Module, plain: dict[str, Tensor]) -> None:
    """Give tied names one tensor again (the ZeRO-3 gather copies each name apart), so that save_pretrained writes
    a tied weight once, as from the model's own state dict."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in first:
            first[id(param)] = name
        elif name in plain and first[id(param)] in plain:
            plain[name] = plain[first[id(param)]]


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a save_pretrained folder (its index's shards, or the single file)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}: not a save_compressed folder.")


def _is_weights_file(name: str) -> bool:
    """A file of save_pretrained's safetensors family (single file, shards, index), which a new save replaces."""
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def _publish(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`: by one rename when `target` is absent or empty, else file by
    file (each replace atomic, config.json last), dropping weight files of a previous save that this one lacks."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)
        return
    written = sorted(staging.iterdir(), key=lambda path: path.name == CONFIG_FILE)
    for path in written:
        os.replace(path, target / path.name)
    names = {path.name for path in written}
    for stale in target.iterdir():
        if stale.is_file() and stale.name not in names and _is_weights_file(stale.name):
            stale.unlink()
    staging.rmdir()


def save_compressed(engine_or_model: nn.Module, save_directory: str | os.PathLike, *,
                    max_shard_size: int | str = "50GB") -> None:
    """Write a sparsified Hugging Face model (or a DeepSpeed engine or DDP wrapper of one) to `save_directory` with
    its Top-KAST layers' weights in compressed-tensors' sparse-bitmask format (see the module docstring).

    Every rank calls it: the plain state dict comes from `ds_topkast.plain_state_dict`, a
    collective under ZeRO-3; rank 0 writes and the other ranks return once it is
    gathered. `max_shard_size` is `save_pretrained`'s (the size of one safetensors file).
    """
    ct = _compressed_tensors()
    model = unwrapped(engine_or_model)
    if not (callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config")):
        raise TypeError(f"save_compressed writes a Hugging Face model folder (config.json and safetensors); "
                        f"{type(model).__name__} has no save_pretrained. Use ds_topkast.plain_state_dict for its "
                        "plain state dict instead.")
    targets = list(sparse_layers(model))
    if not targets:
        raise ValueError("save_compressed: the model has no Top-KAST layers to compress (sparsify it first; a dense "
                         "model saves with save_pretrained).")
    if not writes_on_this_rank() and not any(is_partitioned(p) for p in model.parameters()):
        return  # nothing to gather: only the writer builds the plain model
    plain = plain_state_dict(engine_or_model)  # under ZeRO-3 every rank, before any rank can fail alone
    if not writes_on_this_rank():
        return
    _retie(model, plain)
    sparsity_config = ct.BitmaskConfig(targets=targets, global_sparsity=_global_sparsity(model, plain, set(targets)),
                                       sparsity_structure="unstructured")
    for name in targets:  # one dense weight replaced at a time
        plain.update(_bitmask_entries(name, plain.pop(f"{name}.weight"), ct.pack_bitmasks))
    quantization_config = {ct.version_key: ct.version, ct.method_key: "compressed-tensors",
                           ct.sparsity_key: sparsity_config.model_dump(), ct.transform_key: {}}
    expected = {f"{name}.{entry}" for name in targets for entry in ENTRIES}

    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_compressed: {target} is a file, not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        # The class's own save_pretrained: the dict is final (sparsify's instance method would convert sparse entries).
        type(model).save_pretrained(model, staging, state_dict=plain, max_shard_size=max_shard_size)
        missing = expected - _tensor_names(_weight_files(staging))
        if missing:
            raise RuntimeError(f"save_compressed: save_pretrained did not write {sorted(missing)[:4]} "
                               f"({len(missing)} compressed entries; it renamed or dropped them), nothing was saved.")
        config = json.loads((staging / CONFIG_FILE).read_text())
        config[ct.quantization_key] = quantization_config
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensor_names(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    return names


def _read_compressed(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json of a folder save_compressed wrote and the plain state dict it holds, each target's weight rebuilt
    from its bitmask entries (a ValueError for a folder of another format or a damaged one)."""
    from safetensors import safe_open

    ct = _compressed_tensors()
    config = json.loads((folder / CONFIG_FILE).read_text())
    sparsity = (config.get(ct.quantization_key) or {}).get(ct.sparsity_key) or {}
    if sparsity.get("format") != ct.sparse_bitmask:
        raise ValueError(f"{folder}/config.json has no compressed-tensors sparsity_config of format "
                         f"{ct.sparse_bitmask!r} (found {sparsity.get('format')!r}): not a folder save_compressed "
                         "wrote; a plain folder loads with from_pretrained.")
    targets = set(sparsity.get("targets") or ())
    state: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    for name in sorted(targets):
        parts = {entry: state.pop(f"{name}.{entry}", None) for entry in ENTRIES}
        if any(parts[entry] is None for entry in ("shape", "compressed", "bitmask")):
            raise ValueError(f"{folder}: the compressed weight of {name} lacks "
                             f"{[f'{name}.{entry}' for entry, part in parts.items() if part is None]}.")
        shape = parts["shape"].tolist()
        mask = ct.unpack_bitmasks(parts["bitmask"], shape)
        values = parts["compressed"]
        if int(mask.sum()) != values.numel():
            raise ValueError(f"{folder}: {name}.bitmask marks {int(mask.sum())} entries but {name}.compressed holds "
                             f"{values.numel()}: the file is damaged.")
        weight = values.new_zeros(shape)
        weight[mask] = values
        state[f"{name}.weight"] = weight
    return config, state


def _plain_layout(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """The shapes of the plain model's state-dict entries (a Top-KAST layer's `weight` in the layout of the layer it
    replaced) and each entry's tensor identity (tied entries share one)."""
    state = model.state_dict(keep_vars=True)  # the modules' own tensors: no dense weight is built
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    identity = {key: id(tensor) for key, tensor in state.items()}
    for name, layer in sparse_layers(model).items():
        prefix = f"{name}." if name else ""
        for key in SPARSE_ENTRIES:
            shapes.pop(prefix + key, None)
            identity.pop(prefix + key, None)
        shapes[prefix + "weight"] = layer.plain_shape
        identity[prefix + "weight"] = id(layer)
    return shapes, identity


def load_compressed(model: nn.Module, save_directory: str | os.PathLike) -> nn.Module:
    """Load a folder save_compressed wrote into `model` (plain, or sparsified: each layer keeps its sets and takes
    the weight's entries on B) and return it. The file's names and shapes are checked against the model's first: a
    model of another architecture or size is refused with the mismatched names, and nothing is loaded."""
    _compressed_tensors()
    if hasattr(model, "topkast") or any(is_partitioned(p) for p in model.parameters()):
        raise TypeError("load_compressed loads into a model, not a DeepSpeed engine or a ZeRO-3 partitioned model "
                        "(the optimizer keeps its own copy of the weights): load it before ds_topkast.initialize.")
    folder = Path(save_directory)
    config, state = _read_compressed(folder)
    shapes, identity = _plain_layout(model)
    present = {identity[key] for key in state if key in identity}
    mismatched = [f"{key} is {tuple(state[key].shape)} in the file, {shapes[key]} in the model"
                  for key in shapes if key in state and tuple(state[key].shape) != shapes[key]]
    missing = [key for key in shapes if key not in state and identity[key] not in present]  # tied: saved once
    unexpected = [key for key in state if key not in shapes]
    if mismatched or missing or unexpected:
        problems = [f"{label} ({len(keys)}): {'; '.join(keys[:4])}{'; ...' if len(keys) > 4 else ''}."
                    for label, keys in (("Shape mismatch", mismatched), ("Missing from the file", missing),
                                        ("Not in the model", unexpected)) if keys]
        raise ValueError(f"load_compressed: {folder} (saved from {', '.join(config.get('architectures') or ['?'])}) "
                         f"does not fit this {type(model).__name__}, nothing was loaded. " + " ".join(problems))
    model.load_state_dict(state, strict=False)  # strict=False: tied entries saved once; everything else checked above
    return model


def from_compressed(save_directory: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """The plain model a save_compressed folder holds, as `from_pretrained` of the plain model's folder gives it:
    the class its config.json names (`architectures`), built by that class's `from_pretrained` with the decompressed
    weights and the config without its `quantization_config`. Keyword arguments go to `from_pretrained` (`dtype`,
    `device_map`, `output_loading_info`, ...)."""
    import transformers

    folder = Path(save_directory)
    _, state = _read_compressed(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config  # the weights come decompressed: nothing for a quantizer to do
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(f"{folder}/config.json names no transformers model class in `architectures` "
                         f"({architectures}): build the model yourself and call load_compressed(model, folder).")
    return model_class.from_pretrained(None, config=config, state_dict=state, **from_pretrained_kwargs)
