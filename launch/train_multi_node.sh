#!/usr/bin/env bash
# Train with ds_topkast on several nodes under the deepspeed launcher (run it on the first node).
#   HOSTFILE=launch/hostfile bash launch/train_multi_node.sh CONFIG [extra ds_topkast.train flags...]
# HOSTFILE lists the nodes (see launch/hostfile.example); MASTER_ADDR defaults to this host.
# Every rank keeps 1/world of the dense store, so the store's host memory per node shrinks as
# nodes are added; --out should be on a filesystem all nodes share.
set -euo pipefail
config=${1:?usage: HOSTFILE=... bash launch/train_multi_node.sh CONFIG [flags]}
shift
hostfile=${HOSTFILE:-launch/hostfile}
if [ ! -f "$hostfile" ]; then
  echo "No hostfile at $hostfile: copy launch/hostfile.example to it and list your nodes." >&2
  exit 2
fi
exec deepspeed --hostfile "$hostfile" --master_addr "${MASTER_ADDR:-$(hostname)}" \
  --master_port "${MASTER_PORT:-29500}" --module ds_topkast.train --config "$config" "$@"
