"""The headline: a Llama-7B-shaped model trained full-parameter on one GPU, against what users pick instead.

    python bench/bench_headline.py [--shape llama-7b] [--variants 90/80@80,95/90@24,dense@80,offload@80,...]
                                   [--steps 6] [--micro 16] [--seq 256] [--store cpu|nvme] [--nvme DIR]
                                   [--out runs/headline]
    python bench/bench_headline.py --smoke          # DeepSpeed's CPU accelerator, a tiny shape (CI: a minute)

One Llama-style model (random init, `--shape`), bf16, AdamW, activation checkpointing, the
same batch (`--micro` rows of `--seq` tokens, the GaLore paper's 16 x 256 by default) for
every variant. Each variant runs in its own process under its own accelerator budget
(`VARIANT@GiB`: torch.cuda.set_per_process_memory_fraction caps the process, so one card
emulates an 80 GB and a 24 GB one; the CPU accelerator cannot be capped and reports the
budget only):
  90/80, 95/90  ds_topkast (ZeRO-2, one rank): the model built on the meta device, its
                sparsified layers initialised layer by layer into the dense store (host
                memory, or NVMe with --store nvme), never whole on the accelerator; N steps,
                one refresh (timed against its host-link floor: every store shard copied to
                the accelerator and back; on the CPU accelerator one pass over the store; not
                measured for an NVMe store, see bench_nvme.py), one checkpoint;
  dense         dense ZeRO-2 (DeepSpeed): expected not to start at 7B in 80 GB; it is tried
                all the same and the phase it runs out of memory in is recorded, with the
                bytes the accounting says it needs;
  offload       ZeRO-Offload (ZeRO-2, optimizer state, gradients and step on the host:
                DeepSpeedCPUAdam); skipped, saying why, when the accounting's 18 bytes per
                parameter of host memory are more than the machine has free (121 GB at 7B);
  galore        GaLore (galore-torch's GaLoreAdamW8bit, per-layer weight updates from
                gradient hooks as in its 7B recipe, rank --galore-rank), plain PyTorch;
  adam8bit      8-bit AdamW (bitsandbytes, else torchao's AdamW8bit), bf16 weights, plain PyTorch.
A variant may be given a time limit (--variant-seconds); what it measured before it stops
is kept, and headline.json is rewritten after every variant. A peer whose package is
missing is reported as such (bench/gpu_wheels.sh WITH_PEERS=1 carries them to an offline
GPU machine). Each record: tokens/s (median step), peak accelerator
memory (max_memory_allocated) against the accounting (ds_topkast.estimate_memory, from the
meta model before anything is built), peak host memory of the process, start-up phases, and
for ds_topkast the refresh against its floor and amortised over --interval steps. Prints the
table and the targets, writes headline.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# name: layers, hidden, intermediate, attention heads, key-value heads, vocabulary
SHAPES = {
    "llama-7b": (32, 4096, 11008, 32, 32, 32000),   # LLaMA-7B
    "llama-3b": (26, 3200, 8640, 32, 32, 32000),    # OpenLLaMA-3B
    "llama-1b": (22, 2048, 5632, 32, 4, 32000),     # TinyLlama-1.1B
    "cpu": (4, 1024, 2816, 8, 8, 32000),            # 0.2B: start-up and refresh measured on 2 CPU cores
    "smoke": (2, 128, 352, 4, 4, 512),
}
TOP_KAST = {"90/80": (0.9, 0.8), "95/90": (0.95, 0.9)}
PEERS = ("dense", "offload", "galore", "adam8bit")
DEFAULT_VARIANTS = "90/80@80,95/90@24,dense@80,offload@80,galore@24,adam8bit@80"
SMOKE_VARIANTS = "90/80@1,95/90@1,dense@1,galore@1,adam8bit@1"


def llama_config(shape: str):
    from transformers import LlamaConfig

    layers, hidden, intermediate, heads, kv_heads, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       tie_word_embeddings=False)


def meta_llama(shape: str):
    """The model on the meta device: no memory, any size."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(llama_config(shape))


def headline_config(variant: str, micro: int = 16, store: str = "cpu", nvme: str | None = None,
                    interval: int = 100) -> dict:
    """The DeepSpeed config of a DeepSpeed variant: bf16, AdamW, ZeRO-2 on one rank, buckets of 2e8 entries.

    Every DeepSpeed variant's accounting is that of the Top-KAST config at 90/80 when the
    variant is dense (memory_report's dense column is the same engine holding the layers dense).
    """
    zero = {"stage": 2, "reduce_bucket_size": int(2e8), "allgather_bucket_size": int(2e8), "overlap_comm": False}
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.0, "torch_adam": True}}}
    if variant == "offload":  # its own CPU Adam (JIT-built on first use), as ZeRO-Offload users run it
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        del config["optimizer"]["params"]["torch_adam"]
    forward, backward = TOP_KAST.get(variant, TOP_KAST["90/80"])
    dense_store = {"device": store, **({"nvme_path": nvme} if store == "nvme" else {})}
    config["topkast"] = {"forward_sparsity": forward, "backward_sparsity": backward, "refresh_interval": interval,
                         "include": ["*proj"], "dense_store": dense_store}
    return config


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _cuda() -> bool:
    return torch.cuda.is_available()


def _synchronize() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _peak_accelerator_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if _cuda() else None


def cap_accelerator(budget_gib: float) -> None:
    """Let this process allocate at most `budget_gib` of the GPU (a smaller card on a larger one)."""
    if _cuda():
        total = torch.cuda.get_device_properties(0).total_memory
        if budget_gib * 2**30 < total:
            torch.cuda.set_per_process_memory_fraction(budget_gib * 2**30 / total)


def _timed(fn) -> float:
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


def _batch(args, vocab: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (args.micro, args.seq), generator=generator).to(device)


class Record(dict):
    """One variant's results, written to its JSON file whatever happens (a phase that fails is recorded)."""

    def __init__(self, path: Path, **fields):
        super().__init__(fields, status="started", phase="start")
        self.path = path

    def phase(self, name: str) -> None:
        self["phase"] = name
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=1))


def train_steps(record: Record, step, steps: int, tokens_per_step: int) -> None:
    """Two untimed steps (allocations, the optimizer's first step), then `steps` timed ones."""
    record.phase("first steps")
    losses = [step() for _ in range(2)]
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    record.phase("steps")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        _synchronize()
        times.append(time.perf_counter() - start)
    record.update(step_s=statistics.median(times), tokens_s=tokens_per_step / statistics.median(times),
                  first_loss=losses[0], last_loss=losses[-1], peak_accelerator=_peak_accelerator_bytes())


def deepspeed_worker(record: Record, args) -> None:
    """ds_topkast, dense ZeRO-2 or ZeRO-Offload: the DeepSpeed engine over the same model and batch."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    import ds_topkast
    from common import store_floor_seconds, transfer_floor_seconds
    from ds_topkast.store.cpu import CPUDenseStore
    from ds_topkast.store.shards import available_host_memory

    variant = record["variant"]
    config = headline_config(variant, args.micro, args.store, args.nvme, args.interval)
    record.phase("build")
    model = meta_llama(args.shape)
    estimate = ds_topkast.estimate_memory(model, config)
    sparse = variant in TOP_KAST
    parameters = sum(p.numel() for p in model.parameters())
    # ZeRO-Offload's host bytes by the accounting's rule (memory_accounting._Rules.host_state): fp32 master (4),
    # moments (8), fp32 gradients (4) and a bf16 staging copy (2) per parameter
    dense_host = 18 * parameters if variant == "offload" else 0
    record.update(predicted_accelerator=(estimate.sparse_total if sparse else estimate.dense_total)
                  + estimate.other_parameters,
                  predicted_host=estimate.dense_store_bytes if sparse else dense_host, parameters=parameters)
    available = available_host_memory()
    if available is not None and record["predicted_host"] > available:
        record.update(status="skipped", reason=f"needs {record['predicted_host'] / 2**30:.1f} GiB of host memory "
                                               f"by the accounting, {available / 2**30:.1f} GiB available")
        return
    deepspeed.init_distributed()
    device = _accelerator().device_name(0)
    if sparse:
        record.phase("sparsify")
        record["sparsify_s"] = _timed(lambda: ds_topkast.sparsify(model, config))
        model.gradient_checkpointing_enable()
        record.phase("initialize")
        start = time.perf_counter()
        engine, *_ = ds_topkast.initialize(model=model, config=config)
    else:
        config.pop("topkast")
        record.phase("build on the accelerator")
        start = time.perf_counter()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(llama_config(args.shape), dtype=torch.bfloat16)
        record["build_s"] = time.perf_counter() - start
        model.gradient_checkpointing_enable()
        record.phase("initialize")
        start = time.perf_counter()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    record["initialize_s"] = time.perf_counter() - start
    batch = _batch(args, SHAPES[args.shape][-1], engine.device)

    def step() -> float:
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    train_steps(record, step, args.steps, args.micro * args.seq)
    if sparse:
        record.phase("refresh")
        store = engine.topkast.state.store
        record["refresh_s"] = _timed(lambda: engine.topkast.refresher.refresh(engine.global_steps))
        if isinstance(store, CPUDenseStore):  # on a GPU the host link; on the CPU accelerator one pass over memory
            record["refresh_floor_s"] = (transfer_floor_seconds(store, engine.device, repeats=1) if _cuda() else
                                         store_floor_seconds(store, repeats=1))
        record["store_bytes"] = store.nbytes()
        if args.checkpoint:
            timed_checkpoint(record, engine, Path(args.scratch) / f"checkpoint_{variant.replace('/', '_')}")


def timed_checkpoint(record: Record, engine, folder: Path) -> None:
    """One checkpoint, timed, in a folder that is removed again whatever happens (at 7B it is some 45 GB)."""
    import shutil

    record.phase("checkpoint")
    folder.parent.mkdir(parents=True, exist_ok=True)
    needed = 2 * record["predicted_accelerator"] + record["predicted_host"]  # generous: values, state, store
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        record["checkpoint"] = f"not taken: {free / 2**30:.0f} GiB free under {folder.parent}, about " \
                               f"{needed / 2**30:.0f} GiB needed (--scratch elsewhere, or --no-checkpoint)"
        return
    try:
        record["checkpoint_s"] = _timed(lambda: engine.save_checkpoint(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _galore_optimizer() -> tuple[str, type]:
    """GaLore's 8-bit AdamW (its 7B recipe) on CUDA; its 32-bit AdamW elsewhere (the 8-bit one calls CUDA)."""
    import galore_torch

    if _cuda():
        return "galore-torch GaLoreAdamW8bit", galore_torch.GaLoreAdamW8bit
    return "galore-torch GaLoreAdamW (32-bit: GaLoreAdamW8bit needs CUDA)", galore_torch.GaLoreAdamW


def _galore_optimizers(model, optimizer_type: type, rank: int, lr: float) -> dict:
    """GaLore's 7B recipe: one optimizer per parameter, stepped from its gradient hook (per-layer updates).

    The attention and MLP projections are projected to `rank`; embeddings, norms and the
    head get the same AdamW without projection, as in the GaLore repository's torchrun_main.py.
    """
    optimizers = {}
    for name, param in model.named_parameters():
        group = {"params": [param]}
        if param.dim() == 2 and name.endswith("proj.weight"):
            group.update(rank=rank, update_proj_gap=200, scale=0.25, proj_type="std")
        optimizers[param] = optimizer_type([group], lr=lr, weight_decay=0.0)

    def step_and_free(param) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad()

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(step_and_free)
    return optimizers


def plain_worker(record: Record, args) -> None:
    """GaLore or 8-bit AdamW: a plain PyTorch loop over the same model (bf16 weights) and batch."""
    from common import eight_bit_adamw
    from transformers import AutoModelForCausalLM

    record.phase("import")
    try:
        record["package"], optimizer_type = (_galore_optimizer if record["variant"] == "galore" else
                                             eight_bit_adamw)()
    except ImportError as error:
        record.update(status="not installed", reason=str(error).splitlines()[0][:300])
        return
    except Exception as error:  # noqa: BLE001 - installed but not loadable here (a CUDA library it was not built for)
        record.update(status="not usable", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
        return
    device = "cuda" if _cuda() else "cpu"
    record.phase("build on the accelerator")
    model_parameters = meta_llama(args.shape)
    record["parameters"] = sum(p.numel() for p in model_parameters.parameters())
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(args.shape), dtype=torch.bfloat16)
    record["build_s"] = time.perf_counter() - start
    model.gradient_checkpointing_enable()
    model.train()
    if record["variant"] == "galore":
        _galore_optimizers(model, optimizer_type, args.galore_rank, 1e-3)
        optimizer = None
    else:
        optimizer = optimizer_type(model.parameters(), lr=3e-4, weight_decay=0.0)
    batch = _batch(args, SHAPES[args.shape][-1], device)

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    train_steps(record, step, args.steps, args.micro * args.seq)


def worker(args) -> None:
    variant, budget = args.worker.split("@")
    record = Record(Path(args.out) / f"{variant.replace('/', '_')}.json", variant=variant, budget_gib=float(budget),
                    shape=args.shape, micro=args.micro, seq=args.seq,
                    device=torch.cuda.get_device_name() if _cuda() else "CPU accelerator")
    cap_accelerator(float(budget))
    try:
        (plain_worker if variant in ("galore", "adam8bit") else deepspeed_worker)(record, args)
        if record["status"] == "started":
            record["status"] = "trained"
    except torch.OutOfMemoryError as error:
        record.update(status="out of memory", reason=str(error).splitlines()[0][:300],
                      peak_accelerator=_peak_accelerator_bytes())
    except Exception:  # noqa: BLE001 - the record says where and why; the other variants still run
        record.update(status="failed", reason=traceback.format_exc()[-1500:])
    record.save()


def run_variant(spec: str, args) -> dict:
    """One variant in its own process (a clean accelerator, its own cap); its record with the peak host memory."""
    from common import free_port, run_with_peak_rss, single_rank_environment

    single_rank_environment()
    variant = spec.split("@")[0]
    path = Path(args.out) / f"{variant.replace('/', '_')}.json"
    path.unlink(missing_ok=True)
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    command = [sys.executable, __file__, "--worker", spec, "--shape", args.shape, "--steps", str(args.steps),
               "--micro", str(args.micro), "--seq", str(args.seq), "--store", args.store, "--interval",
               str(args.interval), "--galore-rank", str(args.galore_rank), "--out", args.out,
               "--scratch", args.scratch] + (["--nvme", args.nvme] if args.nvme else []) + (
                   [] if args.checkpoint else ["--no-checkpoint"])
    if args.variant_seconds:  # the process stops itself at the limit (timeout sends SIGTERM, then SIGKILL)
        command = ["timeout", "--kill-after=10", str(args.variant_seconds)] + command
    started = time.perf_counter()
    try:
        host_peak = run_with_peak_rss(command, Path(args.out) / f"{variant.replace('/', '_')}.log", env=env,
                                      cwd=REPO)
    except subprocess.CalledProcessError as error:  # killed (host memory, a signal, the limit): its record stands
        host_peak = None
        if not path.is_file():
            return {"variant": variant, "status": "failed", "reason": error.output[-1500:]}
    record = json.loads(path.read_text())
    if record["status"] == "started":
        limit = args.variant_seconds and time.perf_counter() - started >= args.variant_seconds
        record.update(status="time limit" if limit else "killed",
                      reason=f"the process ended in phase {record['phase']!r}")
    record.update(host_peak=host_peak, wall_s=time.perf_counter() - started)
    return record


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if isinstance(value, (int, float)) else "-"


def table(rows: list[dict], interval: int) -> str:
    """The side-by-side table and the targets of issue 27."""
    by_variant = {r["variant"]: r for r in rows}
    lines = [f"{'variant':<10}{'budget':>7}{'status':>16}{'tokens/s':>10}{'peak GiB':>10}{'predicted':>10}"
             f"{'host GiB':>10}{'predicted':>10}{'start s':>9}{'refresh s':>10}{'/floor':>8}{'refresh %':>10}"
             f"{'loss':>14}"]
    for r in rows:
        start = sum(r.get(key, 0.0) for key in ("sparsify_s", "build_s", "initialize_s"))
        refresh = r.get("refresh_s")
        floor = f"{refresh / r['refresh_floor_s']:.2f}" if refresh and r.get("refresh_floor_s") else "-"
        share = f"{refresh / interval / (refresh / interval + r['step_s']):.2%}" if refresh and r.get("step_s") else "-"
        loss = f"{r['first_loss']:.2f}->{r['last_loss']:.2f}" if "last_loss" in r else "-"
        tokens = f"{r['tokens_s']:.0f}" if "tokens_s" in r else "-"
        lines.append(f"{r['variant']:<10}{r.get('budget_gib', 0):>7g}{r['status']:>16}{tokens:>10}"
                     f"{_gib(r.get('peak_accelerator')):>10}{_gib(r.get('predicted_accelerator')):>10}"
                     f"{_gib(r.get('host_peak')):>10}{_gib(r.get('predicted_host')):>10}{start:>9.1f}"
                     f"{refresh or 0:>10.2f}{floor:>8}{share:>10}{loss:>14}")
        if r.get("checkpoint"):
            lines.append(f"  {r['variant']}: checkpoint {r['checkpoint']}")
        if r["status"] not in ("trained",):
            lines.append(f"  {r['variant']}: {r['status']} in {r.get('phase', '?')}: {r.get('reason', '')}"[:400])
    lines.append("predicted: the accounting's bytes of trained state (estimate_memory) on the accelerator, and on the "
                 "host (the dense store; ZeRO-Offload's master, moments, gradients and staging copy); peak: "
                 "max_memory_allocated over the timed steps (activations included; CUDA only); host: peak resident "
                 f"memory of the variant's process; refresh %: of training time at one refresh per {interval} steps")

    def tokens(name: str) -> float | None:
        row = by_variant.get(name, {})
        return row.get("tokens_s") if row.get("status") == "trained" else None

    checks = [("90/80", "offload", 3.0, "Top-KAST 90/80 >= 3x ZeRO-Offload's tokens/s"),
              ("95/90", "galore", 1.0, "Top-KAST 95/90 >= GaLore's tokens/s")]
    for ours, theirs, factor, target in checks:
        if tokens(ours) and tokens(theirs):
            ratio = tokens(ours) / tokens(theirs)
            lines.append(f"{target}: {ratio:.2f}x ({'met' if ratio >= factor else 'not met'})")
        else:
            lines.append(f"{target}: not measured ({ours}: {by_variant.get(ours, {}).get('status', 'not run')}, "
                         f"{theirs}: {by_variant.get(theirs, {}).get('status', 'not run')})")
    for name in TOP_KAST:
        row = by_variant.get(name, {})
        if row.get("refresh_s") and row.get("refresh_floor_s"):
            ratio = row["refresh_s"] / row["refresh_floor_s"]
            verdict = "met" if ratio <= 2 else "not met"
            lines.append(f"Top-KAST {name} refresh <= 2x its floor: {ratio:.2f}x ({verdict})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-7b")
    parser.add_argument("--variants", default=None,
                        help=f"VARIANT@GiB,...: VARIANT from {list(TOP_KAST) + list(PEERS)}, GiB the accelerator "
                             f"budget (default {DEFAULT_VARIANTS})")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 untimed ones)")
    parser.add_argument("--micro", type=int, default=16, help="rows per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--interval", type=int, default=100, help="refresh interval the refresh is amortised over")
    parser.add_argument("--store", choices=["cpu", "nvme"], default="cpu", help="where ds_topkast's dense store lives")
    parser.add_argument("--nvme", help="folder for an NVMe store")
    parser.add_argument("--scratch", default=None,
                        help="folder for the one checkpoint, removed after it (default: --nvme, else a folder in /tmp)")
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                        help="skip the timed checkpoint (at 7B some 45 GB written)")
    parser.add_argument("--variant-seconds", type=int, default=0,
                        help="stop a variant after this many seconds (0: no limit); its record says where it was")
    parser.add_argument("--galore-rank", type=int, default=1024, help="GaLore's projection rank (its 7B recipe: 1024)")
    parser.add_argument("--smoke", action="store_true",
                        help="DeepSpeed's CPU accelerator, the smoke shape, 2 timed steps (CI)")
    parser.add_argument("--out", default="runs/headline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.shape, args.steps, args.micro, args.seq, args.galore_rank = "smoke", 2, 2, 32, 8
        args.variants = args.variants or SMOKE_VARIANTS
    args.variants = args.variants or DEFAULT_VARIANTS
    if args.store == "nvme" and not args.nvme:
        parser.error("--store nvme needs --nvme DIR (a folder on the NVMe drive)")
    args.scratch = args.scratch or args.nvme or "/tmp/ds_topkast_headline"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    specs = args.variants.split(",")
    unknown = [s for s in specs if s.split("@")[0] not in (*TOP_KAST, *PEERS) or "@" not in s]
    if unknown:
        parser.error(f"--variants {unknown}: each is VARIANT@GiB with VARIANT from {list(TOP_KAST) + list(PEERS)}")
    layers, hidden, intermediate, *_ = SHAPES[args.shape]
    print(f"{args.shape}: {layers} layers, hidden {hidden}, intermediate {intermediate}; {args.micro} x {args.seq} "
          f"tokens per step, bf16, AdamW, activation checkpointing; "
          f"{torch.cuda.get_device_name() if _cuda() else 'CPU accelerator (budgets not enforced)'}", flush=True)
    rows = []
    for spec in specs:  # headline.json after every variant: a run stopped by a time limit keeps what it measured
        rows.append(run_variant(spec, args))
        print(json.dumps(rows[-1]), flush=True)
        (Path(args.out) / "headline.json").write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))
    print(table(rows, args.interval))
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
