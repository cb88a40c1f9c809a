"""The training command's model families: transformers LMs by type, config or weights; Transformer-XL with memory."""
import pytest
import torch

from ds_topkast.config import TopKASTConfigError
from ds_topkast.data import Corpus
from ds_topkast.families import CausalLMFamily, TransformerXLFamily, make_family

CORPUS = Corpus((torch.arange(6000) * 7 % 256).to(torch.uint8), (torch.arange(800) % 256).to(torch.uint8), 256,
                "byte", "test")
SMALL = {"gpt2": {"n_layer": 1, "n_embd": 16, "n_head": 2},
         "llama": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                   "num_key_value_heads": 1},
         "gpt_neox": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}}


@pytest.mark.parametrize("model_type", list(SMALL))
def test_transformers_families_build_from_a_model_type_and_train(model_type):
    family = make_family({"type": model_type, **SMALL[model_type]}, CORPUS, 16, rows=2, seed=0, world=1,
                         accumulation=1)
    assert isinstance(family, CausalLMFamily)
    model = family.build_model()
    assert model.config.vocab_size == 256
    loss = family.train_loss(model, step=0, micro=0, rank=0, world=1)
    assert torch.isfinite(loss) and loss.requires_grad
    sums = family.eval_sums(model, 2, rank=0, world=1)
    assert sums[1] == 2 * 2 * 15


def test_local_weights_and_config_folders(tmp_path):
    source = make_family({"type": "gpt2", **SMALL["gpt2"]}, CORPUS, 16, 2, 0, 1, 1).build_model()
    source.save_pretrained(tmp_path / "model")
    loaded = make_family({"pretrained": str(tmp_path / "model")}, CORPUS, 16, 2, 0, 1, 1).build_model()
    torch.testing.assert_close(loaded.transformer.h[0].mlp.c_fc.weight, source.transformer.h[0].mlp.c_fc.weight)
    fresh = make_family({"config": str(tmp_path / "model")}, CORPUS, 16, 2, 0, 1, 1).build_model()
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
        make_family(spec, CORPUS, 16, 2, 0, 1, 1).build_model()


def test_transformer_xl_family_carries_and_checkpoints_its_memory():
    family = make_family({"type": "transformer_xl", "preset": "tiny"}, CORPUS, 8, rows=2, seed=0, world=1,
                         accumulation=2)
    assert isinstance(family, TransformerXLFamily) and family.config.tgt_len == 8
    model = family.build_model()
    assert family.state_dict() == {"mems": None}
    family.train_loss(model, 0, 0, 0, 1)
    first = [m.clone() for m in family.state_dict()["mems"]]
    family.train_loss(model, 0, 1, 0, 1)  # micro-batch 1 of step 0: the next segment, with memory
    assert len(first) == model.config.n_layer and not torch.equal(family.mems[0], first[0])
    other = make_family({"type": "transformer_xl", "preset": "tiny"}, CORPUS, 8, 2, 0, 1, 2)
    other.load_state_dict({"mems": first})
    assert torch.equal(other.mems[0], first[0])
