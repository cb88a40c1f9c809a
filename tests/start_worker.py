"""One rank's side of the large-model start tests (tests/test_large_start.py starts it with the deepspeed launcher).

Modes:
- zero_init: the pretrained tiny GPT-2 loaded by from_pretrained in memory, and under
  deepspeed.zero.Init (as with a ZeRO-3 TrainingArguments), each trained a few steps at ZeRO-3 (fp32) through a
  refresh; both records are saved.
- meta: the tiny GPT-2 built on the meta device, and built empty with pretrained
  safetensors weights, sparsified on this rank; this rank's store shards and sets saved.
- peak: a stack of large Linear layers built on the meta device and sparsified; the
  peak resident memory of the sparsify call and the accounting's bound are saved.
- memory: ZeRO-3 bf16 at 90/80; memory_report (and its projection to 8 ranks) next to
  the bytes this rank's partitions and bitmaps hold.
"""
import argparse
import re
import sys
from pathlib import Path

import torch
from dist_worker import GLOBAL_BATCH, state_of, train
from models import ds_config, tiny_gpt2
from torch import nn

import ds_topkast
from ds_topkast.core.layers import sparse_layers

PEAK_LAYERS, PEAK_WIDTH = 48, 2048
PEAK_SPARSITY = {"forward_sparsity": 0.99, "backward_sparsity": 0.98}


def zero_init_records(out: Path, rank: int, world: int, steps: int, pretrained: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = ds_config(stage=3, micro_batch=GLOBAL_BATCH // world, lr=1e-2, refresh_interval=2, forward_interval=1,
                    exploration_l2=1e-3)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    for build in ("normal", "zero_init"):
        # under zero_init, from_pretrained builds inside deepspeed.zero.Init, as with a ZeRO-3 TrainingArguments
        hf_config = HfDeepSpeedConfig(cfg) if build == "zero_init" else None  # transformers holds it weakly
        model = AutoModelForCausalLM.from_pretrained(pretrained)
        if hf_config is not None:
            assert all(hasattr(p, "ds_id") for p in model.parameters()), "zero.Init did not partition the model"
        engine, *_ = ds_topkast.initialize(model=model, config=cfg)
        values = [layer.values for layer in sparse_layers(engine.module).values()]
        partitioned = all(v.ds_tensor.numel() < v.ds_numel for v in values)
        record = state_of(engine, train(engine, 0, steps))
        record["values_partitioned"] = partitioned
        torch.save(record, out / f"{build}_rank{rank}.pt")


def shards_of(model: nn.Module) -> dict:
    store = model.topkast_state.store
    return {"store": {n: (store.layout(n)[0], store.read(n).clone()) for n in store.names()},
            "sets": {n: (l.indices.clone(), l.forward_mask.clone(), l.values.detach().clone())
                     for n, l in sparse_layers(model).items()},
            "dense": {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".values")}}


def meta_records(out: Path, rank: int, pretrained: str) -> None:
    from accelerate import init_empty_weights

    section = ds_config()["topkast"]
    with torch.device("meta"):
        model = tiny_gpt2()
    torch.save(shards_of(ds_topkast.sparsify(model, section)), out / f"meta_rank{rank}.pt")
    with init_empty_weights():
        model = tiny_gpt2()
    torch.save(shards_of(ds_topkast.sparsify(model, section, pretrained=pretrained)),
               out / f"pretrained_rank{rank}.pt")


def peak_model() -> nn.Module:
    return nn.Sequential(*[nn.Linear(PEAK_WIDTH, PEAK_WIDTH, bias=False) for _ in range(PEAK_LAYERS)])


def _peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _resident_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_record(out: Path, rank: int, world: int) -> None:
    with torch.device("meta"):
        model = peak_model()
    before = _resident_kib()
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current resident size
    ds_topkast.sparsify(model, PEAK_SPARSITY)
    peak = (_peak_kib() - before) * 1024
    layers = sparse_layers(model)
    store_bytes = model.topkast_state.store.nbytes()
    compact = sum(l.values.numel() * 4 + l.indices.numel() * l.indices.element_size() + l.forward_mask.numel()
                  for l in layers.values())
    full_model = sum(l.in_features * l.out_features * 4 for l in layers.values())
    torch.save({"peak": peak, "store": store_bytes, "compact": compact, "one_layer": PEAK_WIDTH ** 2 * 4,
                "full_model": full_model, "world": world}, out / f"peak_rank{rank}.pt")


def memory_record(out: Path, rank: int, world: int) -> None:
    """ZeRO-3 bf16 at 90/80: memory_report's bytes per rank and what this rank's tensors hold, after one step."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    cfg = ds_config(stage=3, bf16=True, micro_batch=GLOBAL_BATCH // world, forward_sparsity=0.9,
                    backward_sparsity=0.8)
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(n_embd=256, n_head=4), config=cfg)
    batch = torch.randint(0, 64, (GLOBAL_BATCH // world, 16))
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    held = {"values": 0, "fp32_master": 0, "moments": 0, "set_bitmaps": 0}
    for layer in sparse_layers(engine.module).values():
        values = layer.values
        held["values"] += values.ds_tensor.numel() * values.ds_tensor.element_size()
        held["fp32_master"] += safe_get_local_fp32_param(values).numel() * 4
        held["moments"] += sum(safe_get_local_optimizer_state(values, key).numel() * 4
                               for key in ("exp_avg", "exp_avg_sq"))
        held["set_bitmaps"] += layer.backward_bits.numel() + layer.forward_bits.numel()
    report, projected = ds_topkast.memory_report(engine), ds_topkast.memory_report(engine, world=8)
    torch.save({"held": held, "report": report.sparse, "ratio": report.ratio, "ratio_at_8": projected.ratio,
                "dense": report.dense_total, "dense_at_8": projected.dense_total}, out / f"memory_rank{rank}.pt")


def main() -> None:
    import deepspeed
    import deepspeed.comm as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("modes", nargs="+", choices=["zero_init", "meta", "peak", "memory"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pretrained")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    out, rank, world = Path(args.out), dist.get_rank(), dist.get_world_size()
    if "peak" in args.modes:  # first: the others leave memory behind that would blur the measurement
        peak_record(out, rank, world)
    if "meta" in args.modes:
        meta_records(out, rank, args.pretrained)
    if "memory" in args.modes:
        memory_record(out, rank, world)
    if "zero_init" in args.modes:
        zero_init_records(out, rank, world, args.steps, args.pretrained)


if __name__ == "__main__":
    sys.exit(main())
