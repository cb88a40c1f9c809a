"""How the training command runs each kind of model on the corpus, behind one small interface.

`CausalLMRunner`: any transformers `AutoModelForCausalLM` (GPT-2, Llama, GPT-NeoX, ...)
from a model_type with config fields, a config name or path, or local weights, trained on
random windows. `TransformerXLRunner`: our Transformer-XL, trained on contiguous streams
with one memory per stream chunk carried from segment to segment (and saved in
checkpoints, per rank, so a resumed run continues with the memory it had).

Each runner builds its model, gives the loss of one micro-batch, the summed NLL of a
split under its evaluation protocol (Transformer-XL's: the reference's segment, memory,
clamp_len, same_length and stream count), the protocol itself for the records, and any
per-rank state a checkpoint must carry.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ds_topkast.config import TopKASTConfigError
from ds_topkast.lm.data.batches import EvalBatch, StreamBatches, WindowBatches, eval_streams
from ds_topkast.lm.data.corpus_cache import PreparedCorpus

TRANSFORMER_XL = "transformer_xl"


def device_of(engine) -> torch.device:
    """The engine's device (its accelerator, or the CPU on DeepSpeed's CPU accelerator), or a plain model's."""
    return engine.device if hasattr(engine, "device") else next(engine.parameters()).device


def to_device(batch: Tensor, engine) -> Tensor:
    """A host batch where the engine runs."""
    return batch.to(device_of(engine), non_blocking=True)


class CausalLMRunner:
    """transformers causal LMs on random windows of `seq_len` tokens."""

    def __init__(self, spec: dict[str, Any], corpus: PreparedCorpus, seq_len: int | None, rows: int, seed: int):
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

    def eval_batches(self, split: str, count: int | None, rank: int, world: int) -> Iterator[EvalBatch]:
        return self.batches.eval_batches(split, self.rows, count, rank, world)

    def protocol(self, count: int | None) -> dict[str, Any]:
        return {"window": self.seq_len, "windows": "every window in order" if count is None else
                f"{count} batches of {self.rows} evenly spaced windows per rank"}

    @torch.no_grad()
    def eval_sums(self, engine, split: str, count: int | None, rank: int, world: int) -> Tensor:
        """[summed NLL in nats, predicted tokens] over this rank's share of the split's windows (on the device)."""
        sums = torch.zeros(2, dtype=torch.float64, device=device_of(engine))
        for batch in self.eval_batches(split, count, rank, world):
            tokens = to_device(batch.tokens, engine)
            loss = engine(input_ids=tokens, labels=tokens).loss
            if batch.counted:
                predicted = tokens.shape[0] * (tokens.shape[1] - 1)
                sums[0] += loss.double() * predicted
                sums[1] += predicted
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        pass


class TransformerXLRunner:
    """ds_topkast's Transformer-XL on contiguous streams, one memory per stream chunk carried across steps.

    The global batch's streams (train_batch_size of them) are split among ranks and,
    within a rank, among the gradient accumulation micro-steps (the reference's
    batch_chunk): micro-step u of rank r trains streams [(r * G + u) * rows, ... + rows)
    on segment `step`, with chunk u's own memory.
    """

    def __init__(self, spec: dict[str, Any], corpus: PreparedCorpus, seq_len: int | None, rows: int, seed: int,
                 world: int, accumulation: int, eval_streams: int = 10):
        from ds_topkast.lm.models.transformer_xl import TransformerXLConfig, preset

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
        self.corpus, self.rows, self.seed, self.accumulation = corpus, rows, seed, accumulation
        self.eval_streams, self.eval_segment = eval_streams, self.config.segment_length(training=False)
        self.batches = StreamBatches(corpus, self.config.tgt_len, rows * world * accumulation)
        self.tokens_per_row = self.config.tgt_len
        self.mems: list[list[Tensor] | None] = [None] * accumulation

    def build_model(self) -> nn.Module:
        from ds_topkast.lm.models.transformer_xl import TransformerXL

        torch.manual_seed(self.seed)
        return TransformerXL(self.config)

    def train_loss(self, engine, step: int, micro: int, rank: int, world: int) -> Tensor:
        first_row = (rank * self.accumulation + micro) * self.rows
        if self.batches.starts_pass(step):  # a new pass starts without memory, as the reference's epochs do
            self.mems[micro] = None
        batch = to_device(self.batches.train_batch(step, first_row, self.rows), engine)
        out = engine(input_ids=batch[:, :-1], targets=batch[:, 1:], mems=self.mems[micro])
        self.mems[micro] = out.mems
        return out.loss

    def eval_batches(self, split: str, count: int | None, rank: int, world: int) -> Iterator[EvalBatch]:
        return eval_streams(self.corpus, split, self.eval_streams, self.eval_segment, rank, world, count)

    def protocol(self, count: int | None) -> dict[str, Any]:
        """The evaluation settings, as the reference's eval.py flags name them."""
        cfg = self.config
        return {"tgt_len": self.eval_segment, "mem_len": cfg.memory_length(training=False),
                "clamp_len": cfg.clamp_length(training=False), "same_length": cfg.same_lengths(training=False),
                "streams": self.eval_streams, "segments": "all" if count is None else count}

    @torch.no_grad()
    def eval_sums(self, engine, split: str, count: int | None, rank: int, world: int) -> Tensor:
        """[summed NLL, tokens] over this rank's streams of the split, segment by segment with the evaluation memory."""
        sums, mems = torch.zeros(2, dtype=torch.float64, device=device_of(engine)), None
        for batch in self.eval_batches(split, count, rank, world):
            tokens = to_device(batch.tokens, engine)
            out = engine(input_ids=tokens[:, :-1], targets=tokens[:, 1:], mems=mems)
            mems = out.mems
            if batch.counted:
                sums[0] += out.token_nll.double().sum()
                sums[1] += out.token_nll.numel()
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {"mems": self.mems}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Take saved per-rank state; the memories go back to `device`, where the model runs."""
        mems = state.get("mems")
        saved_rows = {chunk[0].shape[0] for chunk in mems or [] if chunk} if isinstance(mems, list) else set()
        if not isinstance(mems, list) or len(mems) != self.accumulation or saved_rows - {self.rows}:
            raise TopKASTConfigError(
                f"The checkpoint's Transformer-XL memory is for {len(mems) if isinstance(mems, list) else 'no'} "
                f"stream chunks of {sorted(saved_rows)} rows per rank, this run has {self.accumulation} "
                f"(gradient_accumulation_steps) of {self.rows} rows; resume with the batch sizes, accumulation and "
                "number of ranks the run was started with.")
        self.mems = [None if chunk is None else [m.to(device) for m in chunk] for chunk in mems]


def make_runner(spec: dict[str, Any], corpus: PreparedCorpus, seq_len: int | None, rows: int, seed: int, world: int,
                accumulation: int, eval_streams: int = 10):
    """The runner a train.model spec needs: "type": "transformer_xl" or any transformers model."""
    if spec.get("type") == TRANSFORMER_XL:
        return TransformerXLRunner(spec, corpus, seq_len, rows, seed, world, accumulation, eval_streams)
    return CausalLMRunner(spec, corpus, seq_len, rows, seed)
