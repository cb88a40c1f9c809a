"""The training command: a language model trained with Top-KAST, under the deepspeed launcher or alone.

    deepspeed --module ds_topkast.train --config configs/tiny_gpt2.json --out runs/tiny
    ds-topkast-train --config configs/tiny_gpt2.json --out runs/tiny        # one process, no launcher

One JSON file holds everything: DeepSpeed's own sections (batch sizes, gradient
accumulation and clipping, optimizer, warm-up + cosine scheduler, ZeRO, bf16, and its
"tensorboard" / "csv_monitor" monitors), the "topkast" section, and a "train" section for
this command (model, data, steps, evaluation, checkpoints; DeepSpeed ignores unknown
top-level sections). Without a "topkast" section the same command trains the model
dense with plain DeepSpeed, the baseline to compare against.

The corpus is prepared once (tokenised into a memory-mapped cache, by one process per
node) with its standard train / valid / test splits. The run prints the memory report, a
progress bar, validation during training (bits per byte, or perplexity for token
corpora), each refresh's mask dynamics, and the test split's result at the end; writes
metrics.jsonl (a "data" record naming each split's files and tokens first, a "test"
record last), the monitor's events, checkpoints every `checkpoint_interval` steps and at
the end, and a plot of the losses and mask dynamics (training.png). `--resume` continues
a stopped run exactly where its latest checkpoint left it, on its original learning-rate
schedule; `--evaluate valid|test` scores a run's latest checkpoint on a whole split.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from ds_topkast.config import SECTION, load_deepspeed_config
from ds_topkast.convert.dense_weights import tag_folder
from ds_topkast.errors import CorpusError
from ds_topkast.lm.data.corpus_cache import PreparedCorpus, open_corpus, prepare_corpus
from ds_topkast.lm.data.corpus_sources import DataConfig
from ds_topkast.lm.loop import TrainingLoop, train
from ds_topkast.lm.models.runners import make_runner
from ds_topkast.lm.run_files import check_resumed_layout, run_layout, schedule_length
from ds_topkast.lm.train_config import TrainConfig, train_section
from ds_topkast.parallel.collectives import release_cpu_shm_buffer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with \"topkast\" and \"train\" sections.")
    parser.add_argument("--out", default="runs/tiny", help="Folder for checkpoints, metrics.jsonl and the plot.")
    parser.add_argument("--steps", type=int, help="Stop at this step (default train.steps); the learning-rate "
                                                  "schedule keeps its length.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in --out.")
    parser.add_argument("--reschedule", action="store_true",
                        help="With --resume: make the learning-rate schedule end at the new last step (--steps, or "
                             "train.steps) instead of where the run's schedule was first set to end.")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="Start a new run from the weights of a checkpoint (a tag folder, or a run folder's "
                             "latest) at this config's sparsity: how a run changes its topkast settings. The "
                             "optimizer state and schedule start afresh.")
    parser.add_argument("--evaluate", choices=("valid", "test"),
                        help="Score the latest checkpoint in --out on this whole split, append the record to "
                             "metrics.jsonl, and exit.")
    parser.add_argument("--prepare-only", action="store_true",
                        help="Prepare the corpus (tokenise it into the cache), print its splits, and exit.")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="Set by the deepspeed launcher.")
    return parser.parse_args(argv)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """ds_topkast's engine when the config has a "topkast" section, else plain DeepSpeed (the dense baseline)."""
    import deepspeed

    import ds_topkast

    if SECTION in ds_config:
        engine, *_ = ds_topkast.initialize(model=model, config=ds_config)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def gather_with_the_whole_forward(model: torch.nn.Module, ds_config: dict[str, Any]) -> None:
    """Under ZeRO-3, register the parameters a model reads outside their own module's forward (Transformer-XL's
    tied adaptive softmax) as external parameters of the model, so DeepSpeed gathers them for its whole forward."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return
    import deepspeed

    for parameter in getattr(model, "parameters_read_outside_their_forward", list)():
        deepspeed.zero.register_external_parameter(model, parameter)


def launched_alone() -> None:
    """Give a process started without a launcher (the console script) the environment of a world of one."""
    if any(key in os.environ for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")):
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def corpus_prepared_once_per_node(data: DataConfig) -> PreparedCorpus:
    """Local rank 0 of each node prepares the corpus (when the cache lacks it) while the others wait, then all map it.

    Every rank learns whether a preparation failed, so a bad corpus ends the job at once
    instead of leaving the other ranks waiting for a collective that never comes. They
    wait in a gloo collective of their own with a day's timeout: tokenising a large
    corpus can outlast NCCL's 30-minute watchdog.
    """
    waiting = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    failure = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            prepare_corpus(data)
        except Exception as err:  # re-raised below, after the others have heard of it
            failure = err
    failed = [False] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failed, failure is not None, group=waiting)
    torch.distributed.destroy_process_group(waiting)
    if failure is not None:
        raise failure
    if any(failed):
        raise SystemExit(f"Rank {failed.index(True)} could not prepare the corpus; its error is in its output.")
    return open_corpus(data)


def require_application_extra(cfg: TrainConfig) -> None:
    """The "lm" install extra's packages this run needs, or an error that says how to get them."""
    needed = ["tqdm"] + ["matplotlib"] * cfg.plot + ["datasets"] * (cfg.data.dataset is not None and not cfg.data.path)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"The training command needs {', '.join(missing)}: pip install 'ds_topkast[lm]'.")


def check_arguments(args, out: Path) -> None:
    """Refuse contradictory flags and a wrong --out before any rank starts work."""
    if sum(map(bool, (args.resume, args.init_from, args.evaluate))) > 1:
        raise SystemExit("--resume continues a run, --init-from starts a new one from a checkpoint's weights, and "
                         "--evaluate scores a run's checkpoint; give one of them.")
    if args.reschedule and not args.resume:
        raise SystemExit("--reschedule changes a resumed run's learning-rate schedule; add --resume.")
    if args.init_from:
        tag_folder(args.init_from)  # a wrong path fails here
    has_run = (out / "latest").exists()
    if (args.resume or args.evaluate) and not has_run:
        flag = "--resume" if args.resume else "--evaluate"
        raise SystemExit(f"{flag}: {out} holds no checkpoint (no 'latest' file); train a run there first.")
    if not (args.resume or args.evaluate or args.prepare_only) and has_run:
        raise SystemExit(f"{out} already holds a run (its 'latest' checkpoint); add --resume to continue it, or "
                         "give a new --out.")


def main(argv=None) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    import ds_topkast

    args = parse_args(argv)
    ds_config = load_deepspeed_config(args.config)
    cfg = train_section(ds_config)
    stop, out = args.steps or cfg.steps, Path(args.out)
    check_arguments(args, out)
    require_application_extra(cfg)
    if args.prepare_only:
        try:
            print(json.dumps(open_corpus(cfg.data).record(), indent=1), flush=True)
        except CorpusError as err:
            raise SystemExit(f"train.data: {err}") from None
        return
    out.mkdir(parents=True, exist_ok=True)
    length = schedule_length(ds_config, out, cfg, stop, args)
    if length is not None:
        ds_config["scheduler"].setdefault("params", {})["total_num_steps"] = length
    layout = run_layout(ds_config)
    if args.resume:
        check_resumed_layout(out, layout)
    launched_alone()
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        corpus = corpus_prepared_once_per_node(cfg.data)
    except CorpusError as err:
        raise SystemExit(f"train.data: {err}") from None
    runner = make_runner(cfg.model, corpus, cfg.seq_len, layout["micro_batch_per_rank"], cfg.seed,
                         dist.get_world_size(), layout["gradient_accumulation_steps"], cfg.eval_streams)
    model = runner.build_model()
    if args.init_from:
        ds_topkast.load_dense_weights(model, args.init_from)
    gather_with_the_whole_forward(model, ds_config)
    engine = build_engine(model, ds_config)
    check_engine_layout(engine, layout)
    loop = TrainingLoop(engine, runner, cfg, out, corpus.unit, stop, length or cfg.steps)
    if args.evaluate:
        engine.load_checkpoint(str(out), load_optimizer_states=False, load_lr_scheduler_states=False)
        loop.score(args.evaluate)
    else:
        train(loop, engine, corpus, runner, args, {"schedule_steps": length, **layout})
    dist.barrier()
    release_cpu_shm_buffer()


def check_engine_layout(engine, layout: dict[str, int]) -> None:
    """The batch layout the runner was built for is the one DeepSpeed derived from the config."""
    derived = {"micro_batch_per_rank": engine.train_micro_batch_size_per_gpu(),
               "gradient_accumulation_steps": engine.gradient_accumulation_steps()}
    if any(layout[key] != value for key, value in derived.items()):
        raise SystemExit(f"DeepSpeed derived {derived} from the batch sizes, the training command {layout}; set "
                         "train_micro_batch_size_per_gpu and gradient_accumulation_steps explicitly.")


if __name__ == "__main__":
    main()
