"""Communication per rank: dense DeepSpeed against ds_topkast, per optimizer step and per refresh.

    deepspeed --num_gpus 2 bench/bench_comm.py [--stage 2] [--sparsity 0.9 0.8]

Bytes are what DeepSpeed's comms logger records for every collective (ds_topkast's own go
through deepspeed.comm too). Per optimizer step, three engines train the same GPT-2-style
model on the same batches, between refreshes:
  dense            plain deepspeed.initialize, every weight trained;
  dense, frozen    the same with the layers ds_topkast would sparsify frozen: the traffic
                   of everything else, which the two other runs share;
  ds_topkast       the sparsified layers trained as compact B sets.
The sparsified layers' share of a run is its bytes minus the frozen run's bytes. Under ZeRO-3
frozen weights are still partitioned and gathered, so there the frozen run does not isolate
the rest and the whole-run ratio is reported: the shared traffic only raises it, so it bounds
the sparsified layers' ratio from above.
Per refresh, one refresh of models of growing width is measured: it should grow with
k_B (plus two 16-bit histograms per selection), not with world x n.
"""
import argparse
import copy
import time

import torch

GLOBAL_BATCH, SEQ = 8, 64


def build_model(width: int, layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=256, n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def ds_config(stage: int, forward: float, backward: float, world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
            "topkast": {"forward_sparsity": forward, "backward_sparsity": backward, "refresh_interval": 10**6}}


def logged_bytes() -> int:
    from deepspeed.comm import comms_logger

    return sum(size * record[0] for sizes in comms_logger.comms_dict.values() for size, record in sizes.items())


def measure(fn) -> tuple[int, float]:
    """Bytes DeepSpeed's comms logger records while fn runs, and its wall time."""
    import deepspeed.comm as dist
    from deepspeed.comm import comms_logger

    dist.barrier()
    comms_logger.reset_data()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return logged_bytes(), seconds


def train_steps(engine, steps: int) -> None:
    import deepspeed.comm as dist

    rows = GLOBAL_BATCH // dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=gen)
        mine = batch[dist.get_rank() * rows:(dist.get_rank() + 1) * rows].to(engine.device)
        engine.backward(engine(input_ids=mine, labels=mine).loss)
        engine.step()


def sparsified_names(cfg: dict, width: int, layers: int) -> list[str]:
    import ds_topkast
    from ds_topkast.runtime.state import topkast_state

    return topkast_state(ds_topkast.sparsify(build_model(width, layers), cfg["topkast"])).layer_names


def per_step(args, world: int) -> list[tuple[str, float]]:
    import deepspeed

    import ds_topkast

    cfg = ds_config(args.stage, *args.sparsity, world)
    names = sparsified_names(cfg, args.width, args.layers)
    rows = []
    labels = ("dense", "ds_topkast") if args.stage == 3 else ("dense", "dense, frozen", "ds_topkast")
    for label in labels:
        model = build_model(args.width, args.layers)
        if label == "dense, frozen":
            for name in names:
                model.get_submodule(name).weight.requires_grad_(False)
        init = ds_topkast.initialize if label == "ds_topkast" else deepspeed.initialize
        engine, *_ = init(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                          config=copy.deepcopy(cfg))
        train_steps(engine, 1)
        total, _ = measure(lambda: train_steps(engine, args.steps))
        rows.append((label, total / args.steps))
    return rows


def per_refresh(args, world: int) -> list[tuple]:
    import ds_topkast
    from ds_topkast.core.layers import sparse_layers

    rows = []
    for width in args.refresh_widths:
        engine, *_ = ds_topkast.initialize(model=build_model(width, args.layers),
                                           config=ds_config(args.stage, *args.sparsity, world))
        train_steps(engine, 1)
        layers = sparse_layers(engine.module)
        n = sum(layer.in_features * layer.out_features for layer in layers.values())
        k_b = sum(layer.k_backward for layer in layers.values())
        total, seconds = measure(lambda: engine.topkast.refresher.refresh(engine.global_steps))
        rows.append((width, n, k_b, total, seconds))
    return rows


def main() -> None:
    import deepspeed
    import deepspeed.comm as dist

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--sparsity", type=float, nargs=2, default=[0.9, 0.8], metavar=("FORWARD", "BACKWARD"))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--refresh-widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    world = dist.get_world_size()
    steps = per_step(args, world)
    refreshes = per_refresh(args, world)
    if dist.get_rank() != 0:
        return
    mib = 2**20
    forward, backward = args.sparsity
    print(f"\nPer optimizer step, rank 0 of {world}, ZeRO-{args.stage} bf16, GPT-2 {args.layers}x{args.width}, "
          f"Top-KAST {forward:g}/{backward:g}")
    totals = dict(steps)
    print(f"{'run':<16}{'MiB/step':>10}{'sparsified layers MiB/step':>28}")
    other = totals.get("dense, frozen")
    for label, total in steps:
        share = "not isolated (ZeRO-3)" if other is None else f"{(total - other) / mib:.3f}"
        print(f"{label:<16}{total / mib:>10.3f}{share:>28}")
    print(f"ds_topkast / dense, whole run: {totals['ds_topkast'] / totals['dense']:.3f}")
    if other is not None:
        ratio = (totals["ds_topkast"] - other) / (totals["dense"] - other)
        print(f"ds_topkast / dense for the sparsified layers: {ratio:.3f}")
    print(f"\nPer refresh, rank 0 of {world}, {args.layers} blocks")
    print(f"{'width':>6}{'dense n':>13}{'k_B':>13}{'refresh MiB':>13}{'bytes / k_B':>13}"
          f"{'world*n*4 MiB':>15}{'seconds':>9}")
    for width, n, k_b, total, seconds in refreshes:
        print(f"{width:>6}{n:>13,}{k_b:>13,}{total / mib:>13.2f}{total / k_b:>13.1f}"
              f"{world * n * 4 / mib:>15.1f}{seconds:>9.3f}")


if __name__ == "__main__":
    main()
