"""Starting a model without materialising it: meta device, deepspeed.zero.Init, safetensors weights.

Each start must give the store, sets and dense parameters the same model built in memory
gives, on one rank and on two (each rank then holding only its shards), and a rank's peak
memory while sparsifying must stay within the accounting (store shard + compact state +
one layer), below what one full copy of the model would take.
"""
import json
from pathlib import Path

import pytest
import torch
from launcher import deepspeed_launch
from models import MLP, ds_config, tiny_gpt2, tiny_llama
from start_worker import shards_of
from torch import nn

import ds_topkast
from ds_topkast.config import TopKASTConfigError
from ds_topkast.convert.meta_init import MetaMaterializer
from ds_topkast.convert.pretrained import PretrainedWeightsError

SECTION = ds_config()["topkast"]
SEED = ds_topkast.TopKASTConfig.from_section(SECTION).seed


def on_meta(build):
    with torch.device("meta"):
        return build()


def in_memory_like_meta(build) -> nn.Module:
    """The model built on the meta device and then materialised whole by the same initialiser, before sparsify."""
    model = on_meta(build)
    MetaMaterializer(model, SEED).materialize_rest()
    return model


def assert_same_start(got: dict, expected: dict) -> None:
    assert got["store"].keys() == expected["store"].keys()
    for name, (offset, theta) in expected["store"].items():
        assert got["store"][name][0] == offset and torch.equal(got["store"][name][1], theta), name
    for name, sets in expected["sets"].items():
        assert all(torch.equal(a, b) for a, b in zip(got["sets"][name], sets)), name
    assert got["dense"].keys() == expected["dense"].keys()
    for name, param in expected["dense"].items():
        assert torch.equal(got["dense"][name], param), name


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, MLP], ids=["gpt2", "llama", "plain"])
def test_a_meta_model_starts_as_the_same_model_initialised_in_memory(build):
    reference = ds_topkast.sparsify(in_memory_like_meta(build), SECTION)
    model = ds_topkast.sparsify(on_meta(build), SECTION)
    assert_same_start(shards_of(model), shards_of(reference))
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    batch = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(model(input_ids=batch, labels=batch)["loss"])


def test_the_meta_initialiser_is_the_models_own():
    """GPT-2's residual projections are rescaled by their block (1/sqrt(2 n_layer)), norms start at one."""
    model = in_memory_like_meta(tiny_gpt2)
    block = model.transformer.h[0]
    assert torch.equal(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    assert float(block.attn.c_proj.weight.detach().std()) == pytest.approx(0.02 / 2, rel=0.2)
    assert float(block.attn.c_attn.weight.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """tiny_gpt2 (seed 3) saved by save_pretrained in shards of at most 20 kB, with its index."""
    folder = tmp_path_factory.mktemp("pretrained")
    tiny_gpt2(seed=3).save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def loaded_in_memory() -> nn.Module:
    return ds_topkast.sparsify(tiny_gpt2(seed=3), SECTION)


def test_pretrained_safetensors_stream_into_the_store_of_the_loaded_model(pretrained):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny_gpt2()
    ds_topkast.sparsify(model, SECTION, pretrained=pretrained)
    assert_same_start(shards_of(model), shards_of(loaded_in_memory()))
    assert model.lm_head.weight is model.transformer.wte.weight, "tied weights stay tied"


def test_a_single_safetensors_file_loads_too(tmp_path):
    from safetensors.torch import save_model

    save_model(tiny_gpt2(seed=3), str(tmp_path / "weights.safetensors"))
    model = ds_topkast.sparsify(on_meta(tiny_gpt2), SECTION, pretrained=tmp_path / "weights.safetensors")
    assert_same_start(shards_of(model), shards_of(loaded_in_memory()))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def shard_holding(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


@pytest.mark.parametrize("damage,message", [
    ("missing", "names shard files that are missing: ['model-"),
    ("truncated", "cannot be read"),
    ("absent", "have no tensor 'transformer.h.1.mlp.c_fc.weight'"),
    ("shape", "has shape (8, 8), the model's has (32, 128)"),
])
def test_damaged_pretrained_weights_name_the_file_and_tensor(pretrained, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    folder = copy_of(pretrained, tmp_path)
    key = "transformer.h.1.mlp.c_fc.weight"
    path = shard_holding(folder, key)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:
        tensors = load_file(path)
        replacement = {"shape": {key: torch.zeros(8, 8)}, "absent": {}}[damage]
        tensors = {k: v for k, v in tensors.items() if k != key} | replacement
        save_file(tensors, path)
        if damage == "absent":  # from the index too: the files do not have it at all
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            del index["weight_map"][key]
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PretrainedWeightsError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")) as caught:
        ds_topkast.sparsify(on_meta(tiny_gpt2), SECTION, pretrained=folder)
    if damage != "absent":
        assert str(folder) in str(caught.value)


def test_a_meta_model_the_initialiser_cannot_reach_is_refused_by_name():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))  # no reset_parameters, no _init_weights above it

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.fc = Scaled(), nn.Linear(4, 4)

    with pytest.raises(TopKASTConfigError, match="Module scale \\(Scaled\\) is on the meta device"):
        ds_topkast.sparsify(on_meta(Model), SECTION)


def test_an_integer_buffer_on_the_meta_device_is_refused_with_the_way_out():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("positions", torch.arange(4))

    with pytest.raises(TopKASTConfigError, match="positions is on the meta device.*init_empty_weights"):
        ds_topkast.sparsify(on_meta(Model), SECTION)


def test_sparsify_without_a_config_says_what_to_pass():
    with pytest.raises(TopKASTConfigError, match="needs a config"):
        ds_topkast.sparsify(tiny_gpt2(), None)


@pytest.fixture(scope="module")
def two_rank_starts(tmp_path_factory, pretrained):
    """One launch of 2 ranks: zero.Init vs in-memory training, meta and pretrained starts, peak memory, ZeRO-3 bytes."""
    out = tmp_path_factory.mktemp("starts")
    deepspeed_launch(2, "tests/start_worker.py", "zero_init", "meta", "peak", "memory", "--out", str(out),
                     "--pretrained", str(pretrained))
    return out


def test_a_zero_init_model_on_two_ranks_trains_as_the_same_model_built_in_memory(two_rank_starts):
    for rank in range(2):
        normal = torch.load(two_rank_starts / f"normal_rank{rank}.pt")
        zero_init = torch.load(two_rank_starts / f"zero_init_rank{rank}.pt")
        assert zero_init["values_partitioned"]
        assert zero_init["losses"] == normal["losses"]
        assert zero_init["history"] == normal["history"] and len(normal["history"]) == 2
        for key in ("indices", "forward_mask", "compact", "params"):
            for name, tensor in normal[key].items():
                assert torch.equal(zero_init[key][name], tensor), f"{key} of {name}"
        assert zero_init["store"] == normal["store"]


@pytest.mark.parametrize("start", ["meta", "pretrained"])
def test_two_ranks_start_with_the_shards_of_the_one_rank_store(two_rank_starts, start):
    ranks = [torch.load(two_rank_starts / f"{start}_rank{rank}.pt") for rank in range(2)]
    if start == "meta":
        one_rank = shards_of(ds_topkast.sparsify(on_meta(tiny_gpt2), SECTION))
    else:
        one_rank = shards_of(loaded_in_memory())
    for name, (_, theta) in one_rank["store"].items():
        (offset0, part0), (offset1, part1) = (r["store"][name] for r in ranks)
        assert offset0 == 0 and offset1 == part0.numel() and part1.numel() < theta.numel()
        assert torch.equal(torch.cat([part0, part1]), theta), name
    for rank in ranks:
        assert_same_start({**rank, "store": one_rank["store"]}, one_rank)


def test_start_up_memory_per_rank_stays_within_the_accounting(two_rank_starts):
    """Peak resident memory of sparsify <= store shard + compact state + a few layers; a full copy would not fit."""
    for rank in range(2):
        got = torch.load(two_rank_starts / f"peak_rank{rank}.pt")
        bound = got["store"] + got["compact"] + 4 * got["one_layer"] + 64 * 2**20
        assert bound < got["full_model"], "the test model must be large enough that a full copy breaks the bound"
        assert got["store"] == got["full_model"] // 2
        assert got["peak"] <= bound, f"rank {rank}: peak {got['peak'] / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


def test_zero3_state_per_rank_is_within_0_3_of_dense_at_two_and_eight_ranks(two_rank_starts):
    """bf16 + Adam at 90/80: measured on 2 ranks, and memory_report's projection (checked here) onto 8."""
    for rank in range(2):
        got = torch.load(two_rank_starts / f"memory_rank{rank}.pt")
        for key, held in got["held"].items():  # ZeRO-3 pads each partition to a multiple of the world size
            assert got["report"][key] <= held <= got["report"][key] * 1.01 + 64, key
        assert got["ratio"] <= 0.3 and got["ratio_at_8"] <= 0.3, (got["ratio"], got["ratio_at_8"])
        assert got["dense_at_8"] * 4 == got["dense"]


def test_a_store_larger_than_free_host_memory_is_refused_before_the_first_layer(monkeypatch):
    import ds_topkast.store.cpu as store

    monkeypatch.setattr(store, "available_host_memory", lambda: 10_000)
    model = on_meta(tiny_gpt2)
    with pytest.raises(store.DenseStoreError, match=r"needs 0.00 GiB of host memory per rank .* Put it on NVMe"):
        ds_topkast.sparsify(model, SECTION)
    assert all(p.is_meta for p in model.parameters()), "refused before any layer was built"
