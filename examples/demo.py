"""`make demo`: build two small parents locally, merge them on an embedded local Ray, and show
that transformers loads the child and generates from it. Nothing is downloaded.

Parent B is a fine-tune of parent A that added 32 tokens (vocabulary 2000 vs 2032), the case the
vocab-gradient padder exists for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import torch

from raymerge.synthetic import build_parent, llama_config

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
    print("demo ok")


if __name__ == "__main__":
    main()
