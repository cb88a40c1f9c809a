"""ds_topkast: Top-KAST (Top-K Always Sparse Training) as a DeepSpeed extension.

    engine, optimizer, loader, scheduler = ds_topkast.initialize(model=model, config="ds_config.json")
    trainer = Trainer(model=ds_topkast.sparsify(model, "ds_config.json"), ...,
                      callbacks=[ds_topkast.TopKASTCallback()])   # Hugging Face Trainer
    ds_topkast.TopKASTAccelerate(accelerator, model, optimizer)     # a custom accelerate loop, after prepare

See README.md for the workflow and DESIGN.md / docs/ for how it is built.
"""
from ds_topkast.checkpoint import CheckpointError
from ds_topkast.compressed_save import from_compressed, load_compressed, save_compressed
from ds_topkast.config import TopKASTConfig, TopKASTConfigError
from ds_topkast.engine import initialize
from ds_topkast.export import export
from ds_topkast.dense_weights import load_dense_weights
from ds_topkast.layers import TopKASTLinear, exploration_penalty
from ds_topkast.memory_accounting import memory_report
from ds_topkast.plain_save import plain_state_dict
from ds_topkast.sparsify import sparsify

__all__ = ["CheckpointError", "TopKASTAccelerate", "TopKASTCallback", "TopKASTConfig", "TopKASTConfigError",
           "TopKASTLinear", "exploration_penalty", "export", "from_compressed", "initialize", "load_compressed",
           "load_dense_weights", "memory_report", "plain_state_dict", "save_compressed", "sparsify"]


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
