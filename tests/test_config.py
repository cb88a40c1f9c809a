"""Every bad "topkast" value fails at start with a message naming the key and the fix."""
import json

import pytest
import torch
from launcher import REPO
from models import MLP, ds_config, tiny_gpt2

import ds_topkast
from ds_topkast.config import TopKASTConfig, TopKASTConfigError, topkast_section
from ds_topkast.core.layers import sparse_layers

BAD_SECTIONS = [
    ({"forward_sparsity": 1.0}, "topkast.forward_sparsity"),
    ({"forward_sparsity": -0.1}, "topkast.forward_sparsity"),
    ({"forward_sparsity": "high"}, "topkast.forward_sparsity"),
    ({"backward_sparsity": 1.5}, "topkast.backward_sparsity"),
    ({"forward_sparsity": 0.5, "backward_sparsity": 0.8}, "must be <= forward_sparsity"),
    ({"refresh_interval": -1}, "topkast.refresh_interval"),
    ({"refresh_interval": 2.5}, "topkast.refresh_interval"),
    ({"forward_interval": -1}, "topkast.forward_interval"),
    ({"include": []}, "topkast.include"),
    ({"include": "*"}, "topkast.include"),
    ({"exclude": [1]}, "topkast.exclude"),
    ({"distribution": "normal"}, "topkast.distribution"),
    ({"exploration_l2": -1.0}, "topkast.exploration_l2"),
    ({"new_entries": "keep"}, "topkast.new_entries"),
    ({"selection": "magnitude"}, "topkast.selection"),
    ({"seed": -1}, "topkast.seed"),
    ({"dense_store": {"device": "gpu"}}, "topkast.dense_store.device"),
    ({"dense_store": {"device": "nvme"}}, "needs dense_store.nvme_path, a folder on the NVMe device"),
    ({"dense_store": {"device": "nvme", "nvme_path": "/x", "buffers": 1}}, "topkast.dense_store.buffers"),
    ({"dense_store": {"aio": {"block": 4096}}}, "dense_store.aio.block: unknown key; remove it or use one of: block_size"),
    ({"dense_store": {"pinned": True}}, "dense_store.pinned: unknown key; remove it or use one of: aio, buffers, device, nvme_path"),
    ({"refresh_every": 10}, "topkast.refresh_every: unknown key; remove it or use one of: algorithm, backward_sparsity"),
    ({"algorithm": "snip"}, "'topkast', 'rigl', 'set', 'static' or 'gmp'"),
    ({"algorithm": "rigl"}, "needs update_end_step"),
    ({"algorithm": "rigl", "update_end_step": 9, "forward_sparsity": 0.9, "backward_sparsity": 0.8}, "trains A = B"),
    ({"algorithm": "set", "update_end_step": 9, "refresh_interval": 0}, "set it >= 1"),
    ({"algorithm": "static", "forward_interval": 1}, "only topkast does"),
    ({"algorithm": "static", "drop_fraction": 0.5}, "drop_fraction applies to algorithm rigl / set only"),
    ({"algorithm": "topkast", "mask_init": "random"}, "mask_init applies to algorithm static / rigl / set only"),
    ({"algorithm": "gmp", "prune_end_step": 100, "backward_sparsity": 0.5}, "B is the whole layer"),
    ({"algorithm": "gmp", "prune_start_step": 100, "prune_end_step": 50}, "needs prune_end_step after"),
    ({"algorithm": "gmp", "prune_end_step": 9, "new_entries": "per_entry_bias_correction"}, "changes nothing"),
    ({"algorithm": "rigl", "update_end_step": 9, "exploration_l2": 1e-4}, "exploration_l2 applies"),
    ({"algorithm": "rigl", "update_end_step": 10, "refresh_interval": 10}, "must exceed refresh_interval"),
]


@pytest.mark.parametrize("section,message", BAD_SECTIONS, ids=[str(s) for s, _ in BAD_SECTIONS])
def test_bad_values_name_the_key(section, message):
    with pytest.raises(TopKASTConfigError) as err:
        TopKASTConfig.from_section(section)
    assert message in str(err.value)


def test_missing_section_says_how_to_add_it():
    with pytest.raises(TopKASTConfigError, match='has no "topkast" section; add one'):
        topkast_section({"train_micro_batch_size_per_gpu": 1})


def test_defaults_are_the_papers_90_80():
    cfg = TopKASTConfig.from_section({})
    assert (cfg.forward_sparsity, cfg.backward_sparsity, cfg.refresh_interval) == (0.9, 0.8, 100)


PATTERN_ERRORS = [
    ({"include": ["*attention*"]}, "include pattern '*attention*' selects no layer"),
    ({"include": ["*ln_1"]}, "it matches only ['LayerNorm']"),
    ({"exclude": ["*no_such_module*"]}, "exclude pattern '*no_such_module*' matches no module"),
    ({"exclude": ["*"]}, "select no nn.Linear or Conv1D layer"),
    ({"include": ["lm_head"], "exclude": []}, "shares its weight with ['transformer.wte.weight']"),
]


@pytest.mark.parametrize("section,message", PATTERN_ERRORS, ids=[m for _, m in PATTERN_ERRORS])
def test_patterns_must_select_layers(section, message):
    with pytest.raises(TopKASTConfigError) as err:
        ds_topkast.sparsify(tiny_gpt2(), section)
    assert message in str(err.value)


ENGINE_ERRORS = [
    (dict(stage=0, bf16=True), "ZeRO stage 0 with bf16 uses DeepSpeed's FP16_Optimizer"),
    (dict(optimizer="Adagrad"), "does not know which state of optimizer Adagrad is per weight"),
]


@pytest.mark.parametrize("kwargs,message", ENGINE_ERRORS, ids=[m for _, m in ENGINE_ERRORS])
def test_unsupported_engine_setups_fail_at_start(kwargs, message):
    with pytest.raises((TopKASTConfigError, TypeError)) as err:
        ds_topkast.initialize(model=MLP(), config=ds_config(**kwargs))
    assert message in str(err.value)


@pytest.mark.parametrize("section", [{"fp16": {"enabled": True}},
                                     {"torch_autocast": {"enabled": True, "dtype": "float16"}}])
def test_fp16_is_refused_in_any_form(section):
    """A loss scale would not reach the regulariser's gradient, which the layers add in backward."""
    cfg = {**ds_config(), **section}
    with pytest.raises(TopKASTConfigError, match=r"fp16 \(.*is not supported by ds_topkast: the regulariser"):
        ds_topkast.initialize(model=MLP(), config=cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(TopKASTConfigError, match="does not exist"):
        ds_topkast.initialize(model=MLP(), config=str(tmp_path / "nope.json"))


TRAIN_ERRORS = [
    ({"steps": 0}, "train.steps: Input should be greater than 0"),
    ({"data": {"paths": "x"}}, "train.data.paths: unknown key; remove it or use one of: binary, cache_dir, dataset, "
                               "held_out, max_bytes, path, test, tokenizer, train, valid"),
    ({"data": {"eval_fraction": 0.1}}, "data.eval_fraction is gone"),
    ({"data": {"train": "a.txt"}}, "not all of train, valid and test"),
    ({"epochs": 3}, "train.epochs: unknown key; remove it or use one of: checkpoint_interval, data,"),
]


@pytest.mark.parametrize("section,message", TRAIN_ERRORS, ids=[m for _, m in TRAIN_ERRORS])
def test_train_section_errors_name_the_key(section, message):
    from ds_topkast.lm.train_config import train_section

    with pytest.raises(TopKASTConfigError) as err:
        train_section({"train": section})
    assert message in str(err.value)


def test_training_command_refuses_a_missing_corpus(tmp_path):
    from ds_topkast.lm.cli import main

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**json.loads((REPO / "configs" / "tiny_gpt2.json").read_text()),
                                  "train": {"data": {"path": str(tmp_path / "missing.txt"), "held_out": 0.1}}}))
    with pytest.raises(SystemExit, match="does not exist; give a text file, a folder or a glob"):
        main(["--config", str(config), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """The paper setups are too big to train here; their sections and model shapes must still validate."""
    from ds_topkast.config import load_deepspeed_config
    from ds_topkast.lm.models.transformer_xl import preset
    from ds_topkast.lm.run_files import micro_batch_per_rank
    from ds_topkast.lm.train_config import train_section

    cfg = load_deepspeed_config(str(path))
    if "topkast" in cfg:
        topkast_section(cfg)
    if "train" not in cfg:  # a Trainer config: its "auto" values are the Trainer's to fill
        return
    train = train_section(cfg)
    assert micro_batch_per_rank(cfg, 8) > 0
    if "preset" in train.model:
        preset(train.model["preset"], **{k: v for k, v in train.model.items() if k not in ("type", "preset")})


def test_the_training_command_derives_accumulation_as_deepspeed_does():
    from ds_topkast.lm.run_files import accumulation_steps, micro_batch_per_rank

    derived = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}
    assert accumulation_steps(derived, 2) == 4 and micro_batch_per_rank(derived, 2) == 2
    assert accumulation_steps({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 4) == 2


def test_weights_partitioned_by_zero3_are_gathered_one_layer_at_a_time():
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config(stage=3)):
        model = MLP()
    ds_topkast.sparsify(model, {"exclude": ["embed", "head"]})
    reference = ds_topkast.sparsify(MLP(), {"exclude": ["embed", "head"]})
    for name, layer in sparse_layers(model).items():
        assert hasattr(layer.values, "ds_id"), "the compact values are partitioned like the weight they replace"
        assert torch.equal(model.topkast_state.store.read(name), reference.topkast_state.store.read(name))
        assert torch.equal(layer.backward_bits, sparse_layers(reference)[name].backward_bits)


def test_a_config_file_that_is_not_json(tmp_path):
    (tmp_path / "ds.json").write_text('{"topkast": {"forward_sparsity": 0.9,}}')
    with pytest.raises(TopKASTConfigError, match="ds.json is not valid JSON"):
        ds_topkast.initialize(model=MLP(), config=str(tmp_path / "ds.json"))


def test_the_training_command_refuses_a_resume_without_a_checkpoint(tmp_path):
    from ds_topkast.lm.cli import main

    with pytest.raises(SystemExit, match="holds no checkpoint"):
        main(["--config", str(REPO / "configs" / "tiny_gpt2.json"), "--out", str(tmp_path), "--resume"])
