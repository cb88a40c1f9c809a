"""The largest model each system trains in a per-rank memory budget: ds_topkast vs dense ZeRO-3 vs ZeRO-Infinity.

    python bench/bench_scale.py [--budget-gib 3] [--sizes s1 s2 ...] [--systems ...] [--lean] [--out runs/bench_scale]

Every run is a real 2-rank job (`deepspeed --num_gpus 2 bench/bench_scale.py --worker ...`)
on DeepSpeed's CPU accelerator, ZeRO-3, fp32 + Adam, on Llama-style models of growing size
(random init, a 4096-token vocabulary so that the sparsified layers dominate):
  ds_topkast     90/80, the model built on the meta device, the dense store on NVMe (files
                 under --nvme), a few steps, one refresh and one checkpoint;
  zero3          dense ZeRO-3, the model built inside deepspeed.zero.Init;
  zero_infinity  ZeRO-3 with parameters and optimizer state offloaded to the same NVMe path.
Each rank runs a watchdog that stops the job as soon as its resident memory passes the
budget, so a size a system cannot hold is recorded as over budget (with the phase it was
in), never swapped or OOM-killed. For each system the sizes are tried in order until one
goes over; ZeRO-Infinity runs at the largest size ds_topkast trained. The table gives per
rank the peak resident memory (VmHWM) and, for ds_topkast, what the accounting predicts
(memory_report's accelerator bytes, which on the CPU accelerator are host bytes, + the NVMe
store's I/O buffers + one layer's dense α and its gradient + the resident baseline of a
rank before the model), step time,
refresh and checkpoint time, and the step time amortised over a refresh every 100 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# name: (hidden, layers); intermediate = 8/3 hidden rounded to 256, heads of 128.
SIZES = {"s0": (768, 6), "s1": (1024, 8), "s1a": (1152, 8), "s1b": (1280, 8), "s1c": (1408, 10), "s2": (1536, 12),
         "s2a": (1792, 12),
         "s3": (2048, 12), "s4": (2048, 20), "s5": (2560, 20), "s6": (3072, 24)}
VOCAB, SEQ, STEPS = 4096, 64, 3
SYSTEMS = ("ds_topkast", "zero3", "zero_infinity")


def llama_config(size: str):
    from transformers import LlamaConfig

    hidden, layers = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 255) // 256 * 256,
                       num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                       vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0, tie_word_embeddings=False)


def parameter_count(size: str) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(llama_config(size)).parameters())


def ds_config(system: str, size: str, nvme: str, lean: bool = False) -> dict:
    """ZeRO-3 set for a small memory budget, the same for every system.

    Buckets of hidden^2 entries (what the Hugging Face integration's "auto" gives):
    DeepSpeed's defaults (reduce buckets of 5e8 entries, optimizer sub-groups of 1e9) are
    sized for large GPUs, and on a small budget they alone would decide who fits. `lean`
    also keeps at most 4·hidden^2 parameters gathered, released as soon as a module is done
    (by default up to 1e9 stay gathered for reuse: the whole model, from forward to backward).
    """
    hidden = SIZES[size][0]
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "sub_group_size": 10**7}
    if lean:
        zero.update(stage3_max_live_parameters=4 * hidden * hidden, stage3_max_reuse_distance=4 * hidden * hidden)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "steps_per_print": 10**9, "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": zero}
    if system == "ds_topkast":
        config["topkast"] = {"forward_sparsity": 0.9, "backward_sparsity": 0.8, "refresh_interval": 100,
                             "include": ["*proj"], "dense_store": {"device": "nvme", "nvme_path": nvme}}
    if system == "zero_infinity":
        offload = {"device": "nvme", "nvme_path": nvme, "pin_memory": False}
        largest = max(VOCAB * hidden, hidden * (hidden * 8 // 3 + 255) // 256 * 256)
        config["zero_optimization"].update(offload_param={**offload, "buffer_count": 5, "buffer_size": largest},
                                           offload_optimizer={**offload, "buffer_count": 4})
    return config


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Watchdog:
    """Stops this rank (and so the job) as soon as its resident memory passes the budget; records the phase.

    `peaks` keeps the peak resident memory (VmHWM) at the end of each phase.
    """

    def __init__(self, budget: int, record: Path):
        self.budget, self.record, self._phase, self.peaks = budget, record, "start", {}
        threading.Thread(target=self._watch, daemon=True).start()

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        self.peaks[self._phase] = _status_kib("VmHWM") * 1024
        self._phase = name

    def _watch(self) -> None:
        while True:
            resident = _status_kib("VmRSS") * 1024
            if resident > self.budget:
                self.record.write_text(json.dumps({"over_budget": True, "phase": self.phase, "resident": resident}))
                os._exit(3)
            time.sleep(0.01)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(args) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ds_topkast
    from ds_topkast.core.layers import sparse_layers
    from ds_topkast.engine.memory_accounting import trained_bytes

    deepspeed.init_distributed()
    rank = dist.get_rank()
    record = Path(args.out) / f"{args.worker}_{args.size}_rank{rank}.json"
    watchdog = Watchdog(int(args.budget_gib * 2**30), record)
    baseline = _status_kib("VmRSS") * 1024
    config = ds_config(args.worker, args.size, args.nvme, args.lean)
    watchdog.phase = "build"
    if args.worker == "ds_topkast" and args.start == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(llama_config(args.size))
        ds_topkast.sparsify(model, config)
    else:
        hf_config = HfDeepSpeedConfig(config)  # while it lives, from_config builds inside deepspeed.zero.Init
        assert hf_config.is_zero3()
        model = AutoModelForCausalLM.from_config(llama_config(args.size))
    initialize = ds_topkast.initialize if args.worker == "ds_topkast" else deepspeed.initialize
    watchdog.phase = "initialize"
    engine, *_ = initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                            config=config)
    batch = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(rank))

    def step():
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()

    watchdog.phase = "steps"
    step()  # warm-up: first-step allocations
    times = [timed(step) for _ in range(STEPS)]
    trained = trained_bytes(engine)
    result = {"over_budget": False, "baseline": baseline, "step_s": statistics.median(times),
              "accounted": sum(v for k, v in trained.items() if k != "host_optimizer_state") + baseline}
    if args.worker == "ds_topkast":
        watchdog.phase = "refresh"
        result["refresh_s"] = timed(lambda: engine.topkast.refresher.refresh(engine.global_steps))
        watchdog.phase = "checkpoint"
        result["checkpoint_s"] = timed(lambda: engine.save_checkpoint(str(Path(args.nvme) / "ckpt")))
        report = ds_topkast.memory_report(engine)
        layers = sparse_layers(engine.module).values()
        one_layer = 2 * 4 * max(layer.in_features * layer.out_features for layer in layers)  # α and its gradient
        result.update(accounted=report.sparse_total + report.other_parameters + report.dense_store_bytes + one_layer
                      + baseline,
                      store_on_nvme=sum(4 * engine.topkast.state.store.layout(n)[1]
                                        for n in engine.topkast.state.store.names()))
    dist.barrier()
    watchdog.phase = "done"
    result["peak"] = _status_kib("VmHWM") * 1024
    result["peak_by_phase"] = watchdog.peaks
    record.write_text(json.dumps(result))


def run(system: str, size: str, args, budget_gib: float | None = None) -> dict:
    """One 2-rank job; the per-rank records merged (the larger peak, the slower time)."""
    nvme = Path(args.nvme) / f"{system}_{size}"
    nvme.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(nvme)], check=True)
    nvme.mkdir(parents=True)
    # A fixed mmap threshold (unless --glibc-default): glibc's default raises it after the first large free and then
    # keeps freed layer-sized blocks resident (about 1.5x the resident size of every system here); the same for all.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(args.port),
               __file__, "--worker", system, "--size", size, "--out", args.out, "--nvme", str(nvme),
               "--budget-gib", str(budget_gib or args.budget_gib), "--start", args.start] + (["--lean"] if args.lean else [])
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(nvme)], check=True)
    records = [json.loads(p.read_text()) for r in range(2)
               if (p := Path(args.out) / f"{system}_{size}_rank{r}.json").is_file()]
    if not records:
        raise SystemExit(f"{system} {size} failed without a record:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    over = [r for r in records if r["over_budget"]]
    merged = over[0] if over else {key: max(r[key] for r in records) if key != "peak_by_phase" else records[0][key]
                                   for key in records[0]}
    return {"system": system, "size": size, "params": parameter_count(size), "wall_s": wall,
            "budget_gib": budget_gib or args.budget_gib, "lean": args.lean, "start": args.start,
            "glibc_default": args.glibc_default, **merged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-gib", type=float, default=3.0, help="per-rank resident memory budget")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--nvme", default="/tmp/ds_topkast_bench_scale", help="folder for the NVMe store and swap")
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--port", type=int, default=29771)
    parser.add_argument("--lean", action="store_true", help="limit ZeRO-3's gathered parameters (see ds_config)")
    parser.add_argument("--start", choices=["meta", "zero_init"], default="meta",
                        help="how ds_topkast's model is built: on the meta device, or inside deepspeed.zero.Init")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's allocator at its defaults (no fixed MALLOC_MMAP_THRESHOLD_)")
    parser.add_argument("--unbudgeted-gib", type=float, default=9.0,
                        help="the per-rank limit of a ZeRO-Infinity rerun when it cannot start in the budget")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, largest = [], {}
    for system in [s for s in args.systems if s != "zero_infinity"]:
        for size in args.sizes:
            rows.append(run(system, size, args))
            print(json.dumps(rows[-1]), flush=True)
            if rows[-1]["over_budget"]:
                break
            largest[system] = size
    if "zero_infinity" in args.systems and "ds_topkast" in largest:
        rows.append(run("zero_infinity", largest["ds_topkast"], args))
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["over_budget"]:  # its step time all the same, with the machine's memory as the limit
            rows.append(run("zero_infinity", largest["ds_topkast"], args, budget_gib=args.unbudgeted_gib))
            print(json.dumps(rows[-1]), flush=True)
    (Path(args.out) / "bench_scale.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, largest, args.budget_gib))


def table(rows: list[dict], largest: dict, budget: float) -> str:
    gib = 2**30
    lines = [f"budget {budget:g} GiB resident per rank, 2 CPU ranks, ZeRO-3 fp32 + Adam",
             f"{'system':<15}{'size':<6}{'params':>9}{'peak/rank':>11}{'accounted':>11}{'step s':>9}"
             f"{'refresh s':>11}{'ckpt s':>8}{'amortised s':>13}"]
    for r in rows:
        if r["over_budget"]:
            lines.append(f"{r['system']:<15}{r['size']:<6}{r['params'] / 1e6:>8.0f}M   over {r['budget_gib']:g} GiB "
                         f"in {r['phase']}")
            continue
        if r["budget_gib"] != budget:
            r = {**r, "system": r["system"] + "*"}
        amortised = r["step_s"] + r.get("refresh_s", 0.0) / 100
        lines.append(f"{r['system']:<15}{r['size']:<6}{r['params'] / 1e6:>8.0f}M{r['peak'] / gib:>9.2f}Gi"
                     f"{r.get('accounted', 0) / gib:>9.2f}Gi{r['step_s']:>9.2f}{r.get('refresh_s', float('nan')):>11.2f}"
                     f"{r.get('checkpoint_s', float('nan')):>8.2f}{amortised:>13.2f}")
    params = {r["system"]: r["params"] for r in rows if not r["over_budget"] and r["size"] == largest.get(r["system"])}
    if "ds_topkast" in params and "zero3" in params:
        lines.append(f"largest ds_topkast / largest dense ZeRO-3: {params['ds_topkast'] / params['zero3']:.2f}x "
                     "(target >= 3x)")
    timing = {r["system"]: r for r in rows if not r["over_budget"] and r["size"] == largest.get("ds_topkast")}
    if any(r["budget_gib"] != budget and not r["over_budget"] for r in rows):
        lines.append("* over the budget: run with the larger limit only to time it")
    if "ds_topkast" in timing and "zero_infinity" in timing:
        ours = timing["ds_topkast"]["step_s"] + timing["ds_topkast"]["refresh_s"] / 100
        lines.append(f"ds_topkast amortised step / ZeRO-Infinity step at {largest['ds_topkast']}: "
                     f"{ours / timing['zero_infinity']['step_s']:.2f}x (target <= 0.5x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
