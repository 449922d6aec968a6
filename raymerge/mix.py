"""The SLERP family on row blocks: a tensor's Gram sums (pass 1) and its weighted sum (pass 2).

A tensor merged by multislerp, nuslerp or karcher (family.py) has N inputs: the parents in the
recipe's order, then the base when there is one. Pass 1 streams the tensor's row blocks through
``GramSums``, which sums every pair's products in float64 in the fixed order slerp.py documents
(``pair_chunk_sums``: the compiled kernel on a CPU, the same bits as torch's steps), so the Gram
matrix, hence every coefficient and output byte, is the same for any block size, thread count,
actor count or node. With a base, the products are those of the task vectors ``x_i - base``,
formed in float64 (exact for bfloat16, float16 and float32 values).

Pass 2 (``mix_inputs`` once, then ``mix_block`` per output) computes ``sum_i c_i x_i``, or
``base + sum_i c_i (x_i - base)``, in float64, one multiply and one add per input in the inputs'
order, then rounds once to the output dtype.

Angles over a whole tensor sum each chunk of about ``REDUCTION_CHUNK`` elements and the chunks'
sums by pairwise halving; nuslerp's per-row angles (flatten off, ``nuslerp_row_wise``) sum each
row the same way (a row is one chunk); its per-column angles (flatten off, the default) sum each
chunk of whole rows per column by pairwise halving and add the chunks' sums in row order.
"""

from __future__ import annotations

import math

import torch

from raymerge.family import FamilyMethod, gram_matrix, gram_pairs
from raymerge.slerp import chunk_elems, chunk_rows, pair_chunk_sums, totals


def _product_inputs(blocks: tuple[torch.Tensor, ...], base: bool) -> list[torch.Tensor]:
    """What pass 1 multiplies: the parents' rows (in one dtype), or their task vectors against
    the base and the base itself, in float64."""
    if base:
        b = blocks[-1].to(torch.float64)
        return [x.to(torch.float64) - b for x in blocks[:-1]] + [b]
    dtypes = {x.dtype for x in blocks}
    if len(dtypes) == 1:
        return list(blocks)
    # Mapped or padded rows come as float32, the others as read: float32 holds every bfloat16
    # and float16 value exactly, so the products are the same numbers.
    work = torch.float64 if torch.float64 in dtypes else torch.float32
    return [x.to(work) for x in blocks]


class GramSums:
    """One tensor's Gram sums, fed its row blocks in order (see the module docstring)."""

    def __init__(self, method: FamilyMethod, shape: tuple[int, ...], n_parents: int):
        self.method = method
        self.shape = shape
        self.n_parents = n_parents
        self.vectors = method.vectors(shape)
        self.pairs = gram_pairs(n_parents, method.base)
        self._partials: list[torch.Tensor] = []
        self._columns: torch.Tensor | None = None

    def add(self, blocks: tuple[torch.Tensor, ...]) -> None:
        """Add the rows of one block (every input's, aligned), in row order."""
        inputs = _product_inputs(blocks, self.method.base)
        if self.vectors == "tensor":
            self._partials.append(pair_chunk_sums(inputs, self.pairs, chunk_elems(self.shape)))
        elif self.vectors == "rows":
            self._partials.append(pair_chunk_sums(inputs, self.pairs, self.shape[-1]))
        else:
            step = chunk_rows(self.shape)
            n = inputs[0].shape[0]
            for r in range(0, n, step):
                cols = [x[r:r + step].reshape(min(step, n - r), -1).t().contiguous() for x in inputs]
                sums = pair_chunk_sums(cols, self.pairs, cols[0].shape[1])
                self._columns = sums if self._columns is None else self._columns + sums

    def result(self) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """The Gram matrix (``[N, N]``, or ``[V, N, N]`` per row or column) and whether each input
        (parents, then the base) is finite."""
        pairs = len(self.pairs)
        if self.vectors == "tensor":
            sums = (torch.tensor(totals(self._partials), dtype=torch.float64) if self._partials
                    else torch.zeros(pairs, dtype=torch.float64))  # a tensor of no elements
        elif self.vectors == "rows":
            sums = (torch.cat(self._partials, dim=1).t() if self._partials
                    else torch.zeros((0, pairs), dtype=torch.float64))
        else:
            sums = (self._columns.t() if self._columns is not None
                    else torch.zeros((math.prod(self.shape[1:]), pairs), dtype=torch.float64))
        finite = [bool(torch.isfinite(sums[..., k]).all()) for k, (i, j) in enumerate(self.pairs) if i == j]
        if self.method.base and not finite[-1]:
            # A non-finite base makes every task vector non-finite: only the base is to blame.
            finite = [True] * self.n_parents + [False]
        gram = gram_matrix(sums, self.n_parents)
        if not all(finite):
            gram = torch.zeros_like(gram)
        return gram, tuple(finite)


def mix_inputs(blocks: tuple[torch.Tensor, ...], base: bool) -> list[torch.Tensor]:
    """What pass 2 weighs, in float64, once for every output of a sweep: the parents' rows, or
    their task vectors ``x_i - base`` (exact in float64) followed by the base's rows."""
    xs = [x.to(torch.float64) for x in blocks]
    if base:
        return [x - xs[-1] for x in xs[:-1]] + [xs[-1]]
    return xs


def mix_block(inputs: list[torch.Tensor], coef: torch.Tensor, method: FamilyMethod,
              shape: tuple[int, ...], r0: int, out_dtype: torch.dtype) -> torch.Tensor:
    """One block of the output from ``mix_inputs`` (rows from ``r0``): ``sum_i c_i x_i``, or
    ``base + sum_i c_i (x_i - base)``, with ``coef`` ``[N]`` or, per row or column of the tensor,
    ``[V, N]``; float64, one multiply and one add per input in order, rounded once."""
    vectors = method.vectors(shape)
    block_shape = inputs[0].shape
    xs = inputs
    if vectors == "rows":
        xs = [x.reshape(-1, shape[-1]) for x in xs]
        per_row = math.prod(shape[1:-1])
        rows = slice(r0 * per_row, r0 * per_row + xs[0].shape[0])
    elif vectors == "columns":
        xs = [x.reshape(x.shape[0], -1) for x in xs]

    def c(i: int):
        if coef.dim() == 1:
            return float(coef[i])
        if vectors == "rows":
            return coef[rows, i].unsqueeze(1)
        return coef[:, i].unsqueeze(0)

    n = len(xs) - 1 if method.base else len(xs)
    if method.base:
        out = xs[-1].clone()
        for i in range(n):
            out += c(i) * xs[i]
    else:
        out = c(0) * xs[0]
        for i in range(1, n):
            out += c(i) * xs[i]
    return out.reshape(block_shape).to(out_dtype)
