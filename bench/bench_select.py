"""Exact top-K selection against torch.topk on one large layer (DESIGN.md, Section 3, step 2).

    python bench/bench_select.py [--numel 16000000] [--repeats 5]

Both pick the k largest |θ| of the same tensor in the same run; the table gives the median
time of each and their ratio. ds_topkast's selection also guarantees ties by flat index
and exactly k entries, which the check below confirms against torch.topk's set.
"""
import argparse
import statistics
import time

import torch

from ds_topkast.select import topk_indices


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=16_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    scores = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)).abs()
    print(f"|θ| of {args.numel:,} random normal entries, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'density':>8} {'k':>12} {'ds_topkast ms':>14} {'torch.topk ms':>14} {'topk / ours':>12}")
    for density in (0.05, 0.1, 0.2, 0.5):
        k = round(density * args.numel)
        ours = median_seconds(lambda: topk_indices(scores, k), args.repeats)
        ref = median_seconds(lambda: torch.topk(scores, k, sorted=False), args.repeats)
        assert torch.equal(topk_indices(scores, k), torch.topk(scores, k).indices.sort().values)
        print(f"{density:>8} {k:>12,} {ours * 1e3:>14.0f} {ref * 1e3:>14.0f} {ref / ours:>12.2f}")


if __name__ == "__main__":
    main()
