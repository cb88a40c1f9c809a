"""Start real ranks with the deepspeed launcher on the CPU accelerator, as users do."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import _free_port, core_share

REPO = Path(__file__).resolve().parents[1]


def remove_shm_buffers(port: str) -> None:
    """Delete the /dev/shm all-reduce buffers DeepSpeed's CPU comm op leaves behind for a job on `port`.

    DeepSpeed 0.19 creates one 66 MB file per rank and never unlinks it; without this a
    test run would leave gigabytes of shared memory (RAM) behind.
    """
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        leftover.unlink(missing_ok=True)


def deepspeed_launch(ranks: int, *target: str, check: bool = True, timeout: int = 600,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS TARGET...` from the repository root; fails the test on a non-zero exit."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": core_share(ranks), **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    port = _free_port()
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", port, *target]
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def accelerate_launch(script: str, *script_args: str, launcher_flags: tuple[str, ...] = ("--multi_gpu",),
                      env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """`accelerate launch` of a script on 2 ranks (gloo CPU ranks without GPUs); fails the test on a non-zero exit.

    accelerate's --cpu launcher needs MPI for several processes; its multi_gpu launcher is
    torchrun, which on a machine without GPUs starts CPU ranks on gloo. `launcher_flags`
    choose the kind: --multi_gpu (DDP), or --use_deepspeed --deepspeed_config_file FILE.
    """
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")},
           "DS_ACCELERATOR": "cpu", **(env or {})}
    port = _free_port()
    try:
        result = subprocess.run([str(accelerate), "launch", *launcher_flags, "--num_processes", "2", "--num_machines",
                                 "1", "--dynamo_backend", "no", "--main_process_port", port, script, *script_args],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
