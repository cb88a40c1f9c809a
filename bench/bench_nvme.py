"""Refresh time of the NVMe dense store against the raw async-I/O floor, and the host memory it holds.

    python bench/bench_nvme.py --path /mnt/nvme/bench [--layers 8] [--width 2048] [--repeats 3]

One rank. A stack of `layers` square Linear layers (90/80) makes a store `layers / 2`
times larger than the NVMe store's two buffers. In one run it times
  refresh    a full Top-KAST refresh: stream every shard in, write back, select,
             rebuild, write every shard out (crash-safe: temporary file, fsync, rename);
  I/O floor  the same files read and then written with a raw DeepSpeed aio handle of the
             same settings into one pinned buffer, nothing else;
  in memory  the same refresh with the CPU store (no I/O at all): the compute floor;
and samples the process's resident memory during the NVMe refresh.
"""
import argparse
import os
import statistics
import threading
import time

import psutil
import torch
from common import Stack


def io_floor(store) -> float:
    """Seconds to read and write every shard file once with a raw aio handle."""
    handle = store._handles[0]
    buffer = store._buffer(0)
    start = time.perf_counter()
    for name in store.names():
        path = str(store._file(name))
        length = os.path.getsize(path) // 4
        handle.sync_pread(buffer[:length], path)
        handle.sync_pwrite(buffer[:length], path + ".floor")
    seconds = time.perf_counter() - start
    for name in store.names():
        os.unlink(str(store._file(name)) + ".floor")
    return seconds


def peak_rss_during(fn) -> tuple[float, int, int]:
    """Wall time of fn, resident memory before it and the peak while it ran."""
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, before, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="A folder on the device to measure.")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.path, exist_ok=True)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29599"}.items():
        os.environ.setdefault(key, value)  # one process, no launcher
    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 0},
              "topkast": {"forward_sparsity": 0.9, "backward_sparsity": 0.8, "refresh_interval": 10**6,
                          "dense_store": {"device": "nvme", "nvme_path": args.path}}}
    engine = trained_engine(config, args)
    cpu_config = {**config, "topkast": {**config["topkast"], "dense_store": {"device": "cpu"}}}
    cpu_engine = trained_engine(cpu_config, args)
    store = engine.topkast.state.store
    refreshes, floors, peaks, in_memory = [], [], [], []
    for _ in range(args.repeats):
        seconds, before, peak = peak_rss_during(lambda: engine.topkast.refresher.refresh(engine.global_steps))
        refreshes.append(seconds)
        peaks.append(peak - before)
        floors.append(io_floor(store))
        in_memory.append(peak_rss_during(lambda: cpu_engine.topkast.refresher.refresh(cpu_engine.global_steps))[0])
    mib = 2**20
    store_bytes = sum(4 * store.layout(name)[1] for name in store.names())
    refresh, floor, memory = (statistics.median(t) for t in (refreshes, floors, in_memory))
    print(f"store {store_bytes / mib:.0f} MiB in {args.layers} files under {args.path}; "
          f"buffers {store.nbytes() / mib:.0f} MiB ({store_bytes / store.nbytes():.1f}x smaller than the store)")
    print(f"{'NVMe refresh s':>15}{'I/O floor s':>12}{'NVMe / I/O':>11}{'in-memory refresh s':>21}"
          f"{'NVMe / in-memory':>18}{'RSS growth MiB':>16}")
    print(f"{refresh:>15.3f}{floor:>12.3f}{refresh / floor:>11.2f}{memory:>21.3f}{refresh / memory:>18.2f}"
          f"{max(peaks) / mib:>16.1f}")


def trained_engine(config: dict, args):
    """A ds_topkast engine on the layer stack after one optimizer step."""
    import ds_topkast

    engine, *_ = ds_topkast.initialize(model=Stack(args.layers, args.width), config=config)
    engine.backward(engine(torch.randn(4, args.width, device=engine.device)))
    engine.step()
    return engine


if __name__ == "__main__":
    main()
