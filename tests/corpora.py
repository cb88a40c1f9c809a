"""Corpora the tests build in memory: the batches and runners treat them like a prepared, memory-mapped one."""
import numpy as np

from ds_topkast.lm.data.corpus_cache import PreparedCorpus
from ds_topkast.lm.data.corpus_sources import SPLITS


def in_memory_corpus(splits: dict[str, np.ndarray], vocab_size: int, unit: str = "token",
                     name: str = "in memory") -> PreparedCorpus:
    """A corpus from arrays already in memory, with no files behind its splits."""
    return PreparedCorpus({s: np.asarray(splits[s]) for s in SPLITS}, vocab_size, unit, name,
                          {s: [] for s in SPLITS})
