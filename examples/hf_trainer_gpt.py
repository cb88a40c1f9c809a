"""Train a GPT-style model with Top-KAST through the Hugging Face Trainer.

    deepspeed --num_gpus 2 examples/hf_trainer_gpt.py --deepspeed configs/hf_trainer_zero2.json \
        --output_dir runs/hf_trainer --max_steps 200 --bf16
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer_gpt.py \
        --topkast_config configs/hf_trainer_zero2.json --output_dir runs/hf_trainer_ddp --max_steps 200

Everything the Trainer takes is a flag (TrainingArguments); the few lines that add Top-KAST
are marked below. The model is a transformers model built from a config (random init: a
model_type with overrides, or a local config folder); the data is the embedded default
corpus (the Python standard library's source, byte-level) or `--data` (a file, folder or
glob). Without `--deepspeed` the "topkast" section comes from `--topkast_config` and a
plain torch optimizer trains the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

import ds_topkast
from ds_topkast.data import DataConfig, load_corpus


@dataclass
class ScriptArguments:
    model: str = field(default="gpt2", metadata={"help": "A transformers model_type or a local config folder."})
    model_overrides: str = field(default='{"n_layer": 4, "n_embd": 128, "n_head": 4}',
                                 metadata={"help": "JSON of config fields set on top (random init)."})
    data: str | None = field(default=None, metadata={"help": "Text file, folder or glob; default: embedded corpus."})
    max_bytes: int = field(default=2_000_000, metadata={"help": "Read at most this many bytes of the corpus."})
    seq_len: int = field(default=128)
    topkast_config: str | None = field(default=None, metadata={
        "help": 'JSON file with the "topkast" section; default: the --deepspeed config.'})


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of a token tensor, as causal-LM examples."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.rows = tokens[:len(tokens) // seq_len * seq_len].long().view(-1, seq_len)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def build_model(script: ScriptArguments, vocab_size: int) -> torch.nn.Module:
    overrides = json.loads(script.model_overrides)
    try:
        config = AutoConfig.from_pretrained(script.model, **overrides)
    except OSError:
        config = AutoConfig.for_model(script.model, **overrides)
    config.vocab_size = max(config.vocab_size, vocab_size) if script.data else vocab_size
    return AutoModelForCausalLM.from_config(config)


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    topkast_source = script.topkast_config or args.deepspeed
    if topkast_source is None:
        raise SystemExit('Give --deepspeed CONFIG or --topkast_config CONFIG (a JSON file with a "topkast" section).')
    corpus = load_corpus(DataConfig(path=script.data, max_bytes=script.max_bytes))
    torch.manual_seed(args.seed)
    model = ds_topkast.sparsify(build_model(script, corpus.vocab_size), topkast_source)  # Top-KAST, line 1
    trainer = Trainer(model=model, args=args, train_dataset=Windows(corpus.train, script.seq_len),
                      eval_dataset=Windows(corpus.eval, script.seq_len),
                      callbacks=[ds_topkast.TopKASTCallback()])  # Top-KAST, line 2
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f} nats/byte = {metrics['eval_loss'] / 0.6931471805599453:.4f} "
              "bits per byte", flush=True)


if __name__ == "__main__":
    main()
