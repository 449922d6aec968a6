"""What `raymerge search` searches over: per-filter gradient anchors, as mergekit's slerp recipes
write them (``self_attn: [0, 0.5, 0.3, 0.7, 1]``), and the constant schedules it tries first.

A point of the space is a flat dict of t values named ``FILTER.i`` (anchor i of FILTER's
gradient) and ``default.i`` (the gradient for every tensor no filter matches), each in [0, 1].
It becomes a ``Schedule`` with mergekit's semantics (schedule.py): anchors spread evenly over the
layers, linear in between, filters matched by substring in order; a gradient whose anchors are
all equal is written as that one value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from raymerge.errors import InputError
from raymerge.schedule import Schedule, check_t

DEFAULT_FILTERS = ("self_attn", "mlp")
DEFAULT_ANCHORS = 5
# The constant schedules every search scores first, so that it can only improve on the best
# global t: 0, 0.1, ..., 1.
SEEDED_T = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class SearchSpace:
    """``anchors`` t values per filter and for the default.

    Example:
        >>> space = SearchSpace(("self_attn",), anchors=2)
        >>> space.names()
        ('self_attn.0', 'self_attn.1', 'default.0', 'default.1')
        >>> space.schedule({"self_attn.0": 0.0, "self_attn.1": 1.0, "default.0": 0.5, "default.1": 0.5})
        Schedule(default=(0.5,), filters=(('self_attn', (0.0, 1.0)),))
    """

    filters: tuple[str, ...] = DEFAULT_FILTERS
    anchors: int = DEFAULT_ANCHORS
    given: bool = False  # the filters were asked for (--filter), not the defaults

    def __post_init__(self):
        if self.anchors < 1:
            raise InputError(f"--anchors {self.anchors}: a gradient needs at least one anchor")
        for f in self.filters:
            if not f or f == "default" or "." in f:
                raise InputError(f"--filter {f!r}: a filter is a non-empty substring of tensor names, "
                                 "without '.', and not 'default'")
        if len(set(self.filters)) != len(self.filters):
            raise InputError(f"--filter: each filter once ({', '.join(self.filters)})")

    def groups(self) -> tuple[str, ...]:
        return (*self.filters, "default")

    def names(self) -> tuple[str, ...]:
        """Every parameter's name, in a fixed order: filters as given, then the default."""
        return tuple(f"{g}.{i}" for g in self.groups() for i in range(self.anchors))

    def schedule(self, point: dict[str, float]) -> Schedule:
        """The schedule a point of the space stands for."""
        missing = [n for n in self.names() if n not in point]
        if missing:
            raise ValueError(f"the point lacks {', '.join(missing)}")
        for n in self.names():
            check_t(point[n], f" ({n})")
        values = {g: _gradient(tuple(float(point[f"{g}.{i}"]) for i in range(self.anchors))) for g in self.groups()}
        return Schedule(default=values["default"], filters=tuple((f, values[f]) for f in self.filters))

    def constant(self, t: float) -> dict[str, float]:
        """The point whose every anchor is ``t``: the schedule of one global t."""
        check_t(t)
        return {n: float(t) for n in self.names()}

    def seeded(self) -> list[dict[str, float]]:
        """The constant points a search scores before any sampler's, in order."""
        return [self.constant(t) for t in SEEDED_T]

    def for_tensors(self, tensor_names) -> "SearchSpace":
        """The space for the parents' SLERPed tensors. A filter asked for (``given``) that matches
        no tensor is refused: its anchors would change nothing. Default filters that match none
        are dropped: ``mlp`` in a Mixtral (``block_sparse_moe``) or an OPT (``fc1``), ``self_attn``
        in a GPT-2 (``attn``); their tensors follow the default gradient.

        Example:
            >>> SearchSpace().for_tensors(["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"]).filters
            ('mlp',)
        """
        names = list(tensor_names)
        matching = tuple(f for f in self.filters if any(f in n for n in names))
        if self.given and matching != self.filters:
            f = next(f for f in self.filters if f not in matching)
            raise InputError(f"--filter {f!r} matches no tensor of the parents "
                             f"(e.g. {names[0] if names else 'none'})")
        return self if matching == self.filters else replace(self, filters=matching)


def _gradient(anchors: tuple[float, ...]) -> tuple[float, ...]:
    """Equal anchors as the one value they are: interpolating between equal values may round
    (0.7 * 0.3 + 0.3 * 0.3 is not 0.3), and a constant schedule must be exactly its global t."""
    return anchors[:1] if len(set(anchors)) == 1 else anchors
