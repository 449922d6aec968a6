"""Where a merge's time goes: the driver's wall time per phase of the merge (``Phases``: the
summary's "time:" line), and each actor call's wall seconds per phase (``CallTimer``: read,
reduce, combine, write), with on a GPU the device's own time for copies in, maths and copies back
(CUDA events, read once the call's work is done). The driver sums the calls' over calls and
actors for the summary's ``actors:`` line.

Phases of a call nest: time spent in an inner phase (a write waiting for the queue, inside a
combination) counts for the inner phase only.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

# The actor's phases, in the order the summary shows them.
PHASES = ("read", "reduce", "combine", "write")
GPU_PHASES = ("gpu copy", "gpu maths", "gpu copy back")


class Phases:
    """Wall time spent in each phase of a merge, as the driver sees it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        now = time.monotonic()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


class CallTimer:
    """Seconds per phase for one actor call."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.clock = clock
        self.wall: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open phase: seconds spent in phases opened inside it
        self._events: list[tuple[str, object, object]] = [] if device.type == "cuda" else None

    @contextmanager
    def phase(self, name: str):
        started = self.clock()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = self.clock() - started
            self.wall[name] += elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed

    @contextmanager
    def gpu(self, name: str):
        """Device time of the work queued inside (nothing on a CPU actor)."""
        if self._events is None:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((name, start, end))

    def seconds(self) -> dict[str, float]:
        """Every phase's seconds; on a GPU, waits for the device first (once per call)."""
        out = dict(self.wall)
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out


def describe(seconds: dict[str, float]) -> str:
    """The summary's text: ``read 1.2 s, reduce 3.4 s, ...`` in the actor's order."""
    names = [p for p in PHASES + GPU_PHASES if p in seconds] + sorted(set(seconds) - set(PHASES + GPU_PHASES))
    return ", ".join(f"{name} {seconds[name]:.1f} s" for name in names)
