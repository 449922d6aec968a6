"""The actors of one pass: started with the shape placement.py chose, called, waited on in one
loop, and stopped so that nothing is left running or pending on them.

Every call goes through the pool, which knows what is in flight: ``wait`` hands each finished
call to its caller's function as it finishes, and ``stop`` kills the actors and then waits, once
for all of them together, until the calls they were running have ended (a killed actor's calls
fail once its process is gone). Stopping never calls a killed actor again: Ray would retry such
a call, and print that it was retried, in the middle of a run that went well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

# How long ``stop`` waits, at most, for the calls of killed actors to end.
STOP_TIMEOUT_S = 60.0


class ActorPool:
    """``count`` actors of ``actor_cls`` (a Ray actor class), each made with ``args``."""

    def __init__(self, actor_cls, count: int, *args, **kwargs):
        self.actors = [actor_cls.remote(*args, **kwargs) for _ in range(count)]
        self._in_flight: dict[Any, Any] = {}  # ref -> the caller's tag for it

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, i: int, method: str, *args, tag: Any = None) -> Any:
        """Call ``method`` on actor ``i``; its result goes to ``wait``'s function with ``tag``."""
        ref = getattr(self.actors[i], method).remote(*args)
        self._in_flight[ref] = tag
        return ref

    def wait(self, on_done: Callable[[Any, Any], None], every_s: float | None = None,
             on_tick: Callable[[int], None] | None = None) -> None:
        """Hand each finished call to ``on_done(tag, value)`` as it finishes, until none is in
        flight; every ``every_s`` seconds while some are, ``on_tick(calls in flight)`` (which may
        raise to give up). A call that failed raises here, as Ray raised it."""
        last_tick = time.monotonic()
        while self._in_flight:
            timeout = None if every_s is None else max(0.0, last_tick + every_s - time.monotonic())
            ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
            for ref in ready:
                tag = self._in_flight.pop(ref)
                on_done(tag, ray.get(ref))
            if every_s is not None and self._in_flight and time.monotonic() - last_tick >= every_s:
                last_tick = time.monotonic()
                on_tick(len(self._in_flight))

    def gather(self, method: str, *args) -> list:
        """Call ``method`` on every actor and return the values, in actor order."""
        values: dict[int, Any] = {}
        for i in range(len(self.actors)):
            self.submit(i, method, *args, tag=i)
        self.wait(values.__setitem__)
        return [values[i] for i in range(len(self.actors))]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Kill every actor (no restart), and return once the calls they were running have ended,
        so that nothing of theirs still writes."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        pending = list(self._in_flight)
        self._in_flight.clear()
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
