"""One rank's side of the multi-rank tests; tests/test_distributed.py starts it with the deepspeed launcher.

Every run trains the tiny GPT-2 on the same global batches (GLOBAL_BATCH rows per step,
each rank taking its own rows), so a run on any world size must match the 1-rank run.
The pytest process imports `train` and `state_of` for its own 1-rank runs.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from models import batches, ds_config, tiny_gpt2

import ds_topkast
from ds_topkast.core.layers import sparse_layers

GLOBAL_BATCH = 4


# The algorithms whose updates draw on every rank's data (RigL's dense gradient) or on a seeded draw (SET).
ALGORITHMS = {
    "rigl": dict(algorithm="rigl", forward_sparsity=0.8, backward_sparsity=0.8, drop_fraction=0.5,
                 update_end_step=100),
    "set": dict(algorithm="set", forward_sparsity=0.8, backward_sparsity=0.8, drop_fraction=0.5,
                update_end_step=100, seed=7),
}


def build(stage: int, world: int, algorithm: str | None = None, **topkast):
    section = ALGORITHMS[algorithm] if algorithm else dict(forward_interval=1, exploration_l2=1e-3)
    cfg = ds_config(stage=stage, micro_batch=GLOBAL_BATCH // world, lr=1e-2, refresh_interval=2,
                    **section, **topkast)
    cfg["optimizer"]["params"]["eps"] = 1e-4  # see test_reference_equivalence.EPS
    if stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # save_16bit_model
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    return engine


def perturb_store(engine) -> None:
    """A stray write into this rank's dense store."""
    name = next(iter(sparse_layers(engine.module)))
    engine.topkast.state.store.shard(name).theta[0] += 1.0


def perturb_sets(engine) -> None:
    """This rank's set B loses an entry and gains another: its masks no longer match the other ranks'."""
    layer = next(iter(sparse_layers(engine.module).values()))
    outside = torch.ones(layer.in_features * layer.out_features, dtype=torch.bool)
    indices = layer.indices
    outside[indices] = False
    indices[-1] = int(outside.nonzero()[0])
    layer.assign_indices(indices.sort().values, layer.forward_mask)


PERTURBATIONS = {"perturb": perturb_store, "diverge": perturb_sets}


def train(engine, first: int, last: int, perturb=None, perturb_at: int | None = None) -> list[float]:
    """Optimizer steps first..last-1 on this rank's rows; returns the global mean loss per step."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = GLOBAL_BATCH // world
    losses = []
    for step, batch in enumerate(batches(last, micro_batch=GLOBAL_BATCH)[first:], start=first):
        if step == perturb_at and rank == world - 1:
            perturb(engine)
        mine = batch[rank * rows:(rank + 1) * rows]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        total = torch.tensor([loss.item()])
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def state_of(engine, losses: list[float]) -> dict:
    """Everything the tests compare, gathered in full on every rank (collectives: call on all ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param

    adapter = engine.topkast.refresher.adapter
    store = engine.topkast.state.store
    layers = sparse_layers(engine.module)
    values = {n: (p.detach() if (v := safe_get_full_fp32_param(p)) is None else v).float().reshape(-1).clone()
              for n, p in engine.module.named_parameters()}
    return {
        "losses": losses,
        "indices": {n: l.indices.clone() for n, l in layers.items()},
        "forward_mask": {n: l.forward_mask.clone() for n, l in layers.items()},
        "compact": {n: adapter.get_master(l.values).clone() for n, l in layers.items()},
        "params": {n: v for n, v in values.items() if not n.endswith(".values")},
        "store": {n: (*store.layout(n), store.numel(n)) for n in store.names()},
        "history": [d.as_dict() for d in engine.topkast.refresher.history],
    }


def main() -> None:
    import deepspeed.comm as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["equivalence", "perturb", "diverge", "save", "resume", "roundtrip",
                                         "algorithms", "one_rank_save"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--start", type=int, default=0, help="resume: the checkpoint's step")
    parser.add_argument("--nvme", help="keep the dense store in files under this folder")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if args.mode == "algorithms":
        for stage in args.stages:
            for algorithm in ALGORITHMS:
                engine = build(stage, int(os.environ["WORLD_SIZE"]), algorithm)
                state = state_of(engine, train(engine, 0, args.steps))
                torch.save(state, out / f"{algorithm}_stage{stage}_rank{dist.get_rank()}.pt")
        return
    for stage in args.stages:
        store = {"dense_store": {"device": "nvme", "nvme_path": args.nvme}} if args.nvme else {}
        engine = build(stage, int(os.environ["WORLD_SIZE"]), **store)
        rank = dist.get_rank()
        if args.mode == "one_rank_save":  # the slip of a custom loop: a ZeRO-3 save inside `if rank == 0:`
            train(engine, 0, 1)
            if rank == 0:
                engine.save_16bit_model(str(out / "plain"))
            dist.barrier()
            raise SystemExit("a save on one rank was not caught")
        if args.mode in PERTURBATIONS:
            train(engine, 0, args.steps, PERTURBATIONS[args.mode], perturb_at=3)
            raise SystemExit(f"the {args.mode} perturbation was not caught")
        if args.mode == "roundtrip":  # save at --start, resume in a fresh engine on the same ranks
            train(engine, 0, args.start)
            engine.save_checkpoint(str(out / f"ckpt_stage{stage}"))
            engine = build(stage, int(os.environ["WORLD_SIZE"]))
        if args.mode in ("resume", "roundtrip"):
            engine.load_checkpoint(str(out / f"ckpt_stage{stage}"))
        losses = train(engine, args.start, args.steps)
        if args.mode == "save":
            engine.save_checkpoint(str(out / f"ckpt_stage{stage}"))
        state = state_of(engine, losses)
        if args.mode == "roundtrip":  # the plain model, both ways out of the engine (collectives)
            state["plain"] = ds_topkast.plain_state_dict(engine)
            engine.save_16bit_model(str(out / f"plain_stage{stage}"))
        torch.save(state, out / f"{args.mode}_stage{stage}_rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())
