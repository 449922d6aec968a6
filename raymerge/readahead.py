"""Reading ahead: the next tensors' parent bytes are read while this one is worked on.

An actor works tensor by tensor (actors.py). Left alone, each tensor's read would wait for
storage, and the maths would wait for the read. ``ReadAhead`` runs a background thread that
walks the actor's tensors in order, ahead of the work, keeping at most about ``ahead_bytes`` read
and not yet used:

- a tensor whose two parents' bytes fit in ``load_bytes`` is read whole, ahead of its use: the
  actor slices it in memory, for its reduction and again for its combination, and storage is
  read once. A parent tensor the page cache holds whole is used where it lies (a read-only view
  of the file's pages, no copy); any other is read with ``O_DIRECT`` from storage straight into a
  buffer, in large sequential reads (a copy through the page cache costs this kernel about one
  CPU second per GB, more than the maths);
- a larger tensor (a big vocabulary's embedding) is streamed by the actor in row blocks from
  the page cache, where they stay for the combination's second look; the thread only asks the
  kernel to start reading its byte ranges (``posix_fadvise(WILLNEED)``, where the platform has
  it), and the actor asks for each block's bytes and a few MB more of the tensor as it goes,
  never past the tensor's end (actors.py, ``_mapped_rows``): the kernel's own read-around would
  read its neighbours a second time.

Tensors are read into byte buffers the actor keeps for its whole life (``Buffers``): their pages
are faulted in once, not once per tensor (a fresh allocation per tensor cost more system time
than the maths). PyTorch ``.bin`` parents (whose tensor offsets are not known) are not read ahead.

Example:
    >>> with ReadAhead(tensors) as ahead:  # doctest: +SKIP
    ...     for i, t in enumerate(tensors):
    ...         loaded = ahead.take(i)  # {(file, name): tensor} for a tensor read whole, else {}
    ...         work_on(t, loaded)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from raymerge import storage
from raymerge.shards import DIRECT_ALIGN, TORCH_DTYPES, TensorEntry, open_direct

# What the thread may hold read and unused. Two of a 7B model's largest tensors (both parents)
# fit; memory stays well under the 1.5 GB an actor may use.
AHEAD_BYTES = 512 * 2**20
# A tensor is read whole when both parents' bytes fit in this; a larger one is streamed.
LOAD_BYTES = 256 * 2**20
READ_CHUNK = 16 * 2**20  # bytes per read call
FETCHES_IN_FLIGHT = 8  # tensors fetched from a bucket at once
ALIGN = DIRECT_ALIGN  # O_DIRECT's alignment of buffers, offsets and lengths


def _entries(tensor) -> list[TensorEntry]:
    """The parent entries (file byte ranges) a planned tensor reads."""
    return [e for e in tensor.inputs if e is not None and not e.file.endswith(".bin")]


class Buffers:
    """Byte buffers reused from one tensor to the next (and from one call to the next).

    The buffers lent out and those kept for reuse together stay within ``limit_bytes`` (what the
    read-ahead can hold at once): a returned buffer is kept only while they fit, so memory is
    bounded by the read-ahead, however its tensors' sizes come and go.
    """

    def __init__(self, limit_bytes: int = AHEAD_BYTES + LOAD_BYTES, pin: bool = False):
        self.limit_bytes = limit_bytes
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self.lent_bytes = 0  # bytes of the buffers handed out and not yet returned
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` starting at an ALIGN boundary: the smallest
        free one that fits, else a new one."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                self.lent_bytes += buf.numel()
                return buf
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        pad = -raw.data_ptr() % ALIGN
        with self._lock:
            self.lent_bytes += nbytes
        return raw[pad:pad + nbytes]

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self.lent_bytes -= buf.numel()
            self._free.append(buf)
            # Keep, with what is lent out, what the read-ahead can hold at once; let the largest
            # others go.
            while self._free and self.free_bytes() + self.lent_bytes > self.limit_bytes:
                self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def free_bytes(self) -> int:
        """Bytes of the buffers kept for reuse."""
        return sum(b.numel() for b in self._free)


def span(entry: TensorEntry) -> tuple[int, int]:
    """The ALIGN-aligned file range [lo, lo + length) that holds the entry's bytes."""
    lo = entry.start - entry.start % ALIGN
    return lo, -(-(entry.end - lo) // ALIGN) * ALIGN


def read_entry(fds: tuple[int, int | None], entry: TensorEntry, buf: torch.Tensor) -> torch.Tensor:
    """The entry's tensor, read into ``buf`` (from ``Buffers``, at least ``span(entry)`` long).

    ``fds`` is the file opened plainly and with O_DIRECT (None where the file system refuses
    it). A chunk the page cache holds whole is copied from it; any other comes from storage
    through the O_DIRECT descriptor (a plain read would also fill the cache: twice the work).
    """
    plain, direct = fds
    lo, length = span(entry)
    view = memoryview(buf[:length].numpy())
    end = entry.end - lo  # bytes of the span that must be read
    pos = 0
    while pos < end:
        size = min(READ_CHUNK, length - pos)  # pos stays aligned: chunks are, and so is EOF's read
        n = None
        if direct is not None and not _cached(plain, lo + pos, min(size, end - pos)):
            try:
                n = os.preadv(direct, [view[pos:pos + size]], lo + pos)
            except OSError as e:  # a file system that opens O_DIRECT but cannot read so
                if e.errno != errno.EINVAL:
                    raise
        if n is None:
            n = os.preadv(plain, [view[pos:pos + min(size, end - pos)]], lo + pos)
        if n == 0:
            raise OSError(f"{entry.file}: unexpected end of file in tensor {entry.name!r}")
        pos += n
    raw = buf[entry.start - lo:entry.end - lo]
    dtype = TORCH_DTYPES[entry.dtype]
    if (entry.start - lo) % dtype.itemsize:  # an unaligned tensor (never written so by safetensors)
        raw = raw.clone()
    return raw.view(dtype).reshape(entry.shape)


def _typed(raw: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The entry's tensor from a buffer holding exactly its bytes."""
    return raw[:entry.nbytes].view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


def _load_libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        return libc
    except (OSError, AttributeError):  # no mincore (not Linux): no O_DIRECT either
        return None


_LIBC = _load_libc()


def _cached(fd: int, offset: int, length: int) -> bool:
    """Whether the page cache holds every page of the file range (``mincore`` on a mapping)."""
    page = mmap.PAGESIZE
    start = offset - offset % page
    size = offset + length - start
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        return False
    try:
        vec = ctypes.create_string_buffer(-(-size // page))
        if _LIBC.mincore(addr, size, vec) != 0:
            return False
        return b"\x00" not in vec.raw  # one byte per page, its low bit set when resident
    finally:
        _LIBC.munmap(addr, size)


class ReadAhead:
    """Reads (or has the kernel read) ``tensors``' parent bytes in order, ahead of their use.

    The tensors from index ``keep_from`` on are the next call's: what was read of them is handed
    over (``leftover``, after ``close``) and given to the next ReadAhead as ``carried``, so a call
    boundary neither waits for a read nor reads anything twice.
    """

    def __init__(self, tensors: Sequence, buffers: Buffers | None = None, carried: dict | None = None,
                 keep_from: int | None = None, ahead_bytes: int = AHEAD_BYTES, load_bytes: int = LOAD_BYTES):
        self.tensors = tensors
        self.buffers = buffers or Buffers()
        self.ahead_bytes = ahead_bytes
        self.load_bytes = load_bytes
        self._cond = threading.Condition()
        self._loaded: dict[int, dict[tuple[str, str], torch.Tensor]] = {}  # tensor index -> its tensors
        self._held_buffers: dict[int, list[torch.Tensor]] = {}  # tensor index -> the buffers under them
        self._done_until = 0  # tensors [0, _done_until) are worked on and released
        self._error: BaseException | None = None
        self._closed = False
        self._fds: dict[str, tuple[int, int | None]] = {}
        self._objects: dict[str, object] = {}  # URI -> the object opened for ranged reads
        self._pool: ThreadPoolExecutor | None = None  # fetches from a bucket (_fetch)
        self._maps: dict[str, mmap.mmap] = {}
        self.keep_from = len(tensors) if keep_from is None else keep_from
        self.leftover: dict[str, tuple[dict, list]] = {}
        carried = dict(carried or {})
        for i, t in enumerate(tensors):
            if t.name in carried:
                self._loaded[i], self._held_buffers[i] = carried.pop(t.name)
        for _, bufs in carried.values():
            for buf in bufs:
                self.buffers.put(buf)
        self._thread = threading.Thread(target=self._run, name="raymerge-readahead", daemon=True)
        self._thread.start()

    def loads(self, tensor) -> bool:
        """Whether ``tensor`` is read whole (else streamed, with the kernel asked to read ahead)."""
        entries = _entries(tensor)
        # An object in a bucket has no page cache to stream from twice: its tensors are read whole.
        return bool(entries) and len(entries) == sum(e is not None for e in tensor.inputs) \
            and (sum(e.nbytes for e in entries) <= self.load_bytes or any(storage.is_uri(e.file) for e in entries))

    def take(self, i: int) -> dict[tuple[str, str], torch.Tensor]:
        """Tensor ``i``'s parent tensors by (file, name) once read, or {} when it is streamed.
        Everything before ``i`` is released: its buffers are reused, so the caller must hold no
        view of them by then."""
        with self._cond:
            self._done_until = i
            self._release(lambda j: j < i)
            self._cond.notify_all()
            if not self.loads(self.tensors[i]):
                return {}
            while i not in self._loaded and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._loaded[i]

    def _held(self, upto: int) -> int:
        """Bytes read ahead (or advised) for tensors past the one being worked on, up to ``upto``."""
        return sum(sum(e.nbytes for e in _entries(t)) for t in self.tensors[self._done_until + 1:upto])

    def _run(self) -> None:
        try:
            for i, tensor in enumerate(self.tensors):
                size = sum(e.nbytes for e in _entries(tensor))
                with self._cond:
                    # The tensor being worked on, and the next, always proceed; after that,
                    # wait for room.
                    while (not self._closed and i > self._done_until + 1
                           and self._held(i) + size > self.ahead_bytes):
                        self._cond.wait()
                    if self._closed:
                        return
                    if i in self._loaded:  # carried over from the last call
                        continue
                if self.loads(tensor) and any(storage.is_uri(e.file) for e in _entries(tensor)):
                    # In a bucket each small read costs a request's latency, not its bytes: several
                    # tensors are fetched at once (within the same read-ahead bound).
                    bufs = [self.buffers.get(e.nbytes) for e in _entries(tensor)]
                    self._fetches().submit(self._fetch, i, _entries(tensor), bufs)
                elif self.loads(tensor):
                    got, bufs = {}, []
                    for e in _entries(tensor):
                        fds = self._fds_of(e.file)
                        if _LIBC is not None and _cached(fds[0], e.start, e.nbytes):
                            got[(e.file, e.name)] = self._mapped(e)  # in the page cache: no copy
                        else:
                            bufs.append(self.buffers.get(span(e)[1]))
                            got[(e.file, e.name)] = read_entry(fds, e, bufs[-1])
                    with self._cond:
                        self._loaded[i], self._held_buffers[i] = got, bufs
                        self._cond.notify_all()
                elif hasattr(os, "posix_fadvise"):
                    for e in _entries(tensor):
                        os.posix_fadvise(self._fds_of(e.file)[0], e.start, e.nbytes, os.POSIX_FADV_WILLNEED)
        except BaseException as e:  # raised to the actor by take()
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            for fds in self._fds.values():
                for fd in fds:
                    if fd is not None:
                        os.close(fd)
            self._fds.clear()

    def _release(self, which) -> None:
        for j in [j for j in self._loaded if which(j)]:
            del self._loaded[j]
            for buf in self._held_buffers.pop(j):
                self.buffers.put(buf)

    def _mapped(self, entry: TensorEntry) -> torch.Tensor:
        """The entry's tensor as a read-only view of the file's pages (the mapping lives as long as
        the views of it)."""
        m = self._maps.get(entry.file)
        if m is None:
            m = self._maps[entry.file] = mmap.mmap(self._fds_of(entry.file)[0], 0, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # the view is never written: torch warns of read-only memory
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(m, dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
        dtype = TORCH_DTYPES[entry.dtype]
        if entry.start % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).reshape(entry.shape)

    def _fetches(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FETCHES_IN_FLIGHT, thread_name_prefix="raymerge-fetch")
        return self._pool

    def _fetch(self, i: int, entries: list[TensorEntry], bufs: list[torch.Tensor]) -> None:
        """Read tensor ``i``'s entries from their objects into ``bufs`` (a fetch thread)."""
        try:
            got = {}
            for e, buf in zip(entries, bufs):
                storage.read_into(self._object(e.file), e.start, memoryview(buf[:e.nbytes].numpy()))
                got[(e.file, e.name)] = _typed(buf, e)
            with self._cond:
                self._loaded[i], self._held_buffers[i] = got, bufs
                self._cond.notify_all()
        except BaseException as e:  # raised to the actor by take()
            for buf in bufs:
                self.buffers.put(buf)
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()

    def _object(self, uri: str):
        """An object in a bucket, opened once for all its tensors' ranged reads (which may run
        at once: Arrow's read_at is thread-safe)."""
        with self._cond:
            f = self._objects.get(uri)
        if f is None:
            opened = storage.open_input(uri)
            with self._cond:
                f = self._objects.setdefault(uri, opened)
            if f is not opened:
                opened.close()
        return f

    def _fds_of(self, file: str) -> tuple[int, int | None]:
        """The file opened plainly, and with O_DIRECT where the platform and file system allow."""
        fds = self._fds.get(file)
        if fds is None:
            plain = os.open(file, os.O_RDONLY)
            # Without mincore (not Linux) the page cache cannot be asked, so no O_DIRECT either.
            direct = open_direct(file, os.O_RDONLY) if _LIBC is not None else None
            fds = self._fds[file] = (plain, direct)
        return fds

    def close(self, failed: bool = False) -> None:
        """Stop reading and give back the buffers of every tensor worked on. What was read of the
        next call's tensors is kept in ``leftover``, unless the call ``failed``: then its buffers
        are given back too, since no next call will take them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._pool is not None:  # every fetch submitted finishes: its buffers are then released
            self._pool.shutdown(wait=True)
        for f in self._objects.values():
            f.close()
        self._objects.clear()
        unused = [] if failed else [j for j in self._loaded if j >= max(self.keep_from, self._done_until + 1)]
        self.leftover = {self.tensors[j].name: (self._loaded.pop(j), self._held_buffers.pop(j)) for j in unused}
        self._release(lambda j: True)
        # Never m.close(): views of a mapping (carried over to the next call) do not pin it, and
        # would dangle. Each mapping (and its descriptor) goes when its last view does.
        self._maps.clear()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(failed=exc_type is not None)
