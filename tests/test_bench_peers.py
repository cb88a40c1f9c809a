"""bench/bench_peers.py in its smoke mode: every method's code path runs, and each one's bytes are what it holds."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import _free_port
from launcher import REPO, remove_shm_buffers

PEERS = ("GaLore", "APOLLO", "APOLLO-Mini", "8-bit AdamW")  # the bench extra's packages: trained there, else skipped


def test_peers_smoke_trains_every_method_and_accounts_its_bytes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    port = env["MASTER_PORT"] = _free_port()
    try:
        result = subprocess.run([sys.executable, "bench/bench_peers.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                                env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = json.loads((tmp_path / "peers.json").read_text())
    rows = {row["method"]: row for row in study["rows"]}
    assert set(rows) | set(study["skipped"]) == {"dense AdamW", "small dense", "Top-KAST 80/0", "Top-KAST 90/80",
                                                 "Top-KAST 95/90", *PEERS}
    assert set(study["skipped"]) <= set(PEERS), study["skipped"]
    assert (tmp_path / "peers.png").stat().st_size > 0 and "| Top-KAST 90/80 |" in (tmp_path / "peers.md").read_text()

    dense = rows["dense AdamW"]
    assert dense["accelerator_bytes"] == 16 * dense["parameters"]  # fp32 weights, gradients and Adam's two moments
    assert dense["step_vs_dense"] == 1.0 and dense["forward_fraction"] == 1.0 and dense["store_bytes"] == 0
    assert rows["small dense"]["parameters"] < 0.2 * dense["parameters"]
    width = study["width"]
    projections = dense["parameters"] - 2 * 256 * width - 9 * width  # less embeddings, lm_head and 4 layers' norms
    for method, forward, backward in (("Top-KAST 80/0", 0.8, 0.0), ("Top-KAST 90/80", 0.9, 0.8),
                                      ("Top-KAST 95/90", 0.95, 0.9)):
        row = rows[method]
        assert row["store_bytes"] == 4 * projections  # the full fp32 projections, off the accelerator
        kept = dense["parameters"] - projections  # embeddings, norms, lm_head: dense
        assert abs(row["forward_fraction"] - ((1 - forward) * projections + kept) / dense["parameters"]) < 1e-3
        if backward > 0:  # a sparse B: less than dense on the accelerator
            assert row["accelerator_bytes"] < dense["accelerator_bytes"] * (1 - backward + 0.15)
    for method in set(PEERS) & set(rows):
        row = rows[method]
        assert row["forward_fraction"] == 1.0 and row["store_bytes"] == 0 and row["package"]
        assert 8 * row["parameters"] < row["accelerator_bytes"] < dense["accelerator_bytes"]  # less state than Adam's
    assert study["confirm_steps"] == [8, 12]
    assert list(study["changed"]) == ["2 (halfway) to 4", "4 to 8", "8 to 12"]  # each length against the one before
    assert all(isinstance(pairs, list) for pairs in study["changed"].values())
    for row in rows.values():
        assert row["held_out_mean"] < row["halfway_mean"], row  # every method's last steps lowered the loss
        longer = row["longer"]
        assert list(longer) == ["8", "12"] and all(at["seeds"] == 1 for at in longer.values()), row  # seed 0's runs
        assert longer["12"]["mean"] < longer["8"]["mean"] < row["halfway_mean"], row
    table = (tmp_path / "peers.md").read_text()
    assert "| at 8 steps (seeds 0) | at 12 steps (seeds 0) |" in table


def test_an_ordering_changes_only_where_a_gap_turns_clearly_on_the_same_seeds():
    """changed_pairs: two methods whose gap turns sign between the lengths, by more than twice its standard error, have
    changed order; level at both, they may swap by chance; one seed's own offset from the mean is no change."""
    sys.path.insert(0, str(Path(REPO) / "bench"))
    from bench_peers import changed_pairs

    def row(method, at_steps, longer, others=None):  # seeds 0-2 at --steps (std 0.01), seed 0 at 2x --steps
        others = others or at_steps
        return {"method": method, "held_out_std": 0.01, "losses": {0: at_steps, 1: others, 2: others},
                "longer": {2: {"losses": {0: longer}}}}

    rows = [row("a", 1.40, 1.30),
            row("b", 1.50, 1.31),  # clearly behind a at both lengths: no change
            row("c", 1.45, 1.25),  # behind a and d at --steps, ahead of both longer, each by 0.05: changed
            row("d", 1.401, 1.299),  # level with a at both: 0.001 apart; a turn must exceed 0.04
            row("e", 1.402, 1.20)]  # level with a and d at --steps, clearly ahead of both longer: changed
    assert changed_pairs(rows, "steps", 2) == [("a", "c"), ("a", "e"), ("c", "d"), ("d", "e")]
    rows[2]["longer"][2]["losses"][0], rows[4]["longer"][2]["losses"][0] = 1.5, 1.49  # behind a and d longer, as before
    assert changed_pairs(rows, "steps", 2) == [("b", "c"), ("b", "e")]  # ... but now clearly behind b

    ahead_on_average = row("f", 1.50, 1.45, others=1.305)  # mean 1.37 at --steps, ahead of a; seed 0 behind a
    assert changed_pairs([row("a", 1.40, 1.30), ahead_on_average], "steps", 2) == []  # seed 0 stays behind

    a, c = row("a", 1.40, 1.30), row("c", 1.45, 1.25)  # c passes a between --steps and 2x ...
    a["longer"][4], c["longer"][4] = {"losses": {0: 1.20}}, {"losses": {0: 1.18}}  # ... and stays ahead at 4x
    assert changed_pairs([a, c], "steps", 4) == [("a", "c")] and changed_pairs([a, c], 2, 4) == []
    c["longer"][4]["losses"][0] = 1.26  # a passes c back between 2x and 4x
    assert changed_pairs([a, c], 2, 4) == [("a", "c")] and changed_pairs([a, c], "steps", 4) == []
