"""The NVMe store trains exactly like the CPU store, survives a refresh killed mid-write, and says what is wrong."""
import pytest
import torch
from dist_worker import build, state_of, train
from test_distributed import assert_same_training

import ds_topkast
from ds_topkast.store.nvme import NVMeDenseStore, NVMeStoreError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def nvme_engine(stage, path):
    return build(stage, world=1, dense_store={"device": "nvme", "nvme_path": str(path)})


@pytest.mark.parametrize("stage", [0, 2])
def test_nvme_store_trains_like_cpu_store(tmp_path, stage):
    cpu = build(stage, world=1)
    expected = state_of(cpu, train(cpu, 0, 5))
    engine = nvme_engine(stage, tmp_path)
    store = engine.topkast.state.store
    assert isinstance(store, NVMeDenseStore)
    got = state_of(engine, train(engine, 0, 5))
    assert_same_training(got, expected, f"NVMe store, ZeRO-{stage}")
    for name in store.names():
        torch.testing.assert_close(store.read(name), cpu.topkast.state.store.read(name), rtol=0, atol=0)
    buffers = store.nbytes()
    assert 0 < buffers <= 2 * 4 * max(store.layout(n)[1] + 1024 for n in store.names())


def test_nvme_store_on_two_ranks_trains_like_cpu_store_on_one(tmp_path):
    from launcher import deepspeed_launch
    from test_distributed import load_ranks, one_rank

    deepspeed_launch(2, "tests/dist_worker.py", "equivalence", "--out", str(tmp_path), "--steps", "5",
                     "--stages", "2", "--nvme", str(tmp_path))
    expected = one_rank(2)
    for rank, got in enumerate(load_ranks(tmp_path, "equivalence_stage2")):
        assert_same_training(got, expected, f"NVMe store, 2 ranks, rank {rank}")
        assert len(list((tmp_path / "ds_topkast_store" / f"rank{rank:05d}").glob("*.bin"))) == 8


def test_refresh_killed_mid_write_resumes_from_checkpoint(tmp_path, monkeypatch):
    import ds_topkast.store.nvme as nvme

    (tmp_path / "a").mkdir()
    uninterrupted = nvme_engine(2, tmp_path / "a")
    expected = state_of(uninterrupted, train(uninterrupted, 0, 6))
    (tmp_path / "b").mkdir()
    engine = nvme_engine(2, tmp_path / "b")
    train(engine, 0, 3)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    real_replace, renames = nvme.os.replace, []

    def crash_on_fourth_rename(src, dst):
        renames.append(dst)
        if len(renames) == 4:
            raise KeyboardInterrupt("injected crash between a shard's write and its rename")
        real_replace(src, dst)

    monkeypatch.setattr(nvme.os, "replace", crash_on_fourth_rename)
    with pytest.raises(KeyboardInterrupt):
        train(engine, 3, 6)  # the refresh at step 4 dies after three layers were replaced
    monkeypatch.setattr(nvme.os, "replace", real_replace)
    resumed = nvme_engine(2, tmp_path / "b")
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    got = state_of(resumed, train(resumed, 3, 6))
    expected["losses"] = expected["losses"][3:]
    assert_same_training(got, expected, "resumed after a crash mid-refresh")


def test_missing_path(tmp_path):
    with pytest.raises(NVMeStoreError, match="does not exist or is not a folder; create it"):
        NVMeDenseStore(str(tmp_path / "nope"), 0, 1)


def test_path_not_writable():
    with pytest.raises(NVMeStoreError, match="is not writable"):
        NVMeDenseStore("/proc", 0, 1)


def test_disk_full_says_how_much_is_needed(tmp_path, monkeypatch):
    import ds_topkast.store.nvme as nvme

    monkeypatch.setattr(nvme.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(NVMeStoreError, match=r"has 0.00 GiB free; this rank's store needs 0.\d+ GiB"):
        nvme_engine(0, tmp_path)


def test_missing_libaio_says_how_to_install(monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(NVMeStoreError, match="apt-get install libaio-dev"):
        ds_topkast.store.nvme.load_aio()


def test_a_refresh_that_stops_early_leaves_the_store_usable(tmp_path):
    engine = nvme_engine(0, tmp_path)
    train(engine, 0, 1)
    store = engine.topkast.state.store
    before = {name: store.read(name) for name in store.names()}
    passes = store.stream(store.names())
    next(passes)
    passes.close()  # as when a guard raises inside the refresh
    for name in store.names():
        assert torch.equal(store.read(name), before[name])
    train(engine, 1, 3)  # the next refresh (step 2) streams every layer again
    assert [d.step for d in engine.topkast.refresher.history] == [2]
