"""ds_topkast: Top-KAST (Top-K Always Sparse Training) as a DeepSpeed extension.

    engine, optimizer, loader, scheduler = ds_topkast.initialize(model=model, config="ds_config.json")
    trainer = Trainer(model=ds_topkast.sparsify(model, "ds_config.json"), ...,
                      callbacks=[ds_topkast.TopKASTCallback()])   # Hugging Face Trainer
    ds_topkast.TopKASTAccelerate(accelerator, model, optimizer)     # a custom accelerate loop, after prepare

Errors derive from ds_topkast.TopKASTError. See README.md for the workflow and docs/DESIGN.md for how it is
built (its Layout section: the folders and which may import which).
"""
from ds_topkast.config import TopKASTConfig
from ds_topkast.convert.compressed_save import from_compressed, load_compressed, save_compressed
from ds_topkast.convert.dense_weights import load_dense_weights
from ds_topkast.convert.export import export
from ds_topkast.convert.plain_save import plain_state_dict
from ds_topkast.convert.sparsify import sparsify
from ds_topkast.core.layers import TopKASTLinear
from ds_topkast.engine.deepspeed_engine import initialize
from ds_topkast.engine.memory_accounting import estimate_memory, memory_report
from ds_topkast.errors import (CheckpointError, CollectiveCallError, CorpusError, DenseStoreError, NonFiniteScoresError,
                               NVMeStoreError, PretrainedWeightsError, RefreshError, TopKASTConfigError, TopKASTError,
                               TrainConfigError, UnsupportedOptimizerError)
from ds_topkast.runtime.regulariser import exploration_penalty

__all__ = ["CheckpointError", "CollectiveCallError", "CorpusError", "DenseStoreError", "NVMeStoreError",
           "NonFiniteScoresError", "PretrainedWeightsError", "RefreshError", "TopKASTAccelerate", "TopKASTCallback",
           "TopKASTConfig", "TopKASTConfigError", "TopKASTError", "TopKASTLinear", "TrainConfigError",
           "UnsupportedOptimizerError", "estimate_memory", "exploration_penalty", "export", "from_compressed",
           "initialize", "load_compressed", "load_dense_weights", "memory_report", "plain_state_dict",
           "save_compressed", "sparsify"]


def __getattr__(name: str):
    """The integrations are imported on first use: they pull in transformers' Trainer or accelerate, which plain users
    never need."""
    if name == "TopKASTCallback":
        from ds_topkast.integrations.hf_trainer import TopKASTCallback

        return TopKASTCallback
    if name == "TopKASTAccelerate":
        from ds_topkast.integrations.accelerate_loop import TopKASTAccelerate

        return TopKASTAccelerate
    raise AttributeError(f"module 'ds_topkast' has no attribute {name!r}")
