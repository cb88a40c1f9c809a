"""The language-model training application built on the ds_topkast library.

The training command (train.py; `deepspeed --module ds_topkast.train` or the
`ds-topkast-train` console script), its corpora (corpus_sources.py: the standard splits;
corpus_cache.py: prepared, memory-mapped token files; hub_corpora.py; batches.py), the
model runners (model_runners.py), our Transformer-XL (transformer_xl.py) and the run plot
(plots.py). It needs the "lm" install extra (`pip install ds_topkast[lm]`: datasets,
matplotlib, tqdm); the library in ds_topkast/ does not.
"""
