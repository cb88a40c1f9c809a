"""export under ZeRO-3: converted one module at a time into the plain model, whole on the host of every rank.

Run as a script (by the deepspeed launcher) it is one rank's side of the 2-rank check:
each rank trains on its rows of the same global batches and saves its exported model.
"""
import argparse
import os
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import GLOBAL_BATCH
from dist_worker import train as train_on_ranks
from models import partitioned_zero3_config as zero3_config
from models import tiny_gpt2
from test_export import trained
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import ds_topkast
from ds_topkast.convert.export import WEIGHTS
from ds_topkast.core.layers import sparse_layers

STEPS = 3


def assert_plain_on_host(model: torch.nn.Module) -> None:
    """No Top-KAST layer, no DeepSpeed parameter or container, no hook: an ordinary model on the CPU."""
    assert not sparse_layers(model) and not hasattr(model, "topkast_state")
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    for name, param in model.named_parameters():
        assert not [key for key in vars(param) if key.startswith("ds_")], name
        assert param.device.type == "cpu" and param.numel() > 0, name
    assert all(buffer.device.type == "cpu" for buffer in model.buffers())
    for module in model.modules():
        assert type(module._parameters) is dict and not hasattr(module, "_original_parameters")
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks), type(module).__name__


def test_forward_export_is_the_trained_model_and_saves_as_one(tmp_path):
    engine, x, expected = trained(zero3_config())
    assert all(param.numel() == 0 for param in engine.module.parameters()), "every layer is partitioned"
    with pytest.raises(ValueError, match=r"call ds_topkast.export\(engine\) on every rank"):
        ds_topkast.export(engine.module)  # partitioned, and the masters are the engine's
    model = ds_topkast.export(engine)
    assert_plain_on_host(model)
    assert model.lm_head.weight is model.transformer.wte.weight, "tied weights stay tied"
    torch.testing.assert_close(model.eval()(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(loaded.eval()(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_theta_export_is_the_store_with_b_master_values_and_the_other_weights_gathered():
    engine, *_ = trained(zero3_config())
    adapter, store = engine.topkast.refresher.adapter, engine.topkast.state.store
    expected = ds_topkast.plain_state_dict(engine)  # every other parameter, gathered layer by layer
    layers = sparse_layers(engine.module)
    for name, layer in layers.items():
        theta = store.read(name).clone()
        theta[layer.indices.long()] = adapter.get_master(layer.values)
        expected[f"{name}.weight"] = theta.view(layer.shape).t()  # Conv1D's (in, out) layout
    model = ds_topkast.export(engine, weights="theta")
    assert_plain_on_host(model)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def exported_state(weights: str, world: int) -> dict[str, torch.Tensor]:
    """The state dict `export(engine, weights)` gives after STEPS steps on the global batches, on `world` ranks."""
    cfg = zero3_config(micro_batch=GLOBAL_BATCH // world)
    cfg["optimizer"]["params"]["eps"] = 1e-4  # as dist_worker.build: Adam's update is then robust to the world size
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    train_on_ranks(engine, 0, STEPS)
    return {key: value.clone() for key, value in ds_topkast.export(engine, weights=weights).state_dict().items()}


def test_two_ranks_export_what_one_rank_exports(tmp_path):
    from launcher import deepspeed_launch  # not at the top: the ranks running this file must not import conftest

    deepspeed_launch(2, "tests/test_export_zero3.py", "--out", str(tmp_path))
    for weights in WEIGHTS:
        expected = exported_state(weights, world=1)
        for rank in range(2):
            got = torch.load(tmp_path / f"{weights}_rank{rank}.pt", weights_only=True)
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                error = (got[key].float() - value.float()).abs().max().item()
                assert error <= 1e-5 * value.abs().max().item(), f"{weights} rank {rank}: {key} differs by {error:.3g}"


def main() -> None:
    import deepspeed.comm as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    for weights in WEIGHTS:
        state = exported_state(weights, int(os.environ["WORLD_SIZE"]))
        torch.save(state, Path(args.out) / f"{weights}_rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    sys.exit(main())
