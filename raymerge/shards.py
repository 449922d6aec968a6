"""The safetensors file format: reading headers, laying out shards, streaming tensors into them.

A safetensors file is ``u64 little-endian header length | JSON header | tensor bytes``. The writer
here lays a shard out exactly as ``safetensors.torch.save_file`` does (tensors sorted by dtype
alignment, largest first, then by name; the header padded with spaces to a multiple of 8), so
the header is known before any tensor is computed and every tensor's offset is fixed: several
actors can then write their tensors into one shard at their offsets, in any order.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from raymerge.errors import InputError

# safetensors dtype names, in the order of the Rust enum (which is also the sort key of
# save_file: descending, so the most-aligned dtypes come first in the file).
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
               "I32", "U32", "F32", "F64", "I64", "U64"]
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SHARD_METADATA = {"format": "pt"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# O_DIRECT's alignment of offsets, lengths and memory (the largest logical block size in use).
DIRECT_ALIGN = 4096


def itemsize(dtype: str) -> int:
    return TORCH_DTYPES[dtype].itemsize


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (offsets are absolute, from the file start)."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Read and validate a safetensors header without touching tensor data.

    Raises InputError naming the file when the header is malformed or points outside the file.
    """
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise InputError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (s, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupt safetensors entry for tensor {name!r}") from None
        if dtype not in TORCH_DTYPES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if not (0 <= s <= e) or data_start + e > size or e - s != numel(shape) * itemsize(dtype):
            raise InputError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong size "
                f"(offsets {s}..{e}, data {size - data_start} bytes): truncated or corrupt"
            )
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + s, data_start + e)
    return entries


@dataclass(frozen=True)
class ShardLayout:
    """A planned shard: its exact header bytes and where each tensor's bytes go."""

    header: bytes
    offsets: dict[str, tuple[int, int]]  # name -> absolute (start, end) in the file
    size: int  # the whole file, header included


def layout_shard(tensors: list[tuple[str, str, tuple[int, ...]]]) -> ShardLayout:
    """Lay out a shard of ``(name, dtype, shape)`` exactly as ``save_file`` would write it."""
    order = sorted(tensors, key=lambda x: (-DTYPE_ORDER.index(x[1]), x[0]))
    header: dict = {"__metadata__": SHARD_METADATA}
    rel = {}
    pos = 0
    for name, dtype, shape in order:
        nbytes = numel(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel[name] = (pos, pos + nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw
    offsets = {k: (len(blob) + s, len(blob) + e) for k, (s, e) in rel.items()}
    return ShardLayout(blob, offsets, len(blob) + pos)


class ShardFile:
    """A shard being written in place: open (creating it), write at offsets, sync, close.

    Several writers may hold the same shard at once; each writes the (identical) header and its
    own tensors, so the order in which they run does not matter.

    Tensor bytes go to storage with ``O_DIRECT`` where the file system allows it (copying a model
    into the page cache costs this kernel more than a CPU second per GB, and writers of one file
    contend for it there). Consecutive writes are gathered in an aligned staging buffer and go
    out as large writes of whole 4 KiB pages; the partial pages at a run's two ends, which other
    writers may share, go through the page cache, as does everything on a file system that
    refuses ``O_DIRECT``. Staged bytes reach the file by ``flush``, ``close`` at the latest.
    """

    def __init__(self, path: str, layout_header: bytes):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.direct_fd = open_direct(path, os.O_WRONLY)
        self._stage: torch.Tensor | None = None
        self._run = (0, 0)  # the staged run [start, end) of the file; start is page-aligned
        try:
            self.write_at(0, layout_header)
        except BaseException:
            self._close_fds()
            raise

    def write_at(self, offset: int, data) -> None:
        """Write bytes through the page cache."""
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:  # a full or failing disk: say which file
            raise OSError(e.errno, e.strerror, self.path) from None

    def write_tensor(self, offset: int, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if self.direct_fd is None:
            self.write_at(offset, raw.numpy())
            return
        start, end = self._run
        if offset != end or start == end:  # not a continuation of the staged run: a new run
            self.flush()
            page = min(-(-offset // DIRECT_ALIGN) * DIRECT_ALIGN, offset + raw.numel())
            self.write_at(offset, raw[:page - offset].numpy())  # the first page's share, if partial
            raw, offset = raw[page - offset:], page
            self._run = (offset, offset)
        if self._stage is None:
            self._stage = _aligned_buffer(STAGING_BYTES)
        pos = 0
        while pos < raw.numel():
            start, end = self._run
            n = min(self._stage.numel() - (end - start), raw.numel() - pos)
            self._stage[end - start:end - start + n].copy_(raw[pos:pos + n])
            self._run = (start, end + n)
            pos += n
            if end + n - start == self._stage.numel():
                self._write_run(last=False)

    def flush(self) -> None:
        """Write out the staged run (its last page, if partial, through the page cache)."""
        start, end = self._run
        if end > start:
            self._write_run(last=True)  # leaves the run empty

    def _write_run(self, last: bool) -> None:
        start, end = self._run
        whole = (end - start) // DIRECT_ALIGN * DIRECT_ALIGN
        if whole and self.direct_fd is not None:
            view = memoryview(self._stage[:whole].numpy())
            try:
                done = 0
                while done < whole:
                    done += os.pwrite(self.direct_fd, view[done:], start + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise OSError(e.errno, e.strerror, self.path) from None
                # A file system that opened O_DIRECT but refuses the write: the page cache from now on.
                os.close(self.direct_fd)
                self.direct_fd = None
                whole = done
        if last or self.direct_fd is None:
            self.write_at(start + whole, self._stage[whole:end - start].numpy())
            self._run = (end, end)
        else:  # keep the partial last page staged: the next write continues it
            rest = self._stage[whole:end - start].clone()
            self._stage[:rest.numel()].copy_(rest)
            self._run = (start + whole, end)

    def close(self, sync: bool = True) -> None:
        """Write out what is staged and close the file, after making its bytes durable when
        ``sync`` (the descriptors are closed even when that fails)."""
        try:
            self.flush()
            if sync:
                try:
                    os.fsync(self.fd)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, self.path) from None
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.direct_fd = None


STAGING_BYTES = 8 * 2**20  # per open shard: the size of its O_DIRECT writes


def open_direct(path: str, flags: int) -> int | None:
    """The file opened with ``flags | O_DIRECT`` (shards write so, read-ahead reads so); None
    where the platform or the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:
        return None


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 buffer (an anonymous mapping, which the tensor keeps alive)."""
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def close_all(files: list[ShardFile], sync: bool) -> None:
    """Close every file, raising the first failure only once all are closed."""
    first = None
    for f in files:
        try:
            f.close(sync=sync)
        except OSError as e:
            first = first or e
    if first is not None:
        raise first


class WriteBehind:
    """Writes blocks on a background thread while the caller computes the next ones.

    ``os.pwrite`` and torch's kernels both release the GIL, so a block's copy into the page cache
    overlaps the maths of the following blocks. At most ``depth`` blocks wait at once (memory
    stays a few blocks); a failed write is raised by the next ``submit`` or by ``drain``.

    Example:
        >>> with WriteBehind() as writer:  # doctest: +SKIP
        ...     writer.submit(shard, offset, block)
    """

    def __init__(self, depth: int = 4):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raymerge-write")
        self._pending: deque[Future] = deque()

    def submit(self, shard: ShardFile, offset: int, tensor: torch.Tensor) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(shard.write_tensor, offset, tensor))

    def drain(self) -> None:
        """Wait for every submitted block; raise the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:  # already failing: drop the queued writes (a running one ends), keep the error
                for f in self._pending:
                    f.cancel()
                self._pending.clear()
        finally:
            self._pool.shutdown(wait=True)
