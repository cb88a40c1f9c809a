"""What several benchmarks share: a median timer that waits for the GPU, a refresh's floors, a stack of square
layers, a one-rank environment, the training command on one rank with its peak memory measured, and the 8-bit
AdamW the peer comparisons run."""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def store_floor_seconds(store, repeats: int = 3) -> float:
    """One read and one write of every byte of the store (an in-place pass over each shard)."""
    def one_pass():
        for name in store.names():
            store.shard(name).theta.mul_(1.0)
    return median_seconds(one_pass, repeats)


def transfer_floor_seconds(store, device, repeats: int = 3) -> float:
    """Each shard copied to the accelerator and back: the host-link floor of a refresh that streams through it."""
    def one_pass():
        for name in store.names():
            theta = store.shard(name).theta
            theta.copy_(theta.to(device, non_blocking=True))
    return median_seconds(one_pass, repeats)


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


def free_port() -> int:
    """A TCP port nobody listens on now, so a launcher does not collide with another job's default port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def training_command(config: Path, run: Path) -> list[str]:
    """The training command on one rank under the deepspeed launcher, on a free port."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [str(deepspeed), "--num_gpus", "1", "--master_port", str(free_port()), "--module", "ds_topkast.train",
            "--config", str(config), "--out", str(run)]


def run_with_peak_rss(command: list[str], log: Path, **popen_kwargs) -> int:
    """Run `command` to its end, output to `log`; return its peak resident memory in bytes.

    The kernel reports, for a reaped child, the resident-set high-water mark of the largest
    process of its tree (the child or any descendant it waited for), so a launcher's worker
    counts. A failed command raises CalledProcessError with the end of its log as output.
    """
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **popen_kwargs)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise subprocess.CalledProcessError(process.returncode, command, output=tail)
    return usage.ru_maxrss * 1024  # Linux reports KiB


def eight_bit_adamw():
    """bitsandbytes' AdamW8bit where it runs, else torchao's; the name says which."""
    try:
        import bitsandbytes

        return "bitsandbytes AdamW8bit", bitsandbytes.optim.AdamW8bit
    except Exception as bnb_error:  # noqa: BLE001 - any import failure means: try the other package
        try:
            from torchao.optim import AdamW8bit
        except Exception as torchao_error:  # noqa: BLE001 - the same for torchao
            raise ImportError(f"neither bitsandbytes ({bnb_error}) nor torchao ({torchao_error}) imports") from None
        return "torchao AdamW8bit", AdamW8bit
