#!/usr/bin/env bash
# The GPU check, in one command, on a machine with one CUDA GPU and no network:
#
#     bash bench/gpu_check.sh [--out DIR]        # about 13.5 minutes on one H100 (8.5 without step 5)
#     bash bench/gpu_check.sh --smoke [--out DIR] # CPU accelerator, tiny sizes, about a minute (CI runs it)
#
# Before it, on a machine with network, `bash bench/gpu_wheels.sh` puts deepspeed (built
# into a wheel, its CUDA ops JIT-built on the GPU machine), its missing requirements and
# libaio into .whl/; this script installs them there (bench/gpu_env.sh) unless --smoke.
# Then, each step with its own time limit and its whole output in DIR/gpu_check.txt:
#   1. the machine: GPU, driver, torch, deepspeed, DeepSpeed's op report;
#   2. the GPU tests, `pytest -m gpu` (tests/test_gpu.py, tests/test_kernels.py): the
#      compact engine against the independent fp32 reference in fp32 and bf16, host syncs
#      against dense DeepSpeed, autocast, the training command (both model families,
#      eval, resume), the NVMe store, the Hugging Face Trainer callback; the Triton
#      kernels against their torch references;
#   3. bench_training.py at GPT-2-medium shape in bf16: step time of dense DeepSpeed
#      (ZeRO-2), ZeRO-Offload and ds_topkast 90/80 with the ATen ops, kernels and syncs
#      of a step, accelerator memory measured (memory_allocated between steps,
#      max_memory_allocated) next to memory_report's, and the refresh against its
#      host-link floor (every shard copied to the GPU and back);
#   4. bench_clm.py: examples/run_clm.py (the Hugging Face Trainer, ZeRO-2 bf16) at
#      GPT-2-small shape, 150 steps with Top-KAST 80/60 and dense: tokens/s between
#      refreshes (each step timed with CUDA events) and over the run, the refresh apart,
#      peak accelerator memory, eval loss;
#   5. bench_lm.py: the training command on the 69M Transformer-XL paper setup
#      (configs/paper/enwik8_txl69m_90_80.json) on the embedded corpus, dense and 90/80,
#      about 150 s each: tokens/s and peak accelerator memory side by side;
#   6. bench_headline.py: Llama-7B's shape on one GPU, Top-KAST 90/80 in an 80 GB budget and
#      95/90 in a 24 GB one, against dense ZeRO-2 (expected not to start), ZeRO-Offload, GaLore
#      and 8-bit AdamW (those two where WITH_PEERS=1 gpu_wheels.sh carried their packages),
#      each variant stopped after 170 s; HEADLINE_VARIANTS=90/80@80,offload@80,dense@80 (then
#      95/90@24,galore@24,adam8bit@80) splits the six into two calls of under 8 minutes.
# --only STEP[,STEP...] runs just those steps (machine, gpu_tests, bench_training,
# run_clm, lm, headline), for a device budget too short for all of them: the headline
# alone is `--only machine,headline`.
# DIR defaults to $OUT (the device tool's folder) or runs/gpu_check. The exit status is
# non-zero if any step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0 only=""
out=${OUT:-runs/gpu_check}
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    --only) only=",$2,"; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--smoke] [--out DIR] [--only STEP,...]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
results=$out/gpu_check.txt
: > "$results"

if [[ $smoke == 1 ]]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  size=tiny precision=fp32 variants=dense,90/80 steps=2 clm_flags=(--smoke)
  lm_flags=(--config configs/tiny_transformer_xl.json --seconds 40)
  headline_flags=(--smoke)
else
  # shellcheck source=bench/gpu_env.sh
  source bench/gpu_env.sh || exit 1
  size=gpt2-medium precision=bf16 variants=dense,offload,90/80 steps=10 clm_flags=(--size gpt2-small --steps 150)
  lm_flags=(--config configs/paper/enwik8_txl69m_90_80.json --seconds 150)
  # 6 variants at 7B do not fit one 8-minute call: HEADLINE_VARIANTS picks a part (see bench_headline.py)
  headline_flags=(--shape llama-7b --variant-seconds 170 ${HEADLINE_VARIANTS:+--variants "$HEADLINE_VARIANTS"})
fi
export PYTHONUNBUFFERED=1 MASTER_PORT=${MASTER_PORT:-29611}
python=${GPU_PYTHON:-python3}
[[ $smoke == 1 ]] && python=python

failed=()
run_step() {  # NAME SECONDS COMMAND...: run with a time limit, output into the results file
  local name=$1 limit=$2 start status
  shift 2
  [[ -z $only || $only == *",$name,"* ]] || return 0
  start=$(date +%s)
  echo "===== $name: $*" | tee -a "$results"
  timeout --kill-after=10 "$limit" "$@" >> "$results" 2>&1
  status=$?
  echo "===== $name: exit $status after $(( $(date +%s) - start )) s" | tee -a "$results"
  [[ $status == 0 ]] || failed+=("$name")
}

run_step machine 45 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $python -c '
import torch, deepspeed, transformers
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"deepspeed\", deepspeed.__version__,
      \"transformers\", transformers.__version__)
print(\"device:\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"CPU accelerator\")
'; $python -m deepspeed.env_report 2>&1 | tail -n 40"
run_step gpu_tests 200 "$python" -m pytest -m gpu -q -p no:xdist -p no:randomly -rs --durations=12 tests/test_gpu.py tests/test_kernels.py
run_step bench_training 320 "$python" bench/bench_training.py --size "$size" --precision "$precision" \
  --steps "$steps" --variants "$variants" --out "$out"
run_step run_clm 300 "$python" bench/bench_clm.py "${clm_flags[@]}" --out "$out/clm"
run_step lm 400 "$python" bench/bench_lm.py "${lm_flags[@]}" --variants dense 90_80 --out "$out/lm"
run_step headline 540 "$python" bench/bench_headline.py "${headline_flags[@]}" --out "$out/headline"

echo "results: $results" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED steps: ${failed[*]}" | tee -a "$results" >&2
  exit 1
fi
echo "all steps passed" | tee -a "$results"
