"""An example script twice in one launch, as the run_clm tests run it: a whole run, then one resumed from it.

    deepspeed --num_gpus N tests/run_clm_worker.py --out DIR -- RUN_CLM_ARGS...
    accelerate launch ... tests/run_clm_worker.py --script run_clm_no_trainer --out DIR -- ARGS...

The first run writes DIR/whole (checkpoints every `--save_steps`, or `--checkpointing_steps`);
the second runs the same arguments into DIR/resumed with `--resume_from_checkpoint` naming
the whole run's checkpoint of step RESUME_STEP (a folder outside its output_dir, as a user
resuming someone else's run would give). One launch for both keeps the test suite's
launches few; each run is the script's own main().
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

CHECKPOINT_FOLDERS = {"run_clm": "checkpoint-{}", "run_clm_no_trainer": "step_{}"}  # what each script names them


def run(script: str, arguments: list[str]) -> None:
    sys.argv = [f"{script}.py", *arguments]
    importlib.import_module(script).main()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", choices=sorted(CHECKPOINT_FOLDERS), default="run_clm")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume_step", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    ours, rest = parser.parse_known_args()
    script_args = [a for a in rest if a != "--"]
    if ours.script == "run_clm":
        script_args.append(f"--local_rank={ours.local_rank}")
    out = Path(ours.out)
    run(ours.script, [*script_args, "--output_dir", str(out / "whole")])
    import torch.distributed as dist

    dist.barrier()
    checkpoint = CHECKPOINT_FOLDERS[ours.script].format(ours.resume_step)
    run(ours.script, [*script_args, "--output_dir", str(out / "resumed"),
                      "--resume_from_checkpoint", str(out / "whole" / checkpoint)])


if __name__ == "__main__":
    main()
