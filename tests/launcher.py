"""Start real ranks with the deepspeed launcher on the CPU accelerator, as users do."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import _free_port

REPO = Path(__file__).resolve().parents[1]


def deepspeed_launch(ranks: int, *target: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS TARGET...` from the repository root; fails the test on a non-zero exit."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", _free_port(), *target]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result
