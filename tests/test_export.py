"""export gives back the original architecture, loadable by its own library, computing the same thing."""
import pytest
import torch
from models import MLP, batches, ds_config, partitioned_zero3_config, tiny_gpt2, tiny_llama
from test_engine import train
from transformers import AutoModelForCausalLM

import ds_topkast
from ds_topkast.core.layers import sparse_layers


def trained(cfg: dict):
    """An engine over tiny_gpt2 trained 3 steps, a batch, and the engine's logits on it (in eval mode)."""
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    train(engine, 3)
    x = batches(1)[0]
    engine.eval()
    with torch.no_grad():
        return engine, x, engine(input_ids=x).logits.float()


def assert_plain_model_computes(state_dict: dict, x, expected, dtype=torch.float32) -> None:
    """state_dict loads into the plain tiny_gpt2 with nothing missing or unexpected and gives `expected` on x."""
    plain = tiny_gpt2(seed=1).to(dtype).eval()
    result = plain.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits.float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", [0, 2])
def test_exported_gpt2_saves_loads_and_matches_the_sparse_model(tmp_path, stage):
    engine, x, expected = trained(ds_config(stage=stage, refresh_interval=2))
    model = ds_topkast.export(engine)
    assert not sparse_layers(model) and not hasattr(model, "topkast_state")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    density = (loaded.transformer.h[0].attn.c_attn.weight != 0).float().mean().item()
    assert density == pytest.approx(0.2, abs=0.01)


def test_theta_export_holds_the_dense_store_with_current_b_values():
    model = ds_topkast.sparsify(tiny_llama(), {"forward_sparsity": 0.8, "backward_sparsity": 0.6})
    layer = sparse_layers(model)["model.layers.0.mlp.up_proj"]
    layer.values.data.add_(1.0)
    theta = model.topkast_state.store.read("model.layers.0.mlp.up_proj").clone()
    theta[layer.indices.long()] = layer.values.detach()
    ds_topkast.export(model, weights="theta")
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.reshape(-1), theta)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_export_refuses_unknown_weights():
    with pytest.raises(ValueError, match="use one of"):
        ds_topkast.export(ds_topkast.sparsify(MLP(), {"exclude": ["embed", "head"]}), weights="alpha")


def test_a_sparsified_models_save_pretrained_writes_the_plain_model_that_loads_back_onto_b(tmp_path):
    """save_pretrained gives from_pretrained the α model; loading that into a sparse model keeps its sets."""
    model = ds_topkast.sparsify(tiny_gpt2(), {"forward_sparsity": 0.8, "backward_sparsity": 0.6})
    x = batches(1)[0]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not sparse_layers(loaded)
    torch.testing.assert_close(loaded.eval()(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)

    layers = sparse_layers(model)
    before = {name: (layer.values.detach().clone(), layer.backward_bits.clone()) for name, layer in layers.items()}
    model.load_state_dict(loaded.state_dict())
    for name, layer in layers.items():
        values, bits = before[name]
        assert torch.equal(layer.backward_bits, bits), name
        torch.testing.assert_close(layer.values.detach(), torch.where(layer.forward_mask, values, 0.0), msg=name)

    wrong = loaded.state_dict()
    wrong["transformer.h.0.mlp.c_fc.weight"] = wrong["transformer.h.0.mlp.c_fc.weight"].t()
    with pytest.raises(RuntimeError, match="size mismatch for transformer.h.0.mlp.c_fc.weight"):
        model.load_state_dict(wrong)


@pytest.mark.parametrize("stage,bf16", [(0, False), (2, True), (3, True)])
def test_save_16bit_model_writes_the_plain_model_and_checkpoints_stay_sparse(tmp_path, stage, bf16):
    """DeepSpeed's documented way out of an engine loads into the plain model with nothing missing or unexpected
    and computes what the engine computes; the engine's own checkpoint still holds the sparse layers."""
    cfg = ds_config(stage=stage, bf16=bf16, refresh_interval=2)
    if stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    engine, x, expected = trained(cfg)
    assert engine.save_16bit_model(str(tmp_path))
    assert_plain_model_computes(torch.load(tmp_path / "pytorch_model.bin", weights_only=True), x, expected,
                                torch.bfloat16 if bf16 else torch.float32)
    engine.save_checkpoint(str(tmp_path / "checkpoint"))
    if stage < 3:  # ZeRO-3 keeps the module's partitions in its optimizer files
        module = torch.load(next((tmp_path / "checkpoint").rglob("*model_states.pt")), weights_only=False)["module"]
        assert "transformer.h.0.attn.c_attn.values" in module and "transformer.h.0.attn.c_attn.weight" not in module


@pytest.mark.parametrize("stage,bf16", [(0, False), (2, True)])
def test_the_state_dict_a_user_takes_and_saves_is_the_plain_model(tmp_path, stage, bf16):
    """A custom loop's commonest saves (`torch.save(model.state_dict())`, of the engine's module too) write the
    plain model; the engine's checkpoint taken next is still sparse and the form stays plain after it."""
    engine, x, expected = trained(ds_config(stage=stage, bf16=bf16, refresh_interval=2))
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.save(engine.module.state_dict(), tmp_path / "model.pt")
    assert_plain_model_computes(torch.load(tmp_path / "model.pt", weights_only=True), x, expected, dtype)
    engine.save_checkpoint(str(tmp_path / "checkpoint"))
    module = torch.load(next((tmp_path / "checkpoint").rglob("*model_states.pt")), weights_only=False)["module"]
    assert "transformer.h.0.attn.c_attn.values" in module and "transformer.h.0.attn.c_attn.weight" not in module
    assert_plain_model_computes(engine.module.state_dict(), x, expected, dtype)
    assert all(isinstance(v, torch.nn.Parameter) for k, v in engine.module.state_dict(keep_vars=True).items()
               if k.endswith(".values")), "keep_vars asks for the module's own tensors"


def test_a_zero3_state_dict_warns_outside_a_gather_and_is_plain_inside_one(tmp_path):
    """Under ZeRO-3 a custom loop's hand-taken saves that cannot be plain warn, naming the calls that are; those
    calls (and DeepSpeed's own gathers while training) warn of nothing."""
    import warnings

    import deepspeed

    engine, x, expected = trained(partitioned_zero3_config())
    with pytest.warns(UserWarning, match="ds_topkast.plain_state_dict"):
        partitions = engine.module.state_dict()
    assert "transformer.h.0.attn.c_attn.values" in partitions
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {key: value.clone() for key, value in engine.module.state_dict().items()}
    assert_plain_model_computes(state, x, expected)
    with pytest.warns(UserWarning, match=r"transformer.h.0.attn.c_attn.values was gathered by hand.*plain_state_dict"):
        for name, param in engine.module.named_parameters():  # DeepSpeed-Chat's save_zero_three_model
            with deepspeed.zero.GatheredParameters([param]):
                param.data.cpu()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.train()
        train(engine, 1)
        engine.save_checkpoint(str(tmp_path / "checkpoint"))
        engine.load_checkpoint(str(tmp_path / "checkpoint"))
        assert "transformer.h.0.attn.c_attn.weight" in ds_topkast.plain_state_dict(engine)
        engine.save_16bit_model(str(tmp_path))
    assert not [w for w in caught if "plain_state_dict" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_plain_state_dict_of_an_engine_or_a_model_loads_into_the_plain_model(stage):
    """ds_topkast.plain_state_dict gives what the trained engine computes, at any stage (ZeRO-3: gathered layer by
    layer); at ZeRO 0-2 the same from the engine's module."""
    engine, x, expected = trained(ds_config(stage=stage, refresh_interval=2))
    for source in (engine, engine.module) if stage < 3 else (engine,):
        assert_plain_model_computes(ds_topkast.plain_state_dict(source), x, expected)
