"""Benchmark parents: two ~0.85B-parameter bf16 Llama-shaped models (hidden 2048, 16 layers,
intermediate 5632, vocab 32000), built once and cached outside the repository.

    python bench/parents.py [--scale 2]     # prints the two parent directories
"""

from __future__ import annotations

import argparse
import os

from raymerge.synthetic import build_parent, llama_config

CACHE = os.environ.get("RAYMERGE_BENCH_CACHE", os.path.expanduser("~/.cache/raymerge-bench"))


def bench_parents(scale: int = 1) -> tuple[str, str]:
    """Build (once) and return the two parents; ``scale=2`` doubles the layer count (~1.6B)."""
    cfg = llama_config(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=16 * scale, num_attention_heads=16, num_key_value_heads=16)
    root = os.path.join(CACHE, f"llama-0.85b-x{scale}")
    a, b = os.path.join(root, "parent-a"), os.path.join(root, "parent-b")
    for path, kwargs in ((a, {"seed": 1}), (b, {"seed": 2, "base": (cfg, 1)})):
        if not os.path.isfile(os.path.join(path, "config.json")):
            # config.json is written last by build_parent, so its presence means complete.
            build_parent(path, cfg, tokenizer=True, max_shard_bytes=10**9, **kwargs)
    return a, b


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=1)
    print(*bench_parents(p.parse_args().scale))
