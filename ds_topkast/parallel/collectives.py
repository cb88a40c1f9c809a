"""The collectives of sharded selection and the refresh guards, over DeepSpeed's process group.

Going through `deepspeed.comm` (not torch.distributed directly) puts every byte the
refresh moves into DeepSpeed's comms logger next to the gradient traffic. Tensors are
moved to the accelerator for the call (NCCL needs them there) and back to the host.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import Tensor

from ds_topkast.core.select import Collectives
from ds_topkast.errors import CollectiveCallError


def job_collectives() -> Collectives:
    """DeepSpeed's collectives over the job's process group (reused when accelerate or the launcher made it), or
    a world of one when no process group of several ranks has been initialised."""
    if (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        import deepspeed

        deepspeed.init_distributed()
        return ProcessGroupCollectives()
    return Collectives()


class ProcessGroupCollectives(Collectives):
    """`Collectives` over the default (data-parallel) process group."""

    def __init__(self):
        import deepspeed.comm as dist
        from deepspeed.accelerator import get_accelerator

        self._dist = dist
        self._device = get_accelerator().current_device_name()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        moved = tensor.to(self._device)
        self._dist.all_reduce(moved)
        return moved.to(tensor.device)

    def all_reduce_min_max(self, tensor: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise minimum and maximum over ranks (for consistency checks)."""
        low, high = tensor.to(self._device), tensor.to(self._device).clone()
        self._dist.all_reduce(low, op=self._dist.ReduceOp.MIN)
        self._dist.all_reduce(high, op=self._dist.ReduceOp.MAX)
        return low.to(tensor.device), high.to(tensor.device)

    def broadcast(self, tensor: Tensor, source: int) -> Tensor:
        moved = tensor.to(self._device)
        self._dist.broadcast(moved, src=source)
        return moved.to(tensor.device)

    def all_gather_ints(self, value: int) -> list[int]:
        return [int(v) for v in self._all_gather(torch.tensor([value], dtype=torch.long))]

    def all_gather_parts(self, tensor: Tensor) -> list[Tensor]:
        counts = self.all_gather_ints(tensor.numel())
        padded = tensor.new_zeros(max(counts))
        padded[:tensor.numel()] = tensor
        return [part[:count] for part, count in zip(self._all_gather(padded), counts)]

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        moved = tensor.to(self._device)
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        self._dist.all_gather(parts, moved)
        return [part.to(tensor.device) for part in parts]


def release_cpu_shm_buffer() -> None:
    """Unlink this rank's /dev/shm all-reduce buffer of DeepSpeed's CPU comm op once the job is done with it.

    DeepSpeed 0.19 on its CPU accelerator creates one 66 MB shared-memory file per rank,
    named after the master address, port and rank, and never removes it, so every run
    would leave RAM behind. Call after the last collective (the peers mapped it at init).
    """
    from pathlib import Path

    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '')}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)



JOIN_TIMEOUT_ENV = "DS_TOPKAST_JOIN_TIMEOUT"  # seconds a rank waits for the others to enter a collective save
JOIN_WARNING_SECONDS = 60.0
_joins: dict[str, int] = {}


def require_every_rank(call: str, fix: str, group=None) -> None:
    """Wait until every rank of `group` (default: the job's) has entered `call`, a collective (a gather of
    partitioned weights), or raise naming it.

    DeepSpeed's own gathers hang for good when one rank calls them alone (the commonest
    slip: a save inside `if rank == 0:`). Each rank counts its calls of `call` in the job's
    rendezvous store, so this costs no collective. A rank that has waited a minute warns;
    one that waits `DS_TOPKAST_JOIN_TIMEOUT` seconds (default 600) raises before anything
    is gathered or written, and marks the call failed, so that a rank arriving later
    raises too instead of entering a gather the others will never join.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store every rank already holds
    ranks = ",".join(map(str, dist.get_process_group_ranks(group or dist.group.WORLD)))
    _joins[f"{call}/{ranks}"] = count = _joins.get(f"{call}/{ranks}", 0) + 1
    key = f"ds_topkast/joined/{call}/{ranks}/{count}"
    world, timeout = dist.get_world_size(group), float(os.environ.get(JOIN_TIMEOUT_ENV, "600"))
    joined, start, warned = store.add(key, 1), time.monotonic(), False
    while joined < world:
        waited = time.monotonic() - start
        if waited > timeout:
            store.set(key + "/failed", "1")
            raise CollectiveCallError(
                f"{call} is a collective under ZeRO-3 (it gathers partitioned weights): every rank must call it, but "
                f"only {joined} of {world} ranks did within {timeout:g} s ({JOIN_TIMEOUT_ENV}). {fix}")
        if waited > JOIN_WARNING_SECONDS and not warned:
            logging.getLogger("ds_topkast").warning(
                "%s: %d of %d ranks have called it after %.0f s; it is a collective: every rank must call it. %s",
                call, joined, world, waited, fix)
            warned = True
        time.sleep(0.05)
        joined = store.add(key, 0)
    if store.check([key + "/failed"]):
        raise CollectiveCallError(f"{call}: another rank gave up waiting for this call earlier (it was called on some "
                                  f"ranks only); the ranks no longer make the same calls. {fix}")
