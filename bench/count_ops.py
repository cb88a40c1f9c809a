"""Host-side cost of one training step and of one refresh, counted (bench/op_counts.py), for docs/RESULTS.md.

    python bench/count_ops.py [--blocks 24] [--width 64] [--stage 2]

GPT-2 of `--blocks` blocks (4 sparsified layers each) at `--width`, ZeRO-`--stage` bf16,
dense DeepSpeed and Top-KAST 90/80 with A re-selected every step, torch's Adam, one step
after two warm-up steps: ATen ops, kernel-launching ops and host-syncing ops, with the
ops that differ most from dense's, and the median time of 5 more steps; then one
refresh's ops and host syncs per sparsified layer.
Only public calls (initialize, backward, step, the refresher's refresh), so the same
script counts an older checkout (PYTHONPATH=<checkout>:bench) for before/after tables.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import median_seconds, single_rank_environment  # noqa: E402
from op_counts import OpCounter, counted_refresh, counted_steps, lm_step  # noqa: E402


def engine_for(blocks: int, width: int, stage: int, sparse: bool):
    import deepspeed
    from transformers import AutoModelForCausalLM, GPT2Config

    import ds_topkast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=blocks, n_embd=width, n_head=4, n_positions=32,
                                                        vocab_size=256, bos_token_id=0, eos_token_id=0))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}, "bf16": {"enabled": True},
           "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}
    if not sparse:
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    cfg["topkast"] = {"forward_sparsity": 0.9, "backward_sparsity": 0.8, "refresh_interval": 1000,
                      "forward_interval": 1, "exclude": ["*wte*", "*wpe*", "*lm_head*"]}
    return ds_topkast.initialize(model=model, config=cfg)[0]


def count_step(engine) -> tuple[OpCounter, float]:
    """The ops of the third step and the median seconds of the five after it."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 32), generator=gen).to(engine.device) for _ in range(8)]
    counter = counted_steps(engine, batches[:3])
    return counter, statistics.median(median_seconds(lambda: lm_step(engine, batch), 1) for batch in batches[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    single_rank_environment()
    dense, dense_s = count_step(engine_for(args.blocks, args.width, args.stage, sparse=False))
    engine = engine_for(args.blocks, args.width, args.stage, sparse=True)
    sparse, sparse_s = count_step(engine)
    print(f"{'one step':<12}{'dense':>8}{'Top-KAST':>10}{'ratio':>8}")
    for key in ("ops", "kernels", "syncs"):
        d, s = dense.totals()[key], sparse.totals()[key]
        print(f"{key:<12}{d:>8}{s:>10}{s / max(d, 1):>8.3f}")
    print(f"{'step ms':<12}{dense_s * 1e3:>8.1f}{sparse_s * 1e3:>10.1f}{sparse_s / dense_s:>8.3f}")
    print("most added kernels:", (sparse.kernels - dense.kernels).most_common(6))
    refresher = engine.topkast.refresher
    layers = len(refresher.layers)
    refresh, extra = counted_refresh(refresher, engine.global_steps)
    totals = refresh.totals()
    print(f"one refresh, per sparsified layer ({layers}): {totals['ops'] / layers:.1f} ops, "
          f"{totals['kernels'] / layers:.1f} kernels, {totals['syncs'] / layers:.2f} syncing ops")
    print("  syncing ops:", refresh.syncs.most_common(6))
    print("  not dispatched, but each a host sync on a GPU (counted by the refresher, 0 where it does not count):",
          extra)


if __name__ == "__main__":
    main()
