"""Start a model from the dense weights of a checkpoint: how a run changes its sparsity.

A checkpoint can only be resumed under the topkast settings that fixed every layer's k
(runtime/checkpoint.py refuses others). To continue a run at another sparsity, or to sparsify a
dense DeepSpeed run, `load_dense_weights` gives the model, before `sparsify`, the dense
weights θ the checkpoint holds: the dense store of every rank with B's latest values
written over it, in the layer's own shape (transformers' Conv1D keeps its (in, out)
weight). Every other parameter comes from the checkpoint's module state. The new run
starts its optimizer state and schedule afresh.

This reads DeepSpeed's model-states file, which holds the whole module only below
ZeRO-3; a ZeRO-3 checkpoint is refused with the way out.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from ds_topkast.convert.layer_weights import in_module_layout, linear_weight
from ds_topkast.core.layers import SPARSE_ENTRIES
from ds_topkast.runtime.checkpoint import (CheckpointError, assemble, checkpoint_file, every_rank, joined_sets,
                                           load_file, read_verified)

_MODEL_STATES = "mp_rank_00_model_states.pt"


def tag_folder(path: str | os.PathLike) -> Path:
    """A checkpoint tag folder, or the tag that a run folder's `latest` names."""
    path = Path(path)
    latest = path / "latest"
    if latest.is_file():
        return path / latest.read_text().strip()
    if (path / _MODEL_STATES).is_file() or (path / f"zero_pp_rank_0_{_MODEL_STATES}").is_file():
        return path
    raise CheckpointError(f"{path} is neither a checkpoint folder (no {_MODEL_STATES}) nor a run folder with a "
                          "'latest' file; give the folder a DeepSpeed save_checkpoint wrote.")


def _dense_theta(tag_dir: Path, module_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each sparsified layer's flat θ: the store shards of every saved rank, B's trained values written over."""
    first = read_verified(checkpoint_file(tag_dir, 0))
    saved = every_rank(tag_dir, first)
    theta = {}
    for name, numel in first["numel"].items():
        flat = assemble(saved, "store", name, 0, numel).clone()
        indices, _ = joined_sets([payload["sets"][name] for payload in saved.payloads], numel)
        flat[indices] = module_state[f"{name}.values"].float()
        theta[name] = flat
    return theta


def load_dense_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a checkpoint's weights into a dense model (not yet sparsified); returns the model.

    `checkpoint`: a tag folder or a run folder with `latest`, written by ds_topkast at any
    sparsity or by plain DeepSpeed (ZeRO stage 0-2). The model must be the architecture
    the checkpoint was trained with; a mismatch is refused by name.
    """
    if getattr(model, "topkast_state", None) is not None:
        raise CheckpointError("load_dense_weights loads into the dense model; call it before ds_topkast.sparsify.")
    tag_dir = tag_folder(checkpoint)
    if not (tag_dir / _MODEL_STATES).is_file():
        raise CheckpointError(f"{tag_dir} was written under ZeRO-3, whose model-states files hold partitions only; "
                              "consolidate it with DeepSpeed's zero_to_fp32.py, or resume it under its own settings.")
    module_state = load_file(tag_dir / _MODEL_STATES)["module"]
    theta = _dense_theta(tag_dir, module_state) if checkpoint_file(tag_dir, 0).is_file() else {}
    state = {key: value for key, value in module_state.items()
             if key.rsplit(".", 1)[0] not in theta or key.rsplit(".", 1)[1] not in SPARSE_ENTRIES}
    for name, flat in theta.items():
        module = model.get_submodule(name)
        if flat.numel() != module.weight.numel():
            raise CheckpointError(f"Layer {name!r} has {flat.numel()} weights in {tag_dir} and "
                                  f"{module.weight.numel()} in the model; build the model the checkpoint was trained "
                                  "with.")
        matrix = flat.view(linear_weight(module).shape)  # θ is (out, in) whatever the module's own layout
        state[f"{name}.weight"] = in_module_layout(module, matrix).to(module.weight.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"The weights in {tag_dir} do not fit this model ({str(err).splitlines()[0]} ...); "
                              "build the model the checkpoint was trained with.") from None
    return model
