"""memory_report: the sparsified layers of a GPT-2-small-shaped model at 90/80 hold <= 0.3 of dense bytes."""
import pytest
from models import ds_config, tiny_gpt2

import ds_topkast
from ds_topkast.core.layers import sparse_layers


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
