"""The training command's model runners: transformers LMs by type, config or weights; Transformer-XL with memory."""
import numpy as np
import pytest
import torch
from corpora import in_memory_corpus

from ds_topkast.config import TopKASTConfigError
from ds_topkast.lm.models.runners import CausalLMRunner, TransformerXLRunner, make_runner

CORPUS = in_memory_corpus({"train": (np.arange(6000) * 7 % 256).astype(np.uint8),
                           "valid": (np.arange(800) % 256).astype(np.uint8),
                           "test": (np.arange(700) % 256).astype(np.uint8)}, 256, "byte")
SMALL = {"gpt2": {"n_layer": 1, "n_embd": 16, "n_head": 2},
         "llama": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                   "num_key_value_heads": 1},
         "gpt_neox": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}}


@pytest.mark.parametrize("model_type", list(SMALL))
def test_transformers_families_build_from_a_model_type_and_train(model_type):
    family = make_runner({"type": model_type, **SMALL[model_type]}, CORPUS, 16, rows=2, seed=0, world=1,
                         accumulation=1)
    assert isinstance(family, CausalLMRunner)
    model = family.build_model()
    assert model.config.vocab_size == 256
    loss = family.train_loss(model, step=0, micro=0, rank=0, world=1)
    assert torch.isfinite(loss) and loss.requires_grad
    sums = family.eval_sums(model, "valid", 2, rank=0, world=1)
    assert sums[1] == 2 * 2 * 15
    assert family.eval_sums(model, "test", None, 0, 1)[1] == (700 - 1) // 15 * 15, "the whole split, in order"


def test_local_weights_and_config_folders(tmp_path):
    source = make_runner({"type": "gpt2", **SMALL["gpt2"]}, CORPUS, 16, 2, 0, 1, 1).build_model()
    source.save_pretrained(tmp_path / "model")
    loaded = make_runner({"pretrained": str(tmp_path / "model")}, CORPUS, 16, 2, 0, 1, 1).build_model()
    torch.testing.assert_close(loaded.transformer.h[0].mlp.c_fc.weight, source.transformer.h[0].mlp.c_fc.weight)
    fresh = make_runner({"config": str(tmp_path / "model")}, CORPUS, 16, 2, 0, 1, 1).build_model()
    assert fresh.config.n_embd == 16


@pytest.mark.parametrize("spec,message", [
    ({"type": "gpt2", "pretrained": "x"}, "exactly one of"),
    ({"n_layer": 2}, "exactly one of"),
    ({"type": "gpt2", "vocab_size": 100, **SMALL["gpt2"]}, "smaller than the corpus"),
    ({"pretrained": "/no/such/folder"}, "could not be built"),
    ({"type": "transformer_xl", "preset": "enwik9"}, "choose one of"),
    ({"type": "transformer_xl", "d_model": 30, "n_head": 4}, "not divisible"),
])
def test_bad_model_specs_fail_at_start(spec, message):
    with pytest.raises(TopKASTConfigError, match=message):
        make_runner(spec, CORPUS, 16, 2, 0, 1, 1).build_model()


def test_transformer_xl_keeps_one_memory_per_stream_chunk_and_checkpoints_them():
    """Accumulation 2 of 1 row trains the streams of accumulation 1 of 2 rows: same losses, same memories."""
    chunked = make_runner({"type": "transformer_xl", "preset": "tiny"}, CORPUS, 8, rows=1, seed=0, world=1,
                          accumulation=2)
    whole = make_runner({"type": "transformer_xl", "preset": "tiny"}, CORPUS, 8, rows=2, seed=0, world=1,
                        accumulation=1)
    assert isinstance(chunked, TransformerXLRunner) and chunked.config.tgt_len == 8
    model = chunked.build_model()
    assert chunked.state_dict() == {"mems": [None, None]}
    for step in range(2):
        both = whole.train_loss(model, step, 0, 0, 1)
        parts = [chunked.train_loss(model, step, micro, 0, 1) for micro in range(2)]
        torch.testing.assert_close(torch.stack(parts).mean(), both)
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(torch.cat([chunked.mems[0][layer], chunked.mems[1][layer]]), whole.mems[0][layer])
    other = make_runner({"type": "transformer_xl", "preset": "tiny"}, CORPUS, 8, 1, 0, 1, 2)
    other.load_state_dict(chunked.state_dict())
    assert torch.equal(other.mems[1][0], chunked.mems[1][0])
    with pytest.raises(TopKASTConfigError, match="for 2 stream chunks of \\[1\\] rows per rank, this run has 1"):
        whole.load_state_dict(chunked.state_dict())


def test_a_new_pass_over_the_streams_starts_without_memory():
    """As the reference resets its memory every epoch: the first segment of pass two is trained like pass one's."""
    runner = make_runner({"type": "transformer_xl", "preset": "tiny"}, CORPUS, 8, 2, 0, 1, 1)
    model = runner.build_model().eval()
    first = runner.train_loss(model, 0, 0, 0, 1)
    runner.train_loss(model, runner.batches.segments - 1, 0, 0, 1)
    assert runner.mems[0] is not None
    torch.testing.assert_close(runner.train_loss(model, runner.batches.segments, 0, 0, 1), first)
