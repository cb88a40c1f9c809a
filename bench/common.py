"""What several benchmarks share: a median timer, a stack of square layers, a one-rank environment."""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn


def median_seconds(fn, repeats: int, warm_up: bool = False) -> float:
    """Median wall time of `repeats` calls of fn (after one untimed call when warm_up)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Stack(nn.Module):
    """`layers` square Linear layers with tanh between them; the loss is the output's mean square."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().square().mean()


def single_rank_environment() -> None:
    """A world of one for in-process DeepSpeed, unless a launcher already set one up."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29731"),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
