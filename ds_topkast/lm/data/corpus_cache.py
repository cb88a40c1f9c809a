"""Corpora tokenised once into binary token files that every rank memory-maps.

`open_corpus(cfg)` finds the prepared corpus for a "train.data" section in the cache, or
prepares it: each split's text is read in chunks, tokenised (bytes; Transformer-XL's
word vocabulary; or a Hugging Face tokenizer) and written as `train.bin`, `valid.bin`,
`test.bin` (the smallest unsigned dtype that holds the vocabulary) with a `meta.json`
(vocabulary size, unit, each split's sources and token count). The cache key is a hash of
the sources (resolved path, size, modification time and byte range of every file), the
tokenizer and the format, so a changed file is prepared again and an unchanged one costs
a memory map: seconds, whatever the corpus size, and no rank holds the corpus in RAM.

A preparation writes into a private folder and renames it into place, so ranks or nodes
preparing the same corpus at once cannot corrupt it; the training command lets one
process per node prepare while the others wait.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_topkast.lm.data.cache_folders import build_once
from ds_topkast.lm.data.corpus_sources import (SPLITS, CorpusError, DataConfig, Split, is_enwik8, local_splits,
                                               source_name)
from ds_topkast.lm.data.hub_corpora import hub_splits
from ds_topkast.lm.data.split_readers import byte_chunks, checked_text_bytes
from ds_topkast.lm.data.tokenization import tokenizer_encoder, word_encoder

FORMAT_VERSION = 1
BYTE_VOCAB = 256


@dataclass
class PreparedCorpus:
    """Token ids of each split, memory-mapped read-only (numpy arrays; batches copy out int64 tensors).

    `unit` says what a token is: "byte" (losses reported in bits per byte, enwik8's bits
    per character) or "token" (perplexity).
    """

    splits: dict[str, np.ndarray]
    vocab_size: int
    unit: str
    name: str
    files: dict[str, list[str]]
    folder: Path | None = None

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def valid(self) -> np.ndarray:
        return self.splits["valid"]

    @property
    def test(self) -> np.ndarray:
        return self.splits["test"]

    def record(self) -> dict:
        """What metrics.jsonl's "data" record says: each split's source files and token count."""
        return {"source": self.name, "unit": self.unit, "vocab_size": self.vocab_size,
                "splits": {split: {"files": self.files[split], "tokens": len(self.splits[split])}
                           for split in SPLITS}}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.int32)


class _TokenWriter:
    """Appends token ids to a binary file in the vocabulary's dtype, a million at a time; an id outside it is refused."""

    def __init__(self, path: Path, vocab_size: int):
        self.file, self.vocab_size, self.pending, self.count = path.open("wb"), vocab_size, array("q"), 0
        self.dtype = token_dtype(vocab_size)

    def extend(self, ids) -> None:
        self.pending.extend(ids)
        if len(self.pending) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        ids = np.frombuffer(self.pending, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise CorpusError(f"The tokenizer gave id {int(ids.max())}, outside its vocabulary of {self.vocab_size}; "
                              "use a tokenizer whose ids are below its size.")
        ids.astype(self.dtype).tofile(self.file)
        self.count += len(self.pending)
        self.pending = array("q")

    def close(self) -> int:
        self.flush()
        self.file.close()
        return self.count


def _write_bytes(split: Split, path: Path, check: bool, source: str) -> int:
    """Copy the split's bytes into path (checking they are text unless told not to); returns their count."""
    chunks = byte_chunks(split)
    with path.open("wb") as out:
        for chunk in (checked_text_bytes(chunks, source) if check else chunks):
            out.write(chunk)
    return path.stat().st_size


def _prepare_text(cfg: DataConfig, splits: dict[str, Split], folder: Path, source: str) -> tuple[int, dict]:
    """Tokenise each split into folder/<split>.bin; returns (vocabulary size, token counts)."""
    if cfg.tokenizer == "words":
        vocab, encode = word_encoder(splits["train"], source)
        (folder / "vocab.txt").write_text("".join(word + "\n" for word in vocab.words), encoding="utf-8")
        vocab_size = len(vocab.words)
    else:
        vocab_size, encode = tokenizer_encoder(cfg.tokenizer, source)
    counts = {}
    for split, ranges in splits.items():
        writer = _TokenWriter(folder / f"{split}.bin", vocab_size)
        for ids in encode(ranges):
            writer.extend(ids)
        counts[split] = writer.close()
    return vocab_size, counts


def _fingerprint(ranges: Split) -> list:
    """What identifies a split's bytes: each range's resolved path, size, modification time and bounds."""
    return [[str(r.path.resolve()), r.path.stat().st_size, r.path.stat().st_mtime_ns, r.start, r.end] for r in ranges]


def _tokenizer_fingerprint(name: str) -> list:
    """A local tokenizer folder's files and their times; a hub name stands for itself."""
    folder = Path(name)
    if not folder.is_dir():
        return [name]
    return [name, *([p.name, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file())]


def cache_key(cfg: DataConfig, splits: dict[str, Split], binary: bool) -> str:
    identity = {"format": FORMAT_VERSION, "tokenizer": _tokenizer_fingerprint(cfg.tokenizer), "binary": binary,
                "splits": {split: _fingerprint(ranges) for split, ranges in splits.items()}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _prepare(cfg: DataConfig, splits: dict[str, Split], files: dict[str, list[str]], binary: bool,
             folder: Path, source: str) -> None:
    """Write the prepared corpus into `folder` (a private one; the caller renames it into place)."""
    if cfg.tokenizer == "bytes":
        counts = {split: _write_bytes(ranges, folder / f"{split}.bin", not binary, source)
                  for split, ranges in splits.items()}
        vocab_size, unit = BYTE_VOCAB, "byte"
    else:
        vocab_size, counts = _prepare_text(cfg, splits, folder, source)
        unit = "token"
    for split, count in counts.items():
        if count == 0:
            raise CorpusError(f"The {split} split of corpus {source} is empty; give it text, or a larger corpus or "
                              "held_out fraction.")
    meta = {"format": FORMAT_VERSION, "source": source, "vocab_size": vocab_size, "unit": unit,
            "dtype": token_dtype(vocab_size).name, "splits": {s: {"files": files[s], "tokens": counts[s]}
                                                              for s in SPLITS}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def corpus_splits(cfg: DataConfig) -> tuple[dict[str, Split], dict[str, list[str]], str]:
    """(byte ranges of each split, how the data record names them, the corpus's name)."""
    if cfg.tokenizer != "bytes" and cfg.binary:
        raise CorpusError("train.data.binary applies to byte-level mode only; remove it or set data.tokenizer "
                          "'bytes'.")
    if cfg.dataset is not None and cfg.path is None:
        splits, files = hub_splits(cfg, cfg.cache_folder())
    else:
        splits = local_splits(cfg)
        files = {split: [r.describe() for r in ranges] for split, ranges in splits.items()}
    return splits, files, source_name(cfg)


def prepare_corpus(cfg: DataConfig) -> Path:
    """The folder of the prepared corpus for `cfg`, preparing it first when the cache has none."""
    splits, files, source = corpus_splits(cfg)
    binary = cfg.binary or is_enwik8(cfg)
    return build_once(cfg.cache_folder() / cache_key(cfg, splits, binary), "meta.json",
                      lambda folder: _prepare(cfg, splits, files, binary, folder, source))


def map_corpus(folder: Path) -> PreparedCorpus:
    """A prepared corpus, memory-mapped."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CorpusError(f"{folder} was prepared by another ds_topkast version; delete it to prepare it again.")
    splits = {split: np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r",
                               shape=(meta["splits"][split]["tokens"],)) for split in SPLITS}
    return PreparedCorpus(splits, meta["vocab_size"], meta["unit"], meta["source"],
                          {split: meta["splits"][split]["files"] for split in SPLITS}, folder)


def open_corpus(cfg: DataConfig) -> PreparedCorpus:
    """Prepare (when not cached) and memory-map the corpus a "train.data" section names."""
    return map_corpus(prepare_corpus(cfg))
