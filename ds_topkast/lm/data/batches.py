"""Deterministic batches from a prepared corpus, for both model layouts.

Batches are a pure function of (seed, step, micro-step): for a given gradient
accumulation, the global batch of a step is the same whatever the world size, each rank
takes its own rows, and a resumed run sees exactly the batches the uninterrupted run
would have. Batches are copied out of the
memory-mapped splits as int64 tensors on the host; the model runners move them.

GPT-style models train on random windows. Transformer-XL trains on contiguous streams:
the train split is cut into one stream per row of the global batch (train_batch_size
rows), each optimizer step reads the next segment of every stream, and gradient
accumulation splits the streams into chunks as the reference's `batch_chunk` does, so
raising it to fit memory never changes which streams a step trains on.

Evaluation covers a split in order. Transformer-XL's follows the reference's
LMOrderedIterator: the split cut into `streams` rows, read segment by segment to its
end (the last segment may be shorter), every token after each stream's first predicted
once. Ranks share the streams (or windows); a rank with fewer rows than another repeats
a row it does not count, so every rank runs the same number of forward passes (ZeRO-3's
forward gathers parameters collectively). Evaluation batches are made one at a time, so a
large split never sits in memory as int64.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ds_topkast.core.seeds import SEED_STRIDE
from ds_topkast.lm.data.corpus_cache import PreparedCorpus
from ds_topkast.lm.data.corpus_sources import SPLITS, CorpusError


def as_long(rows: np.ndarray) -> Tensor:
    """Rows of token ids copied out of a (memory-mapped) array as an int64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


@dataclass
class EvalBatch:
    """One forward pass of an evaluation; `counted` is False for a rank's filler rows (see the module docstring)."""

    tokens: Tensor
    counted: bool = True


def _share(items: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `items` (sizes differ by at most one)."""
    low, high = items * rank // world, items * (rank + 1) // world
    return range(low, high)


def _check_length(corpus: PreparedCorpus, needed: int, what: str) -> None:
    for split in SPLITS:
        if len(corpus.splits[split]) < needed:
            raise CorpusError(f"The {split} split of corpus {corpus.name} has {len(corpus.splits[split])} tokens, "
                              f"fewer than the {needed} {what}; use a larger corpus or a shorter sequence.")


class WindowBatches:
    """GPT-style batches: random windows of the train split; evaluation windows of a split in order."""

    def __init__(self, corpus: PreparedCorpus, seq_len: int, seed: int = 0):
        _check_length(corpus, seq_len + 1, f"seq_len+1 = {seq_len + 1} one window needs")
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed

    def _windows(self, data: np.ndarray, starts) -> Tensor:
        return as_long(np.stack([data[s:s + self.seq_len] for s in starts]))

    def train_batch(self, step: int, micro_step: int, rows: int, rank: int = 0, world: int = 1) -> Tensor:
        """This rank's `rows` windows of micro-batch `micro_step` in optimizer step `step`."""
        gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + step * 1_009 + micro_step)
        starts = torch.randint(0, len(self.corpus.train) - self.seq_len, (rows * world,), generator=gen)
        return self._windows(self.corpus.train, starts[rank * rows:(rank + 1) * rows].tolist())

    def eval_batches(self, split: str, rows: int, count: int | None, rank: int = 0,
                     world: int = 1) -> Iterator[EvalBatch]:
        """This rank's rows of the split's evaluation batches.

        `count` batches of evenly spaced windows (a fixed sample across the split), or with
        `count` None every window in order, each starting where the last one's predictions
        ended, so every token after the first is predicted exactly once.
        """
        data = self.corpus.splits[split]
        if count is not None:
            starts = torch.linspace(0, len(data) - self.seq_len, rows * world * count).long().view(count, world, rows)
            for i in range(count):
                yield EvalBatch(self._windows(data, starts[i, rank].tolist()))
            return
        starts = range(0, len(data) - self.seq_len + 1, self.seq_len - 1)
        per_batch = rows * world
        for first in range(0, len(starts), per_batch):
            mine = starts[first:first + per_batch][rank * rows:(rank + 1) * rows]
            yield (EvalBatch(self._windows(data, mine)) if len(mine) else
                   EvalBatch(self._windows(data, starts[:1]), counted=False))


def _streams(data: np.ndarray, rows: int, min_length: int, what: str) -> np.ndarray:
    """The split cut into `rows` contiguous streams (the remainder dropped), a (rows, length) view."""
    length = len(data) // rows
    if length < min_length:
        raise CorpusError(f"{what} ({len(data)} tokens) cut into {rows} streams leaves {length} per stream, fewer "
                          f"than the {min_length} a segment needs; use a larger corpus, fewer batch rows or shorter "
                          "segments.")
    return data[:rows * length].reshape(rows, length)


class StreamBatches:
    """Transformer-XL training batches: one contiguous stream of the train split per global batch row.

    Segment s of a stream is its (seg_len + 1)-token window starting at s * seg_len:
    inputs are [:, :-1] and targets [:, 1:], and the next segment starts where this one's
    inputs end, so the memory lines up. A stream wraps after its last full segment.
    """

    def __init__(self, corpus: PreparedCorpus, seg_len: int, global_rows: int):
        self.corpus, self.seg_len = corpus, seg_len
        self.streams = _streams(corpus.train, global_rows, seg_len + 1, f"The train split of corpus {corpus.name}")
        self.segments = (self.streams.shape[1] - 1) // seg_len

    def starts_pass(self, segment: int) -> bool:
        """Whether segment `segment` (counted over the run) begins a new pass over the streams."""
        return segment % self.segments == 0

    def train_batch(self, segment: int, first_row: int, rows: int) -> Tensor:
        """Segment `segment` (counted over the whole run) of streams [first_row, first_row + rows)."""
        start = (segment % self.segments) * self.seg_len
        return as_long(self.streams[first_row:first_row + rows, start:start + self.seg_len + 1])


def eval_streams(corpus: PreparedCorpus, split: str, streams: int, seg_len: int, rank: int, world: int,
                 count: int | None = None) -> Iterator[EvalBatch]:
    """This rank's share of the split's evaluation streams, segment by segment (at most `count` segments).

    As the reference's LMOrderedIterator: `streams` rows, segments of seg_len predicted
    tokens from the start, the last one shorter when the stream does not divide.
    """
    rows = _streams(corpus.splits[split], streams, 2, f"The {split} split of corpus {corpus.name}")
    mine = _share(streams, rank, world)
    counted = len(mine) > 0
    rows = rows[mine.start:mine.stop] if counted else rows[:1]
    predicted = rows.shape[1] - 1
    starts = range(0, predicted, seg_len)
    if count is not None:
        starts = starts[:count]
    for s in starts:
        yield EvalBatch(as_long(rows[:, s:min(s + seg_len, predicted) + 1]), counted)
