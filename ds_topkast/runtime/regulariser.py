"""The exploration regulariser's value, for logs: its gradient is applied inside each sparse layer's backward."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ds_topkast.core.layers import sparse_layers
from ds_topkast.parallel.zero3 import gathered, is_partitioned


def exploration_penalty(model: nn.Module) -> Tensor | float:
    """The exploration regulariser's value at the model's current values and sets, for logging.

    Computed when asked (never in the training step); under ZeRO-3 it gathers each
    layer's values, so call it on every rank. Its gradient is already applied inside each
    sparse layer's backward: do not add this to the loss (it is detached, so doing so
    changes the logged loss and nothing else).
    """
    penalties = []
    for layer in sparse_layers(model).values():
        if layer.exploration_l2 > 0:
            with gathered(layer) if is_partitioned(layer.values) else nullcontext():
                penalties.append(layer.exploration_penalty())
    return torch.stack(penalties).sum() if penalties else 0.0
