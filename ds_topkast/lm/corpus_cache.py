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

import codecs
import hashlib
import io
import json
import os
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_topkast.lm.corpus_sources import (SPLITS, ByteRange, CorpusError, DataConfig, Split, default_cache_dir,
                                          is_enwik8, local_splits, source_name)
from ds_topkast.lm.hub_corpora import hub_splits

FORMAT_VERSION = 1
BYTE_VOCAB = 256
_CHUNK = 1 << 24
_TEXT_MODES_FIX = "word and tokenizer modes need text: use data.tokenizer 'bytes' or convert the files"
_BYTES_MODE_FIX = "check data.path, or set data.binary: true to model its raw bytes anyway"


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


class _RangesReader(io.RawIOBase):
    """A readable stream of the bytes of several file ranges, one after another."""

    def __init__(self, ranges: Split):
        self._pending, self._file, self._left = list(ranges), None, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._left == 0:
            if self._file is not None:
                self._file.close()
                self._file = None
            if not self._pending:
                return 0
            part = self._pending.pop(0)
            self._file = part.path.open("rb")
            self._file.seek(part.start)
            self._left = part.end - part.start
        read = self._file.readinto(memoryview(buffer)[:min(len(buffer), self._left)])
        if not read:
            raise CorpusError(f"{self._file.name} became shorter while it was read; prepare the corpus again.")
        self._left -= read
        return read

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def byte_chunks(split: Split) -> Iterator[bytes]:
    with io.BufferedReader(_RangesReader(split), _CHUNK) as reader:
        while chunk := reader.read(_CHUNK):
            yield chunk


def text_lines(split: Split, source: str) -> Iterator[str]:
    """The split's lines as Python's text files give them (newline "\\n", "\\r\\n" or "\\r"), newline kept."""
    with io.TextIOWrapper(io.BufferedReader(_RangesReader(split), _CHUNK), encoding="utf-8", newline=None) as text:
        try:
            yield from text
        except UnicodeDecodeError as err:
            raise CorpusError(f"Corpus {source} is not UTF-8 text ({err.reason}); {_TEXT_MODES_FIX}.") from None


def _checked_text_bytes(chunks: Iterator[bytes], source: str) -> Iterator[bytes]:
    """Byte-level mode models text: a NUL byte or invalid UTF-8 means the path names the wrong files."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    for chunk in chunks:
        nul = chunk.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"Corpus {source} looks binary, not text (a NUL byte at offset {offset + nul}); "
                              f"{_BYTES_MODE_FIX}.")
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as err:
            raise CorpusError(f"Corpus {source} is not UTF-8 text (byte {offset + err.start}: {err.reason}); "
                              f"{_BYTES_MODE_FIX}.") from None
        offset += len(chunk)
        yield chunk


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.int32)


class WordVocabulary:
    """Transformer-XL's word vocabulary: <eos> first, then the train split's words by falling count.

    A line is its whitespace-separated words and <eos>, as the reference's `for line in
    f: line.strip().split() + ['<eos>']` reads it. Words unseen in training map to <unk>,
    which WikiText already holds as a word; a corpus without one gets it last.
    """

    def __init__(self, counts: Counter):
        self.words = ["<eos>", *(word for word, _ in counts.most_common() if word != "<eos>")]
        if "<unk>" not in counts:
            self.words.append("<unk>")
        self.ids = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def of_lines(cls, lines: Iterator[str]) -> "WordVocabulary":
        counts = Counter()
        for line in lines:
            counts.update(line.split())
        return cls(counts)

    def encode_line(self, line: str) -> list[int]:
        unk = self.ids["<unk>"]
        return [self.ids.get(word, unk) for word in line.split()] + [0]


class _TokenWriter:
    """Appends token ids to a binary file in the vocabulary's dtype, a million at a time."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.file, self.dtype, self.pending, self.count = path.open("wb"), dtype, array("q"), 0

    def extend(self, ids) -> None:
        self.pending.extend(ids)
        if len(self.pending) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        np.frombuffer(self.pending, dtype=np.int64).astype(self.dtype).tofile(self.file)
        self.count += len(self.pending)
        self.pending = array("q")

    def close(self) -> int:
        self.flush()
        self.file.close()
        return self.count


def _write_bytes(split: Split, path: Path, check: bool, source: str) -> int:
    chunks = byte_chunks(split)
    with path.open("wb") as out:
        for chunk in (_checked_text_bytes(chunks, source) if check else chunks):
            out.write(chunk)
    return path.stat().st_size


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # offline, unknown name, broken folder: all end the same way for the user
        raise CorpusError(f"Could not load the tokenizer {name!r}: {type(err).__name__}: {err}. Give a local "
                          "tokenizer folder, 'bytes' or 'words'.") from None


def _batched_lines(lines: Iterator[str], size: int = 1 << 20) -> Iterator[str]:
    """Whole lines joined into texts of about `size` characters, so a tokenizer sees no cut line."""
    batch, length = [], 0
    for line in lines:
        batch.append(line)
        length += len(line)
        if length >= size:
            yield "".join(batch)
            batch, length = [], 0
    if batch:
        yield "".join(batch)


def _prepare_text(cfg: DataConfig, splits: dict[str, Split], folder: Path, source: str) -> tuple[int, dict]:
    """Tokenise each split into folder/<split>.bin; returns (vocabulary size, token counts)."""
    if cfg.tokenizer == "words":
        vocab = WordVocabulary.of_lines(text_lines(splits["train"], source))
        (folder / "vocab.txt").write_text("".join(word + "\n" for word in vocab.words), encoding="utf-8")
        vocab_size = len(vocab.words)

        def encode(split: Split) -> Iterator[list[int]]:
            return map(vocab.encode_line, text_lines(split, source))
    else:
        tokenizer = _load_tokenizer(cfg.tokenizer)
        vocab_size = len(tokenizer)

        def encode(split: Split) -> Iterator[list[int]]:
            for text in _batched_lines(text_lines(split, source)):
                yield tokenizer(text, add_special_tokens=False)["input_ids"]
    counts = {}
    for split, ranges in splits.items():
        writer = _TokenWriter(folder / f"{split}.bin", token_dtype(vocab_size))
        for ids in encode(ranges):
            writer.extend(ids)
        counts[split] = writer.close()
    return vocab_size, counts


def _fingerprint(ranges: Split) -> list:
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
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.dataset is not None and cfg.path is None:
        splits, files = hub_splits(cfg, cache)
    else:
        splits = local_splits(cfg)
        files = {split: [r.describe() for r in ranges] for split, ranges in splits.items()}
    return splits, files, source_name(cfg)


def prepare_corpus(cfg: DataConfig) -> Path:
    """The folder of the prepared corpus for `cfg`, preparing it first when the cache has none."""
    splits, files, source = corpus_splits(cfg)
    binary = cfg.binary or is_enwik8(cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    folder = cache / cache_key(cfg, splits, binary)
    if (folder / "meta.json").is_file():
        return folder
    private = folder.with_name(f"{folder.name}.partial{os.getpid()}")
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir(parents=True)
    try:
        _prepare(cfg, splits, files, binary, private, source)
        os.rename(private, folder)
    except OSError:
        if not (folder / "meta.json").is_file():  # not another process's finished preparation: a real failure
            raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return folder


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


def in_memory_corpus(splits: dict[str, np.ndarray], vocab_size: int, unit: str = "token",
                     name: str = "in memory") -> PreparedCorpus:
    """A corpus from arrays already in memory (tests, examples): the batches treat it like a mapped one."""
    return PreparedCorpus({s: np.asarray(splits[s]) for s in SPLITS}, vocab_size, unit, name,
                          {s: [] for s in SPLITS})


__all__ = ["BYTE_VOCAB", "ByteRange", "CorpusError", "DataConfig", "PreparedCorpus", "WordVocabulary",
           "in_memory_corpus", "map_corpus", "open_corpus", "prepare_corpus"]
