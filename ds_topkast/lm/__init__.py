"""The language-model training application built on the ds_topkast library.

The training command (cli.py, with loop.py, run_files.py and train_config.py;
`deepspeed --module ds_topkast.train` or the `ds-topkast-train` console script), its
corpora (data/: corpus_sources.py, the standard splits; corpus_cache.py, prepared,
memory-mapped token files; hub_corpora.py; batches.py), the model runners
(models/runners.py), our Transformer-XL (models/transformer_xl.py) and the run plot
(plots.py). It needs the "lm" install extra (`pip install ds_topkast[lm]`: datasets,
matplotlib, tqdm); the library in ds_topkast/ does not.
"""
