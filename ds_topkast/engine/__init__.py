"""The DeepSpeed engine extended with Top-KAST (ds_topkast.initialize), the optimizer-state adapters and the memory report: the only modules that import deepspeed.runtime internals."""
