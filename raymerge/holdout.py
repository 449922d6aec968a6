"""The held-out text of `raymerge search`, split so that choosing on it stays honest: a dev part,
searched on, and a test part, only reported.

The text (as ``--eval`` reads it, scoring.py) is cut in text order: the first ``1 - holdout`` of
its characters are dev, the rest test, the cut moved forward to the next whitespace so that no
word is split. The dev part is cut again, the same way, into up to ``DEV_PIECES`` consecutive
pieces: a trial reports its dev bits per byte after each piece, which lets an early-stopping
scheduler drop a poor schedule after the first. The pieces and the test part are exact slices
of the text, so their bytes add up to the text's, and each is windowed on its own by the scoring
protocol (scoring.make_windows); bits per byte over several pieces are their bits over their
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymerge.errors import InputError
from raymerge.scoring import Windows, make_windows

DEFAULT_HOLDOUT = 0.3
DEV_PIECES = 4


@dataclass(frozen=True)
class Split:
    """The dev pieces, in text order, and the test part."""

    dev: tuple[str, ...]
    test: str


def cut(text: str, fraction: float) -> int:
    """The character index where ``text`` is cut so that about ``fraction`` of it comes first:
    the first whitespace at or after that point (``len(text)`` if there is none).

    Example:
        >>> text = "one two three four"
        >>> i = cut(text, 0.5); (text[:i], text[i:])
        ('one two three', ' four')
    """
    i = int(len(text) * fraction)
    while i < len(text) and not text[i].isspace():
        i += 1
    return i


def split_text(text: str, holdout: float = DEFAULT_HOLDOUT, pieces: int = DEV_PIECES) -> Split:
    """Cut ``text`` into ``pieces`` dev pieces and one test part (see the module's docstring).

    Example:
        >>> s = split_text("a b c d e f g h i j", holdout=0.3, pieces=2)
        >>> s.dev, s.test
        (('a b c d', ' e f g'), ' h i j')
        >>> "".join(s.dev) + s.test == "a b c d e f g h i j"
        True
    """
    if not 0.0 < holdout < 1.0:
        raise InputError(f"--holdout {holdout}: the held-out fraction must be between 0 and 1")
    at = cut(text, 1.0 - holdout)
    dev, test = text[:at], text[at:]
    bounds = [0] + [cut(dev, k / pieces) for k in range(1, pieces)] + [len(dev)]
    parts = tuple(dev[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)
    return Split(parts, test)


@dataclass(frozen=True)
class SplitWindows:
    """One tokenizer's windows of a split: per dev piece, and of the test part."""

    dev: tuple[Windows, ...]
    test: Windows

    @property
    def dev_windows(self) -> int:
        return sum(len(w.ids) for w in self.dev)


def split_windows(tokenizer, text: str, context: int, holdout: float = DEFAULT_HOLDOUT) -> SplitWindows:
    """The split of ``text`` windowed with ``tokenizer``: as many dev pieces as hold a window each
    (at most ``DEV_PIECES``), and the test part. A text too short for one dev and one test window
    is refused in one line."""
    if context < 2:
        raise InputError(f"--context {context}: a window needs at least 2 tokens")
    too_short = InputError(f"the evaluation text is too short for one dev and one test window of {context} tokens "
                           f"with --holdout {holdout} (a longer text, a shorter --context, or another --holdout)")
    # The test part does not depend on how the dev part is cut: windowed once.
    try:
        test = make_windows(tokenizer, split_text(text, holdout, 1).test, context)
    except InputError:
        raise too_short from None
    for pieces in range(DEV_PIECES, 0, -1):
        try:
            dev = tuple(make_windows(tokenizer, p, context) for p in split_text(text, holdout, pieces).dev)
        except InputError:
            continue
        if dev:
            return SplitWindows(dev, test)
    raise too_short
