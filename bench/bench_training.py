"""Memory, step time and refresh cost: dense DeepSpeed, ZeRO-Offload and ds_topkast side by side.

    python bench/bench_training.py [--size tiny|cpu|cpu-24|gpt2-small|gpt2-medium] [--steps 8] [--interval 100]
                                   [--variants dense,offload,80/0,90/80,95/90] [--out runs/bench]

One process, one GPT-2-style model (same seed, same batches), five engines built one
after another: dense DeepSpeed (ZeRO-2), ZeRO-Offload (ZeRO-2, optimizer on the CPU:
DeepSpeedCPUAdam), and ds_topkast at 80/0, 90/80 and 95/90 (ZeRO-2, CPU store), all in
bf16 on a GPU. On DeepSpeed's CPU accelerator bf16 matmuls are emulated (a training step
is ~16x slower than fp32 on our CI cores), which would hide every other cost, so there
`--precision auto` runs fp32. For each:
- accelerator bytes per rank by category (memory_report's accounting); on a GPU also
  what is measured: torch.cuda.memory_allocated between steps (the trained tensors and
  buffers, to set against the accounting) and max_memory_allocated during the timed
  steps (activations and transients included), both above what was allocated before the
  variant was built (earlier variants leave some behind); host bytes of the store and
  of offloaded state;
- what one step between refreshes asks of the host side (bench/op_counts.py): ATen ops
  dispatched, those that launch a kernel, those that sync the host on CUDA; at the sizes
  users train a GPU step is host-bound and its time follows these counts. `--size cpu-24`
  is the 24-block proxy of docs/RESULTS.md where they decide the CPU step time too;
- median step time between refreshes (and, of it, A's re-selection in every layer),
  and amortised with one refresh every
  `--interval` steps (step + refresh / interval), as ratios to dense and to ZeRO-Offload;
- one refresh against one read+write pass over the same store (the floor) and, on a
  GPU, against copying every shard to the accelerator and back (the host-link floor);
  its host syncs per sparsified layer (syncing ops, values read back, waits for a
  copy); the store's traffic: bytes streamed between refreshes (must be 0) and per refresh.
Prints the table and writes training.json to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
from common import (median_seconds, single_rank_environment, store_floor_seconds, synchronize,  # noqa: E402
                    transfer_floor_seconds)
from op_counts import OpCounter, counted_refresh  # noqa: E402

SIZES = {  # GPT-2 shapes: layers, width, heads, tokens per row, rows per step
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, seq=32, micro=2),
    "cpu": dict(n_layer=4, n_embd=256, n_head=4, seq=128, micro=4),
    "cpu-24": dict(n_layer=24, n_embd=64, n_head=4, seq=32, micro=2),  # host-bound: 96 small sparsified layers
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, seq=256, micro=4),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, seq=1024, micro=4),
}
VARIANTS = {"dense": ("dense ZeRO-2", None), "offload": ("ZeRO-Offload", "offload"),
            "80/0": ("Top-KAST 80/0", (0.8, 0.0)), "90/80": ("Top-KAST 90/80", (0.9, 0.8)),
            "95/90": ("Top-KAST 95/90", (0.95, 0.9))}


def ds_config(variant, micro: int, interval: int, bf16: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}, "bf16": {"enabled": bf16},
           "zero_optimization": {"stage": 2}}
    if variant == "offload":
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    elif variant is not None:
        cfg["topkast"] = {"forward_sparsity": variant[0], "backward_sparsity": variant[1], "refresh_interval": interval,
                          "exclude": ["*wte*", "*wpe*", "*lm_head*"], "dense_store": {"device": "cpu"}}
    return cfg


def build_model(shape: dict):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], n_positions=shape["seq"],
        vocab_size=256, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def release_accelerator_memory() -> int:
    """Free what earlier variants left (DeepSpeed keeps some references past destroy()); bytes still allocated."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def profile_steps(step, batches, rows: int = 25) -> None:
    """torch.profiler's table of the ops that took the most device (or CPU) time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        synchronize()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def measure(name: str, variant, shape: dict, steps: int, interval: int, bf16: bool, profile: bool = False) -> dict:
    import deepspeed

    import ds_topkast
    from ds_topkast.engine.memory_accounting import trained_bytes

    baseline = release_accelerator_memory()
    cfg = ds_config(variant, shape["micro"], interval, bf16)
    model = build_model(shape)
    if "topkast" in cfg:
        engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (shape["micro"], shape["seq"]), generator=gen).to(engine.device)
               for _ in range(steps + 3)]

    def step(batch):
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()

    for batch in batches[:2]:  # warm-up: allocations, first optimizer step
        step(batch)
    gpu = torch.cuda.is_available()
    synchronize()
    allocated = torch.cuda.memory_allocated() - baseline if gpu else None
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sparse = hasattr(engine, "topkast")
    streamed_before = engine.topkast.state.store.streamed_bytes if sparse else 0
    times = [median_seconds(lambda: step(batch), 1) for batch in batches[3:]]
    with OpCounter() as counter:
        step(batches[2])
    row = {"variant": name, "step_s": statistics.median(times), "allocated_between_steps": allocated,
           "max_memory_allocated": torch.cuda.max_memory_allocated() - baseline if gpu else None,
           **{f"{key}_per_step": value for key, value in counter.totals().items()}}
    if profile:
        print(f"\n{name}: the ops that took the most time over 2 steps", flush=True)
        profile_steps(step, batches[2:4])
    if sparse:
        report = ds_topkast.memory_report(engine)
        store = engine.topkast.state.store
        row["streamed_between_refreshes"] = store.streamed_bytes - streamed_before
        row["reselect_s"] = median_seconds(engine.topkast.refresher.reselect_forward_sets, 5, warm_up=True)
        before = store.streamed_bytes
        refresher = engine.topkast.refresher
        row["refresh_s"] = median_seconds(lambda: refresher.refresh(engine.global_steps), 3)
        row["streamed_per_refresh"] = (store.streamed_bytes - before) // 3
        counter, undispatched = counted_refresh(refresher, engine.global_steps)
        row["refresh_syncs_per_layer"] = ((counter.totals()["syncs"] + sum(undispatched.values()))
                                          / len(refresher.layers))
        row["refresh_ops_per_layer"] = counter.totals()["ops"] / len(refresher.layers)
        row["floor_s"] = store_floor_seconds(store)
        row["transfer_floor_s"] = transfer_floor_seconds(store, engine.device) if gpu else None
        row.update(sparsified_bytes=report.sparse_total, sparsified_dense_bytes=report.dense_total,
                   accelerator_bytes=report.sparse_total + report.other_parameters,
                   store_host_bytes=report.dense_store_bytes, host_optimizer_bytes=report.host_optimizer_state)
    else:
        categories = trained_bytes(engine)
        row.update(accelerator_bytes=sum(v for k, v in categories.items() if k != "host_optimizer_state"),
                   host_optimizer_bytes=categories["host_optimizer_state"], refresh_s=0.0)
    row["amortised_step_s"] = row["step_s"] + row["refresh_s"] / interval
    engine.destroy()
    return row


def ratio(value: float, reference: dict | None, key: str) -> str:
    return f"{value / reference[key]:.3f}" if reference else "-"


def print_table(rows: list[dict], interval: int) -> None:
    by_name = {r["variant"]: r for r in rows}
    dense, offload = by_name.get(VARIANTS["dense"][0]), by_name.get(VARIANTS["offload"][0])
    mib = 2**20
    print(f"{'variant':<16}{'accel MiB':>10}{'sparsified':>11}{'step ms':>9}{'/dense':>8}{'/offload':>9}"
          f"{'amortised':>10}{'/dense':>8}{'refresh s':>10}{'/floor':>8}{'refresh %':>10}")
    for r in rows:
        sparsified = f"{r['sparsified_bytes'] / r['sparsified_dense_bytes']:.3f}" if "sparsified_bytes" in r else "-"
        floor = f"{r['refresh_s'] / r['floor_s']:.2f}" if r.get("floor_s") else "-"
        share = r["refresh_s"] / interval / r["amortised_step_s"]
        print(f"{r['variant']:<16}{r['accelerator_bytes'] / mib:>10.1f}{sparsified:>11}{r['step_s'] * 1e3:>9.1f}"
              f"{ratio(r['step_s'], dense, 'step_s'):>8}{ratio(r['step_s'], offload, 'step_s'):>9}"
              f"{r['amortised_step_s'] * 1e3:>10.1f}{ratio(r['amortised_step_s'], dense, 'step_s'):>8}"
              f"{r['refresh_s']:>10.3f}{floor:>8}{share:>10.2%}")
    print(f"sparsified: accelerator bytes of the sparsified layers / the same layers trained dense; "
          f"refresh %: share of training time at one refresh per {interval} steps")
    print(f"\n{'variant':<16}{'ops/step':>9}{'/dense':>8}{'kernels':>9}{'/dense':>8}{'syncs':>7}"
          f"{'reselect ms':>12}{'refresh ops/layer':>18}{'refresh syncs/layer':>20}")
    for r in rows:
        reselect = f"{r['reselect_s'] * 1e3:.2f}" if "reselect_s" in r else "-"
        refresh_ops = f"{r['refresh_ops_per_layer']:.0f}" if "refresh_ops_per_layer" in r else "-"
        refresh_syncs = f"{r['refresh_syncs_per_layer']:.2f}" if "refresh_syncs_per_layer" in r else "-"
        print(f"{r['variant']:<16}{r['ops_per_step']:>9}{ratio(r['ops_per_step'], dense, 'ops_per_step'):>8}"
              f"{r['kernels_per_step']:>9}{ratio(r['kernels_per_step'], dense, 'kernels_per_step'):>8}"
              f"{r['syncs_per_step']:>7}{reselect:>12}{refresh_ops:>18}{refresh_syncs:>20}")
    print("ops/kernels/syncs: ATen ops one step between refreshes dispatches, those launching a kernel, those "
          "syncing the host on CUDA (bench/op_counts.py); reselect: A re-selected in every layer (part of each "
          "step); refresh syncs: syncing ops + values read back + waits for a copy, per sparsified layer")
    if rows[0]["max_memory_allocated"] is not None:
        print(f"\n{'variant':<16}{'predicted MiB':>14}{'allocated MiB':>14}{'peak MiB':>10}{'peak/dense':>11}"
              f"{'transfer floor s':>17}")
        for r in rows:
            transfer = f"{r['transfer_floor_s']:.3f}" if r.get("transfer_floor_s") else "-"
            print(f"{r['variant']:<16}{r['accelerator_bytes'] / mib:>14.1f}{r['allocated_between_steps'] / mib:>14.1f}"
                  f"{r['max_memory_allocated'] / mib:>10.1f}{ratio(r['max_memory_allocated'], dense, 'max_memory_allocated'):>11}"
                  f"{transfer:>17}")
        print("predicted: memory_report's trained tensors (values, gradients, master, moments, index and mask "
              "buffers); allocated: torch.cuda.memory_allocated between steps; peak: max_memory_allocated over "
              "the timed steps (activations included)")


def main() -> None:
    from ds_topkast.parallel.collectives import release_cpu_shm_buffer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--steps", type=int, default=8,
                        help="Timed steps per variant (after 2 warm-up steps and one counted).")
    parser.add_argument("--interval", type=int, default=100, help="Refresh interval for the amortised time.")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 on a GPU, fp32 on the CPU accelerator.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma-separated, from {list(VARIANTS)}.")
    parser.add_argument("--profile", action="store_true", help="Also print torch.profiler's top ops per variant.")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    single_rank_environment()
    shape = SIZES[args.size]
    bf16 = args.precision == "bf16" or (args.precision == "auto" and torch.cuda.is_available())
    print(f"GPT-2 shape {shape}, {'bf16' if bf16 else 'fp32'}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU accelerator'}")
    rows = [measure(*VARIANTS[key], shape, args.steps, args.interval, bf16, args.profile)
            for key in args.variants.split(",")]
    print_table(rows, args.interval)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps({"size": args.size, "shape": shape, "interval": args.interval,
                                                   "bf16": bf16, "rows": rows}, indent=1))
    release_cpu_shm_buffer()


if __name__ == "__main__":
    main()
