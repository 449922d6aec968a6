"""The SLERP family over N parents (multislerp, karcher, nuslerp): the methods, their parameters and
their coefficients, pure torch.

Every method here outputs a weighted sum of its inputs, ``out = sum_i c_i * x_i``, whose
coefficients depend only on the method's parameters and on the inputs' Gram matrix
``G[i, j] = x_i . x_j`` (float64, inputs in the recipe's order). So a merge reduces a tensor's Gram
matrix in pass 1, turns it into coefficients here, and writes one weighted sum per block in pass 2,
as two-parent SLERP does with its three reductions (``raymerge.slerp``).

mergekit's source is the specification (``mergekit/merge_methods/multislerp.py``, ``karcher.py``,
``nuslerp.py``); each function's docstring says where raymerge differs and why.

With a ``base_model`` (multislerp, nuslerp) the Gram matrix is that of the task vectors
``d_i = x_i - base``, and the coefficients come back over ``[parents..., base]``, the base's being
``1 - sum_i c_i``. Reduce the differences themselves in pass 1 (a difference of two bf16, fp16 or
fp32 values is exact in float64): deriving ``d_i . d_j`` from the parents' and the base's own dot
products cancels catastrophically when, as usual, the task vectors are small next to the base.
For the same reason write ``base + sum_i c_i (x_i - base)`` in pass 2, not ``sum_i c_i x_i + c_base
* base``: multislerp's ``c_i`` grows to ``w_i / eps`` for a task vector of norm ~eps (a tensor a
fine-tune barely changed), and then ``c_i x_i`` and ``c_base * base`` cancel to rounding noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raymerge.errors import InputError

# mergekit's defaults (multislerp's eps; karcher's max_iter and tol).
MULTISLERP_EPS = 1e-8
KARCHER_MAX_ITER = 10
KARCHER_TOL = 1e-5
# nuslerp: norms are clamped to this before normalising, so a zero task vector has cos = 0 with the
# other one (its angle is pi/2, and no linear fallback is taken for it: mergekit's behaviour).
NUSLERP_NORM_FLOOR = 1e-7
# nuslerp: |sin(theta)| below this interpolates linearly.
NUSLERP_EPS = 1e-8
# nuslerp: |w0 + w1| below this gives t = 0.5 instead of a division by ~0.
NUSLERP_WEIGHT_SUM_FLOOR = 1e-6
# Weights whose sum is below this fraction of their magnitudes sum to zero up to rounding
# (0.1 + 0.2 - 0.3 is 5.6e-17, not 0): normalising them would blow them up into noise.
ZERO_SUM_RELATIVE = 1e-12


def check_gram(gram: torch.Tensor, method: str, batched: bool = False) -> torch.Tensor:
    """A Gram matrix (``[N, N]``, or ``[..., N, N]`` when ``batched``) as float64, or InputError.

    It must be square, exactly symmetric (pass 1 reduces each pair once), finite, with a
    non-negative diagonal, over at least two inputs.
    """
    g = torch.as_tensor(gram)
    if g.dtype != torch.float64:
        # A float32 Gram matrix would already have lost the digits the angles need.
        raise InputError(f"{method}: the Gram matrix must be float64, got {g.dtype}")
    if g.dim() < 2 or (not batched and g.dim() != 2) or g.shape[-1] != g.shape[-2]:
        want = "[..., N, N]" if batched else "[N, N]"
        raise InputError(f"{method}: the Gram matrix must be square, {want}; got shape {tuple(g.shape)}")
    if g.shape[-1] < 2:
        raise InputError(f"{method} merges at least 2 parents; got {g.shape[-1]}")
    if not torch.isfinite(g).all():
        raise InputError(f"{method}: the Gram matrix holds a NaN or an infinity")
    if not torch.equal(g, g.transpose(-1, -2)):
        raise InputError(f"{method}: the Gram matrix is not symmetric")
    if (torch.diagonal(g, dim1=-2, dim2=-1) < 0).any():
        raise InputError(f"{method}: the Gram matrix has a negative squared norm on its diagonal")
    return g


def _with_base(c: torch.Tensor, base: bool) -> torch.Tensor:
    """``base + sum c_i (x_i - base)`` written as coefficients over ``[parents..., base]``."""
    if not base:
        return c
    return torch.cat([c, (1.0 - c.sum(-1)).unsqueeze(-1)], dim=-1)


def _weights(weights: Sequence[float], n: int, method: str) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != n:
        raise InputError(f"{method}: {w.numel()} weights for {n} parents")
    if not torch.isfinite(w).all():
        raise InputError(f"{method}: a weight is a NaN or an infinity: {w.tolist()}")
    return w


def _sqnorm(v: torch.Tensor, g: torch.Tensor) -> float:
    # Rounding can take a tiny quadratic form below zero; its norm is then 0, never NaN.
    return math.sqrt(max(0.0, float(v @ g @ v)))


def multislerp_coefficients(
    gram: torch.Tensor,
    weights: Sequence[float],
    *,
    base: bool = False,
    normalize_weights: bool = True,
    eps: float = MULTISLERP_EPS,
) -> torch.Tensor:
    """mergekit's ``multislerp`` of N parents as coefficients over ``[parents..., base]``.

    Each input is scaled to unit length (``x_i / (|x_i| + eps)``); the weighted mean ``m`` of
    those directions, normalised, is the output's direction, and the weighted mean of the norms
    its length. mergekit then maps the weighted sum of the directions' tangent vectors at ``m``
    back to the sphere with the exponential map, but that sum is ``m - |m| * m/|m| = 0`` (up to
    rounding), so the map contributes only its ``cos(0 + eps)``, kept here. When ``|m| < eps``
    (antipodal parents whose weights balance) two parents are combined linearly with the weights,
    and more are refused, as mergekit does.

    Differences from mergekit: one parent is refused (mergekit returns it unchanged); weights
    that sum to zero up to rounding are refused when normalised (mergekit divides by the sum);
    the parents are summed in the recipe's order; a tensor
    that every input holds as zeros (every parent equal to the base there) gives zeros (the base),
    where mergekit, for three parents or more, stops the merge ("the weighted sum of the input
    tensors is zero").

    Args:
        gram: float64 ``[N, N]`` Gram matrix of the parents, or of their task vectors
            ``x_i - base`` when ``base``.
        weights: one weight per parent, in the Gram matrix's order.
        base: whether a ``base_model`` is given; then the result has N + 1 entries, the base last.
        normalize_weights: divide the weights by their sum first (mergekit's default).
        eps: mergekit's ``eps``: added to each norm, and the threshold on ``|m|``.

    Returns:
        float64 coefficients, shape ``[N]`` (``[N + 1]`` with a base).

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> [round(c, 6) for c in multislerp_coefficients(g, [1.0, 1.0]).tolist()]
        [0.707107, 0.707107]
    """
    method = "multislerp"
    g = check_gram(gram, method)
    n = g.shape[0]
    w = _weights(weights, n, method)
    if normalize_weights:
        total = float(w.sum())
        if abs(total) <= ZERO_SUM_RELATIVE * float(w.abs().sum()):
            raise InputError(f"{method}: the weights {w.tolist()} sum to zero, so they cannot be normalised")
        w = w / total
    norms = torch.sqrt(torch.diagonal(g))
    # The weighted mean of the unit directions, over the inputs. A zero vector's direction is zero
    # in mergekit too; its coefficient is 0, never w / eps, which pass 2 would multiply into
    # rounding noise (with a base, a parent equal to the base is exactly such a vector).
    a = torch.where(norms == 0, 0.0, w / (norms + eps))
    if bool((norms == 0).all()):
        # Every input is zero (with a base: no parent changed this tensor, as for a frozen layer):
        # the output is zero, or the base. mergekit raises here for three parents or more.
        return _with_base(torch.zeros(n, dtype=torch.float64), base)
    mean_norm = _sqnorm(a, g)
    if mean_norm < eps:
        if n == 2:
            return _with_base(w.clone(), base)
        raise InputError(
            f"{method}: the weighted mean of the {n} parents' directions is zero "
            "(antipodal parents whose weights balance); change the weights"
        )
    avg_norm = float((norms * w).sum())
    return _with_base(a * (avg_norm * math.cos(eps) / mean_norm), base)


def karcher_coefficients(
    gram: torch.Tensor, *, max_iter: int = KARCHER_MAX_ITER, tol: float = KARCHER_TOL
) -> torch.Tensor:
    """mergekit's ``karcher`` (the Riemannian mean on the sphere) of N parents as coefficients.

    The parents' directions ``x_i / |x_i|`` (those with ``|x_i| > tol``) get equal weights; the
    mean starts at their normalised Euclidean mean (the first direction if that is below ``tol``)
    and moves, at most ``max_iter`` times, along the weighted sum of the log maps
    ``theta_i / sin(theta_i) * (u_i - cos(theta_i) * u)`` (skipping ``theta_i < tol``) until that
    step is below ``tol``. Every iterate lies in the span of the parents, so it runs on the Gram
    matrix alone. The output is the mean direction times the mean of all the parents' norms.

    Differences from mergekit: ``base_model`` takes no part (mergekit's documentation says none is
    used, yet ``karcher.py`` averages every gathered tensor, the base's included: a defect not
    copied); one parent is refused (mergekit returns it); norms are float64 (mergekit's are
    float32: ``t.float()``).

    Args:
        gram: float64 ``[N, N]`` Gram matrix of the parents (never the base).
        max_iter: mergekit's ``max_iter``.
        tol: mergekit's ``tol``: the threshold on norms, angles and the step.

    Returns:
        float64 coefficients over the parents, shape ``[N]`` (zeros when every norm is below tol).

    Example:
        >>> g = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> [round(c, 6) for c in karcher_coefficients(g).tolist()]
        [0.53033, 1.06066]
    """
    method = "karcher"
    g = check_gram(gram, method)
    n = g.shape[0]
    if max_iter < 0 or not tol >= 0:
        raise InputError(f"{method}: max_iter and tol must be >= 0; got {max_iter} and {tol}")
    norms = torch.sqrt(torch.diagonal(g))
    valid = (norms > tol).nonzero().reshape(-1)
    c = torch.zeros(n, dtype=torch.float64)
    if valid.numel() == 0:
        return c
    nv = norms[valid]
    gu = g[valid][:, valid] / torch.outer(nv, nv)  # the Gram matrix of the unit directions
    k = valid.numel()
    alpha = 1.0 / k
    # The mean u = sum_j beta[j] * unit_j.
    beta = torch.full((k,), alpha, dtype=torch.float64)
    norm_u = _sqnorm(beta, gu)
    if norm_u < tol:
        beta = torch.zeros(k, dtype=torch.float64)
        beta[0] = 1.0
    else:
        beta = beta / norm_u
    for _ in range(max_iter):
        dots = (gu @ beta).clamp(-1.0, 1.0)
        theta = torch.acos(dots)
        # Angles below tol contribute nothing (mergekit skips them), which also avoids 0/sin(0).
        scale = torch.where(theta < tol, 0.0, alpha * theta / torch.sin(theta))
        step = scale - float((scale * dots).sum()) * beta
        norm_step = _sqnorm(step, gu)
        if norm_step < tol:
            break
        beta = math.cos(norm_step) * beta + (math.sin(norm_step) / norm_step) * step
        norm_u = _sqnorm(beta, gu)
        if norm_u > tol:
            beta = beta / norm_u
    scale_out = float(norms.sum()) / n  # every parent's norm counts, the ones left out too
    c[valid] = beta * scale_out / nv
    return c


def nuslerp_t(weights: Sequence[float]) -> float:
    """nuslerp's ``t`` from its two weights: ``w1 / (w0 + w1)``, or 0.5 when the sum is ~0.

    ``t`` may fall outside [0, 1] (a negative weight extrapolates), as in mergekit.

    Example:
        >>> nuslerp_t([3.0, 1.0])
        0.25
    """
    if len(weights) != 2:
        raise InputError(f"nuslerp merges exactly two parents (plus an optional base_model); got {len(weights)} weights")
    w0, w1 = float(weights[0]), float(weights[1])
    if not (math.isfinite(w0) and math.isfinite(w1)):
        raise InputError(f"nuslerp: a weight is a NaN or an infinity: {[w0, w1]}")
    total = w0 + w1
    if abs(total) < NUSLERP_WEIGHT_SUM_FLOOR:
        return 0.5  # mergekit's choice: an arbitrary midpoint rather than a division by ~0
    return w1 / total


def nuslerp_coefficients(
    gram: torch.Tensor, weights: Sequence[float], *, base: bool = False, eps: float = NUSLERP_EPS
) -> torch.Tensor:
    """mergekit's ``nuslerp`` of two parents as coefficients, for one Gram matrix or a batch.

    SLERP at ``t = nuslerp_t(weights)`` of the two parents, or of their task vectors against the
    base: ``sin((1 - t) theta) / sin(theta)`` and ``sin(t theta) / sin(theta)``, with
    ``cos(theta)`` from the norms clamped to at least 1e-7, and linear ``(1 - t, t)`` where
    ``|sin(theta)| < eps``. A zero vector is at pi/2 from the other (no linear fallback), as in
    mergekit. ``nuslerp_flatten: true`` is one ``[2, 2]`` matrix per tensor; with flatten off,
    pass a ``[R, 2, 2]`` batch, one matrix per vector mergekit interpolates separately, and get
    ``[R, 2]`` (``[R, 3]``) back. Which vectors to reduce is the caller's (``FamilyMethod.vectors``);
    the maths is the same.

    Differences from mergekit: none in the formula; t outside [0, 1] is allowed as there. Choosing
    the parents (exactly two, the base not among them) is the caller's; a Gram matrix over more
    than two inputs is refused here.

    Args:
        gram: float64 ``[..., 2, 2]`` Gram matrices of the two parents (task vectors when ``base``).
        weights: the two parents' ``weight``.
        base: whether a ``base_model`` is given; then a third coefficient, the base's, is appended.
        eps: the threshold on ``|sin(theta)|`` (mergekit's ``nuslerp(eps=1e-8)``).

    Returns:
        float64 coefficients, shape ``[..., 2]`` (``[..., 3]`` with a base).

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> [round(c, 6) for c in nuslerp_coefficients(g, [1.0, 1.0], base=True).tolist()]
        [0.707107, 0.707107, -0.414214]
    """
    method = "nuslerp"
    g = check_gram(gram, method, batched=True)
    if g.shape[-1] != 2:
        raise InputError(
            f"nuslerp merges exactly two parents (plus an optional base_model); got {g.shape[-1]}"
        )
    t = nuslerp_t(weights)
    n0 = torch.sqrt(g[..., 0, 0]).clamp(min=NUSLERP_NORM_FLOOR)
    n1 = torch.sqrt(g[..., 1, 1]).clamp(min=NUSLERP_NORM_FLOOR)
    theta = torch.acos((g[..., 0, 1] / (n0 * n1)).clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    colinear = sin_theta.abs() < eps
    # Where colinear, the division below may give inf or NaN; torch.where discards it.
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return _with_base(torch.stack([c0, c1], dim=-1), base)


METHODS = ("multislerp", "nuslerp", "karcher")


@dataclass(frozen=True)
class FamilyMethod:
    """One of the SLERP family's methods with its parameters (mergekit's names and defaults).

    Attributes:
        name: ``multislerp``, ``nuslerp`` or ``karcher``.
        base: a ``base_model`` is the merge's last input (multislerp, nuslerp): the parents are
            merged as task vectors ``x_i - base``.
        normalize_weights, eps: multislerp's.
        nuslerp_flatten, nuslerp_row_wise: nuslerp's (one angle per tensor, or per row / column).
        max_iter, tol: karcher's.
    """

    name: str
    base: bool = False
    normalize_weights: bool = True
    eps: float = MULTISLERP_EPS
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False
    max_iter: int = KARCHER_MAX_ITER
    tol: float = KARCHER_TOL

    def __post_init__(self):
        if self.name not in METHODS:
            raise InputError(f"unknown merge method {self.name!r}: choose from slerp, {', '.join(METHODS)}")
        if self.base and self.name == "karcher":
            raise InputError("karcher takes no base_model (it averages the parents themselves)")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise InputError(f"{self.name}: eps must be a positive number, got {self.eps}")
        if self.max_iter < 0 or not (self.tol >= 0 and math.isfinite(self.tol)):
            raise InputError(f"{self.name}: max_iter and tol must be >= 0; got {self.max_iter} and {self.tol}")

    @property
    def weighted(self) -> bool:
        """Whether the method takes one weight per parent (karcher takes none)."""
        return self.name != "karcher"

    def vectors(self, shape: tuple[int, ...]) -> str:
        """What one angle is taken over: ``tensor`` (the whole tensor, flattened), or with
        ``nuslerp_flatten: false``, ``rows`` (vectors along the last dimension, with
        ``nuslerp_row_wise: true``) or ``columns`` (vectors along the first dimension, by default).
        A tensor of one dimension is one vector either way, as in mergekit.

        This is mergekit's documentation ("nuslerp_row_wise: SLERP row vectors instead of column
        vectors"), not its code, which takes vectors along the last dimension by default and
        along the first with ``nuslerp_row_wise``: in PyTorch's ``[out, in]`` layout, columns for
        "row-wise". A recipe with flatten off therefore gives what mergekit 0.1.5 gives with the
        flag negated (README, "Merging more than two models")."""
        if self.name != "nuslerp" or self.nuslerp_flatten or len(shape) < 2:
            return "tensor"
        return "rows" if self.nuslerp_row_wise else "columns"

    def coefficients(self, gram: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """Coefficients over the inputs (the base last, with one): ``[N]``, or ``[V, N]`` for a
        batch of ``V`` Gram matrices (nuslerp per row or column)."""
        if self.name == "multislerp":
            return multislerp_coefficients(gram, weights, base=self.base,
                                           normalize_weights=self.normalize_weights, eps=self.eps)
        if self.name == "karcher":
            return karcher_coefficients(gram, max_iter=self.max_iter, tol=self.tol)
        return nuslerp_coefficients(gram, weights, base=self.base)

    def check_weights(self, weights: Sequence[float]) -> None:
        """Refuse, before anything is read, weights the method cannot use on any tensor."""
        if self.name == "nuslerp":
            nuslerp_t(weights)
        elif self.name == "multislerp":
            w = _weights(weights, len(weights), self.name)
            if self.normalize_weights and abs(float(w.sum())) <= ZERO_SUM_RELATIVE * float(w.abs().sum()):
                raise InputError(f"{self.name}: the weights {w.tolist()} sum to zero, so they cannot be normalised")

    def describe(self) -> str:
        """The method and the parameters that differ from mergekit's defaults."""
        changed = [f"{f}={getattr(self, f)}" for f in ("normalize_weights", "eps", "nuslerp_flatten", "nuslerp_row_wise",
                                                         "max_iter", "tol")
                   if getattr(self, f) != getattr(FamilyMethod, f)
                   and f in PARAMETERS[self.name]]
        return self.name + (f" ({', '.join(changed)})" if changed else "")


# The method parameters each method takes, as mergekit names them.
PARAMETERS = {
    "multislerp": ("normalize_weights", "eps"),
    "nuslerp": ("nuslerp_flatten", "nuslerp_row_wise"),
    "karcher": ("max_iter", "tol"),
}


def gram_pairs(n_parents: int, base: bool) -> tuple[tuple[int, int], ...]:
    """The products pass 1 sums for a Gram matrix over ``n_parents`` (task vectors with a base):
    each pair (i, j), i <= j, once; with a base, also the base's own square, whose finiteness
    tells a non-finite base from a non-finite parent.

    Example:
        >>> gram_pairs(2, base=True)
        ((0, 0), (0, 1), (1, 1), (2, 2))
    """
    pairs = tuple((i, j) for i in range(n_parents) for j in range(i, n_parents))
    return pairs + ((n_parents, n_parents),) if base else pairs


def gram_matrix(sums: torch.Tensor, n_parents: int) -> torch.Tensor:
    """The symmetric Gram matrix from ``gram_pairs``' sums (last dimension: pairs), float64
    ``[..., n, n]``; the base's square, if summed, is left out."""
    g = torch.empty((*sums.shape[:-1], n_parents, n_parents), dtype=torch.float64)
    for k, (i, j) in enumerate(gram_pairs(n_parents, base=False)):
        g[..., i, j] = sums[..., k]
        g[..., j, i] = sums[..., k]
    return g
