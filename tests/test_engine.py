"""ds_topkast.initialize takes what deepspeed.initialize takes; optimizer state follows the entries."""
import pytest
import torch
from models import MLP, batches, ds_config, tiny_gpt2

import ds_topkast
from ds_topkast.core.layers import sparse_layers

PLAIN = {"exclude": ["embed", "head"]}


def train(engine, steps, data=None, model_kwargs=None):
    data = data or batches(steps)
    losses = []
    for batch in data[:steps]:
        out = engine(input_ids=batch, labels=batch)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_param_groups_built_before_conversion_keep_their_settings():
    model = MLP()
    groups = [{"params": [model.fc1.weight, model.fc1.bias], "lr": 0.5, "weight_decay": 0.1},
              {"params": [model.fc2.weight, model.fc2.bias, model.embed.weight, model.head.weight], "lr": 0.25}]
    engine, *_ = ds_topkast.initialize(model=model, model_parameters=groups, config=ds_config(**PLAIN))
    by_param = {id(p): g for g in engine.basic_optimizer.param_groups for p in g["params"]}
    assert by_param[id(engine.module.fc1.values)]["lr"] == 0.5
    assert by_param[id(engine.module.fc1.values)]["weight_decay"] == 0.1
    assert by_param[id(engine.module.fc2.values)]["lr"] == 0.25
    assert sum(len(g["params"]) for g in engine.basic_optimizer.param_groups) == 6


def test_parameters_generator_and_list_are_remapped():
    for make in (lambda m: m.parameters(), lambda m: list(m.parameters())):
        model = MLP()
        params = make(model)
        engine, *_ = ds_topkast.initialize(model=model, model_parameters=params, config=ds_config(**PLAIN))
        trained = {id(p) for g in engine.basic_optimizer.param_groups for p in g["params"]}
        assert id(engine.module.fc1.values) in trained and id(engine.module.fc2.values) in trained
        assert len(trained) == 6


def test_client_optimizer_built_on_dense_weights():
    model = MLP()
    client = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, optimizer, *_ = ds_topkast.initialize(model=model, optimizer=client,
                                                  config=ds_config(optimizer=None, **PLAIN))
    assert engine.basic_optimizer is client
    assert any(p is engine.module.fc1.values for p in client.param_groups[0]["params"])
    losses = train(engine, 6, batches(1) * 6)
    assert losses[-1] < losses[0]


def spy_on_refresh(engine):
    """Snapshot every layer's sets and optimizer state just before each refresh."""
    refresher = engine.topkast.refresher
    snapshots = []
    original = refresher.refresh

    def refresh(step):
        snap = {}
        for name, layer in refresher.layers.items():
            snap[name] = {"indices": layer.indices.long().clone(),
                          **{k: refresher.adapter.get_state(layer.values, k).clone() for k in refresher.adapter.state_keys}}
        snapshots.append(snap)
        return original(step)

    refresher.refresh = refresh
    return snapshots


OPTIMIZERS = {
    "Adam": dict(optimizer="Adam", adam_w_mode=False),
    "AdamW zero1": dict(optimizer="AdamW", stage=1),
    "AdamW zero3": dict(optimizer="AdamW", stage=3),
    "AdamW bf16 zero2": dict(optimizer="AdamW", stage=2, bf16=True),
    "SGD momentum": dict(optimizer="SGD"),
    "FusedAdam zero2": dict(optimizer="Adam", stage=2, torch_adam=False),
    "DeepSpeedCPUAdam zero2 offload": dict(optimizer="Adam", stage=2, torch_adam=False, offload_optimizer=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_refresh_moves_state_with_entries_and_zeroes_new_ones(name):
    kwargs = dict(OPTIMIZERS[name])
    adam_w_mode = kwargs.pop("adam_w_mode", None)
    cfg = ds_config(lr=0.05, refresh_interval=2, **kwargs)
    if adam_w_mode is not None:
        cfg["optimizer"]["params"]["adam_w_mode"] = adam_w_mode
    if kwargs["optimizer"] == "SGD":
        cfg["optimizer"]["params"]["momentum"] = 0.9
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    assert name.split()[0] == type(engine.basic_optimizer).__name__
    snapshots = spy_on_refresh(engine)
    train(engine, 2)
    adapter = engine.topkast.refresher.adapter
    assert adapter.state_keys, "the optimizer must have per-entry state to remap"
    moved_some = new_some = False
    for layer_name, layer in sparse_layers(engine.module).items():
        before, after = snapshots[0][layer_name], layer.indices.long()
        old_pos = {int(i): p for p, i in enumerate(before["indices"])}
        kept = torch.tensor([int(i) in old_pos for i in after])
        src = torch.tensor([old_pos.get(int(i), 0) for i in after])
        for key in adapter.state_keys:
            state = adapter.get_state(layer.values, key)
            assert torch.equal(state[kept], before[key][src[kept]]), f"{key} of kept entries of {layer_name}"
            assert torch.all(state[~kept] == 0), f"{key} of new entries of {layer_name} must start at zero"
        store = engine.topkast.state.store.read(layer_name)
        torch.testing.assert_close(adapter.get_master(layer.values), store[after])
        moved_some |= bool((kept & (src != torch.arange(len(after)))).any())
        new_some |= bool((~kept).any())
    assert moved_some and new_some, "the test must see entries that move and entries that are new"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_training_loss_falls(stage):
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=ds_config(stage=stage, bf16=True, lr=1e-2,
                                                                          refresh_interval=5))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    losses = train(engine, 30, batches(2) * 15)
    assert len(engine.topkast.refresher.history) == 6
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4


def values_gradients(engine, backward):
    from deepspeed.utils import safe_get_full_grad

    batch = batches(1)[0]
    backward(engine, engine(input_ids=batch, labels=batch).loss)
    return {name: safe_get_full_grad(layer.values).clone() for name, layer in sparse_layers(engine.module).items()}


def test_loss_backward_and_engine_backward_give_the_same_regularised_gradient():
    """The regulariser's gradient is added in the layer's backward, so a plain loss.backward() gets it too.

    (DeepSpeed allows `loss.backward()` from ZeRO stage 1 on.)
    """
    cfg = ds_config(stage=2, exploration_l2=1.0, refresh_interval=100)
    by_engine = values_gradients(ds_topkast.initialize(model=tiny_gpt2(), config=cfg)[0],
                                 lambda engine, loss: engine.backward(loss))
    by_loss = values_gradients(ds_topkast.initialize(model=tiny_gpt2(), config=cfg)[0],
                               lambda engine, loss: loss.backward())
    without = values_gradients(ds_topkast.initialize(model=tiny_gpt2(), config=ds_config(stage=2,
                                                                                         refresh_interval=100))[0],
                               lambda engine, loss: engine.backward(loss))
    engine = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)[0]
    for name, layer in sparse_layers(engine.module).items():
        torch.testing.assert_close(by_loss[name], by_engine[name])
        v = layer.values.detach()
        density = layer.k_forward / (layer.in_features * layer.out_features)
        torch.testing.assert_close(by_engine[name] - without[name],
                                   2 * v * torch.where(layer.forward_mask, 1.0, 1 / density))


def test_config_path_in_args_as_deepspeed_reads_it(tmp_path):
    import argparse
    import json

    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds_config(**PLAIN)))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    engine, *_ = ds_topkast.initialize(args=args, model=MLP())
    assert set(sparse_layers(engine.module)) == {"fc1", "fc2"}
    assert engine.topkast.config.refresh_interval == 3


def test_deepspeed_torch_autocast_runs_the_sparse_layers_in_bf16():
    """DeepSpeed's "torch_autocast" keeps fp32 weights and runs matmuls under torch.autocast; both passes work."""
    cfg = ds_config(stage=2, lr=1e-2, refresh_interval=5)
    cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    layer = next(iter(sparse_layers(engine.module).values()))
    outputs = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    losses = train(engine, 12, batches(2) * 6)
    handle.remove()
    assert layer.values.dtype == torch.float32 and set(outputs) == {torch.bfloat16}
    assert len(engine.topkast.refresher.history) == 2
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_bf16_forward_set_is_the_top_of_the_fp32_master_not_of_the_rounded_values():
    """A is re-selected from the fp32 master: bf16 rounding (many equal values) never decides membership."""
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=ds_config(stage=2, bf16=True, refresh_interval=100))
    train(engine, 3)
    adapter = engine.topkast.refresher.adapter
    rounding_would_decide = False
    for name, layer in sparse_layers(engine.module).items():
        master = adapter.get_master(layer.values)
        expected = torch.zeros(master.numel(), dtype=torch.bool)
        expected[torch.sort(-master.abs(), stable=True).indices[:layer.k_forward]] = True
        assert torch.equal(layer.forward_mask, expected), name
        from_bf16 = torch.zeros_like(expected)
        from_bf16[torch.sort(-layer.values.detach().float().abs(), stable=True).indices[:layer.k_forward]] = True
        rounding_would_decide |= not torch.equal(from_bf16, expected)
    assert rounding_would_decide, "the test must see layers where bf16 ties would pick other members"


def test_amsgrad_is_refused_at_start():
    from ds_topkast.engine.optimizer_adapters import UnsupportedOptimizerError

    cfg = ds_config(stage=1)
    cfg["optimizer"]["params"]["amsgrad"] = True
    with pytest.raises(UnsupportedOptimizerError, match="amsgrad=True keeps a running maximum"):
        ds_topkast.initialize(model=tiny_gpt2(), config=cfg)

