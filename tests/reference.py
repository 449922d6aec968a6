"""An independent in-memory SLERP, written the way mergekit computes it (numpy, float32, whole
tensor), and the one "check this output" helper the end-to-end tests share."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file


def mergekit_style_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 result, and the magnitude ``|s0 a| + |s1 b|`` its rounding error scales with."""
    v0 = a.float().numpy().ravel()
    v1 = b.float().numpy().ravel()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    if n0 < 1e-8 or n1 < 1e-8:
        s0, s1 = 1 - t, t
    else:
        dot = float(np.clip(np.sum((v0 / n0) * (v1 / n1)), -1.0, 1.0))
        if abs(dot) > 0.9995:
            s0, s1 = 1 - t, t
        else:
            theta = np.arccos(dot)
            s0 = np.sin((1 - t) * theta) / np.sin(theta)
            s1 = np.sin(t * theta) / np.sin(theta)
    res = np.float32(s0) * v0 + np.float32(s1) * v1
    scale = np.abs(np.float32(s0) * v0) + np.abs(np.float32(s1) * v1)
    return (torch.from_numpy(np.asarray(res, dtype=np.float32).reshape(a.shape)),
            torch.from_numpy(np.asarray(scale, dtype=np.float32).reshape(a.shape)))


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x.dtype`` values at each element of ``x``."""
    mag = x.float().abs().clamp_min(torch.finfo(x.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - _mantissa_bits(x.dtype))


def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]


def load_dir(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def assert_within_one_ulp(got: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], name: str) -> None:
    """Within one output ulp of the reference, plus the reference's own float32 error where the
    two terms cancel: its coefficients come from a float32 dot and arccos (about 1e-6 relative),
    which matters for a result near zero made of terms of size ~|s0 a|."""
    want_f32, scale = reference
    want = want_f32.to(got.dtype)
    diff = (got.float() - want.float()).abs()
    bad = diff > ulp(want) + 2.0**-18 * scale
    assert not bad.any(), f"{name}: {int(bad.sum())} elements more than one ulp from the reference"


def check_merged(out: str, a: str, b: str, t: float) -> dict[str, torch.Tensor]:
    """Every tensor within one output ulp of the reference SLERP; index and shards agree."""
    pa, pb, child = load_dir(a), load_dir(b), load_dir(out)
    assert sorted(child) == sorted(pa), "the child must hold exactly the parents' tensors"
    for name, got in child.items():
        assert got.shape == pa[name].shape and got.dtype == pa[name].dtype, name
        assert_within_one_ulp(got, mergekit_style_slerp(t, pa[name], pb[name]), name)
    index_path = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        assert sorted(index["weight_map"]) == sorted(child)
        assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in child.values())
        for name, shard in index["weight_map"].items():
            assert name in load_file(os.path.join(out, shard))
    return child


def plain_bits(model_dir: str, text: str, context: int) -> float:
    """Bits of ``text`` under a written model, with plain transformers: the scoring protocol of
    docs/sweeps.md (windows of ``context - 1`` tokens after BOS), written out here."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(text, add_special_tokens=False).input_ids
    bits = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), context - 1):
            window = torch.tensor([[tok.bos_token_id] + ids[start:start + context - 1]])
            logp = torch.log_softmax(model(window).logits[0].float(), dim=-1)
            for pos in range(1, window.shape[1]):
                bits -= float(logp[pos - 1, window[0, pos]]) / math.log(2)
    return bits
