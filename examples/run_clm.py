"""Causal language modelling with the Hugging Face Trainer, as transformers' run_clm.py does it, plus Top-KAST.

    deepspeed --num_gpus 2 examples/run_clm.py --deepspeed configs/hf_trainer_zero2.json \
        --model_type gpt2 --config_overrides n_layer=4,n_embd=256,n_head=4 --tokenizer_name bytes \
        --do_train --do_eval --output_dir runs/clm --max_steps 300 --bf16
    accelerate launch --multi_gpu --num_processes 2 examples/run_clm.py --topkast_config configs/hf_trainer_zero2.json ...

Our own script, written to drive the Trainer exactly the way run_clm.py does, so that what
works here works in run_clm.py with the same three added lines (marked "Top-KAST"):
`TrainingArguments` are parsed before the model exists (under a ZeRO-3 config the model is
then built inside `deepspeed.zero.Init`), the model comes from `from_pretrained` or
`from_config`, the embeddings are resized to the tokenizer, texts are tokenized and grouped
into blocks, and the script trains (resuming from `--resume_from_checkpoint` or the last
checkpoint in `output_dir`), saves the model, and evaluates.

Two conveniences run_clm.py lacks, both so that it runs without a network: `--tokenizer_name
bytes` is a byte-level tokenizer (256 symbols and an end-of-text token), and without
`--train_file` or `--dataset_name` the data is the embedded default corpus, the Python
standard library's source. `--topkast_config` gives the "topkast" section when there is no
`--deepspeed` config (DDP or one process); `--dense` trains the same model without Top-KAST.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from itertools import chain

import datasets
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast,
                          Trainer, TrainingArguments, default_data_collator, set_seed)
from transformers.trainer_utils import get_last_checkpoint

import ds_topkast  # Top-KAST, line 1
from ds_topkast.lm.data.corpus_sources import default_corpus_bytes

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Weights to start from (a folder)."})
    model_type: str | None = field(default=None, metadata={"help": "A model_type to train from scratch."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Config fields set when training from scratch, e.g. n_embd=10,resid_pdrop=0.2"})
    config_name: str | None = field(default=None, metadata={"help": "A config folder or name, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "A tokenizer folder or name, if not the model's; 'bytes' is a byte-level tokenizer."})
    topkast_config: str | None = field(default=None, metadata={
        "help": 'A JSON file with the "topkast" section; default: the --deepspeed config.'})
    dense: bool = field(default=False, metadata={"help": "Train without Top-KAST (the dense baseline)."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets hub name (needs the network)."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None, metadata={"help": "A .txt file; default: the embedded corpus."})
    validation_file: str | None = field(default=None)
    validation_split_percentage: int = field(default=5)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    block_size: int | None = field(default=None)
    keep_linebreaks: bool = field(default=True)
    max_bytes: int = field(default=2_000_000, metadata={"help": "Bytes of the embedded corpus to use."})


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte, and <|endoftext|>; built locally, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def load_texts(data: DataTrainingArguments) -> datasets.DatasetDict:
    """train and validation splits with a "text" column, from the hub, text files or the embedded corpus."""
    if data.dataset_name is not None:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    elif data.train_file is not None:
        files = {"train": data.train_file, **({"validation": data.validation_file} if data.validation_file else {})}
        raw = datasets.load_dataset("text", data_files=files, keep_linebreaks=data.keep_linebreaks)
    else:
        lines = default_corpus_bytes(data.max_bytes).decode("utf-8", errors="ignore").splitlines(keepends=True)
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines})})
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, shuffle=False)
        raw = datasets.DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
    return raw


def build_model(model_args: ModelArguments, vocab_size: int):
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name)
    else:
        config = AutoConfig.for_model(model_args.model_type or "gpt2")
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
    config.vocab_size = vocab_size
    return AutoModelForCausalLM.from_config(config)


def grouped_blocks(raw: datasets.DatasetDict, tokenizer, block_size: int):
    """Tokenize, concatenate and cut into blocks of block_size tokens, labels = inputs (as run_clm.py); call it on
    the main process first, so that the other ranks read its cached results."""
    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // block_size * block_size
        blocks = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}
        blocks["labels"] = blocks["input_ids"].copy()
        return blocks

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
    return tokenized.map(group_texts, batched=True)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO
                        if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    set_seed(training_args.seed)

    raw = load_texts(data_args)
    if model_args.tokenizer_name == "bytes":
        tokenizer = byte_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = build_model(model_args, len(tokenizer))
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))
    if not model_args.dense:
        model = ds_topkast.sparsify(model, model_args.topkast_config or training_args.deepspeed)  # Top-KAST, line 2

    block_size = min(data_args.block_size or 1024, model.config.max_position_embeddings
                     if hasattr(model.config, "max_position_embeddings") else 1024)
    with training_args.main_process_first(desc="tokenizing and grouping texts"):
        blocks = grouped_blocks(raw, tokenizer, block_size)
    train_dataset, eval_dataset = blocks["train"], blocks["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    callbacks = [] if model_args.dense else [ds_topkast.TopKASTCallback()]  # Top-KAST, line 3
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset if training_args.do_train else None,
                      eval_dataset=eval_dataset if training_args.do_eval else None, processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=callbacks)

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = dict(result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 700))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
