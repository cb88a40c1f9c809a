"""Our Transformer-XL evaluation against an independent rewrite of the reference's (tests/reference_txl_eval.py)."""
import math

import numpy as np
import pytest
import torch
from corpora import in_memory_corpus
from reference_txl_eval import reference_eval_loss, reference_mask

from ds_topkast.lm.models.runners import make_runner
from ds_topkast.lm.models.transformer_xl import attention_mask, sinusoid_encodings

EVAL = {"eval_tgt_len": 6, "eval_mem_len": 10, "eval_clamp_len": 7, "eval_same_length": True}


@pytest.mark.parametrize("qlen,mlen,mem_len", [(4, 0, 10), (6, 10, 10), (6, 4, 10), (5, 3, 4), (8, 8, 3)])
@pytest.mark.parametrize("same_length", [False, True])
def test_the_attention_mask_is_the_references(qlen, mlen, mem_len, same_length):
    ours = attention_mask(qlen, mlen, torch.device("cpu"), mem_len if same_length else None)
    assert torch.equal(ours, reference_mask(qlen, mlen, mem_len, same_length))


def test_clamp_len_gives_far_distances_the_clamped_encoding():
    encodings = sinusoid_encodings(20, 8, 7, "cpu", torch.float32)  # distances 19 ... 0
    assert torch.equal(encodings[0], encodings[12]) and not torch.equal(encodings[12], encodings[13])


def runner_and_model(valid: np.ndarray, **model):
    corpus = in_memory_corpus({"train": np.arange(3000) % 50, "valid": valid, "test": valid}, 50)
    runner = make_runner({"type": "transformer_xl", "preset": "tiny", "vocab_size": 50, **model}, corpus, 8, rows=2,
                         seed=0, world=1, accumulation=1, eval_streams=4)
    torch.manual_seed(0)
    return runner, runner.build_model().eval()


@pytest.mark.parametrize("world", [1, 3, 5])
def test_our_eval_loop_equals_the_references_on_any_number_of_ranks(world):
    valid = np.random.default_rng(0).integers(0, 50, 251)  # 4 streams of 62: reads of 6, ..., 6, 1
    runner, model = runner_and_model(valid, **EVAL)
    expected = reference_eval_loss(model, torch.from_numpy(valid), bsz=4, bptt=6)
    sums = sum(runner.eval_sums(model, "valid", None, rank, world) for rank in range(world))
    assert sums[1] == 4 * 61
    assert math.isclose(sums[0] / sums[1], expected, rel_tol=1e-6)
    assert runner.protocol(None) == {"tgt_len": 6, "mem_len": 10, "clamp_len": 7, "same_length": True, "streams": 4,
                                     "segments": "all"}


def test_same_length_and_clamp_len_change_evaluation_only():
    valid = np.random.default_rng(1).integers(0, 50, 400)
    runner, model = runner_and_model(valid, init_std=0.5, **EVAL)  # weights large enough for attention to matter
    plain_runner, plain = runner_and_model(valid, init_std=0.5, eval_tgt_len=6, eval_mem_len=10)
    plain.load_state_dict(model.state_dict())
    ours, without = (r.eval_sums(m, "valid", None, 0, 1) for r, m in ((runner, model), (plain_runner, plain)))
    assert abs(ours[0] - without[0]) > 1e-3 * ours[0], "the evaluation settings reach the model"
    batch = torch.from_numpy(valid[:33].astype(np.int64)).view(1, 33)
    model.train(), plain.train()
    torch.testing.assert_close(model(batch[:, :-1], batch[:, 1:]).loss, plain(batch[:, :-1], batch[:, 1:]).loss)
