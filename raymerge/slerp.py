"""The SLERP maths: pure torch, no Ray, no I/O.

Each tensor is treated as one flat vector (whole-tensor SLERP, as in mergekit). A merge streams a
tensor in row blocks and makes two passes: first it accumulates the three reductions ``|a|^2``,
``|b|^2`` and ``a.b`` in float64, then it turns them into two scalar coefficients and combines
each block as ``ca * a + cb * b``.

The reductions are summed in one fixed order that no device, thread count or block size changes:
a tensor's rows are cut into chunks of whole rows (about ``REDUCTION_CHUNK`` elements, from the
shape alone), each chunk's float64 products are summed by pairwise halving, and the chunks' sums
by pairwise halving again. Every step is an elementwise float64 multiply or add, which IEEE 754
rounds the same way on a CPU and on a GPU, so the coefficients, and every output byte, are too.
On a CPU a compiled kernel (raymerge.native) takes the same steps in one pass over each chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raymerge.native import pair_sums
from raymerge.schedule import check_t

# Below this norm a vector has no direction worth interpolating along.
NORM_EPS = 1e-8
# Nearly (anti)parallel vectors make sin(theta) tiny; mergekit falls back to linear here too.
DOT_THRESHOLD = 0.9995


@dataclass(frozen=True)
class Reductions:
    """The three float64 sums SLERP needs: ``aa = |a|^2``, ``bb = |b|^2``, ``ab = a.b``, each in
    the fixed order (blocks' sums are never added up any other way: see ``total``)."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0


@dataclass(frozen=True)
class Coefficients:
    """``out = ca * a + cb * b``; ``linear`` says the linear fallback was taken."""

    ca: float
    cb: float
    linear: bool
    theta: float  # the angle between a and b in radians (0.0 when a norm is ~0)


# Elements per reduction chunk (whole rows, so a chunk never straddles a row block).
REDUCTION_CHUNK = 2**16
# The products chunk_sums reduces, as pairs of its inputs (a, b): |a|^2, |b|^2, a.b.
PAIRS = ((0, 0), (1, 1), (0, 1))


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per reduction chunk of a tensor of this shape: row blocks come in multiples of it."""
    return max(1, REDUCTION_CHUNK // max(1, _row_elems(shape)))


def chunk_elems(shape: tuple[int, ...]) -> int:
    """Elements per reduction chunk of a tensor of this shape."""
    return chunk_rows(shape) * _row_elems(shape)


def _row_elems(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def chunk_sums(a: torch.Tensor, b: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """The ``[|a|^2, |b|^2, a.b]`` of each chunk of ``chunk_elems`` consecutive elements (the last
    chunk may be shorter), as a float64 tensor of shape (3, chunks) on the blocks' device.

    On a CPU the compiled kernel (raymerge.native) computes them where it can, else (and on a GPU)
    ``torch_chunk_sums``; both give the same bits.

    Example:
        >>> chunk_sums(torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 4.0, 1.0]), 2)
        tensor([[ 9.,  1.],
                [16.,  1.],
                [ 0.,  1.]], dtype=torch.float64)
    """
    return pair_chunk_sums([a, b], PAIRS, chunk_elems)


def pair_chunk_sums(inputs: list[torch.Tensor], pairs, chunk_elems: int) -> torch.Tensor:
    """``torch_pair_sums``, by the compiled kernel where it can run (a CPU), else by torch."""
    if inputs[0].device.type == "cpu":
        sums = pair_sums([x.reshape(-1) for x in inputs], pairs, chunk_elems)
        if sums is not None:
            return sums
    return torch_pair_sums(inputs, pairs, chunk_elems)


def torch_chunk_sums(a: torch.Tensor, b: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """``chunk_sums`` in torch operations, on any device: the fixed order's specification."""
    return torch_pair_sums([a, b], PAIRS, chunk_elems)


def torch_pair_sums(inputs: list[torch.Tensor], pairs, chunk_elems: int) -> torch.Tensor:
    """The sum of ``inputs[i] * inputs[j]`` over each chunk of ``chunk_elems`` consecutive
    elements, for each ``(i, j)`` in ``pairs``: float64, shape ``(len(pairs), chunks)``, in the
    fixed order (raymerge.native computes the same bits in one pass)."""
    flat = [x.reshape(-1).to(torch.float64) for x in inputs]
    n = flat[0].numel()
    full = n // chunk_elems * chunk_elems
    sums = []
    for lo, hi, width in ((0, full, chunk_elems), (full, n, n - full)):  # whole chunks, then the tail
        if hi > lo:
            sums.append(_halve(_first_level([x[lo:hi].view(-1, width) for x in flat], pairs)))
    return torch.cat(sums, dim=1)


def _first_level(rows: list[torch.Tensor], pairs) -> torch.Tensor:
    """The products of (chunks, m) float64 rows, one per pair, halved once as they are made (the
    halving's first level, without writing every product first): shape (pairs, chunks, max(1, m // 2))."""
    m = rows[0].shape[1]
    h = max(1, m // 2)
    out = torch.empty((len(pairs), rows[0].shape[0], h), dtype=torch.float64, device=rows[0].device)
    for k, (i, j) in enumerate(pairs):
        x, y = rows[i], rows[j]
        torch.mul(x[:, :h], y[:, :h], out=out[k])
        if m > 1:
            out[k] += x[:, h:2 * h] * y[:, h:2 * h]
        if m > 2 and m % 2:
            out[k, :, 0] += x[:, 2 * h] * y[:, 2 * h]
    return out


def _halve(x: torch.Tensor) -> torch.Tensor:
    """Sum the last dimension by pairwise halving: element i plus element i + n/2, an odd last
    element added to the first, until one is left. Elementwise adds only, so every device agrees."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        y = x[..., :h] + x[..., h:2 * h]
        if n % 2:
            y[..., 0] += x[..., 2 * h]
        x = y
    return x[..., 0]


def total(partials: list[torch.Tensor]) -> Reductions:
    """A tensor's reductions from its chunks' sums, in order: one host sync for a GPU's."""
    if not partials:
        return Reductions()
    return Reductions(*totals(partials))


def totals(partials: list[torch.Tensor]) -> list[float]:
    """Each row's total of its chunks' sums (``(pairs, chunks)`` tensors, in order), halved."""
    return _halve(torch.cat(partials, dim=1)).tolist()


def reduce_tensor(a: torch.Tensor, b: torch.Tensor) -> Reductions:
    """``|a|^2``, ``|b|^2`` and ``a.b`` of a whole tensor in float64, in the fixed order.

    Example:
        >>> reduce_tensor(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
        Reductions(aa=9.0, bb=16.0, ab=0.0)
    """
    return total([chunk_sums(a, b, chunk_elems(tuple(a.shape)))])


def slerp_coefficients(red: Reductions, t: float) -> Coefficients:
    """Turn the reductions of a whole tensor into the two SLERP coefficients at ``t``.

    Args:
        red: the float64 reductions of the whole tensor.
        t: interpolation factor in [0, 1]; 0 gives parent A, 1 gives parent B.

    Example:
        >>> c = slerp_coefficients(Reductions(aa=1.0, bb=1.0, ab=0.0), 0.5)
        >>> round(c.ca, 6), round(c.cb, 6), c.linear
        (0.707107, 0.707107, False)
    """
    check_t(t)
    norm_a = math.sqrt(red.aa)
    norm_b = math.sqrt(red.bb)
    if norm_a < NORM_EPS or norm_b < NORM_EPS:
        return Coefficients(1.0 - t, t, linear=True, theta=0.0)
    dot = min(1.0, max(-1.0, red.ab / (norm_a * norm_b)))
    theta = math.acos(dot)
    if abs(dot) > DOT_THRESHOLD:
        return Coefficients(1.0 - t, t, linear=True, theta=theta)
    sin_theta = math.sin(theta)
    return Coefficients(
        math.sin((1.0 - t) * theta) / sin_theta,
        math.sin(t * theta) / sin_theta,
        linear=False,
        theta=theta,
    )


def compute_dtype(*inputs: torch.dtype) -> torch.dtype:
    """Values are combined in float32, or float64 when an input already is float64."""
    return torch.float64 if torch.float64 in inputs else torch.float32


def combine_block(
    a: torch.Tensor, b: torch.Tensor, coef: Coefficients, out_dtype: torch.dtype
) -> torch.Tensor:
    """``ca * a + cb * b`` on one block in float32 (float64 for float64 inputs), then rounded.

    Both products are computed separately (no fused multiply-add), so every device and every
    block size gives the same bits.
    """
    a_w, b_w = to_work(a, b)
    out = torch.mul(a_w, coef.ca)
    out.add_(torch.mul(b_w, coef.cb))
    return out.to(out_dtype)


def to_work(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both blocks in the dtype values are combined in; a sweep converts once for all its t."""
    work = compute_dtype(a.dtype, b.dtype)
    return a.to(work), b.to(work)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Whole-tensor SLERP of two same-shaped tensors, as one flat vector each.

    Example:
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
    """
    coef = slerp_coefficients(reduce_tensor(a, b), t)
    return combine_block(a, b, coef, out_dtype or a.dtype)
