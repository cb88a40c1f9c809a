"""Transformer-XL (Dai et al. 2019), the model of the Top-KAST paper's language-model results.

transformers 5 no longer ships it, so this is our own, following the paper and its
reference code: relative positional attention with the learnable biases u (r_w_bias) and
v (r_r_bias) and the relative shift (Section 3.3), segment-level recurrence with a
memory of `mem_len` hidden states per layer (Section 3.2; a longer `eval_mem_len` in
evaluation), post- or pre-norm residual blocks, and an adaptive embedding tied to an
adaptive log-softmax (Grave et al. 2017; Baevski & Auli 2019) with projections when
d_embed != d_model. Tensors are batch-first: (batch, time, features).

Every projection of every layer (qkv, r, o, both feed-forward maps) is an nn.Linear, so
ds_topkast sparsifies them; the embedding and softmax (`word_emb`, tied) stay dense, as
in the paper.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn


class TransformerXLConfig(BaseModel):
    """Shape and memory of a Transformer-XL; `PRESETS` holds the paper's."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(256, gt=0, description="256 for bytes (enwik8); the word vocabulary for WikiText-103.")
    n_layer: int = Field(2, gt=0)
    d_model: int = Field(64, gt=0)
    n_head: int = Field(4, gt=0)
    d_head: int | None = Field(None, gt=0, description="Default d_model // n_head.")
    d_inner: int = Field(256, gt=0, description="Feed-forward width.")
    d_embed: int | None = Field(None, gt=0, description="Embedding width; default d_model (else projected).")
    tgt_len: int = Field(128, gt=0, description="Segment length in training.")
    mem_len: int = Field(128, ge=0, description="Hidden states kept per layer across segments in training.")
    eval_tgt_len: int | None = Field(None, gt=0, description="Segment length in evaluation; default tgt_len.")
    eval_mem_len: int | None = Field(None, ge=0, description="Memory in evaluation; default mem_len.")
    clamp_len: int | None = Field(None, gt=0, description="Relative distances beyond this use this one's encoding.")
    eval_clamp_len: int | None = Field(None, gt=0, description="clamp_len in evaluation; default clamp_len.")
    same_length: bool = Field(False, description="Every query attends to the same number of keys (the reference's "
                                                 "--same_length): the last mem_len + ... before it, not the whole "
                                                 "memory.")
    eval_same_length: bool | None = Field(None, description="same_length in evaluation; default same_length.")
    dropout: float = Field(0.1, ge=0, lt=1)
    dropatt: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities.")
    pre_lnorm: bool = Field(False, description="Layer norm before (True) or after (False, the paper) each block.")
    untie_r: bool = Field(True, description="One pair of r_w/r_r biases per layer (True) or shared by all.")
    cutoffs: list[int] = Field(default_factory=list, description="Adaptive softmax cluster boundaries.")
    div_val: int = Field(1, ge=1, description="Each tail cluster's embedding is div_val times narrower.")
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "TransformerXLConfig":
        if self.cutoffs and (sorted(set(self.cutoffs)) != self.cutoffs or self.cutoffs[0] <= 0
                             or self.cutoffs[-1] >= self.vocab_size):
            raise ValueError(f"cutoffs {self.cutoffs} must increase strictly inside (0, vocab_size={self.vocab_size})")
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}; set d_head")
        if (self.d_embed or self.d_model) // self.div_val ** len(self.cutoffs) < 1:
            raise ValueError(f"div_val {self.div_val} leaves the last cluster an embedding narrower than 1")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def embed_dim(self) -> int:
        return self.d_embed or self.d_model

    def memory_length(self, training: bool) -> int:
        return self.mem_len if training or self.eval_mem_len is None else self.eval_mem_len

    def segment_length(self, training: bool) -> int:
        return self.tgt_len if training or self.eval_tgt_len is None else self.eval_tgt_len

    def clamp_length(self, training: bool) -> int | None:
        return self.clamp_len if training or self.eval_clamp_len is None else self.eval_clamp_len

    def same_lengths(self, training: bool) -> bool:
        return self.same_length if training or self.eval_same_length is None else self.eval_same_length


PRESETS: dict[str, dict] = {
    # Transformer-XL reference run_enwik8_large.sh (training) and its eval.py command (evaluation); the
    # PyTorch reference shares r_w_bias/r_r_bias across layers. Sources per field: docs/PAPER_CONFIGS.md.
    "enwik8": dict(vocab_size=256, n_layer=24, d_model=1024, n_head=8, d_inner=3072, tgt_len=768, mem_len=768,
                   eval_tgt_len=128, eval_mem_len=3800, eval_clamp_len=1000, eval_same_length=True, dropout=0.15,
                   dropatt=0.15, untie_r=False),
    # Transformer-XL reference run_wt103_large.sh (training) and its eval.py command (evaluation); untie_r as
    # the TF wt103_large_tpu.sh (--untie_r=True). vocab_size is replaced by the corpus's. docs/PAPER_CONFIGS.md.
    "wikitext103": dict(vocab_size=267735, n_layer=18, d_model=1024, n_head=16, d_inner=4096, d_embed=1024,
                        tgt_len=384, mem_len=384, eval_tgt_len=128, eval_mem_len=1600, eval_clamp_len=1000,
                        eval_same_length=True, dropout=0.2, dropatt=0.2, cutoffs=[20000, 40000, 200000], div_val=4),
    # The 69M-parameter model (24 layers of d_model 512, d_ff 1536, 8 heads): no source found for its shape
    # (the Top-KAST paper's appendix was not available to us). Evaluation: run_enwik8_base.sh's eval.py command.
    "69m": dict(vocab_size=256, n_layer=24, d_model=512, n_head=8, d_inner=1536, tgt_len=512, mem_len=512,
                eval_tgt_len=80, eval_mem_len=2100, eval_clamp_len=820, eval_same_length=True, dropout=0.1),
    # CPU-sized: trains in minutes on 2 cores.
    "cpu_small": dict(vocab_size=256, n_layer=4, d_model=128, n_head=4, d_inner=512, tgt_len=128, mem_len=128,
                      eval_mem_len=256, dropout=0.0),
    "tiny": dict(vocab_size=256, n_layer=2, d_model=32, n_head=2, d_inner=64, tgt_len=16, mem_len=16,
                 eval_mem_len=32, dropout=0.0),
}


def preset(name: str, **overrides) -> TransformerXLConfig:
    """A preset's config with `overrides` applied; unknown names list the presets."""
    if name not in PRESETS:
        raise ValueError(f"Unknown Transformer-XL preset {name!r}; choose one of {sorted(PRESETS)}.")
    return TransformerXLConfig(**{**PRESETS[name], **overrides})


def rel_shift(scores: Tensor) -> Tensor:
    """Turn scores against relative encodings into scores against key positions.

    `scores[..., i, c]` pairs query i with the encoding of distance klen-1-c; the result's
    `[..., i, j]` pairs it with key j, i.e. distance (klen - qlen + i) - j. Entries with
    j after the query are garbage and must be masked. (Dai et al. 2019, Appendix B.)
    """
    *lead, qlen, klen = scores.shape
    padded = F.pad(scores, (1, 0)).view(*lead, klen + 1, qlen)
    return padded[..., 1:, :].view(*lead, qlen, klen)


def attention_mask(qlen: int, mlen: int, device: torch.device, same_length_memory: int | None = None) -> Tensor:
    """True where query i (at position mlen + i) must not see key j.

    Always the keys after it (j > mlen + i). With `same_length_memory` m, the reference's
    same_length with m its mem_len: also the keys more than m - 1 before it, so every
    query sees its last m keys (itself included), the first of a segment as many as the
    last (the reference masks tril(ones, -(qlen - (klen - m))) when klen > m).
    """
    ones = torch.ones(qlen, mlen + qlen, dtype=torch.bool, device=device)
    mask = ones.triu(1 + mlen)
    if same_length_memory is not None:
        excess = mlen + qlen - same_length_memory
        mask = mask | ones.tril(-(qlen - excess) if excess > 0 else -qlen)
    return mask


def sinusoid_encodings(klen: int, d_model: int, clamp_len: int | None, device, dtype) -> Tensor:
    """Encodings of distances klen-1, ..., 0 (descending, as rel_shift expects): (klen, d_model)."""
    distance = torch.arange(klen - 1, -1, -1.0, device=device)
    if clamp_len is not None:
        distance = distance.clamp(max=clamp_len)
    inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=device) / d_model))
    angles = distance[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


class RelativeMultiHeadAttention(nn.Module):
    """Multi-head attention over [memory; segment] with relative positions (Dai et al. 2019, eq. 4)."""

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.head_dim
        width = cfg.n_head * cfg.head_dim
        self.qkv_net = nn.Linear(cfg.d_model, 3 * width, bias=False)
        self.r_net = nn.Linear(cfg.d_model, width, bias=False)
        self.o_net = nn.Linear(width, cfg.d_model, bias=False)
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.dropatt = nn.Dropout(cfg.dropatt)
        self.pre_lnorm = cfg.pre_lnorm
        self.scale = 1 / math.sqrt(cfg.head_dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.n_head, self.d_head).transpose(-3, -2)

    def forward(self, h: Tensor, pos: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, mask: Tensor,
                memory: Tensor | None) -> Tensor:
        context = h if memory is None else torch.cat([memory, h], dim=1)
        qlen = h.shape[1]
        q, k, v = self.qkv_net(self.layer_norm(context) if self.pre_lnorm else context).chunk(3, dim=-1)
        q, k, v = self._heads(q[:, -qlen:]), self._heads(k), self._heads(v)  # (B, H, T|K, Dh)
        r = self.r_net(pos).view(-1, self.n_head, self.d_head).transpose(0, 1)  # (H, K, Dh)
        content = (q + r_w_bias[:, None]) @ k.transpose(-1, -2)  # terms (a) + (c)
        position = rel_shift((q + r_r_bias[:, None]) @ r.transpose(-1, -2))  # terms (b) + (d)
        scores = ((content + position) * self.scale).float().masked_fill(mask, float("-inf"))
        probs = self.dropatt(scores.softmax(dim=-1).to(v.dtype))
        attended = (probs @ v).transpose(1, 2).reshape(h.shape[0], qlen, -1)
        out = h + self.drop(self.o_net(attended))
        return out if self.pre_lnorm else self.layer_norm(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_inner)
        self.fc2 = nn.Linear(cfg.d_inner, cfg.d_model)
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_lnorm = cfg.pre_lnorm

    def forward(self, h: Tensor) -> Tensor:
        inner = self.drop(F.relu(self.fc1(self.layer_norm(h) if self.pre_lnorm else h)))
        out = h + self.drop(self.fc2(inner))
        return out if self.pre_lnorm else self.layer_norm(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.attn = RelativeMultiHeadAttention(cfg)
        self.ff = PositionwiseFeedForward(cfg)

    def forward(self, h, pos, r_w_bias, r_r_bias, mask, memory):
        return self.ff(self.attn(h, pos, r_w_bias, r_r_bias, mask, memory))


class AdaptiveEmbedding(nn.Module):
    """Adaptive input embedding tied to the adaptive log-softmax over the same clusters.

    Cluster i covers token ids [bounds[i], bounds[i+1]) with embeddings of width
    d_embed // div_val**i, projected to d_model when narrower (the projection is tied
    too). The head scores the first cluster's tokens plus one logit per tail cluster;
    log p(token in tail i) = log p_head(cluster i) + log p_i(token | cluster i).
    """

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.bounds = [0, *cfg.cutoffs, cfg.vocab_size]
        self.d_model = cfg.d_model
        widths = [cfg.embed_dim // cfg.div_val ** i for i in range(len(self.bounds) - 1)]
        self.embeddings = nn.ModuleList(nn.Embedding(r - l, w) for l, r, w in zip(self.bounds, self.bounds[1:], widths))
        self.projections = nn.ParameterDict({str(i): nn.Parameter(torch.empty(cfg.d_model, w))
                                             for i, w in enumerate(widths) if w != cfg.d_model})
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(r - l)) for l, r in zip(self.bounds, self.bounds[1:]))
        n_tails = len(cfg.cutoffs)
        self.cluster_weight = nn.Parameter(torch.zeros(n_tails, widths[0])) if n_tails else None
        self.cluster_bias = nn.Parameter(torch.zeros(n_tails)) if n_tails else None

    def _to_model(self, i: int, x: Tensor) -> Tensor:
        key = str(i)
        return F.linear(x, self.projections[key]) if key in self.projections else x

    def _from_model(self, i: int, h: Tensor) -> Tensor:
        key = str(i)
        return h @ self.projections[key] if key in self.projections else h

    def forward(self, ids: Tensor) -> Tensor:
        """Embeddings of `ids` in d_model, scaled by sqrt(d_model) as in the reference code."""
        if len(self.embeddings) == 1:
            return self._to_model(0, self.embeddings[0](ids)) * math.sqrt(self.d_model)
        flat = ids.reshape(-1)
        out = None
        for i, (low, high) in enumerate(zip(self.bounds, self.bounds[1:])):
            rows = ((flat >= low) & (flat < high)).nonzero().squeeze(1)  # embed each token in its own cluster only
            part = self._to_model(i, self.embeddings[i](flat[rows] - low))
            out = part.new_zeros(flat.numel(), self.d_model) if out is None else out
            out = out.index_copy(0, rows, part)
        return out.view(*ids.shape, self.d_model) * math.sqrt(self.d_model)

    def _cluster_log_probs(self, i: int, h: Tensor) -> Tensor:
        weight, bias = self.embeddings[i].weight, self.biases[i]
        if i == 0 and self.cluster_weight is not None:
            weight, bias = torch.cat([weight, self.cluster_weight]), torch.cat([bias, self.cluster_bias])
        return F.linear(self._from_model(i, h), weight, bias).float().log_softmax(dim=-1)

    def log_probs(self, h: Tensor) -> Tensor:
        """Log-probabilities of the whole vocabulary, (..., vocab_size) in fp32."""
        head = self._cluster_log_probs(0, h)
        shortlist = self.bounds[1] - self.bounds[0]
        parts = [head[..., :shortlist]]
        for i in range(1, len(self.embeddings)):
            parts.append(head[..., shortlist + i - 1, None] + self._cluster_log_probs(i, h))
        return torch.cat(parts, dim=-1)

    def target_log_probs(self, h: Tensor, targets: Tensor) -> Tensor:
        """log p(targets) without forming the full vocabulary for tail tokens: h (N, d), targets (N,)."""
        head = self._cluster_log_probs(0, h)
        shortlist = self.bounds[1]
        out = head.gather(1, targets.clamp(max=shortlist - 1)[:, None]).squeeze(1)
        for i in range(1, len(self.embeddings)):
            low, high = self.bounds[i], self.bounds[i + 1]
            rows = ((targets >= low) & (targets < high)).nonzero().squeeze(1)
            # computed when no target falls in the cluster too: every rank's graph then holds every parameter,
            # as ZeRO's gradient reduction needs
            tail = self._cluster_log_probs(i, h[rows]).gather(1, (targets[rows] - low)[:, None]).squeeze(1)
            out = out.index_put((rows,), head[rows, shortlist + i - 1] + tail)
        return out


class TransformerXLOutput(NamedTuple):
    """loss: mean NLL (nats) over the targets; token_nll: per target; mems: next segment's memory.

    A NamedTuple, not a dataclass: DeepSpeed's ZeRO-3 hooks the output tensors of tuples,
    lists and dicts for its backward gathers, and would miss a dataclass's.
    """

    loss: Tensor | None
    token_nll: Tensor | None
    hidden: Tensor
    mems: list[Tensor]


class TransformerXL(nn.Module):
    """Transformer-XL language model. `forward(input_ids, targets, mems)` on one segment.

    `targets[b, t]` is the token after `input_ids[b, t]` (already shifted), so consecutive
    segments of a stream are `stream[s*T : s*T+T]` with targets one further; pass each
    call's `mems` to the next. The memory length is `mem_len` in train mode and
    `eval_mem_len` in eval mode.
    """

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.config = cfg
        self.word_emb = AdaptiveEmbedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        bias_shape = (cfg.n_layer, cfg.n_head, cfg.head_dim) if cfg.untie_r else (cfg.n_head, cfg.head_dim)
        self.r_w_bias = nn.Parameter(torch.zeros(bias_shape))
        self.r_r_bias = nn.Parameter(torch.zeros(bias_shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference code's init: N(0, init_std) weights, N(0, init_std/2) projections, zero biases."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for projection in self.word_emb.projections.values():
            nn.init.normal_(projection, 0.0, std / 2)
        if self.word_emb.cluster_weight is not None:
            nn.init.normal_(self.word_emb.cluster_weight, 0.0, std)
        nn.init.normal_(self.r_w_bias, 0.0, std)
        nn.init.normal_(self.r_r_bias, 0.0, std)

    def _layer_biases(self, i: int) -> tuple[Tensor, Tensor]:
        if self.config.untie_r:
            return self.r_w_bias[i], self.r_r_bias[i]
        return self.r_w_bias, self.r_r_bias

    def _update_mems(self, mems: list[Tensor] | None, inputs: list[Tensor]) -> list[Tensor]:
        keep = self.config.memory_length(self.training)
        if keep == 0:
            return []
        with torch.no_grad():
            if mems is None:
                return [h[:, -keep:].detach() for h in inputs]
            return [torch.cat([m, h], dim=1)[:, -keep:].detach() for m, h in zip(mems, inputs)]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                mems: list[Tensor] | None = None) -> TransformerXLOutput:
        mems = mems or None
        h = self.drop(self.word_emb(input_ids))
        qlen, mlen = input_ids.shape[1], (0 if mems is None else mems[0].shape[1])
        memory = self.config.memory_length(self.training)
        same_length = memory if self.config.same_lengths(self.training) and memory > 0 else None
        mask = attention_mask(qlen, mlen, h.device, same_length)
        pos = self.drop(sinusoid_encodings(mlen + qlen, self.config.d_model, self.config.clamp_length(self.training),
                                           h.device, h.dtype))
        layer_inputs = []
        for i, layer in enumerate(self.layers):
            layer_inputs.append(h)
            h = layer(h, pos, *self._layer_biases(i), mask, None if mems is None else mems[i])
        h = self.drop(h)
        new_mems = self._update_mems(mems, layer_inputs)
        if targets is None:
            return TransformerXLOutput(None, None, h, new_mems)
        nll = -self.word_emb.target_log_probs(h.reshape(-1, h.shape[-1]), targets.reshape(-1)).view(targets.shape)
        return TransformerXLOutput(nll.mean(), nll, h, new_mems)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """Next-token log-probabilities over the vocabulary from `hidden` states."""
        return self.word_emb.log_probs(hidden)

    def parameters_read_outside_their_forward(self) -> list[nn.Parameter]:
        """The tied softmax's parameters: the output side reads the embedding's tables, projections and biases
        directly, not through their modules' forward (which is where ZeRO-3 gathers a partitioned parameter)."""
        return list(self.word_emb.parameters())
