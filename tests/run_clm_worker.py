"""examples/run_clm.py twice in one launch, as the run_clm tests run it: a whole run, then one resumed from it.

    deepspeed --num_gpus N tests/run_clm_worker.py --out DIR -- RUN_CLM_ARGS...

The first run writes DIR/whole (checkpoints every `--save_steps`); the second runs the same
arguments into DIR/resumed with `--resume_from_checkpoint DIR/whole/checkpoint-RESUME_STEP`
(a folder outside its output_dir, as a user resuming someone else's run would give). One
launch for both keeps the test suite's launches few; each run is the script's own main().
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import run_clm  # noqa: E402


def run(arguments: list[str]) -> None:
    sys.argv = ["run_clm.py", *arguments]
    run_clm.main()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume_step", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    ours, rest = parser.parse_known_args()
    script_args = [a for a in rest if a != "--"] + [f"--local_rank={ours.local_rank}"]
    out = Path(ours.out)
    run([*script_args, "--output_dir", str(out / "whole")])
    import torch.distributed as dist

    dist.barrier()
    run([*script_args, "--output_dir", str(out / "resumed"),
         "--resume_from_checkpoint", str(out / "whole" / f"checkpoint-{ours.resume_step}")])


if __name__ == "__main__":
    main()
