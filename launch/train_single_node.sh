#!/usr/bin/env bash
# Train with ds_topkast on one machine under the deepspeed launcher.
#   bash launch/train_single_node.sh [CONFIG] [extra ds_topkast.train flags...]
# NUM_GPUS (default 1) ranks are started. Without an accelerator (no nvidia-smi) the
# run uses DeepSpeed's CPU accelerator, as on our CI machines.
set -euo pipefail
config=${1:-configs/tiny_gpt2.json}
shift || true
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  # CPU ranks share the cores: a thread per core in every rank makes them wait on one another.
  threads=$(( $(nproc) / ${NUM_GPUS:-1} ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
fi
exec deepspeed --num_gpus "${NUM_GPUS:-1}" --master_port "${MASTER_PORT:-29500}" --module ds_topkast.train --config "$config" "$@"
