#!/usr/bin/env bash
# Train examples/run_clm.py (the Hugging Face Trainer as run_clm.py drives it, + TopKASTCallback) on one machine.
#   bash launch/train_hf_trainer.sh [CONFIG] [run_clm.py / TrainingArguments flags...]
# NUM_GPUS (default 1) ranks under the deepspeed launcher with CONFIG as the DeepSpeed
# config (default configs/hf_trainer_zero2.json, ZeRO-2). LAUNCHER=accelerate runs the
# same script under `accelerate launch` without DeepSpeed (torch DDP), reading only the
# config's "topkast" section. Without an accelerator the ranks are CPU ranks (--use_cpu).
# With no flags it trains a 4-layer GPT-2 on the embedded corpus with the byte tokenizer.
set -euo pipefail
config=${1:-configs/hf_trainer_zero2.json}
shift || true
ranks=${NUM_GPUS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  device_flags=(--use_cpu)
else
  device_flags=(--bf16)
fi
defaults=(--model_type gpt2 --config_overrides n_layer=4,n_embd=128,n_head=4 --tokenizer_name bytes
          --block_size 128 --do_train --do_eval --output_dir runs/hf_trainer)
[[ $# -gt 0 ]] && defaults=()
if [[ "${LAUNCHER:-deepspeed}" == accelerate ]]; then
  multi=(); [[ "$ranks" -gt 1 ]] && multi=(--multi_gpu)
  exec accelerate launch "${multi[@]}" --num_processes "$ranks" --main_process_port "${MASTER_PORT:-29500}" --mixed_precision no --dynamo_backend no \
    examples/run_clm.py --topkast_config "$config" "${device_flags[@]}" "${defaults[@]}" "$@"
fi
exec deepspeed --num_gpus "$ranks" --master_port "${MASTER_PORT:-29500}" examples/run_clm.py --deepspeed "$config" "${device_flags[@]}" "${defaults[@]}" "$@"
