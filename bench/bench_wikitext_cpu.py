"""The paper's protocol at CPU scale: dense, 80/0 and 90/80 on a WikiText-format corpus, test perplexity.

    python bench/bench_wikitext_cpu.py [--steps 300] [--out runs/wikitext_cpu]

The corpus is made from text every machine has: the Python documentation's topics
(pydoc_data), written as WikiText is (wiki.train.tokens / wiki.valid.tokens /
wiki.test.tokens; a " = title = " line per topic, words and punctuation separated by
spaces, words seen fewer than 3 times in training replaced by <unk>), whole topics per
split. Each variant is the training command on configs/tiny_transformer_xl.json with
the word tokenizer: validation during training, the whole test split at the end, under
the same evaluation protocol. Prints the test perplexities and writes wikitext_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench_lm import REPO, variant_config


def topic_lines(text: str, title: str) -> list[list[str]]:
    """A topic as WikiText lines of words: its title, then one line per paragraph, blank lines between."""
    lines = [["=", title, "="], []]
    for paragraph in re.split(r"\n\s*\n", text):
        words = re.findall(r"\w+|[^\w\s]", paragraph)
        if words:
            lines += [words, []]
    return lines


def make_wikitext(folder: Path) -> Path:
    from pydoc_data.topics import topics

    names = sorted(topics)
    splits = {"valid": names[3::10], "test": names[8::10]}
    splits["train"] = [n for n in names if n not in splits["valid"] + splits["test"]]
    lines = {split: [line for name in chosen for line in topic_lines(topics[name], name)]
             for split, chosen in splits.items()}
    counts = Counter(word for line in lines["train"] for word in line)
    folder.mkdir(parents=True, exist_ok=True)
    for split, content in lines.items():
        with (folder / f"wiki.{split}.tokens").open("w", encoding="utf-8") as out:
            for line in content:
                out.write(" " + " ".join(w if counts[w] >= 3 else "<unk>" for w in line) + " \n" if line else " \n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/wikitext_cpu")
    args = parser.parse_args()
    out = Path(args.out)
    corpus = make_wikitext(out / "wikitext_format")
    train = dict(data={"path": str(corpus), "tokenizer": "words"}, steps=args.steps, eval_interval=args.steps // 3,
                 eval_batches=None, log_interval=20, test=True, plot=False, seq_len=64)
    results = {}
    for variant in ("dense", "80_0", "90_80"):
        config = variant_config(REPO / "configs" / "tiny_transformer_xl.json", variant, out, train)
        run = out / variant
        if not (run / "latest").exists():
            with (out / f"{variant}.log").open("w") as log:
                subprocess.run([sys.executable, "-m", "ds_topkast.train", "--config", str(config), "--out", str(run)],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[variant] = {"test": next(r for r in records if r["kind"] == "test"),
                            "valid": [r for r in records if r["kind"] == "eval"][-1],
                            "data": next(r for r in records if r["kind"] == "data")["splits"]}
    tokens = {split: part["tokens"] for split, part in results["dense"]["data"].items()}
    print(f"WikiText-format corpus: {tokens}; {args.steps} steps")
    print(f"{'variant':<8}{'valid ppl':>11}{'test ppl':>10}{'test vs dense':>15}")
    for variant, r in results.items():
        print(f"{variant:<8}{r['valid']['eval_ppl']:>11.2f}{r['test']['ppl']:>10.2f}"
              f"{r['test']['ppl'] / results['dense']['test']['ppl'] - 1:>+14.1%}")
    (out / "wikitext_cpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
