"""Transformer-XL against plain, independent computations of what the paper defines."""
import math

import pytest
import torch

from ds_topkast.lm.models.transformer_xl import TransformerXL, TransformerXLConfig, preset, rel_shift


def tiny(**overrides) -> TransformerXL:
    torch.manual_seed(0)
    fields = dict(vocab_size=40, n_layer=2, d_model=32, n_head=4, d_inner=48, tgt_len=8, mem_len=8,
                  eval_mem_len=12, dropout=0.0, init_std=0.2)
    return TransformerXL(TransformerXLConfig(**{**fields, **overrides})).eval()


def sinusoids_by_distance(n: int, d_model: int) -> torch.Tensor:
    """Row d: the encoding of relative distance d (Vaswani et al. 2017)."""
    inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
    angles = torch.arange(n, dtype=torch.float)[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def reference_token_nll(model: TransformerXL, stream: torch.Tensor, seg_len: int, mem_len: int) -> torch.Tensor:
    """The whole stream in one pass: position i attends to j in [segment_start(i) - mem_len, i].

    That is exactly the context segment-wise evaluation with a memory of mem_len gives,
    with every relative score computed directly from the distance i - j (no shift trick).
    """
    cfg = model.config
    x, y = stream[:, :-1], stream[:, 1:]
    n, heads, d_head = x.shape[1], cfg.n_head, cfg.head_dim
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (j <= i) & (j >= (i // seg_len) * seg_len - mem_len)
    distance = (i - j).clamp(min=0).expand(x.shape[0], heads, n, n)
    encodings = sinusoids_by_distance(n, cfg.d_model)
    h = model.word_emb(x)
    for index, layer in enumerate(model.layers):
        attn = layer.attn
        split = lambda t: t.view(x.shape[0], n, heads, d_head).transpose(1, 2)
        q, k, v = (split(t) for t in attn.qkv_net(h).chunk(3, dim=-1))
        r = attn.r_net(encodings).view(n, heads, d_head).transpose(0, 1)
        u, w = (bias[index] for bias in (model.r_w_bias, model.r_r_bias))
        content = torch.einsum("bhid,bhjd->bhij", q + u[:, None], k)
        position = torch.einsum("bhid,hjd->bhij", q + w[:, None], r).gather(-1, distance)
        scores = ((content + position) / math.sqrt(d_head)).masked_fill(~visible, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], n, -1)
        h = layer.ff(attn.layer_norm(h + attn.o_net(attended)))
    return -model.word_emb.log_probs(h).gather(-1, y[..., None]).squeeze(-1)


def segment_token_nll(model: TransformerXL, stream: torch.Tensor, seg_len: int) -> torch.Tensor:
    mems, nll = None, []
    for start in range(0, stream.shape[1] - 1, seg_len):
        out = model(stream[:, start:start + seg_len], stream[:, start + 1:start + seg_len + 1], mems)
        mems = out.mems
        nll.append(out.token_nll)
    return torch.cat(nll, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("mem_len", [0, 5, 12])
def test_segments_with_memory_equal_the_reference_over_the_same_context(mem_len):
    model = tiny(eval_mem_len=mem_len)
    stream = torch.randint(0, 40, (2, 4 * 8 + 1), generator=torch.Generator().manual_seed(1))
    expected = reference_token_nll(model, stream, seg_len=8, mem_len=mem_len)
    torch.testing.assert_close(segment_token_nll(model, stream, 8), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rel_shift_pairs_each_query_with_the_encoding_of_its_distance():
    qlen, mlen = 5, 3
    klen = qlen + mlen
    scores = torch.randn(2, 3, qlen, klen)  # scores[..., i, c]: distance klen - 1 - c
    shifted = rel_shift(scores)
    for i in range(qlen):
        for j in range(mlen + i + 1):
            distance = mlen + i - j
            torch.testing.assert_close(shifted[..., i, j], scores[..., i, klen - 1 - distance])


@torch.no_grad()
@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_no_position_sees_a_later_one_with_or_without_memory(pre_lnorm):
    model = tiny(pre_lnorm=pre_lnorm)
    first, second = torch.randint(0, 40, (2, 1, 8), generator=torch.Generator().manual_seed(2))
    mems = model(first).mems
    for memory in (None, mems):
        base = model(second, mems=memory).hidden
        changed = second.clone()
        changed[0, 5] = (changed[0, 5] + 1) % 40
        after = model(changed, mems=memory).hidden
        torch.testing.assert_close(after[:, :5], base[:, :5], atol=0, rtol=0)
        assert not torch.allclose(after[:, 5:], base[:, 5:])
    # and the memory carries the first segment forward: changing it changes the second's output
    assert not torch.allclose(model(second, mems=mems).hidden, model(second).hidden)


@torch.no_grad()
def test_adaptive_softmax_log_probs_sum_to_one_and_match_the_target_path():
    model = tiny(vocab_size=50, cutoffs=[10, 30], div_val=2, d_embed=16)
    hidden = torch.randn(20, 32)
    log_probs = model.log_probs(hidden)
    assert log_probs.shape == (20, 50)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(20), atol=1e-5, rtol=0)
    targets = torch.arange(20) * 5 % 50  # tokens from every cluster
    torch.testing.assert_close(model.word_emb.target_log_probs(hidden, targets),
                               log_probs.gather(1, targets[:, None]).squeeze(1))


def test_projected_embeddings_are_tied_to_the_softmax():
    model = tiny(vocab_size=50, cutoffs=[10], div_val=2, d_embed=16)
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("crit") for name in names), "one set of embedding weights serves both ends"
    assert {"word_emb.projections.0", "word_emb.projections.1"} <= names


def test_presets_have_the_reference_scripts_shapes_and_evaluation():
    """run_enwik8_large.sh and run_wt103_large.sh, with their eval.py commands (docs/PAPER_CONFIGS.md)."""
    enwik8 = preset("enwik8")
    assert (enwik8.n_layer, enwik8.d_model, enwik8.d_inner, enwik8.embed_dim, enwik8.n_head) == (24, 1024, 3072, 1024, 8)
    assert (enwik8.tgt_len, enwik8.mem_len, enwik8.eval_tgt_len, enwik8.eval_mem_len, enwik8.eval_clamp_len,
            enwik8.eval_same_length) == (768, 768, 128, 3800, 1000, True)
    wt103 = preset("wikitext103")
    assert (wt103.n_layer, wt103.n_head, wt103.d_inner, wt103.tgt_len, wt103.mem_len, wt103.eval_mem_len,
            wt103.eval_clamp_len, wt103.eval_same_length) == (18, 16, 4096, 384, 384, 1600, 1000, True)
    assert wt103.cutoffs == [20000, 40000, 200000] and wt103.div_val == 4
    small = preset("69m")
    with torch.device("meta"):
        count = sum(p.numel() for name, p in TransformerXL(small).named_parameters() if "word_emb" not in name)
    assert 68e6 < count < 70e6, count
    with pytest.raises(ValueError, match="choose one of"):
        preset("enwik9")


def test_bad_shapes_fail_with_the_fix():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        TransformerXLConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="cutoffs"):
        TransformerXLConfig(vocab_size=50, cutoffs=[30, 10])
