#!/usr/bin/env bash
# Train examples/hf_trainer_gpt.py (Hugging Face Trainer + TopKASTCallback) on one machine.
#   bash launch/train_hf_trainer.sh [CONFIG] [TrainingArguments / script flags...]
# NUM_GPUS (default 1) ranks under the deepspeed launcher with CONFIG as the DeepSpeed
# config (default configs/hf_trainer_zero2.json, ZeRO-2). LAUNCHER=accelerate runs the
# same script under `accelerate launch` without DeepSpeed (torch DDP), reading only the
# config's "topkast" section. Without an accelerator the ranks are CPU ranks.
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
if [[ "${LAUNCHER:-deepspeed}" == accelerate ]]; then
  multi=(); [[ "$ranks" -gt 1 ]] && multi=(--multi_gpu)
  exec accelerate launch "${multi[@]}" --num_processes "$ranks" --main_process_port "${MASTER_PORT:-29500}" --mixed_precision no --dynamo_backend no \
    examples/hf_trainer_gpt.py --topkast_config "$config" "${device_flags[@]}" "$@"
fi
exec deepspeed --num_gpus "$ranks" --master_port "${MASTER_PORT:-29500}" examples/hf_trainer_gpt.py --deepspeed "$config" "${device_flags[@]}" "$@"
