"""bench/gpu_check.sh in its CPU smoke mode, so the one-command GPU check cannot rot between GPU runs."""
import json
import os
import subprocess

from conftest import _free_port
from launcher import REPO, remove_shm_buffers


def test_gpu_check_smoke_mode_runs_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    port = env["MASTER_PORT"] = _free_port()
    try:
        result = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(tmp_path)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)
    report = (tmp_path / "gpu_check.txt").read_text()
    assert result.returncode == 0, report[-4000:] + result.stderr[-2000:]
    for step in ("machine", "gpu_tests", "bench_training", "run_clm", "lm", "headline"):
        assert f"===== {step}: exit 0" in report, step
    assert "Top-KAST 90/80" in report and (tmp_path / "training.json").is_file()
    assert (tmp_path / "clm" / "clm.json").is_file()
    assert "tiny_transformer_xl: variant" in report and (tmp_path / "lm" / "bench_lm.json").is_file()
    headline = {r["variant"]: r for r in json.loads((tmp_path / "headline" / "headline.json").read_text())["rows"]}
    for variant in ("90/80", "95/90", "dense"):  # the peers need the bench extra: trained there, else "not installed"
        assert headline[variant]["status"] == "trained", headline[variant]
        assert headline[variant]["last_loss"] < headline[variant]["first_loss"], headline[variant]
    assert headline["90/80"]["refresh_s"] > 0 and headline["90/80"]["checkpoint_s"] > 0
    assert {headline[peer]["status"] for peer in ("galore", "adam8bit")} <= {"trained", "not installed"}
