"""Per-tensor t: constant, swept, or scheduled across layers with mergekit's semantics.

A schedule is a default value plus filters (substring of the tensor name -> values; the first
match wins). A value is one number or a list ("gradient") interpolated linearly across the
layers: layer i of n sits at position i/(n-1) (at 1 when there is a single layer, as in
mergekit), and tensors outside the layers (embeddings, final norm, lm_head) sit at position 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from raymerge.errors import InputError

# Decoder layers in the naming schemes of transformers' causal LMs.
LAYER_PATTERN = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def check_t(t: float, where: str = "") -> None:
    """Refuse an interpolation factor outside [0, 1] (extrapolation is not SLERP).

    Example:
        >>> check_t(1.5, " in a schedule")
        Traceback (most recent call last):
        ...
        raymerge.errors.InputError: t=1.5 in a schedule is outside [0, 1]: SLERP only interpolates between the parents
    """
    if not (0.0 <= t <= 1.0):
        raise InputError(f"t={t}{where} is outside [0, 1]: SLERP only interpolates between the parents")


def layer_index(name: str) -> int | None:
    m = LAYER_PATTERN.search(f".{name}")
    return int(m.group(1)) if m else None


def position(name: str, n_layers: int) -> float:
    """Where a tensor sits along the model for gradients: 0 to 1 across layers, 0 outside them."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def evaluate(values: tuple[float, ...], x: float) -> float:
    """mergekit's gradient: linear interpolation of ``values`` spread evenly over [0, 1].

    Example:
        >>> evaluate((0.0, 0.5, 1.0), 0.25)
        0.25
    """
    if len(values) == 1:
        return values[0]
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


@dataclass(frozen=True)
class Schedule:
    """t for every tensor: ``filters`` are tried in order, then ``default``.

    Attributes:
        default: one value, or a gradient across layers; empty means "no default".
        filters: (substring, values) pairs; the first whose substring is in the name wins.
    """

    default: tuple[float, ...] = ()
    filters: tuple[tuple[str, tuple[float, ...]], ...] = ()
    kind: str = field(default="t", repr=False)  # what it schedules: t (in [0, 1]) or a parent's weight (any finite number)

    def __post_init__(self):
        for values in (self.default, *(v for _, v in self.filters)):
            for v in values:
                if self.kind == "t":
                    check_t(v, " in a schedule")
                elif not math.isfinite(v):
                    raise InputError(f"{self.kind} {v} is not a finite number")

    def t_for(self, name: str, n_layers: int) -> float:
        x = position(name, n_layers)
        for needle, values in self.filters:
            if needle in name:
                return evaluate(values, x)
        if not self.default:
            raise InputError(f"no {self.kind} for tensor {name!r}: no filter matches and no default is given")
        return evaluate(self.default, x)

    def describe(self) -> str:
        def fmt(values):
            return format(values[0], "g") if len(values) == 1 else "[" + ", ".join(format(v, "g") for v in values) + "]"

        parts = [f"{needle}={fmt(v)}" for needle, v in self.filters]
        if self.default:
            parts.append(f"default={fmt(self.default)}")
        return "; ".join(parts)


def parse_values(text: str, what: str = "t values") -> tuple[float, ...]:
    """``0.5`` or ``0,0.5,0.3,0.7,1`` -> a tuple of floats."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"cannot read {what} {text!r}: use numbers separated by commas") from None
    return values


def parse_t_for(items: tuple[str, ...], default: tuple[float, ...]) -> Schedule:
    """``--t-for FILTER=V0,V1,...`` flags (in order) and the bare ``-t`` default."""
    filters = []
    for item in items:
        needle, sep, values = item.partition("=")
        if not sep or not needle:
            raise InputError(f"cannot read --t-for {item!r}: use FILTER=V or FILTER=V0,V1,...")
        filters.append((needle, parse_values(values)))
    return Schedule(default=default, filters=tuple(filters))


def parse_range(text: str) -> tuple[float, ...]:
    """``START:STOP:STEP`` (both ends included) -> t values, rounded so 0.1 * 3 is 0.3.

    Example:
        >>> parse_range("0.1:0.5:0.2")
        (0.1, 0.3, 0.5)
    """
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise InputError(f"cannot read --t-range {text!r}: use START:STOP:STEP, e.g. 0.1:0.9:0.1") from None
    if step <= 0 or stop < start:
        raise InputError(f"--t-range {text!r} is empty: STEP must be positive and STOP >= START")
    count = int(round((stop - start) / step)) + 1
    values = tuple(round(start + i * step, 12) for i in range(count))
    return tuple(v for v in values if v <= stop + 1e-12)
