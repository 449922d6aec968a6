"""The SLERP maths: pure torch, no Ray, no I/O.

Each tensor is treated as one flat vector (whole-tensor SLERP, as in mergekit). A merge streams a
tensor in row blocks and makes two passes: first it accumulates the three reductions ``|a|^2``,
``|b|^2`` and ``a.b`` in float64, then it turns them into two scalar coefficients and combines
each block as ``ca * a + cb * b``. Because the reductions are float64 sums, the block size does not
change the coefficients beyond float64 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raymerge.schedule import check_t

# Below this norm a vector has no direction worth interpolating along.
NORM_EPS = 1e-8
# Nearly (anti)parallel vectors make sin(theta) tiny; mergekit falls back to linear here too.
DOT_THRESHOLD = 0.9995


@dataclass(frozen=True)
class Reductions:
    """The three float64 sums SLERP needs: ``aa = |a|^2``, ``bb = |b|^2``, ``ab = a.b``."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0

    def __add__(self, other: "Reductions") -> "Reductions":
        return Reductions(self.aa + other.aa, self.bb + other.bb, self.ab + other.ab)


@dataclass(frozen=True)
class Coefficients:
    """``out = ca * a + cb * b``; ``linear`` says the linear fallback was taken."""

    ca: float
    cb: float
    linear: bool
    theta: float  # the angle between a and b in radians (0.0 when a norm is ~0)


def reduce_block(a: torch.Tensor, b: torch.Tensor) -> Reductions:
    """Accumulate ``|a|^2``, ``|b|^2`` and ``a.b`` of one block in float64.

    The sums' last bits depend on torch's thread count (a float64 dot is split across threads):
    callers that need the same bits everywhere, as the actors do, reduce with one thread.

    Example:
        >>> reduce_block(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
        Reductions(aa=9.0, bb=16.0, ab=0.0)
    """
    a64 = a.reshape(-1).to(torch.float64)
    b64 = b.reshape(-1).to(torch.float64)
    return Reductions(
        aa=float(torch.dot(a64, a64)),
        bb=float(torch.dot(b64, b64)),
        ab=float(torch.dot(a64, b64)),
    )


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
    coef = slerp_coefficients(reduce_block(a, b), t)
    return combine_block(a, b, coef, out_dtype or a.dtype)
