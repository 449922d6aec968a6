"""mergekit 0.1.5 as a benchmark contender: its own virtualenv, a SLERP recipe equivalent to
``raymerge merge A B -t 0.5``, and a tensor-by-tensor comparison of the two outputs.

    python bench/mergekit_recipe.py          # creates the venv if missing, prints mergekit-yaml's path
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from parents import CACHE

MERGEKIT_VERSION = "0.1.5"
VENV = os.path.join(CACHE, "mergekit-venv")
# mergekit's defaults on CPU, no extra flags: --lazy-unpickle only concerns pickled .bin parents
# (ours are safetensors), and --async-write / -j trade memory for speed and are not defaults.
MERGEKIT_FLAGS: list[str] = []


def mergekit_yaml() -> str:
    return os.path.join(VENV, "bin", "mergekit-yaml")


def ensure_mergekit(log: str | None = None) -> tuple[str | None, str]:
    """(path of mergekit-yaml or None, a note). Installs mergekit into VENV once.

    torch is pinned to 2.13.0 with a constraints file so pip takes the CPU wheel that already lies
    on this machine instead of downloading a CUDA build. Any failure is a note, not an exception.
    """
    exe = mergekit_yaml()
    if os.access(exe, os.X_OK):
        return exe, f"mergekit {MERGEKIT_VERSION} (venv {VENV})"
    log = log or os.path.join(CACHE, "mergekit-install.log")
    os.makedirs(CACHE, exist_ok=True)
    constraints = os.path.join(CACHE, "mergekit-constraints.txt")
    with open(constraints, "w") as f:
        f.write("torch==2.13.0\n")
    with open(log, "w") as out:
        steps = [["python3", "-m", "venv", VENV],
                 [os.path.join(VENV, "bin", "pip"), "install", "--disable-pip-version-check",
                  "-c", constraints, f"mergekit=={MERGEKIT_VERSION}"]]
        for cmd in steps:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800).returncode
            except (OSError, subprocess.TimeoutExpired) as e:
                rc, _ = -1, out.write(f"{e}\n")
            if rc != 0:
                return None, f"mergekit skipped: `{' '.join(cmd[:3])} ...` failed (see {log})"
    if not os.access(exe, os.X_OK):
        return None, f"mergekit skipped: no mergekit-yaml after install (see {log})"
    return exe, f"mergekit {MERGEKIT_VERSION} (installed into {VENV})"


def mergekit_view(parent: str, dest: str) -> str:
    """A directory of symlinks to ``parent``'s files whose config.json names the architecture.

    mergekit 0.1.5 picks the architecture from ``config.architectures`` and fails without it
    (TypeError on None); the synthetic benchmark parents have only ``model_type``. The weights
    are the same files (same page cache) as raymerge reads.
    """
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(parent):
        if name != "config.json" and not os.path.lexists(os.path.join(dest, name)):
            os.symlink(os.path.join(parent, name), os.path.join(dest, name))
    with open(os.path.join(parent, "config.json")) as f:
        config = json.load(f)
    if not config.get("architectures"):
        config["architectures"] = {"llama": ["LlamaForCausalLM"]}.get(config.get("model_type"), [])
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dest


def write_recipe(path: str, a: str, b: str, t: float = 0.5) -> str:
    """The `models:` form of mergekit's slerp recipe: base_model A, one global t, bf16 output.

    JSON is valid YAML, so no YAML library is needed here.
    """
    recipe = {"merge_method": "slerp", "base_model": a,
              "models": [{"model": a}, {"model": b}],
              "parameters": {"t": t}, "dtype": "bfloat16"}
    with open(path, "w") as f:
        json.dump(recipe, f, indent=2)
        f.write("\n")
    return path


def _tensors(model_dir: str) -> dict[str, str]:
    """tensor name -> shard path, for a single-file or sharded safetensors model."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open
    single = os.path.join(model_dir, "model.safetensors")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def compare_outputs(ours: str, theirs: str, names: list[str] | None = None) -> str:
    """One line: do both merges agree on a few tensors within one bf16 ulp?"""
    import torch
    from safetensors import safe_open

    mine, other = _tensors(ours), _tensors(theirs)
    names = names or ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                      "model.layers.7.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
    worst, checked, missing = 0.0, 0, []
    for name in names:
        if name not in mine or name not in other:
            missing.append(name)
            continue
        with safe_open(mine[name], "pt") as f:
            x = f.get_tensor(name)
        with safe_open(other[name], "pt") as f:
            y = f.get_tensor(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"mergekit vs raymerge: {name} differs in shape/dtype ({x.shape} {x.dtype} vs {y.shape} {y.dtype})"
        xf, yf = x.float(), y.float()
        # one bf16 ulp at each element's magnitude: 2^(exponent - 7)
        ulp = torch.ldexp(torch.ones_like(xf), torch.frexp(torch.maximum(xf.abs(), yf.abs()))[1] - 8)
        worst = max(worst, float(((xf - yf).abs() / ulp).max()))
        checked += 1
    verdict = "agree" if worst <= 1.0 else "DISAGREE"
    note = f"; not in both: {', '.join(missing)}" if missing else ""
    return (f"mergekit vs raymerge: {verdict} on {checked} tensors, "
            f"max difference {worst:g} bf16 ulp{note}")


if __name__ == "__main__":
    exe, note = ensure_mergekit()
    print(note)
    sys.exit(0 if exe else 1)
