"""ds_topkast: Top-KAST sparse training of language models as a DeepSpeed extension.

torch is not pinned here on purpose: install the build that fits your accelerator first
(`pip install torch==2.13.0` takes the CPU build on our CI machines); a bare `torch`
requirement would pull a multi-GB CUDA build onto machines that have none.
"""
from setuptools import find_packages, setup

setup(
    name="ds_topkast",
    version="0.1.0",
    description="Top-KAST (Top-K Always Sparse Training) for DeepSpeed: dense weights off the accelerator",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ds_topkast", "ds_topkast.*"]),
    python_requires=">=3.11",
    install_requires=[
        "deepspeed>=0.19,<0.20",
        "transformers>=5,<6",
        "accelerate",
        "pydantic>=2",
        "safetensors",
        "numpy",
    ],
    extras_require={
        "lm": ["datasets>=4", "matplotlib", "tqdm"],  # the training application, ds_topkast.lm
        "compressed": ["compressed-tensors>=0.15,<0.21"],  # save_compressed: the sparse-bitmask format
        "test": ["ds_topkast[lm,compressed]", "pytest", "pytest-xdist", "tensorboard",
                 "triton==3.6.0"],  # the kernels' tests run their Triton code in its interpreter
        # bench/: the memory-saving optimizers of bench_headline.py and bench_peers.py. Not sparsimony
        # (bench_sparsimony.py): it pins numpy 1.x, which breaks datasets' pyarrow; install it with --no-deps
        "bench": ["ds_topkast[lm]", "galore-torch==1.0", "apollo-torch==1.0.3",
                  "bitsandbytes==0.50.2", "torchao==0.18.0"],
    },
    entry_points={"console_scripts": ["ds-topkast-train = ds_topkast.train:main"]},
)
