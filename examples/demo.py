"""`make demo`: build small parents locally, merge them on an embedded local Ray, and show that
transformers loads the child and generates from it; then choose t by scoring a sweep. Nothing is
downloaded.

1. Parent B is a fine-tune of parent A that added 32 tokens (vocabulary 2000 vs 2032), the case
   the vocab-gradient padder exists for.
2. Two tiny Llamas trained for a few seconds on two different texts (examples/trained_parents.py)
   are swept over t = 0, 0.1, ..., 1 and scored on a text that mixes both (``--eval``); only the
   best child is written, with the table and the plot. Then `raymerge search` looks for a
   per-layer schedule on the same text and compares the best with the best constant t, on dev
   and on held-out test text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import torch

from raymerge.synthetic import build_parent, llama_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "demo-out")


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    a_cfg = llama_config(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    b_cfg = llama_config(vocab_size=2032, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    a = build_parent(os.path.join(ROOT, "parent-a"), a_cfg, seed=1)
    b = build_parent(os.path.join(ROOT, "parent-b"), b_cfg, seed=2, base=(a_cfg, 1), base_vocab=2000)
    out = os.path.join(ROOT, "child")
    print(f"parents: {a} (vocab 2000), {b} (vocab 2032)")

    cmd = ["raymerge", "merge", a, b, "-o", out, "-t", "0.5", "--max-shard-size", "4MB"]
    print("$ " + " ".join(cmd), flush=True)
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the embedded local Ray
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "raymerge"), *cmd[1:]], check=True, env=env)
    print(f"merge took {time.monotonic() - started:.1f} s; child: {sorted(os.listdir(out))}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = "w1 w2 w3 <extra_5>"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all(), "the child gave non-finite logits"
    print(f"child: vocab_size={model.config.vocab_size}, len(tokenizer)={len(tok)}, dtype={model.dtype}")
    print(f"prompt {prompt!r} -> {tok.decode(generated[0])!r}")

    import trained_parents

    a, b, mixed = trained_parents.build(os.path.join(ROOT, "trained"))
    sweep = os.path.join(ROOT, "sweep")
    cmd = ["raymerge", "merge", a, b, "-o", sweep, "--t-range", "0:1:0.1", "--eval", mixed, "--keep", "best"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "raymerge"), *cmd[1:]], check=True, env=env)
    print(f"kept: {sorted(d for d in os.listdir(sweep) if d.startswith('t-'))}; plot: {os.path.join(sweep, 'sweep.png')}")

    searched = os.path.join(ROOT, "search")
    cmd = ["raymerge", "search", a, b, "-o", searched, "--eval", mixed, "--trials", "32", "--quiet"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "raymerge"), *cmd[1:]], check=True, env=env)
    print(f"plot: {os.path.join(searched, 'search.png')}; recipe: {os.path.join(searched, 'recipe.yml')}")
    print("demo ok")


if __name__ == "__main__":
    main()
