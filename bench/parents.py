"""Benchmark parents, built once and cached outside the repository:

- two ~0.85B-parameter bf16 Llama-shaped models (hidden 2048, 16 layers, intermediate 5632,
  vocab 32000; ``--scale 2``: twice the layers), 1.7 GB each;
- ``--7b``: two Llama-2-7B-shaped models (hidden 4096, 32 layers, intermediate 11008, vocab
  32000), 13.5 GB of bf16 each: together more than the memory of a small machine. They are written
  tensor by tensor, so building them needs little memory (about 1 GB), but 27 GB of disk.

    python bench/parents.py [--scale 2 | --7b]     # prints the two parent directories
"""

from __future__ import annotations

import argparse
import os

from raymerge.synthetic import build_parent, llama_config

CACHE = os.environ.get("RAYMERGE_BENCH_CACHE", os.path.expanduser("~/.cache/raymerge-bench"))
SEVEN_B_BYTES = 2 * 6_738_415_616 * 2  # both parents' weights, bf16


def _build_pair(root: str, cfg, max_shard_bytes: int) -> tuple[str, str]:
    a, b = os.path.join(root, "parent-a"), os.path.join(root, "parent-b")
    for path, kwargs in ((a, {"seed": 1}), (b, {"seed": 2, "base": (cfg, 1)})):
        if not os.path.isfile(os.path.join(path, "config.json")):
            # config.json is written last by build_parent, so its presence means complete.
            build_parent(path, cfg, tokenizer=True, max_shard_bytes=max_shard_bytes, **kwargs)
    return a, b


def bench_parents(scale: int = 1) -> tuple[str, str]:
    """Build (once) and return the two parents; ``scale=2`` doubles the layer count (~1.6B)."""
    cfg = llama_config(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=16 * scale, num_attention_heads=16, num_key_value_heads=16)
    return _build_pair(os.path.join(CACHE, f"llama-0.85b-x{scale}"), cfg, 10**9)


def seven_b_parents() -> tuple[str, str]:
    """Build (once) and return the two Llama-2-7B-shaped parents (sharded as 5 GB files)."""
    cfg = llama_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    cfg.max_position_embeddings = 4096
    return _build_pair(os.path.join(CACHE, "llama-7b"), cfg, 5 * 10**9)


def seven_b_built() -> bool:
    return all(os.path.isfile(os.path.join(CACHE, "llama-7b", p, "config.json")) for p in ("parent-a", "parent-b"))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--7b", dest="seven_b", action="store_true")
    args = p.parse_args()
    print(*(seven_b_parents() if args.seven_b else bench_parents(args.scale)))
