"""The model families the training command trains, behind one small interface.

`CausalLMFamily`: any transformers `AutoModelForCausalLM` (GPT-2, Llama, GPT-NeoX, ...)
from a model_type with config fields, a config name or path, or local weights, trained on
random windows. `TransformerXLFamily`: our Transformer-XL, trained on contiguous streams
with its memory carried from segment to segment (and saved in checkpoints, per rank, so
a resumed run continues with the memory it had).

Each family builds its model, gives the loss of one micro-batch, the summed NLL of the
eval set (with Transformer-XL's longer evaluation memory), and any per-rank state a
checkpoint must carry.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ds_topkast.config import TopKASTConfigError
from ds_topkast.data import Corpus, StreamBatches, WindowBatches

TRANSFORMER_XL = "transformer_xl"


def device_of(engine) -> torch.device:
    """The engine's device (its accelerator, or the CPU on DeepSpeed's CPU accelerator), or a plain model's."""
    return engine.device if hasattr(engine, "device") else next(engine.parameters()).device


def to_device(batch: Tensor, engine) -> Tensor:
    """A host batch where the engine runs."""
    return batch.to(device_of(engine), non_blocking=True)


class CausalLMFamily:
    """transformers causal LMs on random windows of `seq_len` tokens."""

    def __init__(self, spec: dict[str, Any], corpus: Corpus, seq_len: int | None, rows: int, seed: int):
        self.spec, self.corpus, self.rows, self.seed = dict(spec), corpus, rows, seed
        self.seq_len = seq_len or 128
        self.batches = WindowBatches(corpus, self.seq_len, seed)
        self.tokens_per_row = self.seq_len

    def build_model(self) -> nn.Module:
        """A causal LM from exactly one of: "type" (random init), "config" (name/path, random init), "pretrained"."""
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = dict(self.spec)
        sources = {key: fields.pop(key) for key in ("type", "config", "pretrained") if key in fields}
        if len(sources) != 1:
            raise TopKASTConfigError(
                'train.model needs exactly one of "type" (a transformers model_type such as "gpt2", "llama", '
                '"gpt_neox", or "transformer_xl"), "config" (a config name or folder) or "pretrained" '
                f"(a model folder with weights); it has {sorted(sources) or 'none'}.")
        (source, value), = sources.items()
        torch.manual_seed(self.seed)  # identical initial weights (and so identical dense stores) on every rank
        try:
            if source == "pretrained":
                model = AutoModelForCausalLM.from_pretrained(value, **fields)
            else:
                if source == "type":
                    fields.setdefault("vocab_size", self.corpus.vocab_size)
                    fields.setdefault("n_positions" if value == "gpt2" else "max_position_embeddings", self.seq_len)
                    fields.setdefault("bos_token_id", 0)
                    fields.setdefault("eos_token_id", 0)
                    config = AutoConfig.for_model(value, **fields)
                else:
                    config = AutoConfig.from_pretrained(value, **fields)
                model = AutoModelForCausalLM.from_config(config)
        except (OSError, ValueError, TypeError) as err:
            raise TopKASTConfigError(f"train.model {source} {value!r} could not be built: {err}") from None
        if model.config.vocab_size < self.corpus.vocab_size:
            raise TopKASTConfigError(
                f"train.model has a vocabulary of {model.config.vocab_size}, smaller than the corpus's "
                f"{self.corpus.vocab_size} (tokenizer {self.corpus.unit}); match data.tokenizer to the model.")
        return model

    def train_loss(self, engine, step: int, micro: int, rank: int, world: int) -> Tensor:
        batch = to_device(self.batches.train_batch(step, micro, self.rows, rank, world), engine)
        return engine(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def eval_sums(self, engine, count: int | None, rank: int, world: int) -> Tensor:
        """[summed NLL in nats, predicted tokens] over this rank's share of the eval windows (on the device)."""
        sums = torch.zeros(2, dtype=torch.float64, device=device_of(engine))
        for batch in self.batches.eval_batches(self.rows, count or 8, rank, world):
            batch = to_device(batch, engine)
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            sums[0] += engine(input_ids=batch, labels=batch).loss.double() * predicted
            sums[1] += predicted
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        pass


class TransformerXLFamily:
    """ds_topkast's Transformer-XL on one contiguous stream per batch row, memory carried across steps."""

    def __init__(self, spec: dict[str, Any], corpus: Corpus, seq_len: int | None, rows: int, seed: int,
                 world: int, accumulation: int):
        from ds_topkast.models.transformer_xl import TransformerXLConfig, preset

        fields = {k: v for k, v in spec.items() if k != "type"}
        name = fields.pop("preset", None)
        fields.setdefault("vocab_size", corpus.vocab_size)
        if seq_len is not None:
            fields["tgt_len"] = seq_len
        try:
            self.config = preset(name, **fields) if name else TransformerXLConfig(**fields)
        except ValueError as err:
            raise TopKASTConfigError(f"train.model (transformer_xl): {err}") from None
        if self.config.vocab_size < corpus.vocab_size:
            raise TopKASTConfigError(f"train.model.vocab_size {self.config.vocab_size} is smaller than the corpus's "
                                     f"{corpus.vocab_size}; leave it out to take the corpus's.")
        self.rows, self.seed, self.accumulation = rows, seed, accumulation
        eval_len = self.config.segment_length(training=False)
        self.batches = StreamBatches(corpus, self.config.tgt_len, eval_len, rows * world, rows * world)
        self.tokens_per_row = self.config.tgt_len
        self.mems: list[Tensor] | None = None

    def build_model(self) -> nn.Module:
        from ds_topkast.models.transformer_xl import TransformerXL

        torch.manual_seed(self.seed)
        return TransformerXL(self.config)

    def train_loss(self, engine, step: int, micro: int, rank: int, world: int) -> Tensor:
        batch = to_device(self.batches.train_batch(step * self.accumulation + micro, rank, self.rows), engine)
        out = engine(input_ids=batch[:, :-1], targets=batch[:, 1:], mems=self.mems)
        self.mems = out.mems
        return out.loss

    @torch.no_grad()
    def eval_sums(self, engine, count: int | None, rank: int, world: int) -> Tensor:
        """[summed NLL, tokens] over this rank's eval streams, segment by segment with the evaluation memory."""
        sums, mems = torch.zeros(2, dtype=torch.float64, device=device_of(engine)), None
        for batch in self.batches.eval_batches(rank, self.rows, count):
            batch = to_device(batch, engine)
            out = engine(input_ids=batch[:, :-1], targets=batch[:, 1:], mems=mems)
            mems = out.mems
            sums[0] += out.token_nll.double().sum()
            sums[1] += out.token_nll.numel()
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {"mems": self.mems}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Take saved per-rank state; the memory goes back to `device`, where the model runs."""
        mems = state.get("mems")
        self.mems = None if mems is None else [m.to(device) for m in mems]


def make_family(spec: dict[str, Any], corpus: Corpus, seq_len: int | None, rows: int, seed: int, world: int,
                accumulation: int):
    """The family a train.model spec names: "type": "transformer_xl" or any transformers model."""
    if spec.get("type") == TRANSFORMER_XL:
        return TransformerXLFamily(spec, corpus, seq_len, rows, seed, world, accumulation)
    return CausalLMFamily(spec, corpus, seq_len, rows, seed)
