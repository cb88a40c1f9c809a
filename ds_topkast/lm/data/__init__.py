"""The training command's corpora: standard splits, prepared memory-mapped token files, hub datasets, batches."""
