"""slerp.py on hand-made tensors: exact endpoints, fallbacks, blocks, a known angle."""

import math

import pytest
import torch

from raymerge.slerp import (REDUCTION_CHUNK, Coefficients, Reductions, chunk_elems, chunk_rows, chunk_sums, combine_block,
                            reduce_tensor, slerp, slerp_coefficients, total)


def test_endpoints_reproduce_the_parents_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


def test_known_angle_gives_known_coefficients():
    # 60 degrees apart, |a| = 2, |b| = 3.
    a = torch.tensor([2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([3 * math.cos(math.pi / 3), 3 * math.sin(math.pi / 3)], dtype=torch.float64)
    c = slerp_coefficients(reduce_tensor(a, b), 0.25)
    theta = math.pi / 3
    assert not c.linear
    assert c.theta == pytest.approx(theta, abs=1e-12)
    assert c.ca == pytest.approx(math.sin(0.75 * theta) / math.sin(theta), abs=1e-12)
    assert c.cb == pytest.approx(math.sin(0.25 * theta) / math.sin(theta), abs=1e-12)
    out = slerp(a, b, 0.25)
    assert torch.allclose(out, c.ca * a + c.cb * b, atol=0, rtol=1e-15)


def test_orthogonal_unit_vectors_at_half():
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.mark.parametrize("b_scale", [2.0, -3.0])
def test_collinear_falls_back_to_linear(b_scale):
    a = torch.tensor([1.0, 2.0, 3.0])
    b = b_scale * a
    c = slerp_coefficients(reduce_tensor(a, b), 0.3)
    assert c.linear and (c.ca, c.cb) == (pytest.approx(0.7), pytest.approx(0.3))
    assert torch.allclose(slerp(a, b, 0.3), 0.7 * a + 0.3 * b)


def test_zero_norm_falls_back_to_linear():
    a = torch.zeros(5)
    b = torch.arange(5.0)
    c = slerp_coefficients(reduce_tensor(a, b), 0.4)
    assert c.linear
    assert torch.allclose(slerp(a, b, 0.4), 0.4 * b)


def test_row_blocks_equal_whole_tensor_float64_maths():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 24, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(1000, 24, generator=g, dtype=torch.float64)
    step = chunk_rows(a.shape) * 3  # blocks of whole reduction chunks, as the actors cut them
    red = total([chunk_sums(a[r0:r0 + step], b[r0:r0 + step], chunk_elems(a.shape)) for r0 in range(0, 1000, step)])
    assert red == reduce_tensor(a, b), "blocks of whole chunks give the whole tensor's bits"
    # Plain whole-tensor float64 maths, written out independently.
    aa, bb, ab = float((a * a).sum()), float((b * b).sum()), float((a * b).sum())
    assert red.aa == pytest.approx(aa, rel=1e-13)
    assert red.ab == pytest.approx(ab, rel=1e-13)
    theta = math.acos(ab / math.sqrt(aa * bb))
    want = (math.sin(0.6 * theta) * a + math.sin(0.4 * theta) * b) / math.sin(theta)
    c = slerp_coefficients(red, 0.4)
    got = torch.cat([combine_block(a[r0:r0 + 37], b[r0:r0 + 37], c, torch.float64) for r0 in range(0, 1000, 37)])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def _halved(values: list[float]) -> float:
    """Pairwise halving on Python floats (IEEE doubles), written out from the contract: element i
    plus element i + n/2, an odd last element added to the first, until one is left."""
    while len(values) > 1:
        h = len(values) // 2
        folded = [values[i] + values[i + h] for i in range(h)]
        if len(values) % 2:
            folded[0] += values[2 * h]
        values = folded
    return values[0]


def _transcribed(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """``[|a|^2, |b|^2, a.b]`` in the documented order, on Python floats: each chunk's products
    halved, then the chunks' sums."""
    fa, fb = a.double().reshape(-1).tolist(), b.double().reshape(-1).tolist()
    m = chunk_elems(tuple(a.shape))
    chunks = [range(i, min(len(fa), i + m)) for i in range(0, len(fa), m)]
    return [_halved([_halved([x[i] * y[i] for i in c]) for c in chunks]) for x, y in ((fa, fa), (fb, fb), (fa, fb))]


@pytest.mark.parametrize("shape", [(7,), (300, 1000), (3, 5, 4099), (2 * REDUCTION_CHUNK + 5,), ()])
def test_reductions_follow_the_fixed_order_exactly(shape):
    """The documented order, computed independently with Python floats, gives the same bits: any
    device that makes the same elementwise float64 steps (a GPU's do) agrees with the CPU."""
    g = torch.Generator().manual_seed(sum(shape) + 1)
    a = torch.randn(shape, generator=g).to(torch.bfloat16)
    b = torch.randn(shape, generator=g).to(torch.bfloat16)
    got = reduce_tensor(a, b)
    assert [got.aa, got.bb, got.ab] == _transcribed(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reductions_are_exact_at_the_dtype_extremes(dtype):
    """Products of the largest and smallest values a dtype holds (subnormals too) still follow the
    transcription bit for bit: they are exact in float64, however they are added."""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(7)
    scale = torch.tensor([info.max / 4, info.tiny, info.tiny / 8, 1.0], dtype=torch.float64)
    a = (torch.rand(4099, generator=g, dtype=torch.float64) * scale.repeat(1025)[:4099]).to(dtype)
    b = (-torch.rand(4099, generator=g, dtype=torch.float64) * scale.flip(0).repeat(1025)[:4099]).to(dtype)
    got = reduce_tensor(a, b)
    assert [got.aa, got.bb, got.ab] == _transcribed(a, b)


def test_reductions_do_not_depend_on_torch_threads():
    a = torch.randn(512, 1024)
    b = torch.randn(512, 1024)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            results.append(reduce_tensor(a, b))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


# bfloat16 keeps 7 fraction bits: between 1 and 2 its values are 1 + k/128. Each case is
# (a, b, ca, cb) with a float32 result ca*a + cb*b worked out by hand (every product and sum
# exact in float32), and the bfloat16 bits that round-to-nearest-even gives for it, written out.
ROUNDING_CASES = [
    # 1 + 1/256: exactly halfway between 1 (0x3F80, even) and 1 + 1/128 (0x3F81): to even, down.
    (1.0, 2.0**-8, 1.0, 1.0, 0x3F80),
    # 1 + 3/256: halfway between 1 + 1/128 (0x3F81, odd) and 1 + 2/128 (0x3F82, even): to even, up.
    (1.0 + 2.0**-7, 2.0**-8, 1.0, 1.0, 0x3F82),
    # 1 + 1/256 + 2^-20 (cb = 1 + 2^-12): just above the tie, so up to 1 + 1/128.
    (1.0, 2.0**-8, 1.0, 1.0 + 2.0**-12, 0x3F81),
    # 1 + 1/256 - 2^-20 (cb = 1 - 2^-12): just below the tie, so down to 1.
    (1.0, 2.0**-8, 1.0, 1.0 - 2.0**-12, 0x3F80),
    # 0.5 * 2 + 0.5 * (-2^-7) = 1 - 2^-8: exact in bfloat16 (0x3F7F, below 1 the spacing is 2^-8).
    (2.0, -(2.0**-7), 0.5, 0.5, 0x3F7F),
    # The negative tie -(1 + 1/256): to even, -1 (0xBF80).
    (-1.0, -(2.0**-8), 1.0, 1.0, 0xBF80),
    # 0.75 * 3 + 0.25 * (-1) = 2: exact (0x4000).
    (3.0, -1.0, 0.75, 0.25, 0x4000),
]


@pytest.mark.parametrize("a,b,ca,cb,bits", ROUNDING_CASES)
def test_combine_rounds_to_nearest_even(a, b, ca, cb, bits):
    coef = Coefficients(ca=ca, cb=cb, linear=False, theta=1.0)
    for in_dtype in (torch.bfloat16, torch.float32):  # every a and b here is a bfloat16 value
        assert torch.tensor([a, b], dtype=in_dtype).tolist() == [a, b]
        got = combine_block(torch.tensor([a], dtype=in_dtype), torch.tensor([b], dtype=in_dtype), coef, torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert got.view(torch.int16).item() & 0xFFFF == bits, (in_dtype, hex(got.view(torch.int16).item() & 0xFFFF))


def test_combine_is_float32_not_bfloat16():
    """bfloat16 parents are combined in float32: with a float32 output the sums keep bits that a
    bfloat16 computation would have lost."""
    coef = Coefficients(ca=1.0, cb=1.0, linear=False, theta=1.0)
    a = torch.tensor([256.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 2.0**-8], dtype=torch.bfloat16)
    got = combine_block(a, b, coef, torch.float32)
    # 256 + 1 = 257 needs 9 bits (bfloat16 would give 256); 1 + 2^-8 needs 8 fraction bits.
    assert got.tolist() == [257.0, 1.0 + 2.0**-8]


def test_t_outside_unit_interval_is_refused():
    from raymerge.errors import InputError

    with pytest.raises(InputError, match=r"t=1.5 is outside \[0, 1\]"):
        slerp_coefficients(Reductions(1.0, 1.0, 0.0), 1.5)
