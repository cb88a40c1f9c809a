"""The stable entry point of the training command: `deepspeed --module ds_topkast.train ...`.

The command itself lives in the application package, ds_topkast.lm.cli (see its
docstring); the `ds-topkast-train` console script runs this module's `main`, so neither moves when the
application's files do.
"""
from ds_topkast.lm.cli import main

if __name__ == "__main__":
    main()
