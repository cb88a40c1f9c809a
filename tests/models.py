"""Tiny models and DeepSpeed configs the tests build from scratch (random init, no downloads)."""
from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 64


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(GPT2Config(**cfg))


def gpt2_engine(cfg: dict, **overrides):
    """ds_topkast's engine over a fresh tiny_gpt2 (seed 0; `overrides` change its shape)."""
    import ds_topkast

    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(seed=0, **overrides), config=cfg)
    return engine


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def tiny_neox(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0))


class MLP(nn.Module):
    """A plain nn.Module model: no transformers involved."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.fc2(torch.relu(self.fc1(self.embed(input_ids)))))
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def ds_config(stage: int = 0, bf16: bool = False, gas: int = 1, micro_batch: int = 4, lr: float = 1e-2,
              weight_decay: float = 0.0, optimizer: str | None = "AdamW", torch_adam: bool = True,
              offload_optimizer: bool = False, **topkast) -> dict:
    section = {"forward_sparsity": 0.8, "backward_sparsity": 0.6, "refresh_interval": 3}
    section.update(topkast)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9,
              "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
              "topkast": section}
    if optimizer is not None:
        params = {"lr": lr, "weight_decay": weight_decay}
        if "Adam" in optimizer and torch_adam:
            params["torch_adam"] = True  # torch's Adam: no JIT build of DeepSpeed's fused Adam
        config["optimizer"] = {"type": optimizer, "params": params}
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config


def partitioned_zero3_config(**kwargs) -> dict:
    """ds_config at ZeRO-3, refreshing every 2 steps, with every layer really partitioned between passes (else
    ZeRO-3 keeps a tiny model's parameters whole)."""
    cfg = ds_config(stage=3, **{"refresh_interval": 2, **kwargs})
    cfg["zero_optimization"].update(
        stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_max_live_parameters=0)
    return cfg


def batches(n: int, micro_batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (micro_batch, seq), generator=gen) for _ in range(n)]


def lm_loss(call, batch):
    out = call(input_ids=batch, labels=batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
