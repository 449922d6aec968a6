"""Reading ahead: the kernel fetches the next tensors' parent bytes while this one is worked on.

An actor works tensor by tensor (actors.py). Left alone, each tensor's first read would wait for
storage, and the maths would wait for the read. ``ReadAhead`` asks the kernel, from a background
thread, to start reading the byte ranges of the tensors that come next
(``posix_fadvise(WILLNEED)``: the pages go into the page cache, nothing is copied into this
process), keeping about ``ahead_bytes`` requested beyond the tensor being worked on. The advice
changes no byte anyone reads; where the platform lacks it (macOS), or for PyTorch ``.bin``
parents (whose tensor offsets are not known), it does nothing.

Example:
    >>> with ReadAhead(tensors) as ahead:  # doctest: +SKIP
    ...     for i, t in enumerate(tensors):
    ...         ahead.done(i)  # working on tensor i now: read further ahead
    ...         work_on(t)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from raymerge.shards import TensorEntry

# The bytes requested beyond the tensor being worked on: a few of a 7B model's largest tensors,
# small against the page cache of any machine that merges one.
AHEAD_BYTES = 512 * 2**20
CAN_ADVISE = hasattr(os, "posix_fadvise")


def _ranges(tensor) -> list[TensorEntry]:
    """The parent entries (file byte ranges) a planned tensor reads."""
    return [e for e in (tensor.a, tensor.b) if e is not None and not e.file.endswith(".bin")]


class ReadAhead:
    """Advises the kernel to read ``tensors``' parent bytes, in order, ahead of their use."""

    def __init__(self, tensors: Sequence, ahead_bytes: int = AHEAD_BYTES):
        self.tensors = tensors
        self.ahead_bytes = ahead_bytes
        self._current = 0
        self._wake = threading.Condition()
        self._closed = False
        self._fds: dict[str, int] = {}
        self._thread = None
        if CAN_ADVISE and tensors:
            self._thread = threading.Thread(target=self._run, name="raymerge-readahead", daemon=True)
            self._thread.start()

    def done(self, i: int) -> None:
        """Work has reached tensor ``i``: everything before it is no longer needed ahead."""
        with self._wake:
            self._current = i
            self._wake.notify()

    def _run(self) -> None:
        try:
            requested_end = 0  # tensors [0, requested_end) were requested
            while True:
                with self._wake:
                    while not self._closed and not self._room(requested_end):
                        self._wake.wait()
                    if self._closed or requested_end >= len(self.tensors):
                        return
                for entry in _ranges(self.tensors[requested_end]):
                    self._advise(entry)
                requested_end += 1
        finally:
            for fd in self._fds.values():
                os.close(fd)

    def _room(self, requested_end: int) -> bool:
        """Whether tensor ``requested_end`` fits within ``ahead_bytes`` past the current one."""
        if requested_end >= len(self.tensors):
            return True
        if requested_end <= self._current:
            return True
        beyond = sum(sum(e.nbytes for e in _ranges(t)) for t in self.tensors[self._current + 1:requested_end + 1])
        return beyond <= self.ahead_bytes or requested_end == self._current + 1

    def _advise(self, entry: TensorEntry) -> None:
        try:
            fd = self._fds.get(entry.file)
            if fd is None:
                fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
            os.posix_fadvise(fd, entry.start, entry.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advice only: the real read reports any error

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *_) -> None:
        self.close()
