"""The merge actor: reads its tensors' slices with safetensors, pads, SLERPs, writes shards.

A merge is one pass over the actor's share of the plan, tensor by tensor (``write``): stream the
tensor in row blocks and accumulate its float64 reductions (and finiteness, equality of non-float
tensors, the short parent's mean for ``--pad mean``); refuse it, writing nothing more, if a check
fails; else turn the reductions into coefficients (one set per t), combine the same blocks and
append the bytes to the shard, for every output. A call is one shard: its only writer, which
writes it once, front to back, in file order. Every parent byte is read from storage once: a
background thread reads the next tensors whole while this one is worked on (readahead.py; a
tensor too large for that is streamed twice, the second time from the page cache), and another
writes the finished blocks.

``--eval`` needs every tensor's coefficients before anything is written, so it splits the work
in two: ``reduce`` returns the reductions of every tensor, the children are scored, and ``write``
then takes the coefficients it is given (``WriteJob.reduced``).

On a GPU actor a SLERP tensor's blocks are copied to the GPU once (from pinned read-ahead
buffers, without blocking), reduced there with one host sync per tensor, kept there and combined
there; each output block is copied back for the writer. The reductions follow slerp.py's fixed
order of elementwise float64 steps and the combination is an elementwise float32 multiply and
add, so the device, like the block size and the thread count, never changes a byte of the output.
Copied and non-float tensors never go to the GPU; padded rows are built on the CPU (``torch.lerp``
is one kernel, which a GPU may compute with a fused multiply-add) and ``--pad mean`` rows summed
there.

Tensor bytes never travel through Ray: the actor reads the parents and writes the shards itself,
on a filesystem or in a bucket (storage.py); Ray carries plans, paths and small records. The
class is plain Python so that tests and bench/gpu_check.sh can drive it without Ray;
``remote_actor_class`` wraps it for Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field

import torch

from raymerge import storage
from raymerge.align import pad_rows
from raymerge.family import FamilyMethod
from raymerge.mix import GramSums, mix_block, mix_inputs
from raymerge.placement import cuda_problem
from raymerge.plan import MergePlan, TensorPlan
from raymerge.readahead import Buffers, ReadAhead
from raymerge.shards import TORCH_DTYPES, ShardFile, TensorEntry, WriteBehind, close_all, numel
from raymerge.slerp import (Coefficients, Reductions, chunk_elems, chunk_rows, chunk_sums, combine_block,
                            slerp_coefficients, to_work, total)
from raymerge.timing import CallTimer
from raymerge.tokens import input_letter

# Row blocks of a GPU actor, as float32 bytes (the block size never changes an output byte).
GPU_BLOCK_BYTES = 64 * 2**20
# The pieces a streamed tensor's bytes are asked of storage in (_advise).
STREAM_AHEAD = 8 * 2**20


@dataclass(frozen=True)
class TensorStats:
    """What the reduction of one tensor learned."""

    name: str
    reductions: Reductions
    finite: tuple[bool, ...]  # per input, in the plan's order
    equal: bool = True  # non-float tensors: identical in every input
    means: dict[str, torch.Tensor] = field(default_factory=dict)  # --pad mean: input letter -> its mean row
    gram: torch.Tensor | None = None  # the SLERP family: the inputs' float64 Gram matrix (mix.py)

    @property
    def ok(self) -> bool:
        return all(self.finite) and self.equal


@dataclass(frozen=True)
class WriteJob:
    """One shard, made and written whole by one actor: its tensors, in file order.

    Unless ``reduced``, each tensor is reduced and checked here, and its SLERP coefficients come
    from its own reductions and ``ts`` (one t per output). With ``reduced`` (``--eval``), pass 1
    ran already: ``coefficients`` and ``means`` are given.
    """

    shard_paths: tuple[str, ...]  # the shard's file in every output (one per t)
    header: bytes
    size: int  # the planned bytes of each file
    tensors: tuple[TensorPlan, ...]
    ts: dict[str, tuple[float, ...]] = field(default_factory=dict)  # slerp tensor -> one t per output
    reduced: bool = False
    coefficients: dict[str, tuple[Coefficients, ...]] = field(default_factory=dict)  # name -> one per output
    means: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> parent -> mean row
    then: tuple[TensorPlan, ...] = ()  # this actor's next tensors after this job: read ahead
    family: FamilyMethod | None = None  # the SLERP family's method: ts then holds weights per output

    @classmethod
    def for_shard(cls, plan: MergePlan, i: int, paths: tuple[str, ...], **kw) -> "WriteJob":
        """The job that writes shard ``i`` of ``plan`` into ``paths`` (one per output)."""
        layout = plan.shards[i].layout
        return cls(shard_paths=tuple(paths), header=layout.header, size=layout.size,
                   tensors=plan.shard_tensors(i), family=plan.family, **kw)


@dataclass(frozen=True)
class Written:
    """What one ``write`` call did: bytes written, each tensor's reductions (unless reduced), and
    each file's (size, CRC-32) with the process that wrote it: the shard's completion record."""

    nbytes: int
    stats: tuple[TensorStats, ...]
    refused: TensorStats | None = None  # a tensor that failed its checks: the call stopped there
    seconds: dict[str, float] = field(default_factory=dict)  # where the call's time went (timing.py)
    files: tuple[tuple[int, int], ...] = ()  # per shard path: (size, CRC-32), once closed
    writer: dict = field(default_factory=dict)  # host, pid and Ray node of the writing process


class MergeActor:
    """One worker of a merge. Methods take and return plain records; each call is idempotent."""

    def __init__(self, block_bytes: int, num_threads: int = 1, use_gpu: bool = False, owns_process: bool = False):
        """``owns_process``: the actor is its process's only user (a Ray worker), and tunes the
        process's allocator for its block buffers; a MergeActor made in someone else's process
        (a script, a test, the GPU check) leaves it alone."""
        self.block_bytes = block_bytes
        self.num_threads = max(1, num_threads)
        if owns_process:
            _reuse_freed_memory()
        self.gpu_error = cuda_problem() if use_gpu else None
        self.device = torch.device("cuda") if use_gpu and self.gpu_error is None else torch.device("cpu")
        if self.device.type == "cuda":
            # A 1 MiB block suits a CPU's cache; a GPU wants few, large kernels and copies.
            self.block_bytes = max(block_bytes, GPU_BLOCK_BYTES)
        self._handles: dict[str, object] = {}
        self._advised: set[tuple[str, str]] = set()  # streamed entries whose bytes were asked for (_advise)
        self._loaded: dict[tuple[str, str], torch.Tensor] = {}  # the current tensor's bytes, read ahead
        # What they are read into, reused from call to call (pinned for a GPU: its copies then
        # run without a staging copy).
        self._buffers = Buffers(pin=self.device.type == "cuda")
        self._carried: dict = {}  # the next call's first tensors, read by this one (readahead.py)
        self._on_device: dict[int, tuple] = {}  # a GPU's copy of the current tensor's blocks, by first row
        self._clock = CallTimer(self.device)  # the current call's time per phase

    def reset(self) -> None:
        """Forget the last merge before the next (an actor kept for reuse, pool.py): its open
        parent files (a parent rewritten in place is read anew) and what it read ahead."""
        self._handles.clear()
        self._advised.clear()
        self._loaded = {}
        self._on_device.clear()
        for _, bufs in self._carried.values():
            for buf in bufs:
                self._buffers.put(buf)
        self._carried = {}

    # ---- set-up checks -------------------------------------------------------------------

    def where(self, read_paths: list[str], write_dir: str | None = None) -> dict:
        """Report this actor's host, the parents it cannot see, and why it cannot write into
        ``write_dir`` (None when it can: a probe file is created, written, synced and removed)."""
        missing, read_error = [], None
        for path in read_paths:
            try:
                if not storage.isfile(path):
                    missing.append(path)
            except OSError as e:  # an object store that refuses (credentials, no such bucket)
                missing.append(path)
                read_error = read_error or storage.describe(e)
        write_error = None
        if write_dir is not None:
            probe = storage.join(write_dir, f".raymerge-probe-{socket.gethostname()}-{os.getpid()}")
            try:
                if storage.is_uri(probe):
                    storage.write_bytes(probe, b"ok")
                else:
                    with open(probe, "w") as f:
                        f.write("ok")
                        f.flush()
                        os.fsync(f.fileno())
                storage.remove(probe)
            except OSError as e:
                write_error = ("not visible on this node" if e.errno == errno.ENOENT and not storage.is_uri(probe)
                               else storage.describe(e))
                with contextlib.suppress(OSError):
                    storage.remove(probe)
        return {**_process(), "missing": missing, "read_error": read_error, "write_error": write_error, "device": str(self.device),
                "gpu_error": self.gpu_error}

    # ---- reading -------------------------------------------------------------------------

    def _slice(self, entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
        loaded = self._loaded.get((entry.file, entry.name))
        if loaded is not None:
            return loaded[r0:r1] if entry.shape else loaded
        if storage.is_uri(entry.file):  # not read ahead (a model scored in memory): the rows' bytes
            row = entry.nbytes // entry.shape[0] if entry.shape else entry.nbytes
            r0, r1 = (r0, r1) if entry.shape else (0, 1)
            raw = bytearray(storage.read_range(entry.file, entry.start + r0 * row, (r1 - r0) * row))
            x = torch.frombuffer(raw, dtype=TORCH_DTYPES[entry.dtype]) if raw else torch.empty(0, dtype=TORCH_DTYPES[entry.dtype])
            return x.reshape((r1 - r0, *entry.shape[1:]) if entry.shape else ())
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = _open(entry.file)
        if isinstance(handle, dict):  # a .bin state dict of memory-mapped tensors
            tensor = handle[entry.name]
            return tensor.clone() if not entry.shape else tensor[r0:r1].clone()
        if (entry.file, entry.name) not in self._advised:
            self._advised.add((entry.file, entry.name))
            _advise(handle, entry)
        return _mapped_rows(handle, entry, r0, r1)

    def _rows(self, t: TensorPlan, i: int, r0: int, r1: int, means=None) -> torch.Tensor:
        """Rows [r0, r1) of input ``i``'s tensor as aligned: padded rows synthesized, mapped rows gathered."""
        entry = t.inputs[i]
        if t.rowmap is not None:
            return self._mapped_rows(t, i, r0, r1, means)
        pad, parent = t.pad, input_letter(i)
        if pad is None or pad.short != parent or r1 <= pad.n:
            return self._slice(entry, r0, r1)
        long_entry = t.b if parent == "a" else t.a
        real = self._slice(entry, r0, pad.n) if r0 < pad.n else None
        new_rows = range(max(r0, pad.n), r1)
        synth = pad_rows(
            pad, new_rows,
            s_last=self._slice(entry, pad.n - 1, pad.n)[0],
            l_last=self._slice(long_entry, pad.N - 1, pad.N)[0],
            l_rows=self._slice(long_entry, new_rows.start, new_rows.stop) if pad.strategy == "copy" else None,
            s_mean=(means or {}).get(parent),
        )
        block = synth if real is None else torch.cat([real.to(torch.float32), synth])
        return block

    def _gather(self, entry: TensorEntry, src: torch.Tensor) -> torch.Tensor:
        """The entry's rows ``src`` (all >= 0), read as few contiguous runs."""
        if len(src) and int(src[-1]) - int(src[0]) == len(src) - 1 and bool((src.diff() == 1).all()):
            return self._slice(entry, int(src[0]), int(src[-1]) + 1)
        breaks = [0] + [i for i in range(1, len(src)) if src[i] != src[i - 1] + 1] + [len(src)]
        return torch.cat([self._slice(entry, int(src[i]), int(src[j - 1]) + 1) for i, j in zip(breaks, breaks[1:])])

    def _mapped_rows(self, t: TensorPlan, i: int, r0: int, r1: int, means) -> torch.Tensor:
        """Child rows [r0, r1) from input ``i`` by token string; rows it lacks filled (tokens.py):
        with ``copy``, from the first other input, in order, that has them."""
        entries = t.inputs
        entry = entries[i]
        src = t.rowmap.source(i)[r0:r1]
        have = src >= 0
        if entry is not None and bool(have.all()):
            return self._gather(entry, src)
        template = entry or next(e for e in entries if e is not None)
        block = torch.zeros((r1 - r0, *template.shape[1:]), dtype=torch.float32)
        if entry is not None and bool(have.any()):
            block[have] = self._gather(entry, src[have]).to(torch.float32)
        lacking = ~have
        fill = t.rowmap.fill
        if fill == "mean" and entry is not None:
            block[lacking] = means[input_letter(i)].to(torch.float32)
        elif fill == "copy":
            for j, other in enumerate(entries):
                if j == i or other is None or not bool(lacking.any()):
                    continue
                osrc = t.rowmap.source(j)[r0:r1]
                usable = lacking & (osrc >= 0)
                if bool(usable.any()):
                    block[usable] = self._gather(other, osrc[usable]).to(torch.float32)
                    lacking = lacking & ~usable
        return block

    def _sources(self, t: TensorPlan, r0: int, r1: int, means) -> tuple[torch.Tensor, ...]:
        """The aligned input rows [r0, r1) an output block is made from: every input's for a
        SLERP, a mix or a comparison, the one parent's for a copy."""
        if t.op in ("copy_a", "copy_b"):
            return (self._rows(t, "ab".index(t.op[-1]), r0, r1, means),)
        return tuple(self._rows(t, i, r0, r1, means) for i in range(len(t.inputs)))

    def _blocks(self, shape: tuple[int, ...]):
        """Row ranges of one tensor, sized so a float32 block holds about block_bytes, in whole
        reduction chunks (slerp.py): the block size never changes a reduction's bits."""
        if not shape:
            yield 0, 1
            return
        row_elems = max(1, numel(shape[1:]))
        chunk = chunk_rows(shape)
        step = max(chunk, self.block_bytes // (4 * row_elems) // chunk * chunk)
        for r0 in range(0, shape[0], step):
            yield r0, min(shape[0], r0 + step)

    def _mean_row(self, entry: TensorEntry) -> torch.Tensor:
        """The mean of all of a parent tensor's rows (``--pad mean``), summed in float64 on the
        CPU with one thread, chunk by chunk: the same bits whatever the block size or device."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            sums = torch.zeros(entry.shape[1:], dtype=torch.float64)
            step = chunk_rows(entry.shape)
            for r0 in range(0, entry.shape[0], step):
                sums += self._slice(entry, r0, min(entry.shape[0], r0 + step)).to(torch.float64).sum(dim=0)
        finally:
            torch.set_num_threads(threads)
        return (sums / entry.shape[0]).to(torch.float32)

    def _means(self, t: TensorPlan) -> dict[str, torch.Tensor]:
        """The mean rows ``--pad mean`` fills with: the short parent's, or each parent's by token string."""
        if t.pad is not None and t.pad.strategy == "mean":
            return {t.pad.short: self._mean_row(t.a if t.pad.short == "a" else t.b)}
        if t.rowmap is not None and t.rowmap.fill == "mean":
            return {input_letter(i): self._mean_row(e) for i, e in enumerate(t.inputs) if e is not None}
        return {}

    # ---- reductions ----------------------------------------------------------------------

    def reduce(self, tensors: list[TensorPlan], family: FamilyMethod | None = None) -> list[TensorStats]:
        """The float64 reductions of each tensor, and its checks (``--eval``'s first pass)."""
        torch.set_num_threads(self.num_threads)
        self._clock = CallTimer(self.device)
        stats = []
        with ReadAhead(tensors, self._buffers) as ahead:
            for i, t in enumerate(tensors):
                self._loaded = ahead.take(i)
                stats.append(self._reduce_one(t, self._means(t), family=family))
        self._loaded = {}
        return stats

    def _reduce_one(self, t: TensorPlan, means: dict, keep: bool = False,
                    family: FamilyMethod | None = None) -> TensorStats:
        """One tensor's reductions and checks. A SLERP on a GPU reduces there, with one host sync
        for the tensor, and with ``keep`` holds its blocks there for the combination. A mix (the
        SLERP family) is reduced on the CPU into its Gram matrix (mix.py)."""
        if t.op == "mix":
            gram = GramSums(family, t.shape, len(t.inputs) - family.base)
            for r0, r1 in self._blocks(t.shape):
                gram.add(self._sources(t, r0, r1, means))
            matrix, finite = gram.result()
            return TensorStats(t.name, Reductions(), finite, means=means, gram=matrix)
        partials, equal = [], True
        device = self.device if t.op == "slerp" else torch.device("cpu")
        per_chunk = chunk_elems(t.shape)
        for r0, r1 in self._blocks(t.shape):
            src = self._sources(t, r0, r1, means)
            if t.op == "equal":
                equal = equal and all(torch.equal(src[0], x) for x in src[1:])
            elif src[0].is_floating_point():
                if device.type != "cpu":
                    with self._clock.gpu("gpu copy"):
                        src = tuple(x.to(device, non_blocking=True) for x in src)
                    if keep:
                        self._on_device[r0] = src
                with self._clock.gpu("gpu maths"):
                    partials.append(chunk_sums(src[0], src[-1], per_chunk))
        red = total(partials)
        if t.op in ("copy_a", "copy_b"):
            ok = math.isfinite(red.aa)
            return TensorStats(t.name, red, (ok, ok), means=means)
        return TensorStats(t.name, red, (math.isfinite(red.aa), math.isfinite(red.bb)) + (True,) * len(t.more),
                           equal, means)

    # ---- writing -------------------------------------------------------------------------

    def write(self, job: WriteJob) -> Written:
        """Make this shard's tensors and write them, in file order, into the shard's file in
        every output (created here, written front to back, closed once).

        Stops at the first tensor that fails its checks (NaN or inf, differing non-float
        tensors) and reports it, having written nothing of it.
        """
        files: list[ShardFile] = []
        written, stats, refused = 0, [], None
        clock = self._clock = CallTimer(self.device)
        try:
            for path in job.shard_paths:
                files.append(ShardFile(path, job.header, job.size))
            # The next tensors are read while this one is worked on; blocks go to disk on a
            # background thread while the next ones are combined.
            ahead = ReadAhead(job.tensors + job.then, self._buffers, self._carried, keep_from=len(job.tensors))
            self._carried = {}
            with ahead, WriteBehind() as writer:
                for i, t in enumerate(job.tensors):
                    with clock.phase("read"):
                        self._loaded = ahead.take(i)
                    # One of the actor's CPUs goes to the background writer; torch gets the rest
                    # (elementwise maths: the thread count never changes a bit).
                    torch.set_num_threads(max(1, self.num_threads - 1))
                    if job.reduced:
                        coefs, means = job.coefficients.get(t.name), job.means.get(t.name)
                    else:
                        with clock.phase("reduce"):
                            means = self._means(t)
                            s = self._reduce_one(t, means, keep=True, family=job.family)
                        stats.append(s)
                        if not s.ok:
                            refused = s
                            break
                        coefs = tensor_coefficients(t, s, job.ts.get(t.name, ()), job.family)
                    with clock.phase("combine"):
                        written += self._write_tensor(t, coefs, means, files, writer, job.family)
                    self._on_device.clear()
                with clock.phase("write"):
                    writer.drain()
        except BaseException:
            # Already failing: close without syncing, so that a sync error cannot hide the real
            # one (a full disk), and leak no descriptor.
            with contextlib.suppress(OSError):
                close_all(files, sync=False)
            raise
        finally:
            self._loaded = {}
            self._on_device.clear()
        self._carried = ahead.leftover
        with clock.phase("write"):
            closed = close_all(files, sync=refused is None)
        return Written(written, tuple(stats), refused, clock.seconds(),
                       files=tuple(closed) if refused is None else (), writer=_process())

    def _write_tensor(self, t: TensorPlan, coefs, means, files: list[ShardFile], writer: WriteBehind,
                      family: FamilyMethod | None = None) -> int:
        """Combine one tensor's blocks and queue them for every output."""
        out_dtype = TORCH_DTYPES[t.dtype]
        row_bytes = numel(t.shape[1:]) * out_dtype.itemsize
        written = 0
        for r0, r1 in self._blocks(t.shape):
            src = self._on_device.pop(r0, None) or self._sources(t, r0, r1, means)
            for f, block in zip(files, self._out_blocks(t, src, coefs, out_dtype, len(files), r0, family)):
                with self._clock.phase("write"):  # waits while the writer's queue is full
                    writer.submit(f, t.offset + r0 * row_bytes, block)
                written += block.numel() * block.element_size()
        return written

    def merged_tensor(self, t: TensorPlan, coef: Coefficients | None, means=None) -> torch.Tensor:
        """One output tensor in memory: the blocks ``write`` would write for this t, joined (the
        same bits as the written tensor; used to score a child without writing it)."""
        out_dtype = TORCH_DTYPES[t.dtype]
        coefs = (coef,) if coef is not None else None
        blocks = [next(self._out_blocks(t, self._sources(t, r0, r1, means), coefs, out_dtype, 1, r0))
                  for r0, r1 in self._blocks(t.shape)]
        return torch.cat(blocks).reshape(t.shape) if t.shape else blocks[0].reshape(())

    def _out_blocks(self, t: TensorPlan, src: tuple[torch.Tensor, ...], coefs, out_dtype, n_outputs: int, r0: int,
                    family: FamilyMethod | None = None):
        """One block (from row ``r0``) of the tensor in every output: one SLERP per t, one
        weighted sum per output of the SLERP family, or the copied rows."""
        if t.op == "mix":
            inputs = mix_inputs(src, family.base)  # once for every output of a sweep
            for coef in coefs:
                yield mix_block(inputs, coef, family, t.shape, r0, out_dtype)
        elif t.op == "slerp":
            with self._clock.gpu("gpu copy"):
                src = tuple(x.to(self.device, non_blocking=True) for x in src)
            with self._clock.gpu("gpu maths"):
                a, b = to_work(*src)  # once for every t of a sweep
            for coef in coefs:
                with self._clock.gpu("gpu maths"):
                    block = combine_block(a, b, coef, out_dtype)
                with self._clock.gpu("gpu copy back"):
                    block = block.cpu()
                yield block
        else:
            # A copy, never a view: the read-ahead reuses the rows' buffer once the tensor is done,
            # perhaps before the background writer has written this block.
            x = src[0].to(out_dtype, copy=True)
            yield from [x] * n_outputs


def tensor_coefficients(t: TensorPlan, s: TensorStats, settings: tuple, family: FamilyMethod | None):
    """One tensor's coefficients per output from its reductions: SLERP's at each t, the SLERP
    family's for each output's weights (mix.py); None for a copy."""
    if t.op == "slerp":
        return tuple(slerp_coefficients(s.reductions, x) for x in settings)
    if t.op == "mix":
        return tuple(family.coefficients(s.gram, w) for w in settings)
    return None


def _process() -> dict:
    """This process: its host, pid and Ray node (None outside Ray)."""
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"host": socket.gethostname(), "pid": os.getpid(), "node": node}


def _reuse_freed_memory() -> None:
    """Make glibc keep freed block buffers for reuse instead of returning them to the kernel.

    Every block allocates a few MiB of work tensors. By default glibc may serve such sizes with
    fresh mmaps, and then each 4 KiB page faults again when touched: millions of faults and 4-6 s
    more per merge of the benchmark parents, in some runs and not others (bench/actor_split.py;
    README, Performance). A fixed mmap threshold above the block sizes, and no trimming below 1 GiB of
    free heap, keep reusing the same few MiB. Memory held stays what the largest block needs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 256 * 2**20)
    libc.mallopt(m_trim_threshold, 2**30)


def _open(file: str):
    """A safetensors file mapped for streaming (``_mapped_rows``); a PyTorch .bin file as its
    state dict, memory-mapped, weights only."""
    if file.endswith(".bin"):
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    with open(file, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    if hasattr(m, "madvise"):
        # No read-around on a page fault: the kernel would read megabytes (the device's
        # read-ahead) on both sides of a streamed tensor's pages, into its neighbours, which the
        # read-ahead reads whole with O_DIRECT: those bytes would come from storage twice.
        # _advise asks for exactly the streamed tensor's bytes.
        m.madvise(mmap.MADV_RANDOM)
    return m


def _mapped_rows(m: mmap.mmap, entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a safetensors entry as a read-only view of the mapped file's pages."""
    dtype = TORCH_DTYPES[entry.dtype]
    row = entry.nbytes // entry.shape[0] if entry.shape else entry.nbytes
    r0, r1 = (r0, r1) if entry.shape else (0, 1)
    shape = (r1 - r0, *entry.shape[1:]) if entry.shape else ()
    if r1 <= r0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # the view is never written: torch warns of read-only memory
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(m, dtype=torch.uint8, count=(r1 - r0) * row, offset=entry.start + r0 * row)
    if entry.start % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def _advise(m: mmap.mmap, entry: TensorEntry) -> None:
    """Ask storage for a streamed entry's whole byte range, once, never past its end: with
    MADV_RANDOM a page not asked for would be read alone, one fault at a time. The kernel cuts
    one request to its read-ahead size, so the range is asked for in STREAM_AHEAD pieces."""
    if not hasattr(m, "madvise") or entry.nbytes == 0:
        return
    lo = entry.start - entry.start % mmap.PAGESIZE
    end = entry.start + entry.nbytes
    for start in range(lo, end, STREAM_AHEAD):
        m.madvise(mmap.MADV_WILLNEED, start, min(STREAM_AHEAD, end - start))


def remote_actor_class(num_cpus: float, num_gpus: float, runtime_env: dict | None, max_restarts: int = 3):
    """The Ray actor class for MergeActor with its resource request and ``runtime_env``
    (``storage.actor_runtime_env``: the driver's object-store configuration, to every node)."""
    import ray  # here, so that MergeActor itself runs (and is tested, and GPU-checked) without Ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      max_task_retries=max_restarts,
                      runtime_env=runtime_env)(MergeActor)
