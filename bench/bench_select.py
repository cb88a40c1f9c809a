"""Exact top-K selection against torch.topk and torch.kthvalue on layers of 1M to 64M entries.

    python bench/bench_select.py [--sizes 1M 4M 16M 64M] [--densities 0.1 0.2] [--repeats 3] [--out runs/bench]

All three find the k largest |θ| of the same tensor in the same run (kthvalue finds the
threshold, which is what a mask needs): the table gives the median time of each and the
ratios. ds_topkast's selection also guarantees exactly k entries with ties broken by flat
index; the check below confirms it picks the same values as torch.topk (at 64M entries
equal magnitudes occur, and torch.topk breaks those ties arbitrarily). Writes select.json.
"""
import argparse
import json
from pathlib import Path

import torch
from common import median_seconds

from ds_topkast.core.select import topk_indices


def entries(text: str) -> int:
    return int(float(text[:-1]) * 2**20) if text[-1] in "Mm" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "4M", "16M", "64M"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    print(f"|θ| of random normal entries, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'entries':>12} {'density':>8} {'ours ms':>9} {'topk ms':>9} {'kthvalue ms':>12} {'topk/ours':>10} "
          f"{'kthvalue/ours':>14}")
    rows = []
    for size in map(entries, args.sizes):
        scores = torch.randn(size, generator=torch.Generator().manual_seed(0)).abs()
        for density in args.densities:
            k = round(density * size)
            ours = median_seconds(lambda: topk_indices(scores, k), args.repeats, warm_up=True)
            topk = median_seconds(lambda: torch.topk(scores, k, sorted=False), args.repeats, warm_up=True)
            kth = median_seconds(lambda: torch.kthvalue(scores, size - k + 1), args.repeats, warm_up=True)
            chosen = topk_indices(scores, k)  # same values as torch.topk's; at ties, the lower flat indices
            assert chosen.numel() == k and torch.equal(scores[chosen].sort().values,
                                                       torch.topk(scores, k).values.sort().values)
            rows.append({"entries": size, "density": density, "ours_s": ours, "topk_s": topk, "kthvalue_s": kth})
            print(f"{size:>12,} {density:>8} {ours * 1e3:>9.1f} {topk * 1e3:>9.1f} {kth * 1e3:>12.1f} "
                  f"{topk / ours:>10.2f} {kth / ours:>14.2f}")
        del scores
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
