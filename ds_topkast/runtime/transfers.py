"""Host-accelerator copies of a refresh on a side stream, so that they overlap the accelerator's work.

A refresh streams every store shard through the accelerator (DESIGN.md, Section 3): copy
it there, work on it, copy it back. Done in series, the copies and the work add up; here
the copy of the next layer's shard to the device and of the previous one back to the host
run on a second CUDA stream while the default stream works on this layer, and the host
waits once, at the end (or, for a store that reuses its host buffers, before handing a
buffer back). Host buffers are the store's own pinned shards (or the NVMe store's pinned
ring), so the copies are asynchronous. On other devices the copies are plain (on the CPU
accelerator they are no copies at all).
"""
from __future__ import annotations

import torch
from torch import Tensor


class SideStreamCopies:
    """Copies to and from `device` on a side stream; `wait()` is the only host wait, and it is counted."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host_waits = 0

    def to_device(self, host: Tensor) -> tuple[Tensor, object]:
        """Start copying `host` to the device; returns the copy and what `ready` needs to use it."""
        if self.stream is None:
            return host.to(self.device), None
        with torch.cuda.stream(self.stream):
            copy = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return copy, done

    def ready(self, copy: Tensor, done: object) -> Tensor:
        """The copy, usable on the current stream (which waits on the device, not on the host)."""
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            copy.record_stream(current)
        return copy

    def to_host(self, source: Tensor, host: Tensor) -> None:
        """Start copying `source` (on the device) into `host` once the current stream's work on it is done."""
        if self.stream is None:
            if source.data_ptr() != host.data_ptr():
                host.copy_(source)
            return
        produced = torch.cuda.Event()
        produced.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(produced)
            host.copy_(source, non_blocking=True)
            source.record_stream(self.stream)

    def wait(self) -> None:
        """Block the host until every copy started so far is done."""
        if self.stream is not None:
            self.stream.synchronize()
            self.host_waits += 1
