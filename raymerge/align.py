"""The alignment plan and the vocab-gradient padder.

Fine-tuned models often extend the vocabulary (32000 vs 32001, 32002, 32032...). When two parent
tensors differ on exactly one axis and that axis's sizes are the parents' vocabulary sizes, the
shorter parent S (n entries) is extended to the longer L (N entries, k = N - n) in memory before
SLERP. Strategies:

- ``gradient`` (default): ``S'[n-1+j] = S[n-1] + (j/k) (L[N-1] - S[n-1])`` for j = 1..k, a linear
  ramp from S's last entry to L's last entry, in float32. Zero rows (the original script's fix)
  pull the SLERP of a new token towards the origin and made merged models go NaN; the ramp keeps
  new rows inside the span of trained rows instead.
- ``zeros`` (the original script), ``copy`` (``S'[n..N) = L[n..N)``), ``mean`` (each new entry
  is the mean of S's entries).

The plan is built from headers and configs alone; the padded rows are made by the actors, from
the two edge entries (and S's mean for ``mean``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymerge.errors import InputError
from raymerge.parents import Parent
from raymerge.shards import TensorEntry

EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                  "tok_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


@dataclass(frozen=True)
class PadSpec:
    """How one tensor's shorter parent is extended along its vocabulary axis."""

    axis: int
    short: str  # "a" or "b": the parent with fewer entries
    n: int  # entries in the short parent
    N: int  # entries in the long parent (and in the output)
    strategy: str

    @property
    def k(self) -> int:
        return self.N - self.n


@dataclass(frozen=True)
class AlignedTensor:
    name: str
    shape: tuple[int, ...]
    a: TensorEntry | None
    b: TensorEntry | None
    pad: PadSpec | None


@dataclass(frozen=True)
class Alignment:
    """What the padder decided for the whole model."""

    tensors: tuple[AlignedTensor, ...]
    vocab_size: int | None  # rows of the merged embedding
    tied_output: bool
    tokenizer_from: str  # the parent whose vocabulary has the merged row count, "a" when equal
    notes: tuple[str, ...]


def embedding_name(p: Parent) -> str | None:
    names = [n for n in p.tensors if n.endswith(EMBED_SUFFIXES)]
    return sorted(names)[0] if names else None


def head_name(p: Parent) -> str | None:
    return next((n for n in HEAD_NAMES if n in p.tensors), None)


def _rows(p: Parent) -> int | None:
    e = embedding_name(p)
    return p.tensors[e].shape[0] if e else None


def tied(p: Parent) -> bool:
    # transformers ties lm_head to the input embedding when the config says so, whatever the file
    # holds; without an lm_head in the file the head can only be the embedding.
    return embedding_name(p) is not None and (p.tie_word_embeddings or head_name(p) is None)


def _sources(p: Parent, untie: bool) -> dict[str, TensorEntry]:
    """The parent's tensors by output name, with a tied head dropped or spelled out."""
    tensors = dict(p.tensors)
    if not tied(p):
        return tensors
    head = head_name(p)
    if head:
        del tensors[head]
    if untie:
        tensors[HEAD_NAMES[0]] = p.tensors[embedding_name(p)]
    return tensors


def align_parents(a: Parent, b: Parent, pad: str) -> Alignment:
    """Match the parents' tensors by name and plan the padding of vocabulary axes.

    Raises InputError, naming the tensor and both shapes, for any other shape difference.
    """
    tied_a, tied_b = tied(a), tied(b)
    untie = tied_a != tied_b
    src_a, src_b = _sources(a, untie), _sources(b, untie)
    if untie and HEAD_NAMES[0] not in src_a | src_b:
        raise InputError("only one parent ties its embeddings, and the other has no lm_head.weight")
    if untie:
        # The untied parent may call its head embed_out; give both the same output name.
        for src, p in ((src_a, a), (src_b, b)):
            h = head_name(p)
            if h and h != HEAD_NAMES[0] and h in src:
                src[HEAD_NAMES[0]] = src.pop(h)
    vocab_sizes = {(a.vocab_size, b.vocab_size), (_rows(a), _rows(b))}
    notes = []
    tensors = []
    for name in sorted(set(src_a) | set(src_b)):
        ea, eb = src_a.get(name), src_b.get(name)
        if ea is None or eb is None:
            only = "A" if eb is None else "B"
            notes.append(f"{name}: only in parent {only}, copied through")
            e = ea or eb
            tensors.append(AlignedTensor(name, e.shape, ea, eb, None))
            continue
        spec = _pad_spec(name, ea, eb, vocab_sizes, pad)
        if spec is not None:
            notes.append(f"{name}: parent {spec.short.upper()} has {spec.n} rows, the other {spec.N}; "
                         f"{spec.k} rows padded ({spec.strategy})")
        shape = ea.shape if spec is None else (ea.shape if spec.short == "b" else eb.shape)
        tensors.append(AlignedTensor(name, shape, ea, eb, spec))
    rows_a, rows_b = _rows(a), _rows(b)
    merged = max(r for r in (rows_a, rows_b) if r is not None) if (rows_a or rows_b) else None
    tokenizer_from = "a" if merged is None or rows_a == merged else "b"
    if untie:
        notes.append(f"parent {'A' if tied_a else 'B'} ties lm_head to its embedding; the output is untied")
    return Alignment(tuple(tensors), merged, tied_a and tied_b, tokenizer_from, tuple(notes))


def _pad_spec(name: str, ea: TensorEntry, eb: TensorEntry, vocab_sizes: set, pad: str) -> PadSpec | None:
    if ea.shape == eb.shape:
        return None
    axes = [i for i, (x, y) in enumerate(zip(ea.shape, eb.shape)) if x != y]
    mismatch = (
        f"tensor {name!r}: shapes differ, A {list(ea.shape)} vs B {list(eb.shape)}"
    )
    if len(ea.shape) != len(eb.shape) or len(axes) != 1:
        raise InputError(f"{mismatch} (only a vocabulary axis may differ)")
    axis = axes[0]
    sa, sb = ea.shape[axis], eb.shape[axis]
    if (sa, sb) not in vocab_sizes:
        raise InputError(f"{mismatch}, and {sa} vs {sb} are not the parents' vocabulary sizes")
    if axis != 0:
        raise InputError(f"{mismatch}: the vocabulary axis must be the first one")
    short = "a" if sa < sb else "b"
    return PadSpec(axis, short, min(sa, sb), max(sa, sb), pad)


def check_tokenizer_prefix(vocab_a: list[str | None], vocab_b: list[str | None]) -> None:
    """Refuse parents whose shorter vocabulary is not a prefix of the longer one.

    Merging rows by index is only meaningful when row i is the same token in both parents.
    """
    for i, (ta, tb) in enumerate(zip(vocab_a, vocab_b)):
        if ta != tb:
            raise InputError(
                f"the tokenizers disagree at id {i} (A {ta!r}, B {tb!r}): the shorter vocabulary "
                "is not a prefix of the longer one, so merging rows by id would mix unrelated tokens"
            )


def pad_rows(
    spec: PadSpec,
    rows: range,
    s_last: torch.Tensor,
    l_last: torch.Tensor,
    l_rows: torch.Tensor | None = None,
    s_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """The short parent's synthesized entries ``rows`` (all in [n, N)), in float32.

    Args:
        spec: the tensor's pad plan.
        rows: absolute row indices, each >= spec.n.
        s_last: the short parent's last entry S[n-1].
        l_last: the long parent's last entry L[N-1].
        l_rows: the long parent's entries at ``rows`` (for ``copy``).
        s_mean: the mean of the short parent's entries (for ``mean``).

    Example:
        >>> spec = PadSpec(0, "a", 2, 4, "gradient")
        >>> pad_rows(spec, range(2, 4), torch.tensor([0.0]), torch.tensor([1.0])).flatten().tolist()
        [0.5, 1.0]
    """
    count = len(rows)
    row_shape = tuple(s_last.shape)
    if spec.strategy == "zeros":
        return torch.zeros((count, *row_shape), dtype=torch.float32)
    if spec.strategy == "copy":
        return l_rows.to(torch.float32)
    if spec.strategy == "mean":
        return s_mean.to(torch.float32).expand(count, *row_shape).clone()
    j = torch.arange(rows.start - spec.n + 1, rows.stop - spec.n + 1, dtype=torch.float64)
    w = (j / spec.k).to(torch.float32).reshape(count, *([1] * len(row_shape)))
    s = s_last.to(torch.float32).expand(count, *row_shape)
    l = l_last.to(torch.float32).expand(count, *row_shape)
    # torch.lerp computes s + w (l - s), switching to l - (1 - w)(l - s) for w >= 0.5, so the
    # last new entry (w = 1) is exactly L[N-1].
    return torch.lerp(s, l, w)
