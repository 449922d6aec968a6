"""family.py against independent whole-tensor float64 versions of mergekit's formulas.

Each case merges random tensors two ways: the coefficients from their Gram matrix applied as
``sum_i c_i x_i``, and a direct float64 transcription of mergekit's method that never sees a Gram
matrix. They must agree to 1e-12 of the inputs' scale.
"""

import math

import pytest
import torch

from raymerge.errors import InputError
from raymerge.family import (check_gram, karcher_coefficients, multislerp_coefficients, nuslerp_coefficients,
                             nuslerp_t)

F64 = torch.float64
SHAPES = [(7,), (5, 3), (4, 3, 2)]
TOL = 1e-12


# --- the direct versions: whole tensors, float64, mergekit's steps in mergekit's order ---------

def multislerp_direct(xs, weights, base=None, normalize_weights=True, eps=1e-8):
    vs = torch.stack([x if base is None else x - base for x in xs])
    flat = vs.reshape(len(xs), -1)
    w = torch.tensor(weights, dtype=F64)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        assert len(xs) == 2
        res = (w[0] * vs[0] + w[1] * vs[1]).reshape(xs[0].shape)
    else:
        mean = mean / mean.norm()
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * w[:, None]).sum(0)
        tn = tangent.norm() + eps
        res = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms[:, 0] * w).sum()
        res = res.reshape(xs[0].shape)
    return res if base is None else res + base


def karcher_direct(xs, max_iter=10, tol=1e-5):
    norms = [float(x.norm()) for x in xs]
    units = [torch.zeros_like(x) if n == 0.0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a = 1.0 / len(valid)
    us = [units[i] for i in valid]
    u = sum(a * ui for ui in us)
    nu = float(u.norm())
    u = us[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for ui in us:
            dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (ui - dot * u)
        ns = step.norm()
        if float(ns) < tol:
            break
        u = torch.cos(ns) * u + torch.sin(ns) * (step / ns)
        if float(u.norm()) > tol:
            u = u / u.norm()
    return sum(norms) / len(xs) * u


def nuslerp_direct(t, v0, v1, dim=-1, flatten=True, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    s = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    lin = (s.abs() < eps).expand_as(res)
    res = torch.where(lin, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


def nuslerp_merge_direct(xs, weights, base=None, dim=-1, flatten=True):
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return nuslerp_direct(t, xs[0], xs[1], dim, flatten)
    return base + nuslerp_direct(t, xs[0] - base, xs[1] - base, dim, flatten)


# --- the Gram route -------------------------------------------------------------------------

def gram(vs):
    n = len(vs)
    g = torch.empty(n, n, dtype=F64)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = torch.dot(vs[i].flatten(), vs[j].flatten())
    return g


def task_vectors(xs, base):
    return xs if base is None else [x - base for x in xs]


def combine(c, xs, base=None):
    inputs = list(xs) + ([] if base is None else [base])
    assert c.shape == (len(inputs),)
    return sum(float(ci) * x for ci, x in zip(c, inputs))


def assert_close(got, want, inputs):
    scale = max(float(x.abs().max()) for x in inputs)
    err = float((got - want).abs().max())
    assert err <= TOL * max(scale, 1.0), f"off by {err:.3g} at scale {scale:.3g}"


def parents(shape, n, with_base, seed):
    g = torch.Generator().manual_seed(seed)
    if not with_base:
        return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n)], None
    base = torch.randn(shape, generator=g, dtype=F64)
    return [base + 0.1 * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)], base


def positive_weights(n, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return (0.2 + torch.rand(n, generator=g, dtype=F64)).tolist()


CASES = [(shape, n, with_base) for shape in SHAPES for n in (2, 3, 4) for with_base in (False, True)]


# --- multislerp -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape,n,with_base", CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_mergekit_formula(shape, n, with_base, normalize):
    seed = hash((shape, n, with_base)) % 10_000
    xs, base = parents(shape, n, with_base, seed)
    w = positive_weights(n, seed)
    c = multislerp_coefficients(gram(task_vectors(xs, base)), w, base=with_base, normalize_weights=normalize)
    want = multislerp_direct(xs, w, base, normalize_weights=normalize)
    assert_close(combine(c, xs, base), want, xs)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_near_parallel_zero_norm_and_antipodal(with_base):
    xs, base = parents((6, 4), 3, with_base, 7)
    origin = torch.zeros_like(xs[0]) if base is None else base
    near = origin + 1.5 * (xs[0] - origin) + 1e-9 * xs[1]
    cases = [
        [xs[0], near, xs[2]],  # near-parallel
        [xs[0], origin.clone(), xs[2]],  # a zero (task) vector
        [xs[0], 2 * origin - xs[0]],  # antipodal, equal weights: the linear fallback
        [origin.clone(), origin.clone()],  # both zero: the linear fallback too
    ]
    for ps in cases:
        w = [1.0] * len(ps)
        c = multislerp_coefficients(gram(task_vectors(ps, base)), w, base=with_base)
        assert_close(combine(c, ps, base), multislerp_direct(ps, w, base), ps)
    antipodal = multislerp_coefficients(gram(task_vectors(cases[2], base)), [1.0, 1.0], base=with_base)
    assert antipodal.tolist() == [0.5, 0.5] + ([0.0] if with_base else [])


def test_multislerp_tiny_task_vector_is_combined_as_task_vectors():
    # c_i grows to w_i / eps here: only base + sum c_i (x_i - base) keeps the digits.
    xs, base = parents((6, 4), 3, True, 9)
    ps = [xs[0], base + 1e-12 * xs[1], xs[2]]
    ds = task_vectors(ps, base)
    c = multislerp_coefficients(gram(ds), [1.0, 1.0, 1.0], base=True)
    assert float(c[1]) > 1e6
    got = base + sum(float(ci) * d for ci, d in zip(c[:-1], ds))
    assert_close(got, multislerp_direct(ps, [1.0, 1.0, 1.0], base), ps)
    assert torch.equal(c[-1], 1 - c[:-1].sum())


def test_multislerp_eps_survives_through_cos():
    # The tangent step is zero, but mergekit's exponential map still multiplies by cos(eps).
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    c = multislerp_coefficients(g, [1.0, 1.0], eps=0.1)
    mean_norm = math.sqrt(2) * 0.5 / 1.1
    assert c.tolist() == pytest.approx([0.5 / 1.1 * math.cos(0.1) / mean_norm] * 2, rel=1e-15)


def test_multislerp_refuses_a_zero_mean_of_three():
    a = torch.randn(5, dtype=F64)
    with pytest.raises(InputError, match="weighted mean") as e:
        multislerp_coefficients(gram([a, -a, torch.zeros(5, dtype=F64)]), [1.0, 1.0, 1.0])
    assert "\n" not in str(e.value)


# --- karcher --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,n", [(shape, n) for shape in SHAPES for n in (2, 3, 4)])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (3, 1e-5), (50, 1e-9)])
def test_karcher_matches_mergekit_formula(shape, n, max_iter, tol):
    xs, _ = parents(shape, n, False, n * 31 + len(shape))
    xs = [(i + 1) * x for i, x in enumerate(xs)]  # unequal norms, so the scale matters
    c = karcher_coefficients(gram(xs), max_iter=max_iter, tol=tol)
    assert_close(combine(c, xs), karcher_direct(xs, max_iter, tol), xs)


def test_karcher_near_parallel_and_zero_norm():
    xs, _ = parents((6, 4), 3, False, 11)
    zero = torch.zeros_like(xs[0])
    cases = [
        [xs[0], 2 * xs[0] + 1e-9 * xs[1], xs[2]],  # near-parallel: an angle below tol is skipped
        [xs[0], zero, xs[2]],  # left out of the mean, yet its norm 0 counts in the scale
        [xs[0], 1e-7 * xs[1], xs[2]],  # a norm below tol: the same
        [zero, zero, zero],  # every norm zero: zeros
        [xs[0], -xs[0], xs[1]],
    ]
    for ps in cases:
        c = karcher_coefficients(gram(ps))
        assert_close(combine(c, ps), karcher_direct(ps), ps)
    assert karcher_coefficients(gram(cases[1]))[1] == 0.0


def test_karcher_ignores_a_base():
    # mergekit averages base_model as one more input; raymerge's karcher has no base argument.
    xs, base = parents((5, 3), 2, True, 3)
    c = karcher_coefficients(gram(xs))
    assert c.shape == (2,)
    assert_close(combine(c, xs), karcher_direct(xs), xs)
    assert float((karcher_direct(xs + [base]) - karcher_direct(xs)).abs().max()) > 1e-3


# --- nuslerp --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,with_base", [(shape, b) for shape in SHAPES for b in (False, True)])
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.3, 0.7], [2.0, 0.5], [1.0, -0.3], [1.0, -1.0]])
def test_nuslerp_flatten_matches_mergekit_formula(shape, with_base, weights):
    xs, base = parents(shape, 2, with_base, 5 + len(shape))
    c = nuslerp_coefficients(gram(task_vectors(xs, base)), weights, base=with_base)
    assert_close(combine(c, xs, base), nuslerp_merge_direct(xs, weights, base), xs)


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_near_parallel_parallel_and_zero_norm(with_base):
    xs, base = parents((6, 4), 2, with_base, 13)
    origin = torch.zeros_like(xs[0]) if base is None else base
    cases = [
        [xs[0], origin + 2 * (xs[0] - origin) + 1e-9 * xs[1]],
        [xs[0], origin + 2 * (xs[0] - origin)],
        [xs[0], origin.clone()],  # at pi/2 from the other: sin(t pi/2) of it, not t of it
        [origin.clone(), origin.clone()],
    ]
    for ps in cases:
        c = nuslerp_coefficients(gram(task_vectors(ps, base)), [0.4, 0.6], base=with_base)
        assert_close(combine(c, ps, base), nuslerp_merge_direct(ps, [0.4, 0.6], base), ps)
    zero = nuslerp_coefficients(gram(task_vectors(cases[2], base)), [0.4, 0.6], base=with_base)
    assert float(zero[0]) == pytest.approx(math.sin(0.4 * math.pi / 2), rel=1e-15)


def test_nuslerp_linear_fallback_on_parallel_gram():
    c = nuslerp_coefficients(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64), [0.25, 0.75])
    assert c.tolist() == [0.25, 0.75]


def row_grams(vs, dim):
    """Per-vector Gram matrices for mergekit's flatten-off layout: vectors along ``dim``."""
    flat = [(v if dim == -1 else v.transpose(dim, -1)).reshape(-1, v.shape[dim]) for v in vs]
    g = torch.empty(flat[0].shape[0], len(vs), len(vs), dtype=F64)
    for i in range(len(vs)):
        for j in range(i, len(vs)):
            g[:, i, j] = g[:, j, i] = (flat[i] * flat[j]).sum(-1)
    return g


def combine_rows(c, inputs, dim):
    shape = inputs[0].shape
    moved = [(x if dim == -1 else x.transpose(dim, -1)) for x in inputs]
    tshape = moved[0].shape
    out = sum(c[:, k, None] * m.reshape(-1, tshape[-1]) for k, m in enumerate(moved)).reshape(tshape)
    out = out if dim == -1 else out.transpose(dim, -1)
    assert out.shape == shape
    return out


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_vector_batch_matches_flatten_off(shape, with_base, row_wise):
    xs, base = parents(shape, 2, with_base, 17 + len(shape))
    origin = torch.zeros(shape, dtype=F64) if base is None else base
    # One vector parallel in the two parents, one zero in the first: their own fallbacks, per vector.
    dim = 0 if row_wise else -1
    idx = (slice(None), 0) if row_wise else (0,)
    idx2 = (slice(None), 1) if row_wise else (1,)
    if len(shape) == 3 and row_wise:
        idx, idx2 = (slice(None), 0, 0), (slice(None), 1, 1)
    xs[1][idx] = origin[idx] + 2 * (xs[0][idx] - origin[idx])
    xs[0][idx2] = origin[idx2]
    weights = [0.35, 0.65]
    c = nuslerp_coefficients(row_grams(task_vectors(xs, base), dim), weights, base=with_base)
    inputs = xs + ([] if base is None else [base])
    assert c.shape == (c.shape[0], len(inputs))
    got = combine_rows(c, inputs, dim)
    assert_close(got, nuslerp_merge_direct(xs, weights, base, dim=dim, flatten=False), xs)


def test_nuslerp_t_as_mergekit_computes_it():
    assert nuslerp_t([3.0, 1.0]) == 0.25
    assert nuslerp_t([1.0, -1.0]) == 0.5  # a ~zero sum: mergekit's midpoint
    assert nuslerp_t([1.0, -0.5]) == -1.0  # extrapolation is allowed


# --- every method -----------------------------------------------------------------------------

def merged(method, xs, w, base):
    if method == "multislerp":
        return combine(multislerp_coefficients(gram(task_vectors(xs, base)), w, base=base is not None), xs, base)
    if method == "karcher":
        return combine(karcher_coefficients(gram(xs)), xs)
    return combine(nuslerp_coefficients(gram(task_vectors(xs, base)), w, base=base is not None), xs, base)


@pytest.mark.parametrize("method,n", [("multislerp", 3), ("multislerp", 4), ("karcher", 4), ("nuslerp", 2)])
@pytest.mark.parametrize("with_base", [False, True])
def test_permuting_parents_with_their_weights_changes_nothing(method, n, with_base):
    xs, base = parents((5, 4), n, with_base and method != "karcher", 23)
    w = positive_weights(n, 23)
    want = merged(method, xs, w, base)
    for perm in ([1, 0] + list(range(2, n)), list(reversed(range(n)))):
        got = merged(method, [xs[i] for i in perm], [w[i] for i in perm], base)
        assert_close(got, want, xs)


def one_line_refusal(fn, match):
    with pytest.raises(InputError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


ONE = torch.tensor([[1.0]], dtype=F64)
G3 = gram([torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)])


def test_refusals_are_one_line_input_errors():
    one_line_refusal(lambda: multislerp_coefficients(ONE, [1.0]), "at least 2 parents")
    one_line_refusal(lambda: karcher_coefficients(ONE), "at least 2 parents")
    one_line_refusal(lambda: nuslerp_coefficients(ONE, [1.0, 1.0]), "at least 2 parents")
    one_line_refusal(lambda: nuslerp_coefficients(G3, [1.0, 1.0]), "exactly two parents")
    one_line_refusal(lambda: nuslerp_t([1.0, 1.0, 1.0]), "exactly two parents")
    one_line_refusal(lambda: multislerp_coefficients(G3[:2, :2], [1.0, -1.0]), "sum to zero")
    one_line_refusal(lambda: multislerp_coefficients(G3, [0.1, 0.2, -0.3]), "sum to zero")
    one_line_refusal(lambda: multislerp_coefficients(G3, [1.0, 1.0]), "2 weights for 3 parents")
    one_line_refusal(lambda: multislerp_coefficients(G3[:2], [1.0, 1.0]), "square")
    one_line_refusal(lambda: karcher_coefficients(G3[0]), "square")
    one_line_refusal(lambda: karcher_coefficients(G3[None]), "square")
    asym = G3.clone()
    asym[0, 1] += 1e-9
    one_line_refusal(lambda: karcher_coefficients(asym), "not symmetric")
    one_line_refusal(lambda: multislerp_coefficients(G3.float(), [1.0] * 3), "float64")
    nan = G3.clone()
    nan[1, 1] = float("nan")
    one_line_refusal(lambda: check_gram(nan, "karcher"), "NaN")
    # Unnormalised weights may sum to zero: mergekit never divides by their sum then.
    multislerp_coefficients(G3[:2, :2], [1.0, -1.0], normalize_weights=False)
