"""Hugging Face hub datasets as local split files, through `datasets` (parquet; no loading scripts).

Each split is written once, as the text file it came from, under the corpus cache
(`hub/<dataset>/<config>/<split>.txt`); from then on the corpus is a local one and
needs no network. WikiText rows are the lines of wiki.*.tokens: a row already ends in
its newline, and a blank line is an empty row, so each row becomes exactly one line
(joining rows with another newline would add an <eos> per line). enwik8 is written as
the raw 100M bytes and split 90M / 5M / 5M like the raw file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ds_topkast.lm.data.cache_folders import build_once
from ds_topkast.lm.data.corpus_sources import SPLITS, CorpusError, DataConfig, Split, enwik8_splits, whole_files


@dataclass(frozen=True)
class HubDataset:
    """How to load one hub dataset: its path, load_dataset's arguments, its split names for train/valid/test.

    `splits` None: one split whose rows, joined, are enwik8's raw bytes, split 90M/5M/5M.
    """

    path: str
    arguments: dict = field(default_factory=dict)
    splits: tuple[str, str, str] | None = ("train", "validation", "test")

    def label(self) -> str:
        return f"hf://{self.path}" + "".join(f" {k}={v}" for k, v in self.arguments.items())


def _wikitext(config: str) -> HubDataset:
    return HubDataset("Salesforce/wikitext", {"name": config})


HUB_DATASETS = {
    "wikitext-103": _wikitext("wikitext-103-v1"),
    "wikitext-103-raw": _wikitext("wikitext-103-raw-v1"),
    "wikitext-2": _wikitext("wikitext-2-v1"),
    "wikitext-2-raw": _wikitext("wikitext-2-raw-v1"),
    # LTCB/enwik8 is a loading-script dataset; its parquet conversion holds the raw file as one row
    "enwik8": HubDataset("LTCB/enwik8", {"revision": "refs/convert/parquet", "data_dir": "enwik8-raw"}, None),
}
_OFFLINE_FIX = ("If the hub is unreachable from this machine, download the data where it is reachable and give the "
                "files as data.path (enwik8: data.dataset enwik8 with data.path the raw 100 MB file; WikiText: "
                "data.path the folder with wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens), or leave data "
                "out for the embedded default corpus.")


def as_line(row: str) -> str:
    """A dataset row as the line of the original file: rows that end in their newline keep it, others get one."""
    return row if row.endswith("\n") else row + "\n"


def hub_dataset(name: str) -> HubDataset:
    """A short name's entry, or any hub path with train / validation / test splits and a "text" column."""
    return HUB_DATASETS.get(name) or HubDataset(name)


def _load(name: str, hub: HubDataset):
    from datasets import load_dataset

    try:
        return load_dataset(hub.path, **hub.arguments)
    except Exception as err:  # offline, unknown name, no permission, a script dataset: all end the same way
        raise CorpusError(f"Could not load the Hugging Face dataset {name!r} ({hub.label()}): "
                          f"{type(err).__name__}: {err}. {_OFFLINE_FIX}") from None


def _write_split(rows, path: Path, as_lines: bool) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        for row in rows:
            out.write(as_line(row) if as_lines else row)


def _download(name: str, hub: HubDataset, folder: Path) -> None:
    """Write each split's text under `folder` (a private one: the caller renames it into place)."""
    loaded = _load(name, hub)
    names = hub.splits or tuple(loaded)[:1]
    for split, hub_split in zip(SPLITS, names):
        if hub_split not in loaded:
            raise CorpusError(f"Dataset {name!r} has no {hub_split!r} split (it has {list(loaded)}); give its files as "
                              "data.train, data.valid and data.test.")
        if "text" not in loaded[hub_split].column_names:
            raise CorpusError(f"Dataset {name!r} has no 'text' column (it has {loaded[hub_split].column_names}).")
        _write_split(loaded[hub_split]["text"], folder / f"{split}.txt", as_lines=hub.splits is not None)


def hub_splits(cfg: DataConfig, cache: Path) -> tuple[dict[str, Split], dict[str, list[str]]]:
    """The dataset's splits as ranges of its local copy (downloaded on first use), and how to name them."""
    hub = hub_dataset(cfg.dataset)
    folder = cache / "hub" / hub.label().removeprefix("hf://").replace("/", "__").replace(" ", "_")
    build_once(folder, "train.txt", lambda private: _download(cfg.dataset, hub, private))
    if hub.splits is None:
        splits = enwik8_splits(folder / "train.txt", cfg.max_bytes)
        return splits, {split: [f"{hub.label()} [bytes {r[0].start}:{r[0].end}]"] for split, r in splits.items()}
    splits = {split: whole_files([folder / f"{split}.txt"], cfg.max_bytes, cfg.reads_text) for split in SPLITS}
    return splits, {split: [f"{hub.label()} {name}"] for split, name in zip(SPLITS, hub.splits)}
