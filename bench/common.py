"""What several benchmarks share: a median timer that waits for the GPU, a stack of square layers, a one-rank environment."""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so a timer measures the work and not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warm_up: bool = False) -> float:
    """Median wall time of `repeats` calls of fn (after one untimed call when warm_up), GPU work included."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
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
