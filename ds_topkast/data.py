"""Byte-level corpora and deterministic batches for language-model training.

The embedded default corpus is the installed Python standard library's own source
(top-level *.py files, read as bytes): every machine that runs ds_topkast has it, so
the training command and the tests never download anything. Any text file or folder
can be used instead. Batches are a pure function of (seed, step, micro-step): the
global batch of a step is the same whatever the world size, each rank takes its own
rows, and a resumed run sees exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor

BYTE_VOCAB = 256


class CorpusError(ValueError):
    """A corpus path is missing, empty or too short for the requested windows."""


def default_corpus_files() -> list[Path]:
    """The standard library's top-level modules, sorted so every run reads the same bytes."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _files(path: str | None) -> list[Path]:
    if path is None:
        return default_corpus_files()
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    elif root.is_file():
        files = [root]
    else:
        raise CorpusError(f"Corpus path {path} does not exist; give a text file or a folder of them, "
                          "or leave it out for the embedded default corpus.")
    if not files:
        raise CorpusError(f"Corpus folder {path} holds no files.")
    return files


def load_bytes(path: str | None = None, max_bytes: int | None = None) -> Tensor:
    """The corpus as a uint8 tensor of bytes, files joined in sorted order."""
    chunks, total = [], 0
    for file in _files(path):
        data = file.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    joined = b"".join(chunks)[:max_bytes]
    if not joined:
        raise CorpusError(f"Corpus {path or 'default'} is empty.")
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


class ByteBatches:
    """Random windows from a train split and fixed windows from an eval split (last `eval_fraction`)."""

    def __init__(self, corpus: Tensor, seq_len: int, eval_fraction: float = 0.05, seed: int = 0):
        split = int(len(corpus) * (1 - eval_fraction))
        self.train, self.eval = corpus[:split].long(), corpus[split:].long()
        self.seq_len, self.seed = seq_len, seed
        for name, part in (("train", self.train), ("eval", self.eval)):
            if len(part) <= seq_len:
                raise CorpusError(f"The {name} split has {len(part)} bytes, fewer than seq_len+1 = {seq_len + 1}; "
                                  "use a larger corpus or a shorter seq_len.")

    def _windows(self, data: Tensor, starts: Tensor) -> Tensor:
        return torch.stack([data[s:s + self.seq_len] for s in starts.tolist()])

    def train_batch(self, step: int, micro_step: int, rows: int, rank: int = 0, world: int = 1) -> Tensor:
        """This rank's `rows` windows of micro-batch `micro_step` in optimizer step `step`."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro_step)
        starts = torch.randint(0, len(self.train) - self.seq_len, (rows * world,), generator=gen)
        return self._windows(self.train, starts[rank * rows:(rank + 1) * rows])

    def eval_batches(self, rows: int, count: int) -> list[Tensor]:
        """`count` batches of evenly spaced eval windows (the same every call)."""
        span = len(self.eval) - self.seq_len
        starts = torch.linspace(0, span, rows * count).long()
        return [self._windows(self.eval, starts[i * rows:(i + 1) * rows]) for i in range(count)]
