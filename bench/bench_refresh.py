"""Refresh time against the store's read+write floor as the model grows.

    python bench/bench_refresh.py [--widths 512 1024 2048 3072] [--layers 8] [--out runs/bench]

For each width, a stack of `--layers` square Linear layers trained by ds_topkast at 90/80
(ZeRO-2, bf16, CPU store) takes one optimizer step, then the table gives the median time
of a full refresh (stream every shard, write B back, select A and B, rebuild the compact
values and their optimizer state) against one read and one write of every byte of the
same store (the memory-bandwidth floor), and the time per stored entry, which stays flat
if the refresh grows linearly in n. Writes refresh.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_training import store_floor_seconds
from common import Stack, median_seconds, single_rank_environment


def measure(width: int, layers: int) -> dict:
    import ds_topkast

    cfg = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9, "bf16": {"enabled": True},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 2},
           "topkast": {"forward_sparsity": 0.9, "backward_sparsity": 0.8, "refresh_interval": 10**6,
                       "dense_store": {"device": "cpu"}}}
    engine, *_ = ds_topkast.initialize(model=Stack(layers, width), config=cfg)
    engine.backward(engine(torch.randn(4, width, dtype=torch.bfloat16, device=engine.device)))
    engine.step()
    store = engine.topkast.state.store
    refresh = median_seconds(lambda: engine.topkast.refresher.refresh(engine.global_steps), 3)
    floor = store_floor_seconds(store)
    n = sum(store.numel(name) for name in store.names())
    engine.destroy()
    return {"entries": n, "refresh_s": refresh, "floor_s": floor}


def main() -> None:
    from ds_topkast.parallel.collectives import release_cpu_shm_buffer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[512, 1024, 2048, 3072])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    single_rank_environment()
    print(f"{args.layers} square layers at 90/80, {torch.get_num_threads()} threads")
    print(f"{'entries':>12} {'refresh s':>10} {'floor s':>9} {'refresh/floor':>14} {'ns per entry':>13}")
    rows = []
    for width in args.widths:
        row = measure(width, args.layers)
        rows.append(row)
        print(f"{row['entries']:>12,} {row['refresh_s']:>10.3f} {row['floor_s']:>9.3f} "
              f"{row['refresh_s'] / row['floor_s']:>14.2f} {row['refresh_s'] / row['entries'] * 1e9:>13.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refresh.json").write_text(json.dumps(rows, indent=1))
    release_cpu_shm_buffer()


if __name__ == "__main__":
    main()
