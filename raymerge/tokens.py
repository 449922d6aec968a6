"""Vocabularies by token string: read a parent's tokenizer, map embedding rows, write the union.

Fine-tunes that add different tokens (``<|im_start|>`` at 32000 in one, ``<pad>`` at 32000 in the
other) cannot be merged row by row: row 32000 is a different token in each. Here the child's
vocabulary is decided first, as a list of token strings by id, and each parent's rows are mapped
to it by string:

- ``union``: A's tokens at A's ids, then the tokens only B has, in B's id order (so the same
  parents always give the same ids);
- ``a`` / ``b``: that parent's tokenizer and ids; the other's tokens outside it are dropped.

A child row that a parent lacks is filled for that parent (``copy``: the other parent's row,
mergekit's choice; ``mean``: the parent's mean row; ``zeros``). Rows past the tokenizer's length
(embeddings padded to a multiple, as Qwen's) are kept, matched by position: a matrix is never cut
to the tokenizer's length.

Tokenizers are read through transformers (``AutoTokenizer``, never remote code), which also reads
parents that ship only a SentencePiece ``tokenizer.model``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from raymerge import storage
from raymerge.errors import InputError, RaymergeError

# Any of these makes a directory hold a tokenizer transformers can load.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")
ADDED_TOKEN_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


@dataclass(frozen=True)
class Vocab:
    """A tokenizer's tokens by id, and the flags of its added tokens."""

    tokens: tuple[str | None, ...]  # by id; None where no token has that id
    added: dict[str, dict] = field(default_factory=dict, compare=False)  # content -> AddedToken flags

    def ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens) if t is not None}


def load_tokenizer(model_dir: str):
    """The directory's tokenizer as transformers loads it (fast; converted from tokenizer.model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers' own refusal: a damaged or unsupported tokenizer
        raise InputError(f"{model_dir}: transformers cannot load its tokenizer "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def has_tokenizer(model_dir: str) -> bool:
    """Whether the directory ships a tokenizer transformers can load."""
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_MARKERS)


def vocab_of(tok) -> Vocab:
    """A loaded tokenizer's tokens by id and the flags of its added tokens."""
    vocab = tok.get_vocab()
    by_id: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, i in vocab.items():
        by_id[i] = token
    added = {t.content: {k: getattr(t, k) for k in ADDED_TOKEN_FLAGS}
             for t in tok.added_tokens_decoder.values()}
    return Vocab(tuple(by_id), added)


def first_difference(va: Vocab, vb: Vocab) -> int | None:
    """The first id at which the two vocabularies hold different tokens (None: one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(va.tokens, vb.tokens)) if x != y), None)


@dataclass(frozen=True, eq=False)
class RowMap:
    """What an actor needs of a token map: each child row's row in every input (-1: filled), and
    how a missing row is filled. Small: one int32 vector per input, no token strings."""

    sources: tuple[torch.Tensor, ...]  # int32 [rows] per input, in the plan's input order
    fill: str  # "copy", "mean" or "zeros"

    @property
    def rows(self) -> int:
        return len(self.sources[0])

    def source(self, i: int) -> torch.Tensor:
        """Input ``i``'s row for each child row (-1 where it lacks the token)."""
        return self.sources[i]


def input_letter(i: int) -> str:
    """Input ``i``'s letter: ``a``, ``b``, ... (vocabulary modes, pad specs, fills and mean rows
    name inputs so; upper case in messages)."""
    return chr(ord("a") + i)


def input_index(mode: str) -> int:
    """The input a letter names: ``a`` is the first, ``b`` the second, ..."""
    return ord(mode) - ord("a")


@dataclass(frozen=True, eq=False)
class TokenMap:
    """The child's vocabulary, and for each child row the row each input gives it."""

    mode: str  # "union", or the letter of the input whose tokenizer the child keeps ("a", "b", ...)
    tokens: tuple[str | None, ...]  # the child's tokens by id
    rowmap: RowMap
    added: tuple[str, ...]  # union: the later inputs' tokens appended to the first's, in order
    dropped: int  # one input's tokenizer: tokens of the others the child does not have
    first_difference: int | None  # where the first two vocabularies first differ
    labels: tuple[str, ...] = ("A", "B")  # the inputs, for messages ("A", "B", "C", "base")
    added_flags: dict = field(default_factory=dict, compare=False)  # added token -> AddedToken flags

    @property
    def fill(self) -> str:
        return self.rowmap.fill

    @property
    def a_rows(self) -> torch.Tensor:
        return self.rowmap.sources[0]

    @property
    def b_rows(self) -> torch.Tensor:
        return self.rowmap.sources[1]

    @property
    def rows(self) -> int:
        return self.rowmap.rows

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(f"{self.mode}/{self.fill}/".encode())
        for src in self.rowmap.sources:
            h.update(src.numpy().tobytes())
        h.update("\x00".join(t or "" for t in self.tokens).encode())
        return h.hexdigest()

    def describe(self) -> list[str]:
        """What the alignment does, for ``raymerge plan`` and the notes."""
        n = len(self.tokens)
        filled = [int((src < 0).sum()) for src in self.rowmap.sources]
        a, b = self.a_rows[:n], self.b_rows[:n]
        moved = int(((a >= 0) & (b >= 0) & (a != b)).sum())
        how = {"copy": "another input's row", "mean": "the input's mean row", "zeros": "zeros"}[self.fill]
        if len(self.labels) == 2:
            how = how.replace("another input", "the other parent").replace("the input", "the parent")
        lines = [f"vocabulary by token string ({self.mode}): {n} tokens, {self.rows} rows"
                 + (f"; the tokenizers first differ at id {self.first_difference}" if self.first_difference is not None else "")]
        if self.added:
            shown = ", ".join(repr(t) for t in self.added[:5]) + (", ..." if len(self.added) > 5 else "")
            who = "B has" if len(self.labels) == 2 else "later inputs have"
            lines.append(f"  {len(self.added)} token(s) only {who}, appended after {self.labels[0]}'s: {shown}")
        if self.dropped:
            if len(self.labels) == 2:
                lines.append(f"  {self.dropped} token(s) of parent {'B' if self.mode == 'a' else 'A'} dropped")
            else:
                lines.append(f"  {self.dropped} token(s) of the other inputs dropped")
        if moved:
            lines.append(f"  {moved} token(s) at different ids in the parents, matched by string")
        lines.append(f"  rows filled with {how}: "
                     + ", ".join(f"{k} for {'parent ' if label != 'base' else ''}{label}" for k, label in zip(filled, self.labels)))
        return lines

    def to_table(self):
        """One row per child id: token, then each input's row (-1 where filled)."""
        import pyarrow as pa

        tokens = list(self.tokens) + [None] * (self.rows - len(self.tokens))
        columns = {"id": list(range(self.rows)), "token": tokens}
        for label, src in zip(self.labels, self.rowmap.sources):
            columns[f"{label.lower()}_row"] = src.tolist()
        return pa.table(columns)


def token_map(va: Vocab, vb: Vocab, rows_a: int, rows_b: int, mode: str, fill: str) -> TokenMap:
    """Map both parents' embedding rows onto the child's vocabulary (see the module docstring).

    Example:
        >>> m = token_map(Vocab(("x", "y")), Vocab(("x", "z", "y")), 2, 3, "union", "copy")
        >>> m.tokens, m.a_rows.tolist(), m.b_rows.tolist()
        (('x', 'y', 'z'), [0, 1, -1], [0, 2, 1])
    """
    return inputs_token_map((va, vb), (rows_a, rows_b), mode, fill)


def inputs_token_map(vocabs: tuple[Vocab, ...], rows: tuple[int, ...], mode: str, fill: str,
                     labels: tuple[str, ...] | None = None) -> TokenMap:
    """Map every input's embedding rows onto the child's vocabulary.

    ``union``: the first input's tokens at its ids, then each next input's new tokens in its id
    order; a letter (``a``, ``b``, ...): that input's tokenizer and ids, the others' other tokens
    dropped.

    Example:
        >>> m = inputs_token_map((Vocab(("x",)), Vocab(("x", "y")), Vocab(("z", "x"))), (1, 2, 2), "union", "copy")
        >>> m.tokens, [s.tolist() for s in m.rowmap.sources]
        (('x', 'y', 'z'), [[0, -1, -1], [0, 1, -1], [1, -1, 0]])
    """
    labels = labels or tuple(input_letter(i).upper() for i in range(len(vocabs)))
    ids = [v.ids() for v in vocabs]
    if mode == "union":
        tokens, seen = list(vocabs[0].tokens), set(ids[0])
        for v in vocabs[1:]:
            for t in v.tokens:
                if t is not None and t not in seen:
                    tokens.append(t)
                    seen.add(t)
        tokens = tuple(tokens)
        added, base_rows, dropped = tokens[len(vocabs[0].tokens):], rows[0], 0
    elif len(mode) == 1 and 0 <= input_index(mode) < len(vocabs):
        k = input_index(mode)
        added, tokens, base_rows = (), vocabs[k].tokens, rows[k]
        others = set().union(*(set(d) for i, d in enumerate(ids) if i != k))
        dropped = len(others - set(ids[k]))
    else:
        raise ValueError(f"unknown vocabulary mode {mode!r}")
    n_rows = max(len(tokens), base_rows)
    sources = []
    for vocab, vocab_ids, parent_rows in zip(vocabs, ids, rows):
        src = [-1] * n_rows
        for i in range(n_rows):
            token = tokens[i] if i < len(tokens) else None
            if token is not None:
                j = vocab_ids.get(token, -1)
            else:  # no token at this id: a padding row, matched by position where the input has one too
                j = i if i >= len(vocab.tokens) or vocab.tokens[i] is None else -1
            src[i] = j if j < parent_rows else -1
        sources.append(torch.tensor(src, dtype=torch.int32))
    flags: dict = {}
    for v in vocabs:
        for content, f in v.added.items():
            flags.setdefault(content, f)
    return TokenMap(mode, tokens, RowMap(tuple(sources), fill), tuple(added), dropped,
                    first_difference(vocabs[0], vocabs[1]), labels, flags)


def union_tokenizer(a_dir: str, tmap: TokenMap):
    """The first input's tokenizer, loaded by transformers, with the later inputs' tokens added in
    the token map's order.

    Added tokens keep their flags (special, normalized, lstrip, rstrip, single_word); tokens from
    another input's base vocabulary become added tokens matched literally. Special tokens, chat
    template and bos/eos/pad stay the first input's.
    """
    from tokenizers import AddedToken

    tok = load_tokenizer(a_dir)
    groups: list[tuple[bool, list]] = []
    for content in tmap.added:
        flags = tmap.added_flags.get(content, {"special": False, "normalized": False})
        token = AddedToken(content, **flags)
        if groups and groups[-1][0] == bool(flags.get("special")):
            groups[-1][1].append(token)
        else:
            groups.append((bool(flags.get("special")), [token]))
    for special, group in groups:
        tok.add_tokens(group, special_tokens=special)
    got = tok.get_vocab()
    wrong = next((i for i, t in enumerate(tmap.tokens) if t is not None and got.get(t) != i), None)
    if wrong is not None or len(got) != sum(t is not None for t in tmap.tokens):
        raise RaymergeError(f"the union tokenizer does not give the planned ids (token {tmap.tokens[wrong]!r} "
                            f"should be id {wrong}, is {got.get(tmap.tokens[wrong])})" if wrong is not None else
                            f"the union tokenizer has {len(got)} tokens, the plan {len(tmap.tokens)}")
    return tok


def write_union_tokenizer(out_dir: str, a_dir: str, tmap: TokenMap) -> None:
    """The union tokenizer saved by transformers into ``out_dir``; the first input's ``tokenizer.model``, if any,
    is copied alongside (it holds A's pieces; the added tokens live in ``tokenizer.json`` and
    ``tokenizer_config.json``)."""
    tok = union_tokenizer(a_dir, tmap)
    with tempfile.TemporaryDirectory(prefix="raymerge-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        if os.path.isfile(os.path.join(a_dir, "tokenizer.model")):
            shutil.copyfile(os.path.join(a_dir, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(os.path.join(out_dir, name), f.read())
