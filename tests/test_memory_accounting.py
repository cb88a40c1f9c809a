"""memory_report and estimate_memory: the accounting of what each rank holds, checked against the tensors held.

A GPT-2-small-shaped model at 90/80 holds <= 0.3 of dense bytes in its sparsified layers; the estimate
from a meta-device model equals the report of the engine built from the same config and the sizes of
the tensors that engine holds; and at Llama-7B's shape the estimate gives the arithmetic of the headline
benchmark (bench/bench_headline.py).
"""
import sys
from pathlib import Path

import pytest
import torch
from models import ds_config, tiny_gpt2, tiny_llama

import ds_topkast
from ds_topkast.core.layers import layer_scratch, sparse_layers


@pytest.mark.parametrize("stage,bf16", [(1, True), (0, False)])
def test_gpt2_small_shape_at_90_80(stage, bf16):
    model = tiny_gpt2(n_layer=12, n_embd=768, n_head=12, n_positions=64)
    cfg = ds_config(stage=stage, bf16=bf16, forward_sparsity=0.9, backward_sparsity=0.8)
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    report = ds_topkast.memory_report(engine)
    print(report.format())
    layers = sparse_layers(engine.module)
    dense_entries = sum(l.in_features * l.out_features for l in layers.values())
    assert dense_entries == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)
    assert report.sparse["values"] == sum(l.values.numel() * l.values.element_size() for l in layers.values())
    assert report.sparse["set_bitmaps"] == sum(-(-l.in_features * l.out_features // 8) + -(-l.k_backward // 8)
                                               for l in layers.values())  # a bit per weight (B), per value (A)
    assert report.dense_store_bytes == 4 * dense_entries
    assert report.dense_total == 16 * dense_entries  # 2+2+4+8 (bf16 + Adam) or 4+4+0+8 (fp32 + Adam)
    assert report.ratio <= 0.3


def _meta_llama():
    with torch.device("meta"):
        return tiny_llama()


def _optimizer_state_bytes(params) -> int:
    """fp32 master and Adam moments DeepSpeed holds for these parameters, wherever it holds them."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return sum(4 * (safe_get_full_fp32_param(p).numel()
                    + sum(safe_get_full_optimizer_state(p, key).numel() for key in ("exp_avg", "exp_avg_sq")))
               for p in params)


@pytest.mark.parametrize("stage,bf16,offload", [(2, True, False), (1, False, False), (2, True, True)],
                         ids=["zero2-bf16", "zero1-fp32", "offload"])
def test_the_estimate_before_the_run_is_the_report_of_the_run_and_the_tensors_it_holds(stage, bf16, offload):
    """estimate_memory on a meta model = memory_report of the engine that config builds = the tensors it holds."""
    cfg = ds_config(stage=stage, bf16=bf16, offload_optimizer=offload, forward_sparsity=0.9, backward_sparsity=0.8,
                    distribution="erk", include=["*proj"])
    estimate = ds_topkast.estimate_memory(_meta_llama(), cfg)
    engine, *_ = ds_topkast.initialize(model=tiny_llama(), config=cfg)
    layer_scratch.clear()  # what earlier tests in this process left
    batch = torch.randint(0, 64, (4, 8))
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    report = ds_topkast.memory_report(engine)
    assert estimate.as_dict() == report.as_dict()
    assert layer_scratch.nbytes() == report.layer_scratch  # α and dL/dα, one pair per distinct layer size
    layers = list(sparse_layers(engine.module).values())
    assert report.sparse["values"] == sum(l.values.numel() * l.values.element_size() for l in layers)
    assert report.sparse["set_bitmaps"] == sum(l.backward_bits.numel() + l.forward_bits.numel() for l in layers)
    assert report.dense_store_bytes == engine.topkast.state.store.nbytes()
    compact_state = _optimizer_state_bytes(l.values for l in layers)
    if offload:  # on the host: master, moments, the fp32 gradient partition and the bf16 staging copy
        assert report.sparse["fp32_master"] == report.sparse["moments"] == report.sparse["gradients"] == 0
        trained = [p for p in engine.module.parameters() if p.requires_grad]
        zero = engine.optimizer
        held = (_optimizer_state_bytes(trained)
                + sum(4 * p.grad.numel() for p in zero.single_partition_of_fp32_groups)
                + sum(b.numel() * b.element_size() for b in zero.param_buffer_of_bit16_for_cpu_offload_groups))
        assert 0 <= held - report.host_optimizer_state <= 64 * len(zero.single_partition_of_fp32_groups)
    else:
        assert report.sparse["fp32_master"] + report.sparse["moments"] == compact_state


def test_a_7b_llama_fits_an_80_gb_card_at_90_80_and_a_24_gb_one_at_95_90_by_the_accounting():
    """Llama-7B's shape (meta device) in bf16 + AdamW, ZeRO-2, one GPU: the issue's arithmetic, from the estimate."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_headline import headline_config, meta_llama

    model = meta_llama("llama-7b")
    gb = 1e9
    top_kast = {}
    for sparsity in ("90/80", "95/90"):
        report = ds_topkast.estimate_memory(model, headline_config(sparsity))
        top_kast[sparsity] = (report.sparse_total + report.other_parameters) / gb
        assert report.dense_store_bytes / gb == pytest.approx(25.9, abs=0.05)  # 6.48B fp32 weights, on the host
        dense = (report.dense_total + report.other_parameters) / gb
    assert top_kast["90/80"] == pytest.approx(25.9, abs=0.1) and top_kast["95/90"] == pytest.approx(15.5, abs=0.1)
    assert dense == pytest.approx(107.8, abs=0.1)  # 16 bytes per weight: dense ZeRO-2 cannot start on an 80 GB card
    offload = ds_topkast.estimate_memory(model, headline_config("offload"))
    assert (offload.dense_total + offload.other_parameters) / gb == pytest.approx(13.5, abs=0.1)  # bf16 weights


def test_the_estimate_refuses_what_it_cannot_count():
    model = _meta_llama()
    cfg = ds_config(stage=2, bf16=True)
    for change, message in [(lambda c: c["zero_optimization"].update(stage="auto"), "zero_optimization.stage"),
                            (lambda c: c["bf16"].update(enabled="auto"), "bf16.enabled"),
                            (lambda c: c.pop("optimizer"), "needs the optimizer"),
                            (lambda c: c.setdefault("data_types", {}).update(grad_accum_dtype="fp8"), "fp8"),
                            (lambda c: c["topkast"].update(distribution="global"), "global")]:
        bad = ds_config(stage=2, bf16=True)
        change(bad)
        with pytest.raises(ds_topkast.TopKASTConfigError, match=message):
            ds_topkast.estimate_memory(model, bad)
    with pytest.raises(ds_topkast.TopKASTConfigError, match="world"):
        ds_topkast.estimate_memory(model, cfg, world=0)
