"""ds_topkast on CUDA: what only a GPU shows (devices, bf16 kernels, host syncs, NCCL, async I/O).

Run by `bench/gpu_check.sh` (`pytest -m gpu`); every test is skipped without CUDA. The
same behaviours are tested on DeepSpeed's CPU accelerator elsewhere; here they run with
the engine on the GPU against the plain fp32 reference on the CPU.
"""
import json
import warnings

import pytest
import torch
from launcher import REPO
from models import batches, ds_config, lm_loss, tiny_gpt2
from op_counts import OpCounter
from reference_topkast import ReferenceTopKAST

import ds_topkast
from ds_topkast.core.layers import sparse_layers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")]

EPS = 1e-4


def on_gpu(batch):
    return batch.cuda()


def reference_for(engine, model, lr, l2):
    layers = sparse_layers(engine.module)
    return ReferenceTopKAST(model, {n: (l.k_forward, l.k_backward, l.source_type == "Conv1D") for n, l in layers.items()},
                            lr=lr, eps=EPS, weight_decay=0.0, refresh_interval=3, forward_interval=1,
                            exploration_l2=l2)


@pytest.mark.parametrize("stage,bf16", [(0, False), (2, True), (3, True)])  # ZeRO-3: partitioned values
def test_compact_engine_on_cuda_matches_the_dense_reference(stage, bf16):
    """fp32: the same sets and weights as the CPU reference; bf16: the same losses to bf16 accuracy, A nearly equal."""
    import copy

    model = tiny_gpt2()
    ref_model = copy.deepcopy(model)
    cfg = ds_config(stage=stage, bf16=bf16, lr=1e-2, refresh_interval=3, forward_interval=1, exploration_l2=1e-3)
    cfg["optimizer"]["params"]["eps"] = EPS
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    assert engine.device.type == "cuda" and all(p.is_cuda for p in engine.module.parameters())
    ref = reference_for(engine, ref_model, 1e-2, 1e-3)
    for step, batch in enumerate(batches(7)):
        loss = engine(input_ids=on_gpu(batch), labels=on_gpu(batch)).loss
        engine.backward(loss)
        engine.step()
        ref_loss = ref.train_step([batch], lm_loss)
        assert loss.item() == pytest.approx(ref_loss, rel=2e-2 if bf16 else 1e-4), f"step {step}"
    assert [d.step for d in engine.topkast.refresher.history] == [3, 6]
    adapter = engine.topkast.refresher.adapter
    for name, layer in sparse_layers(engine.module).items():
        indices = layer.indices.long().cpu()
        ref_b = ref.B[name].reshape(-1).nonzero().squeeze(1)
        ref_a = ref.A[name].reshape(-1).nonzero().squeeze(1)
        ours_a = indices[layer.forward_mask.cpu()]
        if bf16:
            overlap = torch.isin(ours_a, ref_a).float().mean().item()
            assert overlap > 0.95, f"A of {name}: {overlap:.3f} shared with the fp32 reference"
        else:
            assert torch.equal(indices, ref_b) and torch.equal(ours_a, ref_a), name
            master = adapter.get_master(layer.values).cpu()
            torch.testing.assert_close(master, ref.theta[name].reshape(-1)[indices], rtol=1e-4, atol=1e-5)


def test_a_training_step_makes_no_more_cuda_syncs_than_dense_deepspeed():
    """CUDA's own sync detector (warn mode) and the ATen count, ds_topkast against dense DeepSpeed (ZeRO-2 bf16)."""
    import deepspeed

    cfg = ds_config(stage=2, bf16=True, refresh_interval=1000, forward_interval=1, exploration_l2=1e-3)
    dense_cfg = {k: v for k, v in cfg.items() if k != "topkast"}
    sparse, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    model = tiny_gpt2()
    dense, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dense_cfg)
    counts = {}
    for name, engine in (("ds_topkast", sparse), ("dense", dense)):
        data = [on_gpu(b) for b in batches(5)]
        for batch in data[:2]:
            engine.backward(engine(input_ids=batch, labels=batch).loss)
            engine.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught, OpCounter() as counter:
                warnings.simplefilter("always")
                for batch in data[2:]:
                    engine.backward(engine(input_ids=batch, labels=batch).loss)
                    engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[name] = (sum("synchronizing" in str(w.message) for w in caught), counter.totals()["syncs"])
    print(f"syncs over 3 steps (CUDA detector, ATen ops): {counts}")
    assert counts["ds_topkast"][0] <= counts["dense"][0] and counts["ds_topkast"][1] <= counts["dense"][1], counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sparse_layer_forward_and_backward_never_sync(dtype):
    """Forward and backward (regulariser included) of a sparse layer under set_sync_debug_mode("error")."""
    model = ds_topkast.sparsify(tiny_gpt2(), {"forward_sparsity": 0.8, "backward_sparsity": 0.6,
                                              "exploration_l2": 1e-3}).to("cuda", dtype)
    layer = next(iter(sparse_layers(model).values()))
    x = torch.randn(4, 16, layer.in_features, device="cuda", dtype=dtype, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.values.grad is not None and x.grad is not None


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_reselection_of_a_from_the_master_never_syncs(stage):
    """A's re-selection (the master gathered by DeepSpeed under ZeRO) under set_sync_debug_mode("error")."""
    cfg = ds_config(stage=stage, bf16=stage > 0, refresh_interval=1000, forward_interval=1)
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    batch = on_gpu(batches(1)[0])
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.topkast.refresher.reselect_forward_sets()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_device_checksum_equals_the_host_one():
    """A refresh checks and seals shards on the GPU (sum64); checkpoints check them on the host."""
    from ds_topkast.store.shards import checksum, matches, sum64

    values = torch.randn((1 << 23) + 3)
    on_gpu = checksum(values.cuda())
    assert on_gpu == sum64(values) and matches(values, on_gpu) and matches(values.cuda(), checksum(values))


def test_autocast_through_the_sparse_layer_on_cuda():
    layer = ds_topkast.sparsify(tiny_gpt2(), {"forward_sparsity": 0.8, "backward_sparsity": 0.6}).cuda()
    batch = on_gpu(batches(1)[0])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = layer(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [l.values.grad for l in sparse_layers(layer).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_triton_layer_matches_its_torch_reference_on_the_cpu(checkpointed):
    """An odd shape (k_B not a multiple of the 2,048-entry block), the regulariser on: output, input gradient and
    value gradient of the layer on CUDA (Triton kernels) against the same layer on the CPU (torch references)."""
    import copy

    from torch.utils.checkpoint import checkpoint

    from ds_topkast.core.layers import TopKASTLinear

    torch.manual_seed(0)
    numel = 97 * 61
    indices = torch.randperm(numel)[:2501].sort().values
    forward = torch.zeros(2501, dtype=torch.bool).index_fill_(0, torch.randperm(2501)[:1000], True)
    cpu = TopKASTLinear.from_indices(97, 61, torch.randn(2501), indices, forward, torch.nn.Parameter(torch.randn(61)),
                                     k_forward=1000, exploration_l2=1e-2)
    results = []
    for layer in (cpu, copy.deepcopy(cpu).cuda()):
        x = torch.randn(5, 97, generator=torch.Generator().manual_seed(1)).to(layer.values.device).requires_grad_()
        y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        y.square().sum().backward()
        results.append([t.detach().cpu() for t in (y, x.grad, layer.values.grad, layer.bias.grad)])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def run_training_command(tmp_path, family: str, name: str, steps: int, resume: bool = False) -> list[dict]:
    from ds_topkast import train

    source = {"gpt2": "configs/tiny_gpt2.json", "transformer_xl": "configs/tiny_transformer_xl.json"}[family]
    config = json.loads((REPO / source).read_text())
    config["topkast"]["refresh_interval"] = 3
    config["train"].update(eval_interval=3, eval_batches=2, log_interval=1, checkpoint_interval=3, plot=False)
    config["train"]["data"]["max_bytes"] = 200_000
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(config))
    out = tmp_path / name
    train.main(["--config", str(path), "--out", str(out), "--steps", str(steps)] + ["--resume"] * resume)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["gpt2", "transformer_xl"])
def test_training_command_trains_refreshes_evaluates_and_resumes_on_cuda(tmp_path, family):
    whole = run_training_command(tmp_path, family, "whole", 6)
    run_training_command(tmp_path, family, "split", 3)
    resumed = run_training_command(tmp_path, family, "split", 6, resume=True)
    assert [r["step"] for r in whole if r["kind"] == "refresh"] == [3, 6]
    final = [r for r in whole if r["kind"] == "eval"][-1]
    resumed_final = [r for r in resumed if r["kind"] == "eval"][-1]
    assert final["step"] == resumed_final["step"] == 6
    assert resumed_final["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_nvme_store_on_cuda_selects_what_the_host_store_selects(tmp_path):
    def trained(store):
        cfg = ds_config(stage=2, bf16=True, refresh_interval=2, dense_store=store)
        engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
        for batch in batches(4):
            engine.backward(engine(input_ids=on_gpu(batch), labels=on_gpu(batch)).loss)
            engine.step()
        return engine

    nvme, host = trained({"device": "nvme", "nvme_path": str(tmp_path)}), trained({"device": "cpu"})
    assert len(nvme.topkast.refresher.history) == 2
    for (name, a), b in zip(sparse_layers(nvme.module).items(), sparse_layers(host.module).values()):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.forward_mask, b.forward_mask), name
        torch.testing.assert_close(nvme.topkast.state.store.read(name), host.topkast.state.store.read(name))


@pytest.mark.parametrize("deepspeed", [False, True], ids=["autocast_bf16", "deepspeed_zero2_bf16"])
def test_hf_trainer_callback_on_cuda(tmp_path, deepspeed):
    from hf_trainer_worker import train

    model, callback = train(tmp_path, steps=4, gas=2, deepspeed=deepspeed, save_steps=2, bf16=True)
    assert [d.step for d in callback.history] == [2, 4]
    assert all(p.is_cuda for p in model.parameters())
    assert (tmp_path / "checkpoint-4" / "topkast_rank00000.pt").is_file()


@pytest.mark.parametrize("case", ["rigl", "gmp", "set"])
def test_the_algorithm_family_on_cuda_matches_its_reference(case):
    """fp32 ZeRO-2 on the GPU: RigL's dense gradient handed over from CUDA backward, GMP's masked gradient, SET's
    draw; the same masks and weights as the plain CPU reference."""
    import copy

    from reference_sparse_algorithms import ReferenceMasked
    from test_algorithms import CASES
    from test_algorithms import reference_for as masked_reference

    model = tiny_gpt2()
    ref_model = copy.deepcopy(model)
    cfg = ds_config(stage=2, lr=1e-2, refresh_interval=2, **CASES[case])
    del cfg["topkast"]["backward_sparsity"]
    cfg["optimizer"]["params"]["eps"] = EPS
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    ref = masked_reference(ref_model, engine, cfg["topkast"])
    assert isinstance(ref, ReferenceMasked)
    ref.lr, ref.wd = 1e-2, 0.0
    for batch in batches(7):
        engine.backward(engine(input_ids=on_gpu(batch), labels=on_gpu(batch)).loss)
        engine.step()
        ref.train_step([batch], lm_loss)
    assert [d.step for d in engine.topkast.refresher.history] == [2, 4, 6]
    adapter = engine.topkast.refresher.adapter
    for name, layer in sparse_layers(engine.module).items():
        indices = layer.indices.long().cpu()
        assert torch.equal(indices, ref.B[name].reshape(-1).nonzero().squeeze(1)), name
        expected = ref.theta[name].reshape(-1)[indices]
        error = (adapter.get_master(layer.values).cpu() - expected).abs().max().item()
        assert error <= 1e-4 * expected.abs().max().item(), f"{name}: values differ by {error:.3g}"
