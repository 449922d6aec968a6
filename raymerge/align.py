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

When both parents ship tokenizers that do not extend one another by id, rows are aligned by
token string instead (tokens.py, ``--vocab``): each parent's embedding and head rows are mapped to
the child's vocabulary, a row a parent lacks filled for that parent.

The plan is built from headers, configs and tokenizers alone; the padded or mapped rows are made
by the actors, from the two edge entries (and a parent's mean row for ``mean``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymerge.errors import InputError
from raymerge.parents import Parent
from raymerge.schedule import layer_index
from raymerge.shards import TensorEntry
from raymerge.tokens import RowMap, TokenMap, first_difference, has_tokenizer, inputs_token_map, token_map

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
    rowmap: RowMap | None = None  # rows aligned by token string
    more: tuple[TensorEntry, ...] = ()  # the third and later inputs' (the SLERP family)


@dataclass(frozen=True)
class Alignment:
    """What the padder (or the token-string alignment) decided for the whole model."""

    tensors: tuple[AlignedTensor, ...]
    vocab_size: int | None  # rows of the merged embedding
    tied_output: bool
    tokenizer_from: str  # the parent whose vocabulary has the merged row count, "a" when equal
    notes: tuple[str, ...]
    token_map: TokenMap | None = None


def embedding_name(p: Parent) -> str | None:
    names = [n for n in p.tensors if n.endswith(EMBED_SUFFIXES)]
    return sorted(names)[0] if names else None


def head_name(p: Parent) -> str | None:
    return next((n for n in HEAD_NAMES if n in p.tensors), None)


def _rows(p: Parent) -> int | None:
    e = embedding_name(p)
    return p.tensors[e].shape[0] if e else None


def tied(p: Parent) -> bool:
    """Whether transformers ties the parent's head to its input embedding.

    The config's value, else the model class's default (configs.py); for a model type transformers
    does not know and whose config does not say, a checkpoint without a head.
    """
    if embedding_name(p) is None:
        return False
    tie = p.config.tie_word_embeddings
    return head_name(p) is None if tie is None else tie


def check_head(p: Parent) -> None:
    """Refuse an untied parent without a head: transformers would initialise it at random."""
    if embedding_name(p) is not None and not tied(p) and head_name(p) is None:
        raise InputError(f"parent {p.label}: {p.config.path}: tie_word_embeddings is false (the config's value or "
                         f"the model class's default), but the weights in {p.path} hold no {HEAD_NAMES[0]}")


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


def vocab_alignment(a: Parent, b: Parent, vocab: str, pad: str | None) -> tuple[TokenMap | None, str, list[str]]:
    """Choose between the padder (rows matched by id) and alignment by token string.

    ``auto`` keeps the padder when one tokenizer extends the other by id, or when a parent ships
    no tokenizer transformers can read (rows matched by size, as the padder does, with a note);
    otherwise it aligns by string, as ``union``. Returns the token map (None for the padder), the
    pad (or fill) strategy, and notes.
    """
    if vocab == "auto" and a.same_tokenizer_as(b):
        return None, pad or "gradient", []  # one tokenizer: rows match by id
    vocabs, notes = [], []
    for p in (a, b):
        try:
            vocabs.append(p.vocab)
        except InputError as e:
            if vocab != "auto":
                raise
            vocabs.append(None)
            notes.append(f"parent {p.label}: {e}; rows are matched by id")
    va, vb = vocabs
    if vocab == "auto":
        if va is None or vb is None or first_difference(va, vb) is None:
            return None, pad or "gradient", notes
        vocab = "union"
    else:
        lacking = next((p for p, v in ((a, va), (b, vb)) if v is None), None)
        if lacking is not None:
            raise InputError(f"--vocab {vocab} aligns rows by token string, but parent {lacking.label} "
                             f"({lacking.path}) ships no tokenizer")
    if pad == "gradient":
        raise InputError("--pad gradient extends appended ids only; rows aligned by token string take "
                         "the other parent's row (--pad copy, the default), or --pad mean or zeros")
    rows_a, rows_b = _rows(a), _rows(b)
    if rows_a is None or rows_b is None:
        raise InputError(f"--vocab {vocab}: parent {'A' if rows_a is None else 'B'} has no input embedding to align")
    fill = pad or "copy"
    return token_map(va, vb, rows_a, rows_b, vocab, fill), fill, notes


def _is_vocab_tensor(name: str, p: Parent) -> bool:
    """The input embedding and the head (weight and bias), whose rows are the vocabulary."""
    return name == embedding_name(p) or name.split(".")[0] in {h.split(".")[0] for h in HEAD_NAMES}


def align_parents(a: Parent, b: Parent, vocab: str = "auto", pad: str | None = None) -> Alignment:
    """Match the parents' tensors by name and plan the padding (or mapping) of vocabulary rows.

    Raises InputError, naming the tensor and both shapes, for any other shape difference.
    """
    check_head(a)
    check_head(b)
    tmap, pad, notes = vocab_alignment(a, b, vocab, pad)
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
    rows_a, rows_b = _rows(a), _rows(b)
    vocab_sizes = set() if tmap else {(a.vocab_size, b.vocab_size), (rows_a, rows_b)}
    tensors = []
    for name in sorted(set(src_a) | set(src_b)):
        ea, eb = src_a.get(name), src_b.get(name)
        rowmap = tmap.rowmap if tmap is not None and _is_vocab_tensor(name, a if ea else b) else None
        if rowmap is not None:
            for e, rows, label in ((ea, rows_a, "A"), (eb, rows_b, "B")):
                if e is not None and (not e.shape or e.shape[0] != rows):
                    raise InputError(f"tensor {name!r}: parent {label} has shape {list(e.shape)}, "
                                     f"but its embedding has {rows} rows")
            if ea is not None and eb is not None and ea.shape[1:] != eb.shape[1:]:
                raise InputError(f"tensor {name!r}: shapes differ, A {list(ea.shape)} vs B {list(eb.shape)} "
                                 "(only the vocabulary axis may differ)")
        if ea is None or eb is None:
            only, other = ("A", b) if eb is None else ("B", a)
            layer = layer_index(name)
            if layer is not None and other.num_layers and layer >= other.num_layers:
                raise InputError(f"tensor {name!r} is in layer {layer}, which only parent {only}'s files hold: "
                                 f"both configs say {other.num_layers} layers")
            notes.append(f"{name}: only in parent {only}, copied through")
            e = ea or eb
            shape = (rowmap.rows, *e.shape[1:]) if rowmap is not None else e.shape
            tensors.append(AlignedTensor(name, shape, ea, eb, None, rowmap))
            continue
        if rowmap is not None:
            tensors.append(AlignedTensor(name, (rowmap.rows, *ea.shape[1:]), ea, eb, None, rowmap))
            continue
        spec = _pad_spec(name, ea, eb, vocab_sizes, pad)
        if spec is not None:
            notes.append(f"{name}: parent {spec.short.upper()} has {spec.n} rows, the other {spec.N}; "
                         f"{spec.k} rows padded ({spec.strategy})")
        shape = ea.shape if spec is None else (ea.shape if spec.short == "b" else eb.shape)
        tensors.append(AlignedTensor(name, shape, ea, eb, spec))
    if tmap is not None:
        merged = tmap.rows
        tokenizer_from = "b" if tmap.mode == "b" else "a"
        notes.extend(line.strip() for line in tmap.describe())
    else:
        merged = max(r for r in (rows_a, rows_b) if r is not None) if (rows_a or rows_b) else None
        tokenizer_from = "a" if merged is None or rows_a == merged else "b"
    if untie:
        notes.append(f"parent {'A' if tied_a else 'B'} ties lm_head to its embedding; the output is untied")
    return Alignment(tuple(tensors), merged, tied_a and tied_b, tokenizer_from, tuple(notes), tmap)


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


def inputs_vocab(inputs: list[Parent], vocab: str, pad: str | None) -> tuple[TokenMap | None, str, list[str]]:
    """``vocab_alignment`` for any number of inputs (the SLERP family).

    ``auto`` matches rows by id when every input ships the first one's tokenizer and has its
    number of embedding rows; otherwise (and for ``union`` or one input's letter) rows are
    aligned by token string, which needs every input's tokenizer.
    """
    rows = [_rows(p) for p in inputs]
    if vocab == "auto" and len(set(rows)) == 1:
        by_id = None, pad or "copy"  # nothing to pad or fill
        if all(p.same_tokenizer_as(inputs[0]) for p in inputs):
            return (*by_id, [])
        lacking = [p for p in inputs if not has_tokenizer(p.path)]
        if lacking:
            return (*by_id, [f"parent {p.label} ships no tokenizer; rows are matched by id" for p in lacking])
        if all(p.vocab.tokens == inputs[0].vocab.tokens for p in inputs):
            return (*by_id, [])
    if vocab == "auto":
        vocab = "union"
    if len(vocab) == 1 and not 0 <= ord(vocab) - ord("a") < len(inputs):
        raise InputError(f"--vocab {vocab}: there are only {len(inputs)} inputs")
    for p, r in zip(inputs, rows):
        if not has_tokenizer(p.path):
            raise InputError(f"parent {p.label} ({p.path}) ships no tokenizer, and the inputs' vocabularies "
                             "differ: rows of more than two models are aligned by token string")
        if r is None:
            raise InputError(f"parent {p.label} has no input embedding to align")
    if pad == "gradient":
        raise InputError("--pad gradient extends appended ids of two parents; rows of more than two models are "
                         "aligned by token string: use --pad copy (the default), mean or zeros")
    fill = pad or "copy"
    tmap = inputs_token_map(tuple(p.vocab for p in inputs), tuple(rows), vocab, fill,
                            tuple(p.label for p in inputs))
    return tmap, fill, []


def align_inputs(inputs: list[Parent], vocab: str = "auto", pad: str | None = None) -> Alignment:
    """Match N inputs' tensors by name (each must be in every input) and align vocabulary rows.

    Shapes must be equal, but for the vocabulary rows of the embedding and the head, which are
    aligned by token string when the inputs' tokenizers differ. A head tied in some inputs and
    not in others is spelled out, and the child is untied.
    """
    for p in inputs:
        check_head(p)
    tmap, fill, notes = inputs_vocab(inputs, vocab, pad)
    ties = [tied(p) for p in inputs]
    untie = len(set(ties)) > 1
    sources = [_sources(p, untie) for p in inputs]
    if untie:
        for src, p in zip(sources, inputs):
            h = head_name(p)
            if h and h != HEAD_NAMES[0] and h in src:
                src[HEAD_NAMES[0]] = src.pop(h)
        notes.append(f"{', '.join(p.label for p, t in zip(inputs, ties) if t)} tie lm_head to the embedding; "
                     "the output is untied")
    rows = [_rows(p) for p in inputs]
    tensors = []
    for name in sorted(set().union(*sources)):
        entries = [src.get(name) for src in sources]
        lacking = [p.label for p, e in zip(inputs, entries) if e is None]
        if lacking:
            raise InputError(f"tensor {name!r} is missing from {', '.join(lacking)}: the SLERP family merges "
                             "tensors that every input holds")
        first = entries[0]
        rowmap = tmap.rowmap if tmap is not None and _is_vocab_tensor(name, inputs[0]) else None
        if rowmap is not None:
            for e, r, p in zip(entries, rows, inputs):
                if not e.shape or e.shape[0] != r:
                    raise InputError(f"tensor {name!r}: parent {p.label} has shape {list(e.shape)}, "
                                     f"but its embedding has {r} rows")
            shape = (rowmap.rows, *first.shape[1:])
        else:
            shape = first.shape
        for e, p in zip(entries[1:], inputs[1:]):
            if (e.shape[1:] != first.shape[1:]) if rowmap is not None else (e.shape != first.shape):
                raise InputError(f"tensor {name!r}: shapes differ, {inputs[0].label} {list(first.shape)} vs "
                                 f"{p.label} {list(e.shape)}"
                                 + (" (only the vocabulary axis may differ)" if rowmap is not None else ""))
        tensors.append(AlignedTensor(name, shape, entries[0], entries[1], None, rowmap, tuple(entries[2:])))
    if tmap is not None:
        merged = tmap.rows
        tokenizer_from = tmap.mode if tmap.mode != "union" else "a"
        notes.extend(line.strip() for line in tmap.describe())
    else:
        merged = rows[0]
        tokenizer_from = "a"
    return Alignment(tuple(tensors), merged, all(ties), tokenizer_from, tuple(notes), tmap)
