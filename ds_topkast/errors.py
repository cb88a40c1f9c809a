"""Every error ds_topkast raises, under one base: `except ds_topkast.TopKASTError` catches them all.

Each says what is wrong and the way out. They also keep the built-in class each one was
before the base existed (ValueError, RuntimeError, TypeError), so code that caught those
still does.
"""
from __future__ import annotations


class TopKASTError(Exception):
    """Base of every ds_topkast error."""


class TopKASTConfigError(TopKASTError, ValueError):
    """A setting is missing, misspelled or out of range, or does not fit the model: found at start."""


class PretrainedWeightsError(TopKASTConfigError):
    """Pretrained weights are missing, damaged or do not fit the model."""


class NonFiniteScoresError(TopKASTError, ValueError):
    """Selection was asked to rank NaN, infinite or negative scores."""


class DenseStoreError(TopKASTError, RuntimeError):
    """The store was asked for a layer it does not hold, or given mismatched state."""


class NVMeStoreError(DenseStoreError):
    """The NVMe path or the async I/O library cannot hold or serve the store."""


class CollectiveCallError(TopKASTError, RuntimeError):
    """A collective ds_topkast call was made on some ranks only (e.g. inside `if rank == 0:`)."""


class UnsupportedOptimizerError(TopKASTError, TypeError):
    """The optimizer or DeepSpeed wrapper is one whose state ds_topkast cannot remap."""


class RefreshError(TopKASTError, RuntimeError):
    """A refresh found state it must not act on (non-finite weights, changed shards, diverged ranks)."""


class CheckpointError(TopKASTError, RuntimeError):
    """A Top-KAST checkpoint file is missing, damaged, or does not fit the running model."""


class CorpusError(TopKASTError, ValueError):
    """A corpus is missing, empty, ambiguous in its splits, unreadable in its tokenisation, or too short."""


class TrainConfigError(TopKASTConfigError):
    """The training command's "train" section or model settings cannot be used."""
