"""ds_topkast: Top-KAST (Top-K Always Sparse Training) as a DeepSpeed extension.

    engine, optimizer, loader, scheduler = ds_topkast.initialize(model=model, config="ds_config.json")

See README.md for the workflow and DESIGN.md / docs/ for how it is built.
"""
from ds_topkast.config import TopKASTConfig, TopKASTConfigError
from ds_topkast.engine import initialize
from ds_topkast.export import export
from ds_topkast.layers import TopKASTLinear, exploration_loss
from ds_topkast.memory import memory_report
from ds_topkast.sparsify import sparsify

__all__ = ["TopKASTConfig", "TopKASTConfigError", "TopKASTLinear", "exploration_loss", "export", "initialize",
           "memory_report", "sparsify"]
