"""The compiled fixed-order reductions (raymerge.native) against their specification, slerp.py's
torch code: the same float64 bits for every dtype, shape, chunk size and value, or no answer."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from raymerge.native import library, pair_sums
from raymerge.slerp import PAIRS, chunk_elems, chunk_sums, torch_chunk_sums

SHAPES = [(1,), (2,), (3,), (8,), (13,), (7, 3), (64, 4096), (11, 5632), (5, 1000), (100003,), (3, 5, 7)]


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.equal(x.view(torch.int64), y.view(torch.int64))


def values(shape, dtype, g, kind):
    x = torch.randn(shape, generator=g)
    if kind == "spread":  # magnitudes over many binades, so rounding happens at every level
        x = x * torch.exp2(torch.randint(-40, 40, shape, generator=g).float())
    elif kind == "special":  # zeros, subnormal and huge values (their squares overflow float32)
        flat = x.reshape(-1)
        flat[::3] = 0.0
        flat[1::5] = 1e-40
        flat[2::7] = 3e38
    return x.to(dtype)


def test_a_compiler_is_here():
    """This machine (and CI) has a C compiler: the tests below then exercise the kernel."""
    assert library() is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "spread", "special"])
def test_the_same_bits_as_the_torch_code(dtype, kind):
    g = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        a, b = values(shape, dtype, g, kind), values(shape, dtype, g, kind)
        for chunk in sorted({chunk_elems(shape), 1, 2, 3, 5, 8, 24, 64, 4096}):
            want = torch_chunk_sums(a, b, chunk)
            got = pair_sums([a.reshape(-1), b.reshape(-1)], list(PAIRS), chunk)
            assert same_bits(got, want), (shape, dtype, kind, chunk)
            assert same_bits(chunk_sums(a, b, chunk), want)


def test_infinities_and_nans_come_out_where_the_torch_code_has_them():
    a = torch.tensor([1.0, float("inf"), 2.0, 3.0, float("nan"), 1.0, 1.0, 1.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 1.0, float("-inf"), 3.0, 1.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.bfloat16)
    for chunk in (1, 2, 3, 8, 9):
        want = torch_chunk_sums(a, b, chunk)
        got = pair_sums([a, b], list(PAIRS), chunk)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0))


def test_every_pair_of_several_inputs():
    """The Gram matrix of N inputs (the SLERP family's reductions) pair by pair."""
    g = torch.Generator().manual_seed(3)
    xs = [values((9, 700), torch.bfloat16, g, "spread").reshape(-1) for _ in range(4)]
    pairs = [(i, j) for i, j in itertools.combinations_with_replacement(range(4), 2)]
    got = pair_sums(xs, pairs, 1400)
    for row, (i, j) in zip(got, pairs):
        assert same_bits(row, torch_chunk_sums(xs[i], xs[j], 1400)[2])


def test_what_it_does_not_take_is_left_to_the_torch_code():
    a = torch.randn(8, 6)
    assert pair_sums([a.half().reshape(-1)] * 2, list(PAIRS), 8) is None  # float16
    assert pair_sums([a.t(), a.t()], list(PAIRS), 8) is None  # not contiguous
    assert pair_sums([a.reshape(-1), a[:4].reshape(-1)], list(PAIRS), 8) is None  # sizes differ
    assert same_bits(chunk_sums(a.t(), a.t(), 8), torch_chunk_sums(a.t(), a.t(), 8))


@pytest.mark.parametrize("env", [{"RAYMERGE_NATIVE": "0"}, {"CC": "/no/such/compiler"}])
def test_switched_off_or_without_a_compiler_it_gives_no_answer(env, tmp_path):
    code = ("import torch; from raymerge.native import library, pair_sums; "
            "assert library() is None; assert pair_sums([torch.ones(4)] * 2, [(0, 1)], 2) is None")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
