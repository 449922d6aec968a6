"""The actors of one pass: started with the shape placement.py chose, called, waited on in one
loop, and stopped so that nothing is left running or pending on them.

Every call goes through the pool, which knows what is in flight: ``wait`` hands each finished
call to its caller's function as it finishes, and ``stop`` kills the actors and then waits, once
for all of them together, until the calls they were running have ended (a killed actor's calls
fail once its process is gone). Stopping never calls a killed actor again: Ray would retry such
a call, and print that it was retried, in the middle of a run that went well.

Starting an actor costs about two seconds (a Ray worker process importing torch), which is most
of a small merge. A process that merges again and again on a Ray it keeps (a Python session, a
test suite) may keep a pass's actors when the pass ends well (``keep_for``, ``release``): the next
pool with the same key, within ``IDLE_S``, takes them (``reset`` first) instead of starting new
ones. Kept actors hold their CPUs and GPUs, so any other pool lets them go first, and they go by
themselves after ``IDLE_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray

# How long ``stop`` waits, at most, for the calls of killed actors to end.
STOP_TIMEOUT_S = 60.0
# How long actors kept for reuse wait for their next pass before they are stopped.
IDLE_S = 3.0

_idle_lock = threading.Lock()
_idle: dict[tuple, list] = {}  # (Ray connection, key) -> actors kept after a pass that ended well
_idle_timer: threading.Timer | None = None


class ActorPool:
    """``count`` actors of ``actor_cls`` (a Ray actor class), each made with ``args``.

    ``keep_for``: a key saying what the actors are (class, resources, arguments); with it, the
    pool takes actors another pool of the same key kept, and ``release`` keeps its own. Actors
    taken are ``reset`` (a method they must have) before use.
    """

    def __init__(self, actor_cls, count: int, *args, keep_for: tuple | None = None, **kwargs):
        self.key = (_connection(), keep_for) if keep_for is not None else None
        self._in_flight: dict[Any, Any] = {}  # ref -> the caller's tag for it
        self.actors = _take_idle(self.key, count)
        try:
            for i in range(len(self.actors)):
                self.submit(i, "reset")
            self.wait(lambda tag, value: None)
        except ray.exceptions.RayError:  # a kept actor died meanwhile: start afresh
            self.stop()
            self.actors = []
        self.actors += [actor_cls.remote(*args, **kwargs) for _ in range(count - len(self.actors))]

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

    def release(self) -> None:
        """The pass ended well: keep the actors for the next pool of the same key (for
        ``IDLE_S``), or stop them when the pool has no key."""
        if self.key is None or self._in_flight:
            self.stop()
            return
        global _idle_timer
        with _idle_lock:
            _idle.setdefault(self.key, []).extend(self.actors)
            if _idle_timer is not None:
                _idle_timer.cancel()
            _idle_timer = threading.Timer(IDLE_S, release_idle)
            _idle_timer.daemon = True
            _idle_timer.start()
        self.actors = []

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Kill every actor (no restart), and return once the calls they were running have ended,
        so that nothing of theirs still writes."""
        _kill(self.actors)
        pending = list(self._in_flight)
        self._in_flight.clear()
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=timeout_s)


def release_idle() -> None:
    """Stop every actor kept for reuse (they hold CPUs and GPUs another pool may need).

    The kills happen under the lock, so that a caller about to leave its Ray (``ray.shutdown``)
    after this returns never races the timer's kills. Actors kept on a Ray this process has left
    are only forgotten: they ended with the connection that made them."""
    with _idle_lock:
        try:
            here = _connection() if ray.is_initialized() else None
        except Exception:  # noqa: BLE001 - Ray is shutting down meanwhile
            here = None
        actors = [a for (connection, _), kept in _idle.items() if connection == here for a in kept]
        _idle.clear()
        _kill(actors)


def _connection() -> tuple[str, str]:
    """This process's current Ray connection: its job, and the node it attached to (a job id
    alone repeats from one cluster to the next)."""
    context = ray.get_runtime_context()
    return context.get_job_id(), context.get_node_id()


def _take_idle(key: tuple | None, count: int) -> list:
    """Up to ``count`` actors kept under ``key``; every other kept actor is stopped."""
    with _idle_lock:
        kept = _idle.pop(key, []) if key is not None else []
    release_idle()
    _kill(kept[count:])
    return kept[:count]


def _kill(actors: list) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already, or from a Ray this process has left
            pass
