"""Where each split of a corpus comes from: the standard splits, never inferred from file order.

A "train.data" section names its text one way, and that way fixes the train, valid and
test splits:

- enwik8 (`dataset: enwik8` with `path` the raw 100,000,000-byte file whatever it is called,
  or a file named enwik8*): the standard first 90M / next 5M / last 5M bytes;
- a WikiText folder (`wiki.train.tokens`, `wiki.valid.tokens`, `wiki.test.tokens`, or their
  `.raw` forms) or any folder holding `train.*`, `valid.*`/`validation.*`, `test.*`
  files: each split its own file, by name;
- `train`, `valid`, `test`: explicit files or globs per split;
- anything else (a file, a folder, a glob; the embedded default corpus) only with an
  explicit `held_out` fraction: valid and test are each that fraction at the end, in order.
- a Hugging Face dataset by name: its own train / validation / test splits.

A split is a list of byte ranges of local files (hub splits are first written to local
files by corpus_cache.py), so preparing, recording and checking a split never needs the
whole corpus in memory.
"""
from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ds_topkast.errors import CorpusError

SPLITS = ("train", "valid", "test")
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # the standard train / valid / test bytes of the raw file
DEFAULT_HELD_OUT = 0.05  # of the embedded default corpus, for valid and for test each
WIKITEXT_NAMES = {split: (f"wiki.{split}.tokens", f"wiki.{split}.raw") for split in SPLITS}
SPLIT_STEMS = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}



class DataConfig(BaseModel):
    """The "train.data" section: where the text comes from, how it splits, and how it becomes tokens."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Text file, folder or glob; with `dataset`, the local copy of that "
                                               "dataset. None (and no dataset, no train): the embedded corpus.")
    dataset: str | None = Field(None, description="enwik8, wikitext-103, wikitext-103-raw, wikitext-2, "
                                                  "wikitext-2-raw, or a hub path with a 'text' column.")
    train: str | None = Field(None, description="Train split: a file or glob (with valid and test).")
    valid: str | None = Field(None, description="Validation split: a file or glob.")
    test: str | None = Field(None, description="Test split: a file or glob.")
    held_out: float | None = Field(None, gt=0, lt=0.5, description="For a corpus without splits: valid and test "
                                                                   "are each this trailing fraction, in order.")
    tokenizer: str = Field("bytes", description="bytes, words, or a Hugging Face tokenizer path or name.")
    max_bytes: int | None = Field(None, gt=0, description="Read at most this many bytes of each split's text "
                                                          "(of the whole corpus when held_out splits it).")
    binary: bool = Field(False, description="Byte-level mode only: accept files that are not UTF-8 text (NUL bytes, "
                                            "invalid UTF-8), to model raw bytes. enwik8 is always read this way.")
    cache_dir: str | None = Field(None, description="Where prepared corpora go; default $DS_TOPKAST_CACHE or "
                                                    "~/.cache/ds_topkast/corpora.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "eval_fraction" in values:
            raise ValueError("data.eval_fraction is gone: a corpus without its own splits now needs data.held_out "
                             "(valid and test are each that trailing fraction), or data.train/valid/test files")
        return values

    @property
    def reads_text(self) -> bool:
        """Whether the corpus is text (cut at character boundaries), not raw bytes (data.binary)."""
        return self.tokenizer != "bytes" or not self.binary

    def cache_folder(self) -> Path:
        """Where this corpus's prepared files (and hub copies) go."""
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        explicit = [s for s in SPLITS if getattr(self, s) is not None]
        if explicit and len(explicit) != 3:
            raise ValueError(f"data gives {', '.join(explicit)} but not all of train, valid and test; give all three")
        if explicit and (self.path is not None or self.dataset is not None or self.held_out is not None):
            raise ValueError("data.train/valid/test name the splits themselves; remove path, dataset and held_out")
        return self


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, end) of one file."""

    path: Path
    start: int
    end: int

    def read(self) -> bytes:
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)

    def describe(self) -> str:
        whole = self.start == 0 and self.end == self.path.stat().st_size
        return str(self.path) if whole else f"{self.path}[bytes {self.start}:{self.end}]"


Split = list[ByteRange]


def default_corpus_files() -> list[Path]:
    """The standard library's top-level modules, sorted so every run reads the same bytes."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def default_corpus_bytes(max_bytes: int) -> bytes:
    """The embedded corpus's first max_bytes (cut at a character boundary): text every machine has."""
    return b"".join(part.read() for part in whole_files(default_corpus_files(), max_bytes, text=True))


def matching_files(pattern: str, what: str) -> list[Path]:
    """A file, every file under a folder, or a glob's matches, sorted; an empty answer is an error."""
    root = Path(pattern)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            raise CorpusError(f"Corpus folder {pattern} holds no files; put text files in it or point {what} at "
                              "another folder.")
        return files
    if root.is_file():
        return [root]
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if matches:
        return matches
    raise CorpusError(f"Corpus path {pattern} ({what}) does not exist; give a text file, a folder or a glob of them.")


def _utf8_boundary(path: Path, cut: int) -> int:
    """`cut` moved back to the start of a UTF-8 character it would split, so a capped text stays decodable."""
    with path.open("rb") as f:
        f.seek(max(cut - 4, 0))
        tail = f.read(cut - max(cut - 4, 0))
    trailing = 0  # continuation bytes (10xxxxxx) just before the cut
    while trailing < len(tail) and tail[-1 - trailing] & 0xC0 == 0x80:
        trailing += 1
    if trailing == len(tail):
        return cut
    lead = tail[-1 - trailing]
    length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return cut - trailing - 1 if trailing + 1 < length else cut


def _ranges(files: list[Path], start: int, end: int) -> Split:
    """Bytes [start, end) of the files taken as one concatenated text."""
    out, offset = [], 0
    for file in files:
        size = file.stat().st_size
        low, high = max(start, offset), min(end, offset + size)
        if low < high:
            out.append(ByteRange(file, low - offset, high - offset))
        offset += size
    return out


def _cut(files: list[Path], offset: int, text: bool) -> int:
    """`offset` into the concatenated files, moved back to a character boundary for text."""
    if not text or offset == 0:
        return offset
    last = _ranges(files, 0, offset)[-1]
    return offset - (last.end - _utf8_boundary(last.path, last.end))


def _length(files: list[Path], max_bytes: int | None, text: bool) -> int:
    """The files' total length, cut at max_bytes."""
    total = sum(f.stat().st_size for f in files)
    return total if max_bytes is None or max_bytes >= total else _cut(files, max_bytes, text)


def whole_files(files: list[Path], max_bytes: int | None, text: bool) -> Split:
    """The files as one split, cut at max_bytes."""
    return _ranges(files, 0, _length(files, max_bytes, text))


def held_out_splits(files: list[Path], fraction: float, max_bytes: int | None, text: bool) -> dict[str, Split]:
    """Train, valid, test as consecutive byte ranges: 1 - 2f, f, f of the (capped) concatenation.

    The cuts are moved to character boundaries for text, so each split decodes alone.
    """
    total = _length(files, max_bytes, text)
    held = int(total * fraction)
    cuts = [0, _cut(files, total - 2 * held, text), _cut(files, total - held, text), total]
    return {split: _ranges(files, cuts[i], cuts[i + 1]) for i, split in enumerate(SPLITS)}


def enwik8_splits(file: Path, max_bytes: int | None) -> dict[str, Split]:
    """The standard 90M / 5M / 5M bytes of the raw enwik8 file (each capped at max_bytes)."""
    size, needed = file.stat().st_size, sum(ENWIK8_SPLIT)
    if size != needed:  # a cut, a concatenation or enwik9 would shift the standard valid and test bytes
        raise CorpusError(f"{file} has {size} bytes, not enwik8's {needed}; give the raw enwik8 file (unzipped), or "
                          "drop data.dataset: enwik8 and split the file with data.held_out.")
    out, start = {}, 0
    for split, length in zip(SPLITS, ENWIK8_SPLIT):
        out[split] = [ByteRange(file, start, start + min(length, max_bytes or length))]
        start += length
    return out


def _named_split_files(folder: Path) -> dict[str, list[Path]] | None:
    """The folder's split files by name (WikiText's, or train.* / valid.* / test.*), or None when it has none."""
    for names in (tuple(n[0] for n in WIKITEXT_NAMES.values()), tuple(n[1] for n in WIKITEXT_NAMES.values())):
        if all((folder / name).is_file() for name in names):
            return {split: [folder / name] for split, name in zip(SPLITS, names)}
    found = {split: sorted(p for p in folder.iterdir() if p.is_file() and p.name.split(".")[0].lower() in stems)
             for split, stems in SPLIT_STEMS.items()}
    if not any(found.values()):
        return None
    missing = [split for split, files in found.items() if len(files) != 1]
    if missing:
        raise CorpusError(f"Folder {folder} has split files by name but not exactly one each for "
                          f"{', '.join(missing)} (found { {s: [p.name for p in f] for s, f in found.items()} }); "
                          "keep one train.*, one valid.* and one test.* file, or name them with data.train/valid/test.")
    return found


def _refuse_bytes_written_as_numbers(file: Path) -> None:
    """Transformer-XL's getdata.sh writes enwik8 as decimal byte values; modelling those digits is no enwik8 result."""
    with file.open("rb") as f:
        head = f.read(4096)
    if head and not head.strip(b"0123456789 \n") and b" " in head:
        raise CorpusError(f"{file} holds numbers separated by spaces: Transformer-XL's prepared enwik8 (each byte "
                          "written as its value). Point data.path at the raw, unzipped enwik8 file and set "
                          "data.dataset: enwik8.")


def _is_enwik8_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().startswith("enwik8")


def local_splits(cfg: DataConfig) -> dict[str, Split]:
    """The splits of a local corpus, by the rules of this module's docstring."""
    text = cfg.reads_text
    if cfg.train is not None:
        return {split: whole_files(matching_files(getattr(cfg, split), f"data.{split}"), cfg.max_bytes, text)
                for split in SPLITS}
    if cfg.path is None:
        return held_out_splits(default_corpus_files(), cfg.held_out or DEFAULT_HELD_OUT, cfg.max_bytes, text)
    root = Path(cfg.path)
    if cfg.dataset == "enwik8" or (cfg.dataset is None and _is_enwik8_file(root)):
        if not root.is_file():
            raise CorpusError(f"data.dataset enwik8 needs data.path to be the raw enwik8 file; {cfg.path} is not a "
                              "file.")
        if cfg.held_out is not None:
            raise CorpusError("enwik8 has its standard 90M/5M/5M split; remove data.held_out.")
        return enwik8_splits(root, cfg.max_bytes)
    named = _named_split_files(root) if root.is_dir() else None
    if named is not None:
        if cfg.held_out is not None:
            raise CorpusError(f"Folder {cfg.path} has its own train/valid/test files; remove data.held_out.")
        _refuse_bytes_written_as_numbers(named["train"][0])
        return {split: whole_files(files, cfg.max_bytes, text) for split, files in named.items()}
    if cfg.dataset is not None and cfg.dataset.startswith("wikitext"):
        raise CorpusError(f"data.dataset {cfg.dataset} with data.path {cfg.path}: the folder has no "
                          "wiki.train.tokens / wiki.valid.tokens / wiki.test.tokens (or .raw) files; point "
                          "data.path at the unzipped WikiText folder.")
    files = matching_files(cfg.path, "data.path")
    if cfg.held_out is None:
        raise CorpusError(f"Corpus {cfg.path} has no train/valid/test files by name, so its splits are not known; "
                          "set data.held_out (e.g. 0.05: valid and test are each the last 5%, in order), or give "
                          "data.train, data.valid and data.test. enwik8 under another name: set data.dataset: enwik8.")
    return held_out_splits(files, cfg.held_out, cfg.max_bytes, text)


def source_name(cfg: DataConfig) -> str:
    """How records and errors name the corpus."""
    if cfg.train is not None:
        return f"train {cfg.train}, valid {cfg.valid}, test {cfg.test}"
    return " at ".join(filter(None, (cfg.dataset, cfg.path))) or "default (Python standard library source)"


def is_enwik8(cfg: DataConfig) -> bool:
    """Whether the corpus is enwik8 (read as raw bytes, never checked as text)."""
    return cfg.dataset == "enwik8" or (cfg.dataset is None and cfg.path is not None
                                       and _is_enwik8_file(Path(cfg.path)))


def default_cache_dir() -> Path:
    """Where prepared corpora go when data.cache_dir is not set."""
    return Path(os.environ.get("DS_TOPKAST_CACHE") or Path.home() / ".cache" / "ds_topkast" / "corpora")
