"""The training command's "train" section: what it trains and for how long (DeepSpeed ignores the section)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ds_topkast.config import validate_section
from ds_topkast.lm.data.corpus_sources import DataConfig


class TrainConfig(BaseModel):
    """The "train" section: what the command trains and for how long."""

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any] = Field(default_factory=lambda: {"type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4},
                                  description='"type" (a transformers model_type, or "transformer_xl" with an '
                                              'optional "preset"), "config" or "pretrained", plus config fields.')
    data: DataConfig = Field(default_factory=DataConfig)
    seq_len: int | None = Field(None, gt=1, description="Tokens per window (GPT-style, default 128) or per "
                                                        "segment (Transformer-XL, default its tgt_len).")
    steps: int = Field(200, gt=0, description="Optimizer steps of the whole run; the learning-rate schedule's "
                                              "length.")
    eval_interval: int = Field(50, gt=0, description="Steps between validations.")
    eval_batches: int | None = Field(8, gt=0, description="Validation during training: batches (Transformer-XL: "
                                                          "segments per stream; the reference's max_eval_steps); "
                                                          "null: the whole valid split.")
    eval_streams: int = Field(10, gt=0, description="Transformer-XL: streams an eval split is cut into (the "
                                                    "reference's eval batch size, 10).")
    test: bool = Field(True, description="Evaluate the whole test split at the end of training.")
    log_interval: int = Field(10, gt=0, description="Steps between train-loss records (the mean over them).")
    checkpoint_interval: int | None = Field(None, gt=0, description="Also save every N steps (always at the end).")
    plot: bool = Field(True, description="Write training.png (losses, mask dynamics) next to the checkpoint.")
    seed: int = 0


def train_section(ds_config: dict[str, Any]) -> TrainConfig:
    return validate_section(TrainConfig, ds_config.get("train", {}), "train")
