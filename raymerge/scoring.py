"""How a model is scored on held-out text: bits per byte and token perplexity (``--eval``).

The protocol, which plain transformers reproduces:

1. The text is a UTF-8 text file, a ``.jsonl`` file's ``text`` fields, or a Parquet file's text
   column, documents joined by a blank line, cut to its first ``max_bytes`` bytes (back to a
   character boundary).
2. The model's tokenizer encodes it without special tokens. The ids are cut into consecutive,
   non-overlapping chunks of ``context - 1`` tokens (the last one may be shorter).
3. Each chunk is scored as one window of at most ``context`` tokens: the chunk preceded by the
   tokenizer's BOS token, or, for a tokenizer without one, by the previous chunk's last token
   (the very first chunk then has no context token, and its first token is not scored). Every
   other token of the text is scored exactly once, given only the tokens before it in its window.
4. bits = the sum over scored tokens of ``-log2 p(token)`` (float32 log-softmax of the logits);
   bits per byte = bits / the UTF-8 bytes of the text; token perplexity = ``exp(nats / tokens)``.

Bits per byte does not depend on the tokenizer, so children whose vocabularies differ from a
parent's compare fairly (lm-evaluation-harness reports the same quantity for wikitext).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from raymerge.errors import InputError

DEFAULT_EVAL_BYTES = 1_000_000
MAX_CONTEXT = 2048


def read_text(path: str, column: str = "text", max_bytes: int = DEFAULT_EVAL_BYTES) -> str:
    """The evaluation text (step 1 of the protocol), refusing what cannot be scored.

    Only the first ``max_bytes`` are scored, and only about that much is read: Parquet row group
    by row group, JSON Lines line by line, plain text up to four bytes per byte scored.
    """
    if not os.path.isfile(path):
        raise InputError(f"--eval {path}: no such file")
    if path.endswith(".parquet"):
        text = "\n\n".join(_parquet_docs(path, column, max_bytes))
    elif path.endswith(".jsonl"):
        text = "\n\n".join(_jsonl_docs(path, column, max_bytes))
    else:
        with open(path, "rb") as f:
            raw = f.read(max_bytes * 4)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < max_bytes:
                raise InputError(f"--eval {path}: not UTF-8 text (byte {e.start})") from None
            text = raw[:e.start].decode("utf-8")
    text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    if not text.strip():
        raise InputError(f"--eval {path}: no text to score")
    return text


def _joined_bytes(docs: list[str]) -> int:
    """The bytes of documents joined by blank lines (a separator counted after each)."""
    return sum(len(d.encode("utf-8")) + 2 for d in docs)


def _parquet_docs(path: str, column: str, max_bytes: int) -> list[str]:
    """The non-empty texts of a Parquet column, read row group by row group until ``max_bytes``."""
    import pyarrow.parquet as pq

    docs: list[str] = []
    held = 0  # bytes of docs, joined
    try:
        f = pq.ParquetFile(path)
        if column not in f.schema_arrow.names:
            raise InputError(f"--eval {path}: no column {column!r} (columns: {', '.join(f.schema_arrow.names)})")
        for group in range(f.num_row_groups):  # read one by one (iter_batches reads ahead)
            values = [d for d in f.read_row_group(group, columns=[column]).column(0).to_pylist() if d]
            if not all(isinstance(d, str) for d in values):
                raise InputError(f"--eval {path}: column {column!r} does not hold text")
            docs += values
            held += _joined_bytes(values)
            if held >= max_bytes:
                break
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's own refusal: not a Parquet file, a corrupt page
        raise InputError(f"--eval {path}: not a readable Parquet file ({type(e).__name__})") from None
    return docs


def _jsonl_docs(path: str, column: str, max_bytes: int) -> list[str]:
    """The non-empty texts of a JSON Lines field, read line by line until ``max_bytes``."""
    docs: list[str] = []
    held = 0  # bytes of docs, joined
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"--eval {path}: not UTF-8 text (line {n}, byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise InputError(f"--eval {path}: line {n} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                raise InputError(f"--eval {path}: line {n} has no text field {column!r}")
            if record[column]:
                docs.append(record[column])
                held += _joined_bytes(docs[-1:])
            if held >= max_bytes:
                break
    return docs


@dataclass(frozen=True)
class Windows:
    """A text cut into windows for one tokenizer (steps 2 and 3)."""

    ids: tuple[torch.Tensor, ...]  # each [1, <= context] int64
    first_scored: tuple[int, ...]  # per window: the first position whose token is scored
    n_bytes: int
    n_tokens: int  # tokens scored


def make_windows(tokenizer, text: str, context: int) -> Windows:
    """Tokenize ``text`` and cut it into the protocol's windows.

    Example:
        >>> class Chars:  # a tokenizer with one id per character and BOS id 0
        ...     bos_token_id = 0
        ...     def __call__(self, text, add_special_tokens=False):
        ...         return {"input_ids": [ord(c) for c in text]}
        >>> w = make_windows(Chars(), "abcde", 3)  # chunks of 2 characters, each after BOS
        >>> [x.tolist() for x in w.ids], w.first_scored, w.n_tokens
        ([[[0, 97, 98]], [[0, 99, 100]], [[0, 101]]], (1, 1, 1), 5)
    """
    if context < 2:
        raise InputError(f"--context {context}: a window needs at least 2 tokens")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < context - 1:
        raise InputError(f"the evaluation text is {len(ids)} tokens, shorter than one window of {context} "
                         "(--context, or a longer text)")
    bos = getattr(tokenizer, "bos_token_id", None)
    step = context - 1
    windows, first = [], []
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        if bos is not None:
            windows.append([bos] + chunk)
            first.append(1)
        elif start == 0:
            windows.append(chunk)
            first.append(1)
        else:
            windows.append([ids[start - 1]] + chunk)
            first.append(1)
    scored = sum(len(w) - f for w, f in zip(windows, first))
    return Windows(tuple(torch.tensor([w], dtype=torch.int64) for w in windows), tuple(first),
                   len(text.encode("utf-8")), scored)


@dataclass(frozen=True)
class Score:
    bits: float
    n_tokens: int
    n_bytes: int
    windows: int

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.n_bytes

    @property
    def perplexity(self) -> float:
        return math.exp(self.bits * math.log(2) / self.n_tokens)


@torch.no_grad()
def score(model, windows: Windows) -> Score:
    """Step 4: the model's total bits on the windows' scored tokens."""
    total = 0.0
    for ids, first in zip(windows.ids, windows.first_scored):
        logits = model(ids.to(model.device)).logits[0].float()
        logp = torch.log_softmax(logits[first - 1:-1], dim=-1)
        target = ids[0, first:].to(logp.device)
        total -= float(logp.gather(1, target[:, None]).sum(dtype=torch.float64)) / math.log(2)
    return Score(total, windows.n_tokens, windows.n_bytes, len(windows.ids))


def default_context(config) -> int:
    """The model's context (``max_position_embeddings``, GPT-2's ``n_positions``), capped at 2048."""
    n = getattr(config, "max_position_embeddings", None) or MAX_CONTEXT
    return int(min(n, MAX_CONTEXT))
