"""Progress of a merge as the driver sees it: a bar on a terminal, a plain line every few seconds
elsewhere (as under ``ray job submit``, whose log is a file). Actors never print."""

from __future__ import annotations

import sys
import time


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class Progress:
    def __init__(self, label: str, total_bytes: int, total_shards: int = 0, enabled: bool = True,
                 stream=None, interval_s: float = 5.0):
        self.label = label
        self.total = max(1, total_bytes)
        self.shards = total_shards
        self.done_bytes = 0
        self.done_shards = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else interval_s
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, nbytes: int = 0, shards: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_shards += shards
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._show(final=False)

    def close(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        if not self.enabled:
            return
        elapsed = max(1e-9, time.monotonic() - self.start)
        rate = self.done_bytes / elapsed
        frac = min(1.0, self.done_bytes / self.total)
        eta = f"ETA {(self.total - self.done_bytes) / rate:.0f} s" if rate > 0 else "ETA ?"
        shards = f", shards {self.done_shards}/{self.shards}" if self.shards else ""
        text = (f"{self.label}: {_gb(self.done_bytes)}/{_gb(self.total)} ({frac:.0%}){shards}, "
                f"{rate / 1e9:.2f} GB/s, " + (f"{elapsed:.1f} s" if final else eta))
        if self.tty:
            width = 24
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            self.stream.write(f"\r[{bar}] {text}" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
