#!/usr/bin/env bash
# Train one of the Top-KAST paper's Transformer-XL setups (configs/paper/).
#   bash launch/train_paper.sh SETUP SPARSITY [extra ds_topkast.train flags...]
#   SETUP: enwik8_txl (277M), enwik8_txl69m (69M) or wt103_txl; SPARSITY: dense, 80_0, 90_60, ...
#   e.g. NUM_GPUS=8 bash launch/train_paper.sh enwik8_txl 80_0
# Checkpoints, metrics.jsonl and training.png go to runs/paper/SETUP_SPARSITY; add --resume
# to continue a stopped run (its learning-rate schedule is kept). Every value's source is in
# docs/PAPER_CONFIGS.md. The data comes from the Hugging Face hub (LTCB/enwik8's parquet
# conversion, Salesforce/wikitext) and is prepared once into the corpus cache. On a machine
# without the hub, keep train.data.dataset and add train.data.path: enwik8's raw 100 MB
# file (whatever it is called; split 90M/5M/5M), or the WikiText-103 folder holding
# wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (split by those names).
set -euo pipefail
setup=${1:?usage: train_paper.sh SETUP SPARSITY [flags...]}
sparsity=${2:?usage: train_paper.sh SETUP SPARSITY [flags...]}
shift 2
config="configs/paper/${setup}_${sparsity}.json"
if [[ ! -f "$config" ]]; then
  echo "No $config; the setups are: $(ls configs/paper | sed 's/\.json$//' | tr '\n' ' ')" >&2
  exit 2
fi
exec "$(dirname "$0")/train_single_node.sh" "$config" --out "runs/paper/${setup}_${sparsity}" "$@"
