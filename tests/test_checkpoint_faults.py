"""Damaged, tampered and mismatched checkpoints are refused by name before anything changes.

Each test saves a real checkpoint, damages it the way disks, copies and people do, and
checks that loading names the file and the way out, and that neither the running
engine's store and sets nor the checkpoint's files were changed by the attempt.
"""
import hashlib
import os
from pathlib import Path

import pytest
import torch
from models import batches, ds_config, gpt2_engine
from test_engine import train

from ds_topkast.core.layers import sparse_layers
from ds_topkast.runtime.checkpoint import CheckpointError, checkpoint_file

TAG = "global_step2"


def saved_run(folder: Path, cfg):
    engine = gpt2_engine(cfg)
    train(engine, 2)
    engine.save_checkpoint(str(folder))
    return engine


def fingerprint(engine) -> dict:
    """Everything a load could change: each layer's store shard, sets and values."""
    store = engine.topkast.state.store
    return {name: (store.read(name).clone(), layer.indices.clone(), layer.forward_mask.clone(),
                   layer.values.detach().clone()) for name, layer in sparse_layers(engine.module).items()}


def file_hashes(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_untouched(engine, folder: Path, match: str):
    before, files = fingerprint(engine), file_hashes(folder)
    with pytest.raises(CheckpointError, match=match):
        engine.load_checkpoint(str(folder))
    for name, tensors in fingerprint(engine).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[name])), f"{name} changed by a refused load"
    assert file_hashes(folder) == files, "a refused load wrote to the checkpoint"


def rewrite_payload(path: Path, change) -> None:
    """Bit rot inside a tensor: the file still reads, one value differs from what was written."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def flip_store_value(payload):
    name = next(iter(payload["store"]))
    payload["store"][name][0] += 1.0


def flip_forward_mask(payload):
    sets = next(iter(payload["sets"].values()))
    sets["forward_bits"][0] ^= 1


def flip_index(payload):
    sets = next(iter(payload["sets"].values()))
    sets["backward_bits"][0] ^= 1


DAMAGES = {
    "store value": (flip_store_value, "is corrupted: layer .*'s store does not match the checksum"),
    "set A mask": (flip_forward_mask, "is corrupted: layer .*'s forward_bits does not match the checksum"),
    "set B index": (flip_index, "is corrupted: layer .*'s backward_bits does not match the checksum"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupted_tensor_is_refused_naming_the_file(tmp_path, damage):
    change, message = DAMAGES[damage]
    cfg = ds_config(stage=2, refresh_interval=2)
    saved_run(tmp_path, cfg)
    rewrite_payload(checkpoint_file(tmp_path / TAG, 0), change)
    assert_refused_untouched(gpt2_engine(cfg), tmp_path, "topkast_rank00000.pt " + message)


def test_a_truncated_file_is_refused_naming_the_file(tmp_path):
    cfg = ds_config(refresh_interval=2)
    saved_run(tmp_path, cfg)
    path = checkpoint_file(tmp_path / TAG, 0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused_untouched(gpt2_engine(cfg), tmp_path, f"{path} cannot be read .*truncated or corrupted")


def test_flipped_bytes_anywhere_are_caught(tmp_path):
    cfg = ds_config(refresh_interval=2)
    saved_run(tmp_path, cfg)
    path = checkpoint_file(tmp_path / TAG, 0)
    raw = bytearray(path.read_bytes())
    for offset in range(len(raw) // 3, len(raw) * 2 // 3, 97):
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert_refused_untouched(gpt2_engine(cfg), tmp_path, f"{path} (cannot be read|is corrupted)")


NVME_DAMAGES = {
    "missing": (lambda f: f.unlink(), "is missing"),
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:100]), "is truncated"),
    "corrupted": (lambda f: f.write_bytes(b"\x7f" + f.read_bytes()[1:]), "is corrupted: layer"),
}


@pytest.mark.parametrize("damage", NVME_DAMAGES)
def test_a_damaged_nvme_store_file_is_refused_naming_it(tmp_path, damage):
    change, message = NVME_DAMAGES[damage]
    (tmp_path / "nvme").mkdir()
    cfg = ds_config(refresh_interval=2, dense_store={"device": "nvme", "nvme_path": str(tmp_path / "nvme")})
    saved_run(tmp_path / "ckpt", cfg)
    store_file = sorted((tmp_path / "ckpt" / TAG / "topkast_store_rank00000").glob("*.bin"))[1]
    os.unlink(store_file)  # a hard link to the live store: damage the checkpoint's copy only
    (tmp_path / "ckpt" / TAG / "topkast_store_rank00000" / store_file.name).write_bytes(
        (tmp_path / "nvme" / "ds_topkast_store" / "rank00000" / store_file.name).read_bytes())
    change(store_file)
    assert_refused_untouched(gpt2_engine(cfg), tmp_path / "ckpt", f"{store_file} {message}")


class RunsCode:
    """Unpickling this calls a function: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["topkast_rank00000.pt", "mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_crafted_pickle_is_refused_without_running_it(tmp_path, victim):
    cfg = ds_config(stage=2, refresh_interval=2)
    saved_run(tmp_path, cfg)
    marker = tmp_path / "code_ran"
    path = tmp_path / TAG / victim
    payload = torch.load(path, weights_only=False)
    payload["extra"] = RunsCode(marker)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"{path} holds objects that would run code when loaded"):
        gpt2_engine(cfg).load_checkpoint(str(tmp_path))
    assert not marker.exists(), "the crafted pickle ran"


def test_deepspeed_files_still_load_weights_only_in_every_zero_stage(tmp_path):
    """The weights-only reader accepts what DeepSpeed itself writes (bf16 and fp32 optimizer states)."""
    for stage, bf16 in [(1, True), (3, False)]:
        cfg = ds_config(stage=stage, bf16=bf16, refresh_interval=2)
        saved_run(tmp_path / str(stage), cfg)
        assert gpt2_engine(cfg).load_checkpoint(str(tmp_path / str(stage)))[0] is not None


@pytest.mark.parametrize("model,message", [
    ({"n_layer": 3}, r"sparsified layers missing from it \['transformer.h.2.attn.c_attn'"),
    ({"n_embd": 48}, r"layers changed size \['transformer.h.0.attn.c_attn \(3072 -> 6912\)'"),
])
def test_a_changed_model_is_refused(tmp_path, model, message):
    cfg = ds_config(refresh_interval=2)
    saved_run(tmp_path, cfg)
    other = gpt2_engine(cfg, **model)
    assert_refused_untouched(other, tmp_path, "does not fit this model: " + message)


def test_settings_that_keep_every_k_may_change_on_resume(tmp_path):
    saved_run(tmp_path, ds_config(refresh_interval=2))
    changed = gpt2_engine(ds_config(refresh_interval=3, forward_interval=0, exploration_l2=1e-4))
    assert changed.load_checkpoint(str(tmp_path))[0] is not None
    train(changed, 2, batches(4)[2:])
    assert [d.step for d in changed.topkast.refresher.history] == [2, 3]


def test_latest_names_a_checkpoint_only_once_it_is_complete(tmp_path, monkeypatch):
    """A save that dies before DeepSpeed's files are all written leaves `latest` on the previous checkpoint."""
    import deepspeed

    engine = saved_run(tmp_path, ds_config(stage=2, refresh_interval=2))
    train(engine, 1)

    def dies_mid_write(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the ZeRO optimizer state")

    monkeypatch.setattr(deepspeed.runtime.engine.DeepSpeedEngine, "_save_zero_checkpoint", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(str(tmp_path))
    assert (tmp_path / "latest").read_text() == TAG
    assert checkpoint_file(tmp_path / "global_step3", 0).is_file(), "the interrupted save had begun"
    assert not list(tmp_path.glob("latest.*")), "no temporary pointer is left behind"
