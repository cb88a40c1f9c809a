"""examples/run_clm.py, unchanged, with each optimizer step timed: what bench_clm.py launches.

    deepspeed bench/clm_timed.py <run_clm.py's arguments>

A callback added to the script's Trainer marks the end of every optimizer step (a CUDA
event on a GPU, so nothing waits for the device; the host clock on the CPU) and, at the
end of training, writes `step_times.json` into the output folder: the seconds between
consecutive step ends, each step's number, and the peak accelerator memory
(max_memory_allocated, the engine built inside train() included). The Trainer's own
memory metrics are not used: `--skip_memory_metrics False` runs transformers' memory
tracker thread for the whole run, whose busy loop contends for the GIL with every call
into torch, and a sparse step makes more of those calls than a dense one.
"""
from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "run_clm.py"


class StepTimes(TrainerCallback):
    """Marks each optimizer step's end; the times between marks and the peak memory go to step_times.json."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.marks: list = []
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.steps, self.marks = [state.global_step], [self._mark()]

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        self.marks.append(self._mark())

    def on_train_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
            peak = torch.cuda.max_memory_allocated()
        else:
            seconds, peak = [b - a for a, b in zip(self.marks, self.marks[1:])], None
        if state.is_world_process_zero:
            Path(args.output_dir, "step_times.json").write_text(json.dumps(
                {"steps": self.steps[1:], "seconds": seconds, "peak_accelerator_bytes": peak}))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


def with_step_times(trainer_init):
    def init(self, *args, callbacks=None, **kwargs):
        trainer_init(self, *args, callbacks=[*(callbacks or []), StepTimes()], **kwargs)
    return init


if __name__ == "__main__":
    transformers.Trainer.__init__ = with_step_times(transformers.Trainer.__init__)
    sys.argv[0] = str(EXAMPLE)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
