"""raymerge's multislerp, nuslerp and karcher against mergekit 0.1.5 run on the same recipes.

For each architecture (tiny Llama, Qwen2 and Mixtral models as transformers writes them: a base
and four fine-tunes whose every tensor differs from the base), each recipe is run by
``mergekit-yaml`` (``dtype: float32``, ``out_dtype: bfloat16``) and by ``raymerge run``, and every
output tensor compared: within one bf16 ulp, or, where the result cancels to a tiny fraction of
its tensor's scale, within 2^-16 of the tensor's largest value (mergekit's float32 arithmetic has
lost those digits there).

Where raymerge deviates from mergekit on purpose (README, "Merging more than two models"), the
case shows the deviation and nothing else: raymerge's karcher ignores ``base_model`` (mergekit
averages it in): raymerge with the base equals mergekit on the parents alone; raymerge's
``nuslerp_row_wise`` follows mergekit's documentation (row vectors when true): it equals mergekit
with the flag negated; where no parent changed a tensor, raymerge's multislerp of three or more
parents gives the base, where mergekit stops with an error. A Mixtral's experts: raymerge merges
each expert's matrices as the checkpoint stores them, mergekit 0.1.5 each layer's experts fused
into one tensor (transformers 5's layout), which changes every angle a method takes over a whole
tensor; the other tensors are compared as usual, the experts' difference is reported.

    python bench/family_mergekit.py [--arch llama] [--keep DIR]   # exit 1 on any disagreement
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the tiny parents' builder (hfparents.py)

from hfparents import save_parent, tiny_config  # noqa: E402
from mergekit_recipe import ensure_mergekit  # noqa: E402

ARCHS = ("llama", "qwen2", "mixtral")
RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")


def fine_tune(base: str, dest: str, seed: int, scale: float = 0.05) -> str:
    """``base`` plus seeded noise on every tensor (its own spread, at least 0.01 absolute), so
    that no tensor equals the base's: mergekit's multislerp stops on a tensor no parent changed."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(base):
        if name != "model.safetensors":
            shutil.copy(os.path.join(base, name), os.path.join(dest, name))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, x in load_file(os.path.join(base, "model.safetensors")).items():
        spread = float(x.float().std()) if x.numel() > 1 else 0.0
        noise = scale * max(spread, 0.2) * torch.randn(x.shape, generator=g)
        tensors[name] = (x.float() + noise).to(x.dtype)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return dest


def recipe(path: str, method: str, models: list[tuple[str, float | None]], base: str | None = None,
           **parameters) -> str:
    doc = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": m, **({"parameters": {"weight": w}} if w is not None else {})} for m, w in models]}
    if base:
        doc["base_model"] = base
    if parameters:
        doc["parameters"] = parameters
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)  # JSON is YAML
    return path


def run(cmd: list[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.returncode, (done.stderr or done.stdout).strip(), time.monotonic() - started


def unfuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5 writes a Mixtral's experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H],
    ``mlp.experts.down_proj`` [E, H, I], ``mlp.gate``), as transformers 5 defines the model;
    checkpoints (the parents, raymerge's output) store each expert's ``w1``, ``w2``, ``w3``."""
    out = {}
    for name, x in tensors.items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            half = x.shape[1] // 2
            for e in range(x.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = x[e, :half]
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = x[e, half:]
        elif rest == "experts.down_proj":
            for e in range(x.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = x[e]
        elif rest == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = x
        else:
            out[name] = x
    return out


def compare(ours: str, theirs: str, experts: bool = True) -> tuple[int, float, str]:
    """(tensors compared, worst difference in units of the tolerance, worst tensor); without
    ``experts``, a Mixtral's expert tensors are left out (mergekit merges them fused)."""
    a, b = load_dir(ours), unfuse(load_dir(theirs))
    if sorted(a) != sorted(b):
        raise SystemExit(f"{ours} and {theirs} hold different tensors")
    worst, where = 0.0, ""
    for name in a:
        if not experts and ".experts." in name:
            continue
        x, y = a[name].double(), b[name].double()
        if a[name].dtype != torch.bfloat16 or b[name].dtype != torch.bfloat16 or x.shape != y.shape:
            raise SystemExit(f"{name}: {a[name].dtype}{list(x.shape)} vs {b[name].dtype}{list(y.shape)}")
        mag = torch.maximum(x.abs(), y.abs()).clamp_min(1e-30)
        ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
        tol = torch.maximum(ulp, torch.full_like(ulp, 2.0**-16 * float(y.abs().max())))
        ratio = float(((x - y).abs() / tol).max())
        if ratio > worst:
            worst, where = ratio, name
    return len(a), worst, where


def load_dir(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def cases(base: str, ft: list[str], plain: list[str]) -> list[tuple[str, dict, dict | None, str]]:
    """(name, raymerge's recipe, mergekit's recipe (None: the same), what is expected)."""
    w3, w4 = [1.0, 2.0, 0.5], [1.0, 2.0, 0.5, 1.5]
    out = [
        ("multislerp 3", dict(method="multislerp", models=list(zip(ft[:3], w3))), None, "agree"),
        ("multislerp 4", dict(method="multislerp", models=list(zip(ft, w4))), None, "agree"),
        ("multislerp 3 + base", dict(method="multislerp", models=list(zip(ft[:3], w3)), base=base), None, "agree"),
        ("multislerp 4 + base, unnormalised", dict(method="multislerp", models=list(zip(ft, w4)), base=base,
                                                   normalize_weights=False), None, "agree"),
        ("karcher 3", dict(method="karcher", models=[(m, None) for m in ft[:3]]), None, "agree"),
        ("karcher 4", dict(method="karcher", models=[(m, None) for m in ft]), None, "agree"),
        ("karcher 3 + base_model (deviation: base not averaged in)",
         dict(method="karcher", models=[(m, None) for m in ft[:3]], base=base),
         dict(method="karcher", models=[(m, None) for m in ft[:3]]), "agree"),
    ]
    for with_base in (False, True):
        for flatten, row_wise in ((True, False), (False, False), (False, True)):
            name = f"nuslerp{' + base' if with_base else ''}, flatten {flatten}" + ("" if flatten else f", row_wise {row_wise}")
            ours = dict(method="nuslerp", models=list(zip(ft[:2], [1.0, 3.0])), base=base if with_base else None,
                        nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
            theirs = None
            if not flatten:  # deviation: mergekit's row_wise interpolates columns (PyTorch layout)
                name += " (deviation: mergekit run with row_wise negated)"
                theirs = {**ours, "nuslerp_row_wise": not row_wise}
            out.append((name, ours, theirs, "agree"))
    out.append(("multislerp 3 + base, tensors no parent changed (deviation: mergekit stops)",
                dict(method="multislerp", models=list(zip(plain[:3], w3)), base=base), None, "mergekit fails"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=ARCHS, help="default: all three")
    parser.add_argument("--keep", default=None, help="keep the parents and outputs here")
    args = parser.parse_args()
    exe, note = ensure_mergekit()
    print(note)
    if exe is None:
        return 1
    root = args.keep or tempfile.mkdtemp(prefix="raymerge-family-")
    failures = 0
    for arch in args.arch or ARCHS:
        d = os.path.join(root, arch)
        config = tiny_config(arch)
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
        base = save_parent(os.path.join(d, "base"), config, seed=1)
        ft = [fine_tune(base, os.path.join(d, f"ft{i}"), seed=10 + i) for i in range(4)]
        # Fine-tunes as hfparents makes them: bf16 norms too close to 1 to change.
        plain = [save_parent(os.path.join(d, f"plain{i}"), config, seed=1, noise_seed=20 + i, noise=0.05)
                 for i in range(3)]
        for k, (name, ours, theirs, expect) in enumerate(cases(base, ft, plain)):
            ours_yml = recipe(os.path.join(d, f"r{k}.yml"), **ours)
            theirs_yml = recipe(os.path.join(d, f"m{k}.yml"), **(theirs or ours))
            out_r, out_m = os.path.join(d, f"raymerge-{k}"), os.path.join(d, f"mergekit-{k}")
            rc_r, err_r, s_r = run([RAYMERGE, "run", ours_yml, "-o", out_r, "--quiet", "--overwrite"])
            rc_m, err_m, s_m = run([exe, theirs_yml, out_m])
            if rc_r != 0:
                verdict = f"RAYMERGE FAILED: {err_r.splitlines()[-1] if err_r else rc_r}"
            elif expect == "mergekit fails":
                verdict = ("as expected: mergekit stops (" + err_m.splitlines()[-1][:80] + "); raymerge gives the base there"
                           if rc_m != 0 else "UNEXPECTED: mergekit succeeded")
            elif rc_m != 0:
                verdict = f"MERGEKIT FAILED: {err_m.splitlines()[-1] if err_m else rc_m}"
            else:
                n, worst, where = compare(out_r, out_m, experts=arch != "mixtral")
                verdict = (f"agree on {n} tensors (worst {worst:.2f} of the tolerance, {where})" if worst <= 1.0
                           else f"DISAGREE: {where} off by {worst:.2f} of the tolerance")
                if arch == "mixtral":
                    # Deviation: mergekit takes one angle over a layer's fused experts.
                    _, off, _ = compare(out_r, out_m)
                    verdict += (f"; the expert tensors (mergekit merges each layer's experts fused into one) "
                                f"differ by up to {off:.3g}x the tolerance")
                if theirs is not None and worst <= 1.0:
                    # The deviation is real: mergekit on raymerge's own recipe gives something else.
                    out_same = out_m + "-same-recipe"
                    if run([exe, ours_yml, out_same])[0] == 0:
                        _, off, _ = compare(out_r, out_same)
                        verdict += f"; mergekit on the same recipe differs by up to {off:.3g}x the tolerance"
                        if off <= 1.0:
                            verdict = "UNEXPECTED: no deviation on the same recipe; " + verdict
            failures += verdict.startswith(("RAYMERGE", "MERGEKIT", "UNEXPECTED", "DISAGREE"))
            print(f"{arch:8s} {name}: {verdict}  [raymerge {s_r:.1f} s, mergekit {s_m:.1f} s]", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{failures} case(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
