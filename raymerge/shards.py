"""The safetensors file format: reading headers, laying out shards, streaming tensors into them.

A safetensors file is ``u64 little-endian header length | JSON header | tensor bytes``. The writer
here lays a shard out exactly as ``safetensors.torch.save_file`` does (tensors sorted by dtype
alignment, largest first, then by name; the header padded with spaces to a multiple of 8), so
the header is known before any tensor is computed and every tensor's offset is fixed: one writer
then writes the whole shard in one pass, front to back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from raymerge import storage
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
    size = storage.size(path)
    head = storage.read_range(path, 0, 8)
    if len(head) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise InputError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
    try:
        header = json.loads(storage.read_range(path, 8, n))
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
    """A shard written by one process, once, front to back: header, then tensors in file order.

    Nothing is ever written at an offset another process may touch, and nothing is written twice
    or out of order, so the file is correct on every storage: local disks, NFS/EFS (whose
    clients share only what a closing writer flushed), FUSE-mounted buckets (s3fs, gcsfuse,
    mountpoint-s3: the last writer to close an object wins, and some accept only sequential
    writes) and object stores. ``close`` returns the file's size and CRC-32, which the driver
    records as the shard's completion.

    Bytes go to storage with ``O_DIRECT`` where the file system allows it (copying a model into
    the page cache costs this kernel more than a CPU second per GB): they are gathered in an
    aligned staging buffer that goes out as large writes of whole 4 KiB pages, and the last
    partial page goes through the page cache at ``close``, as does everything on a file system
    that refuses ``O_DIRECT``.
    """

    def __init__(self, path: str, header: bytes, size: int):
        self.path = path
        self.size = size  # planned: close() refuses a file of any other length
        self.stream = None  # an object store's upload, for a URI
        self.fd = self.direct_fd = None
        if storage.is_uri(path):
            try:
                self.stream = storage.open_output(path)
            except OSError as e:
                raise OSError(e.errno, storage.describe(e), path) from None
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.direct_fd = open_direct(path, os.O_WRONLY)
        self.crc32 = 0
        self._stage: torch.Tensor | None = None
        self._start = 0  # the file offset of the stage's first byte (page-aligned)
        self._staged = 0  # bytes in the stage
        try:
            if header:
                self.write_tensor(0, torch.frombuffer(bytearray(header), dtype=torch.uint8))
        except BaseException:
            self._close_fds()
            raise

    @property
    def position(self) -> int:
        """The offset the next byte goes to."""
        return self._start + self._staged

    def write_tensor(self, offset: int, tensor: torch.Tensor) -> None:
        """Append the tensor's bytes, which must go at ``offset``: the end of what is written."""
        if offset != self.position:
            raise ValueError(f"{self.path}: a write at byte {offset}, but the file is written up to "
                             f"{self.position}: shards are written front to back")
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if self._stage is None:
            self._stage = _aligned_buffer(STAGING_BYTES)
        pos = 0
        while pos < raw.numel():
            n = min(self._stage.numel() - self._staged, raw.numel() - pos)
            self._stage[self._staged:self._staged + n].copy_(raw[pos:pos + n])
            self._staged += n
            pos += n
            if self._staged == self._stage.numel():
                self._write_stage(last=False)

    def _write_stage(self, last: bool) -> None:
        """Write the stage's whole pages (all of it when ``last``) at its offset."""
        data = self._stage[:self._staged].numpy()
        self.crc32 = zlib.crc32(data, self.crc32)
        if self.stream is not None:  # uploaded in parts as it comes, in the background
            try:
                self.stream.write(data)
            except OSError as e:
                raise OSError(e.errno, storage.describe(e), self.path) from None
            self._start, self._staged = self._start + self._staged, 0
            return
        whole = self._staged // DIRECT_ALIGN * DIRECT_ALIGN
        done = 0
        if whole and self.direct_fd is not None:
            view = memoryview(data[:whole])
            try:
                while done < whole:
                    done += os.pwrite(self.direct_fd, view[done:], self._start + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise OSError(e.errno, e.strerror, self.path) from None
                # A file system that opened O_DIRECT but refuses the write: the page cache from now on.
                os.close(self.direct_fd)
                self.direct_fd = None
        if last or self.direct_fd is None:
            self._pwrite(data[done:], self._start + done)
            self._start, self._staged = self._start + self._staged, 0
        else:  # a full stage is whole pages: nothing is left over
            self._start, self._staged = self._start + whole, 0

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:  # a full or failing disk: say which file
            raise OSError(e.errno, e.strerror, self.path) from None

    def close(self, sync: bool = True) -> tuple[int, int]:
        """Write out what is staged and close the file, after making its bytes durable when
        ``sync`` (the descriptors are closed even when that fails). Returns (size, CRC-32)."""
        try:
            if self._staged:
                self._write_stage(last=True)
            if sync:
                if self.position != self.size:
                    raise RuntimeError(f"{self.path}: {self.position} bytes written, {self.size} planned")
                try:
                    if self.stream is not None:
                        self.stream.close()  # completes the upload: the object appears whole
                    else:
                        os.fsync(self.fd)
                except OSError as e:
                    raise OSError(e.errno, storage.describe(e) if self.stream else e.strerror, self.path) from None
        finally:
            self._close_fds()
        return self.position, self.crc32

    def _close_fds(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None
        if self.stream is not None and not self.stream.closed:
            # A failed shard: pyarrow cannot abort an upload, so it completes here, short, and
            # the driver removes every shard without a completion record.
            with contextlib.suppress(OSError):
                self.stream.close()


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


def close_all(files: list[ShardFile], sync: bool) -> list[tuple[int, int]]:
    """Close every file, raising the first failure only once all are closed; returns each
    file's (size, CRC-32)."""
    first, closed = None, []
    for f in files:
        try:
            closed.append(f.close(sync=sync))
        except OSError as e:
            first = first or e
    if first is not None:
        raise first
    return closed


class WriteBehind:
    """Writes blocks on a background thread while the caller computes the next ones.

    ``os.pwrite`` and torch's kernels both release the GIL, so a block's write overlaps the maths
    of the following blocks; one thread keeps the blocks in the order they are submitted. At most ``depth`` blocks wait at once (memory
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
