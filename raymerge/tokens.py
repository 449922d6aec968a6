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
    """What an actor needs of a token map: each child row's row in A and in B (-1: filled), and how
    a missing row is filled. Small: two int32 vectors, no token strings."""

    a_rows: torch.Tensor  # int32 [rows]
    b_rows: torch.Tensor
    fill: str  # "copy", "mean" or "zeros"

    @property
    def rows(self) -> int:
        return len(self.a_rows)

    def source(self, parent: str) -> torch.Tensor:
        return self.a_rows if parent == "a" else self.b_rows


@dataclass(frozen=True, eq=False)
class TokenMap:
    """The child's vocabulary, and for each child row the row each parent gives it."""

    mode: str  # "union", "a" or "b"
    tokens: tuple[str | None, ...]  # the child's tokens by id
    rowmap: RowMap
    added: tuple[str, ...]  # union: B's tokens appended to A's tokenizer, in order
    dropped: int  # a / b: tokens of the other parent the child does not have
    first_difference: int | None

    @property
    def fill(self) -> str:
        return self.rowmap.fill

    @property
    def a_rows(self) -> torch.Tensor:
        return self.rowmap.a_rows

    @property
    def b_rows(self) -> torch.Tensor:
        return self.rowmap.b_rows

    @property
    def rows(self) -> int:
        return self.rowmap.rows

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(f"{self.mode}/{self.fill}/".encode())
        h.update(self.a_rows.numpy().tobytes())
        h.update(self.b_rows.numpy().tobytes())
        h.update("\x00".join(t or "" for t in self.tokens).encode())
        return h.hexdigest()

    def describe(self) -> list[str]:
        """What the alignment does, for ``raymerge plan`` and the notes."""
        n = len(self.tokens)
        filled_a = int((self.a_rows < 0).sum())
        filled_b = int((self.b_rows < 0).sum())
        a, b = self.a_rows[:n], self.b_rows[:n]
        moved = int(((a >= 0) & (b >= 0) & (a != b)).sum())
        how = {"copy": "the other parent's row", "mean": "the parent's mean row", "zeros": "zeros"}[self.fill]
        lines = [f"vocabulary by token string ({self.mode}): {n} tokens, {self.rows} rows"
                 + (f"; the tokenizers first differ at id {self.first_difference}" if self.first_difference is not None else "")]
        if self.added:
            shown = ", ".join(repr(t) for t in self.added[:5]) + (", ..." if len(self.added) > 5 else "")
            lines.append(f"  {len(self.added)} token(s) only B has, appended after A's: {shown}")
        if self.dropped:
            lines.append(f"  {self.dropped} token(s) of parent {'B' if self.mode == 'a' else 'A'} dropped")
        if moved:
            lines.append(f"  {moved} token(s) at different ids in the parents, matched by string")
        lines.append(f"  rows filled with {how}: {filled_a} for parent A, {filled_b} for parent B")
        return lines

    def to_table(self):
        """One row per child id: token, A's row, B's row (-1 where filled)."""
        import pyarrow as pa

        tokens = list(self.tokens) + [None] * (self.rows - len(self.tokens))
        return pa.table({"id": list(range(self.rows)), "token": tokens,
                         "a_row": self.a_rows.tolist(), "b_row": self.b_rows.tolist()})


def token_map(va: Vocab, vb: Vocab, rows_a: int, rows_b: int, mode: str, fill: str) -> TokenMap:
    """Map both parents' embedding rows onto the child's vocabulary (see the module docstring).

    Example:
        >>> m = token_map(Vocab(("x", "y")), Vocab(("x", "z", "y")), 2, 3, "union", "copy")
        >>> m.tokens, m.a_rows.tolist(), m.b_rows.tolist()
        (('x', 'y', 'z'), [0, 1, -1], [0, 2, 1])
    """
    ids_a, ids_b = va.ids(), vb.ids()
    if mode == "union":
        added = tuple(t for t in vb.tokens if t is not None and t not in ids_a)
        tokens, base_rows, dropped = va.tokens + added, rows_a, 0
    elif mode in ("a", "b"):
        keep, other = (va, ids_b) if mode == "a" else (vb, ids_a)
        added, tokens = (), keep.tokens
        base_rows = rows_a if mode == "a" else rows_b
        dropped = len(set(other) - set(keep.ids()))
    else:
        raise ValueError(f"unknown vocabulary mode {mode!r}")
    rows = max(len(tokens), base_rows)
    sources = []
    for vocab, ids, parent_rows in ((va, ids_a, rows_a), (vb, ids_b, rows_b)):
        src = [-1] * rows
        for i in range(rows):
            token = tokens[i] if i < len(tokens) else None
            if token is not None:
                j = ids.get(token, -1)
            else:  # no token at this id: a padding row, matched by position where the parent has one too
                j = i if i >= len(vocab.tokens) or vocab.tokens[i] is None else -1
            src[i] = j if j < parent_rows else -1
        sources.append(torch.tensor(src, dtype=torch.int32))
    return TokenMap(mode, tuple(tokens), RowMap(sources[0], sources[1], fill), added, dropped,
                    first_difference(va, vb))


def union_tokenizer(a_dir: str, vb: Vocab, tmap: TokenMap):
    """A's tokenizer, loaded by transformers, with B's tokens added in B's id order.

    B's added tokens keep their flags (special, normalized, lstrip, rstrip, single_word); tokens
    from B's base vocabulary become added tokens matched literally. Special tokens, chat template
    and bos/eos/pad stay A's.
    """
    from tokenizers import AddedToken

    tok = load_tokenizer(a_dir)
    groups: list[tuple[bool, list]] = []
    for content in tmap.added:
        flags = vb.added.get(content, {"special": False, "normalized": False})
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


def write_union_tokenizer(out_dir: str, a_dir: str, vb: Vocab, tmap: TokenMap) -> None:
    """The union tokenizer saved by transformers into ``out_dir``; A's ``tokenizer.model``, if any,
    is copied alongside (it holds A's pieces; the added tokens live in ``tokenizer.json`` and
    ``tokenizer_config.json``)."""
    tok = union_tokenizer(a_dir, vb, tmap)
    with tempfile.TemporaryDirectory(prefix="raymerge-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        if os.path.isfile(os.path.join(a_dir, "tokenizer.model")):
            shutil.copyfile(os.path.join(a_dir, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(os.path.join(out_dir, name), f.read())
