"""Corpora, tokenisation and deterministic batches for language-model training.

A corpus comes from local files (a file, a folder or a glob, read as raw bytes), from a
Hugging Face dataset name through `datasets` (enwik8, wikitext-103 or any dataset with
a "text" column) when the hub is reachable, or, when nothing is given, from the embedded
default: the installed Python standard library's own source, which every machine that
runs ds_topkast has, so the training command and the tests never download anything.

Tokenisation is byte-level (enwik8-style; losses reported in bits per byte), word-level
(Transformer-XL's WikiText-103 vocabulary: whitespace words plus <eos> per line, built
from the training split) or any Hugging Face tokenizer by local path or hub name.

Batches are a pure function of (seed, step, micro-step): the global batch of a step is
the same whatever the world size, each rank takes its own rows, and a resumed run sees
exactly the batches the uninterrupted run would have. GPT-style models train on random
windows; Transformer-XL on contiguous streams, one per batch row, so its memory carries
from one segment to the next.
"""
from __future__ import annotations

import glob
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

BYTE_VOCAB = 256
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # the standard train / valid / test bytes
HUB_DATASETS = {  # short names -> (hub path, config, splits)
    "enwik8": ("LTCB/enwik8", "enwik8-raw", None),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-v1", ("train", "validation")),
    "wikitext-103-raw": ("Salesforce/wikitext", "wikitext-103-raw-v1", ("train", "validation")),
}


class CorpusError(ValueError):
    """A corpus is missing, empty, unreadable in the chosen tokenisation or too short."""


class DataConfig(BaseModel):
    """The "train.data" section: where the text comes from and how it becomes tokens."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Text file, folder or glob; none (and no dataset): the embedded "
                                               "stdlib-source corpus.")
    dataset: str | None = Field(None, description="Hugging Face dataset: enwik8, wikitext-103, wikitext-103-raw "
                                                  "or a hub path with a 'text' column.")
    tokenizer: str = Field("bytes", description="bytes, words, or a Hugging Face tokenizer path or name.")
    max_bytes: int | None = Field(None, gt=0, description="Read at most this many bytes of the corpus.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Trailing fraction held out for eval when the "
                                                               "source has no validation split.")
    binary: bool = Field(False, description="Byte-level mode only: accept files that are not UTF-8 text (NUL bytes, "
                                            "invalid UTF-8), to model raw bytes.")


@dataclass
class Corpus:
    """Token ids of the train and eval splits, kept compact (uint8 bytes, int32 tokens; batches are int64).

    `unit` says what a token is: "byte" (losses reported in bits per byte) or "token".
    """

    train: Tensor
    eval: Tensor
    vocab_size: int
    unit: str  # "byte" or "token"
    name: str


def default_corpus_files() -> list[Path]:
    """The standard library's top-level modules, sorted so every run reads the same bytes."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def corpus_files(path: str | None) -> list[Path]:
    """The files a data.path names: a file, every file under a folder, or a glob's matches, sorted."""
    if path is None:
        return default_corpus_files()
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            raise CorpusError(f"Corpus folder {path} holds no files; put text files in it or point data.path "
                              "at another folder.")
        return files
    if root.is_file():
        return [root]
    matches = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    if matches:
        return matches
    raise CorpusError(f"Corpus path {path} does not exist; give a text file, a folder or a glob of them, "
                      "or leave data.path out for the embedded default corpus.")


def read_bytes(path: str | None = None, max_bytes: int | None = None) -> bytes:
    """The corpus files joined in sorted order, cut at max_bytes."""
    chunks, total = [], 0
    for file in corpus_files(path):
        chunks.append(file.read_bytes())
        total += len(chunks[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    joined = b"".join(chunks)[:max_bytes]
    if not joined:
        raise CorpusError(f"Corpus {path or 'default'} is empty; give files that hold text.")
    return joined


_TEXT_MODES_FIX = "word and tokenizer modes need text: use data.tokenizer 'bytes' or convert the files"
_BYTES_MODE_FIX = "check data.path, or set data.binary: true to model its raw bytes anyway"


def _decode(data: bytes, source: str, fix: str = _TEXT_MODES_FIX) -> str:
    """The corpus as UTF-8 text; a character cut at the end (by max_bytes) is dropped, anything else refused."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data":
            return data[:err.start].decode("utf-8")
        raise CorpusError(f"Corpus {source} is not UTF-8 text (byte {err.start}: {err.reason}); {fix}.") from None


def _check_text_bytes(data: bytes, source: str) -> None:
    """Byte-level mode models text: a NUL byte or invalid UTF-8 means the path names the wrong files."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"Corpus {source} looks binary, not text (a NUL byte at offset {nul}); {_BYTES_MODE_FIX}.")
    _decode(data, source, _BYTES_MODE_FIX)


def _hub_texts(name: str, max_bytes: int | None) -> tuple[str, str | None]:
    """(train text, validation text or None) of a hub dataset, through `datasets`."""
    from datasets import load_dataset

    hub_path, config, splits = HUB_DATASETS.get(name, (name, None, None))
    try:
        loaded = load_dataset(hub_path, config)
    except Exception as err:  # offline, unknown name, no permission: all end the same way for the user
        raise CorpusError(
            f"Could not load the Hugging Face dataset {name!r} ({hub_path}): {type(err).__name__}: {err}. "
            "If the hub is unreachable from this machine, download the data where it is reachable and give "
            "the files as data.path (enwik8: the raw 100 MB file named enwik8), or leave data out for the "
            "embedded default corpus.") from None
    train_split = (splits or ("train",))[0]
    eval_split = splits[1] if splits else next((s for s in ("validation", "valid", "test") if s in loaded), None)

    def text(split: str) -> str:
        if "text" not in loaded[split].column_names:
            raise CorpusError(f"Dataset {name!r} has no 'text' column (it has {loaded[split].column_names}).")
        lines = loaded[split]["text"]
        return "\n".join(lines)[:max_bytes] if max_bytes else "\n".join(lines)

    return text(train_split), (text(eval_split) if eval_split else None)


def _is_enwik8(cfg: DataConfig) -> bool:
    return cfg.dataset == "enwik8" or (cfg.path is not None and Path(cfg.path).name == "enwik8")


def _split(tokens: Tensor, eval_fraction: float) -> tuple[Tensor, Tensor]:
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]


class WordVocabulary:
    """Transformer-XL's word-level vocabulary: whitespace words, <eos> ending each line, by frequency."""

    def __init__(self, text: str):
        counts = Counter(word for line in text.splitlines() for word in line.split())
        self.words = ["<eos>", "<unk>", *sorted(counts, key=lambda w: (-counts[w], w))]
        self.ids = {word: i for i, word in enumerate(self.words)}

    def encode(self, text: str) -> Tensor:
        unk = self.ids["<unk>"]
        ids = [i for line in text.splitlines() for i in (*(self.ids.get(w, unk) for w in line.split()), 0)]
        return torch.tensor(ids, dtype=torch.int32)


def _tokenize(cfg: DataConfig, train_text: str, eval_text: str | None, source: str) -> Corpus:
    if cfg.tokenizer == "words":
        vocab = WordVocabulary(train_text)
        encode, vocab_size = vocab.encode, len(vocab.words)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        except Exception as err:
            raise CorpusError(f"Could not load the tokenizer {cfg.tokenizer!r}: {type(err).__name__}: {err}. "
                              "Give a local tokenizer folder, 'bytes' or 'words'.") from None

        def encode(text: str) -> Tensor:
            return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)

        vocab_size = len(tokenizer)
    if eval_text is None:
        train, held_out = _split(encode(train_text), cfg.eval_fraction)
    else:
        train, held_out = encode(train_text), encode(eval_text)
    return Corpus(train, held_out, vocab_size, "token", source)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read, tokenise and split the corpus a "train.data" section names."""
    if cfg.path is not None and cfg.dataset is not None:
        raise CorpusError("train.data gives both path and dataset; keep one.")
    source = cfg.dataset or cfg.path or "default (Python standard library source)"
    if cfg.dataset is not None:
        train_text, eval_text = _hub_texts(cfg.dataset, cfg.max_bytes)
        raw = train_text.encode("utf-8") if cfg.tokenizer == "bytes" else None
    else:
        raw = read_bytes(cfg.path, cfg.max_bytes)
        train_text = eval_text = None
    if cfg.tokenizer != "bytes":
        if cfg.binary:
            raise CorpusError("train.data.binary applies to byte-level mode only; remove it or set data.tokenizer "
                              "'bytes'.")
        return _tokenize(cfg, train_text if train_text is not None else _decode(raw, source), eval_text, source)
    if not cfg.binary and cfg.dataset is None:
        _check_text_bytes(raw, source)
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if _is_enwik8(cfg) and len(tokens) >= sum(ENWIK8_SPLIT):
        train_bytes, valid_bytes, _ = ENWIK8_SPLIT
        return Corpus(tokens[:train_bytes], tokens[train_bytes:train_bytes + valid_bytes], BYTE_VOCAB, "byte", source)
    if eval_text is not None:
        held_out = torch.frombuffer(bytearray(eval_text.encode("utf-8")), dtype=torch.uint8)
        return Corpus(tokens, held_out, BYTE_VOCAB, "byte", source)
    return Corpus(*_split(tokens, cfg.eval_fraction), BYTE_VOCAB, "byte", source)


def _check_length(corpus: Corpus, needed: int, what: str) -> None:
    for name, part in (("train", corpus.train), ("eval", corpus.eval)):
        if len(part) < needed:
            raise CorpusError(f"The {name} split of corpus {corpus.name} has {len(part)} tokens, fewer than the "
                              f"{needed} {what}; use a larger corpus or a shorter sequence.")


class WindowBatches:
    """GPT-style batches: random windows of the train split, fixed evenly spaced eval windows."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int = 0):
        _check_length(corpus, seq_len + 1, f"seq_len+1 = {seq_len + 1} one window needs")
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed

    def _windows(self, data: Tensor, starts: Tensor) -> Tensor:
        return torch.stack([data[s:s + self.seq_len] for s in starts.tolist()]).long()

    def train_batch(self, step: int, micro_step: int, rows: int, rank: int = 0, world: int = 1) -> Tensor:
        """This rank's `rows` windows of micro-batch `micro_step` in optimizer step `step`."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro_step)
        starts = torch.randint(0, len(self.corpus.train) - self.seq_len, (rows * world,), generator=gen)
        return self._windows(self.corpus.train, starts[rank * rows:(rank + 1) * rows])

    def eval_batches(self, rows: int, count: int, rank: int = 0, world: int = 1) -> list[Tensor]:
        """This rank's rows of `count` global batches of evenly spaced eval windows (the same every call)."""
        span = len(self.corpus.eval) - self.seq_len
        starts = torch.linspace(0, span, rows * world * count).long().view(count, world, rows)
        return [self._windows(self.corpus.eval, starts[i, rank]) for i in range(count)]


class StreamBatches:
    """Transformer-XL batches: each global batch row is its own contiguous stream of the split.

    Micro-batch u of a run reads segment u of every stream (wrapping at the end), as
    (rows, seg_len + 1) windows: inputs are [:, :-1] and targets [:, 1:], and the next
    segment starts where this one's inputs end, so the memory lines up.
    """

    def __init__(self, corpus: Corpus, seg_len: int, eval_seg_len: int, global_rows: int, eval_global_rows: int):
        self.corpus, self.seg_len, self.eval_seg_len = corpus, seg_len, eval_seg_len
        self.train_streams = self._streams(corpus.train, global_rows, seg_len, "train")
        self.eval_streams = self._streams(corpus.eval, eval_global_rows, eval_seg_len, "eval")

    def _streams(self, data: Tensor, rows: int, seg_len: int, name: str) -> Tensor:
        length = len(data) // rows
        if length < seg_len + 1:
            raise CorpusError(f"The {name} split of corpus {self.corpus.name} ({len(data)} tokens) cut into {rows} "
                              f"streams leaves {length} per stream, fewer than a segment of {seg_len + 1}; use a "
                              "larger corpus, fewer batch rows or shorter segments.")
        return data[:rows * length].view(rows, length)

    def segments(self, streams: Tensor, seg_len: int) -> int:
        return (streams.shape[1] - 1) // seg_len

    def train_batch(self, micro_batch: int, rank: int, rows: int) -> Tensor:
        """Segment `micro_batch` (counted over the whole run) of this rank's streams."""
        start = (micro_batch % self.segments(self.train_streams, self.seg_len)) * self.seg_len
        return self.train_streams[rank * rows:(rank + 1) * rows, start:start + self.seg_len + 1].long()

    def eval_batches(self, rank: int, rows: int, count: int | None) -> list[Tensor]:
        """This rank's eval streams segment by segment, from the start (at most `count` segments)."""
        total = self.segments(self.eval_streams, self.eval_seg_len)
        mine = self.eval_streams[rank * rows:(rank + 1) * rows]
        return [mine[:, s * self.eval_seg_len:(s + 1) * self.eval_seg_len + 1].long()
                for s in range(total if count is None else min(count, total))]
