"""File sizes of a sparsified model saved plain (save_pretrained) and compressed (ds_topkast's save_compressed).

    pip install compressed-tensors
    python bench/compressed_sizes.py          # a few seconds on 2 CPU cores

A Llama-style model (4 layers, hidden 256, intermediate 688, vocab 4096, untied
embeddings; random init, seed 0) in bf16, sparsified by the README's default patterns
(every Linear but the embeddings and lm_head) at Top-KAST forward/backward sparsity 90/80
and 95/90. Sizes are the safetensors files' bytes; "sparse layers" counts only the
Top-KAST layers' tensors (dense `weight` against `compressed` + `bitmask` + `shape` +
`row_offsets`), the rest of the model (embeddings, lm_head, norms) is dense in both.
Prints one table.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # sizes do not depend on the device; nothing here runs on it

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import ds_topkast  # noqa: E402
from ds_topkast.convert.compressed_save import save_compressed  # noqa: E402
from ds_topkast.core.layers import sparse_layers  # noqa: E402

VARIANTS = ((0.9, 0.8), (0.95, 0.9))
MB = 1e6


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=False)).to(torch.bfloat16)


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Each stored tensor's bytes, by name, over the folder's safetensors files."""
    sizes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                sizes[key] = tensor.numel() * tensor.element_size()
    return sizes


def file_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for forward, backward in VARIANTS:
            model = ds_topkast.sparsify(llama(), {"forward_sparsity": forward, "backward_sparsity": backward})
            names = tuple(f"{name}." for name in sparse_layers(model))
            plain, compressed = Path(scratch, f"plain_{forward}"), Path(scratch, f"compressed_{forward}")
            model.save_pretrained(plain)
            save_compressed(model, compressed)
            layer_bytes = [sum(size for key, size in tensor_bytes(folder).items() if key.startswith(names))
                           for folder in (plain, compressed)]
            sparsity = json.loads((compressed / "config.json").read_text())["quantization_config"]["sparsity_config"]
            rows.append((f"{round(forward * 100)}/{round(backward * 100)}", file_bytes(plain), file_bytes(compressed),
                         *layer_bytes, sparsity["global_sparsity"]))
    print("Llama 4x256 (intermediate 688, vocab 4096), bf16; safetensors bytes")
    print(f"{'topkast':>8} {'plain MB':>9} {'compressed MB':>14} {'ratio':>6} {'sparse layers MB':>18} "
          f"{'ratio':>6} {'global_sparsity':>16}")
    for variant, plain, compressed, layers_plain, layers_compressed, sparsity in rows:
        print(f"{variant:>8} {plain / MB:>9.2f} {compressed / MB:>14.2f} {compressed / plain:>6.3f} "
              f"{f'{layers_plain / MB:.2f} -> {layers_compressed / MB:.2f}':>18} "
              f"{layers_compressed / layers_plain:>6.3f} {sparsity:>16.3f}")


if __name__ == "__main__":
    main()
