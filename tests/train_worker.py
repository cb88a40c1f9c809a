"""The training command with a fault injected or its memory watched; the deepspeed launcher runs it.

    deepspeed tests/train_worker.py --config C --out O [--resume]

TOPKAST_FAULT="<point>:<step>:<rank>" kills that rank with SIGKILL, as the OOM killer or
a failing node does, at one point of optimizer step <step>:
  train       after the backward pass, before DeepSpeed's optimizer step;
  refresh     in the refresh, once its first layer is refreshed (store written, sets changed);
  checkpoint  in the checkpoint save, once DeepSpeed's ZeRO file of this rank is half written.
TOPKAST_WATCH=<folder>: after every refresh each rank appends its resident host memory to
rss_rank<r>.txt, and at every checkpoint the CRC-32 of its parameters to params_rank<r>.txt.
"""
import os
import signal
import sys
import zlib
from pathlib import Path

import torch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def inject_fault(point: str, step: int, rank: int) -> None:
    import deepspeed

    from ds_topkast.engine.deepspeed_engine import TopKASTEngineMixin
    from ds_topkast.runtime.refresh import Refresher

    if rank != int(os.environ["RANK"]):
        return
    if point == "train":
        real_step = TopKASTEngineMixin.step

        def step_then_die(self, *args, **kwargs):
            if self.global_steps + 1 == step:
                die()
            return real_step(self, *args, **kwargs)

        TopKASTEngineMixin.step = step_then_die
    elif point == "refresh":
        real_layer = Refresher._refresh_layer

        def refresh_layer_then_die(self, index, *args):  # args end with the refresh's step
            if args[-1] == step and index == 1:
                die()
            return real_layer(self, index, *args)

        Refresher._refresh_layer = refresh_layer_then_die
    elif point == "checkpoint":
        engine_class = deepspeed.runtime.engine.DeepSpeedEngine
        real_save = engine_class._save_zero_checkpoint

        def save_half_then_die(self, save_dir, tag):
            real_save(self, save_dir, tag)
            if self.global_steps == step:
                for written in Path(save_dir, tag).glob(f"*zero_pp_rank_{rank}_*optim_states.pt"):
                    written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
                die()

        engine_class._save_zero_checkpoint = save_half_then_die
    else:
        raise ValueError(f"unknown fault point {point!r}")


def watch(folder: Path) -> None:
    from ds_topkast.lm.loop import TrainingLoop
    from ds_topkast.runtime.refresh import Refresher

    rank = os.environ["RANK"]
    real_refresh, real_save = Refresher.refresh, TrainingLoop.save

    def refresh_and_record(self, step):
        dynamics = real_refresh(self, step)
        with open(folder / f"rss_rank{rank}.txt", "a") as f:
            f.write(f"{step} {resident_bytes()}\n")
        return dynamics

    def save_and_record(self):
        real_save(self)
        crc = 0
        for parameter in self.engine.module.parameters():
            crc = zlib.crc32(parameter.detach().float().contiguous().view(torch.uint8).numpy(), crc)
        with open(folder / f"params_rank{rank}.txt", "a") as f:
            f.write(f"{self.engine.global_steps} {crc}\n")

    Refresher.refresh, TrainingLoop.save = refresh_and_record, save_and_record


if __name__ == "__main__":
    if os.environ.get("TOPKAST_FAULT"):
        point, step, rank = os.environ["TOPKAST_FAULT"].split(":")
        inject_fault(point, int(step), int(rank))
    if os.environ.get("TOPKAST_WATCH"):
        watch(Path(os.environ["TOPKAST_WATCH"]))
    from ds_topkast.lm.cli import main

    main()
