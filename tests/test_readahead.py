"""Reading ahead (raymerge/readahead.py): the bytes an actor works from are the parents' bytes,
whether they come from the page cache or from storage (O_DIRECT), at any alignment; and a merge
reads each parent tensor once."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import raymerge.readahead as readahead
from raymerge.actors import MergeActor, WriteJob
from raymerge.options import MergeOptions
from raymerge.parents import load_parent
from raymerge.plan import build_plan
from raymerge.readahead import Buffers, ReadAhead, read_entry, span
from raymerge.shards import read_header


def _evict(path: str) -> None:
    """Drop the file from the page cache (written back first: dirty pages cannot be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def odd_file(tmp_path):
    """A safetensors file whose tensors start at offsets that are not multiples of 4096, of
    several dtypes and sizes (one larger than a read chunk), including a scalar."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.big": torch.randn(3000, 1500, generator=g).to(torch.bfloat16),  # 9 MB, several chunks
        "b.odd": torch.randn(7, 3, generator=g).to(torch.float16),
        "c.f32": torch.randn(1001, generator=g),
        "d.ids": torch.arange(13, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
    }
    path = str(tmp_path / "odd.safetensors")
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("cached", [True, False], ids=["page cache", "storage"])
def test_read_entry_gives_the_files_bytes(odd_file, cached, monkeypatch):
    path, tensors = odd_file
    monkeypatch.setattr(readahead, "READ_CHUNK", 1 << 20)  # many chunks, unaligned tails
    entries = read_header(path)
    assert any(e.start % readahead.ALIGN for e in entries.values())
    plain, direct = os.open(path, os.O_RDONLY), None
    try:
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pass  # a file system without O_DIRECT (tmpfs): the plain path is what runs there
    try:
        if cached:
            load_file(path)
        else:
            _evict(path)
        buffers = Buffers()
        for name, e in entries.items():
            got = read_entry((plain, direct), e, buffers.get(span(e)[1]))
            assert got.dtype == tensors[name].dtype and got.shape == tensors[name].shape
            assert torch.equal(got, tensors[name]), name
    finally:
        for fd in (plain, direct):
            if fd is not None:
                os.close(fd)


def test_buffers_lent_and_kept_stay_within_the_limit():
    """Whatever sizes come and go, the buffers kept for reuse and those lent out never hold more
    than the limit together (beyond what is lent out at once), and a kept buffer is reused."""
    page = readahead.ALIGN
    buffers = Buffers(limit_bytes=4 * page)
    lent = [buffers.get(page) for _ in range(3)]
    buffers.put(lent.pop())  # 2 lent + 1 kept: within the limit, kept
    assert buffers.free_bytes() == page and buffers.lent_bytes == 2 * page
    big = buffers.get(3 * page)  # nothing kept fits: a new one; 5 pages lent, 1 kept
    for buf in lent:
        buffers.put(buf)
        assert buffers.free_bytes() + buffers.lent_bytes <= max(buffers.limit_bytes, 5 * page)
    assert buffers.free_bytes() + buffers.lent_bytes <= buffers.limit_bytes
    buffers.put(big)
    assert buffers.lent_bytes == 0 and buffers.free_bytes() <= buffers.limit_bytes
    kept = {b.data_ptr() for b in buffers._free}
    assert kept
    again = buffers.get(page)
    assert again.data_ptr() in kept and again.data_ptr() % page == 0


def test_a_truncated_file_is_an_error_not_zeros(odd_file):
    path, _ = odd_file
    entries = read_header(path)
    last = max(entries.values(), key=lambda e: e.end)
    os.truncate(path, last.end - 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="unexpected end of file"):
            read_entry((fd, None), last, Buffers().get(span(last)[1]))
    finally:
        os.close(fd)


def test_the_next_calls_tensors_are_carried_over_not_read_again(tiny_parents, monkeypatch):
    a, b = tiny_parents
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), MergeOptions(a=a, b=b, out="x"), 1)
    tensors = list(plan.tensors)
    reads = _count_reads(monkeypatch, lambda e: e.name)
    first, second = tensors[:5], tensors[5:10]
    with ReadAhead(first + second[:2], keep_from=5) as ahead:
        for i in range(5):
            ahead.take(i)
    leftover = ahead.leftover
    assert set(leftover) <= {t.name for t in second[:2]}
    with ReadAhead(second, carried=leftover) as ahead:
        for i, t in enumerate(second):
            loaded = ahead.take(i)
            assert torch.equal(loaded[(t.a.file, t.a.name)], load_file(t.a.file)[t.a.name])
    assert sorted(reads) == sorted(e.name for t in tensors[:10] for e in (t.a, t.b)), \
        "every entry of the ten tensors read exactly once"


def test_a_merge_reads_every_parent_tensor_once(tiny_parents, tmp_path, monkeypatch):
    """One actor, several calls (one per shard): each parent tensor is read once, whole, and the
    shards equal a merge made by the two-pass path (reduce, then write with the coefficients)."""
    a, b = tiny_parents
    options = MergeOptions(a=a, b=b, out=str(tmp_path), max_shard_size=200_000)
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), options, 1)
    reads = _count_reads(monkeypatch, lambda e: (e.file, e.name))
    actor = MergeActor(options.block_bytes)
    mmap_reads = []
    monkeypatch.setattr(actor, "_handles", _Counting(mmap_reads))
    one_pass, two_pass = tmp_path / "one", tmp_path / "two"
    one_pass.mkdir(), two_pass.mkdir()
    stats = {s.name: s for s in actor.reduce(list(plan.tensors))}
    reads.clear()
    from raymerge.slerp import slerp_coefficients

    for i, shard in enumerate(plan.shards):
        mine = plan.shard_tensors(i)
        ts = {t.name: (0.3,) for t in mine if t.op == "slerp"}
        done = actor.write(WriteJob.for_shard(plan, i, (str(one_pass / shard.filename),), ts=ts))
        assert done.refused is None and len(done.stats) == len(mine)
    assert sorted(reads) == sorted((e.file, e.name) for t in plan.tensors for e in (t.a, t.b))
    assert mmap_reads == [], "nothing read a second time through safetensors"
    for i, shard in enumerate(plan.shards):
        mine = plan.shard_tensors(i)
        coefs = {t.name: (slerp_coefficients(stats[t.name].reductions, 0.3),) for t in mine if t.op == "slerp"}
        actor.write(WriteJob.for_shard(plan, i, (str(two_pass / shard.filename),), reduced=True,
                                       coefficients=coefs))
        assert (one_pass / shard.filename).read_bytes() == (two_pass / shard.filename).read_bytes()


def _count_reads(monkeypatch, key) -> list:
    """Log every parent tensor the read-ahead gets: read from storage, or viewed in the page cache."""
    log = []
    read, mapped = readahead.read_entry, ReadAhead._mapped
    monkeypatch.setattr(readahead, "read_entry", lambda fds, e, buf: log.append(key(e)) or read(fds, e, buf))
    monkeypatch.setattr(ReadAhead, "_mapped", lambda self, e: log.append(key(e)) or mapped(self, e))
    return log


@pytest.mark.parametrize("cached", [True, False], ids=["page cache", "storage"])
def test_read_ahead_views_cached_tensors_and_reads_the_others(odd_file, cached, monkeypatch):
    """A tensor the page cache holds is a view of the file's pages; one it lacks is read (O_DIRECT
    where the file system allows it); both give the file's values."""
    path, tensors = odd_file
    entries = read_header(path)
    load_file(path) if cached else _evict(path)

    class T:  # a planned tensor of one parent
        def __init__(self, e):
            self.name, self.a, self.b, self.inputs = e.name, e, None, (e, None)

    how = []
    monkeypatch.setattr(readahead, "read_entry", lambda fds, e, buf, real=readahead.read_entry:
                        how.append("read") or real(fds, e, buf))
    plan = [T(e) for e in entries.values()]
    with ReadAhead(plan) as ahead:
        for i, t in enumerate(plan):
            got = ahead.take(i)[(path, t.name)]
            assert torch.equal(got, tensors[t.name]), t.name
    assert how == ([] if cached else ["read"] * len(plan))


class _Counting(dict):
    """The actor's safetensors handles, counting every lookup (a read outside the read-ahead)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def get(self, key, default=None):
        self.log.append(key)
        return super().get(key, default)


def test_tensors_carried_over_stay_valid_after_their_read_ahead_closes(odd_file, tmp_path):
    """Views of the page cache handed to the next call must outlive the ReadAhead that made them
    (an unmapped view would read whatever is mapped there next: here, another file)."""
    path, tensors = odd_file
    load_file(path)  # in the page cache: the read-ahead hands out views of the file's pages
    entries = list(read_header(path).values())

    class T:
        def __init__(self, e):
            self.name, self.a, self.b, self.inputs = e.name, e, None, (e, None)

    with ReadAhead([T(e) for e in entries], keep_from=1) as ahead:
        ahead.take(0)
        ahead._thread.join(timeout=30)  # the rest read ahead: the thread ends after the last one
    leftover = ahead.leftover
    assert leftover, "every tensor was read ahead for the next call"
    other = str(tmp_path / "other.safetensors")
    save_file({n: torch.zeros_like(t) for n, t in tensors.items()}, other)
    import mmap as mmap_module
    maps = [mmap_module.mmap(os.open(other, os.O_RDONLY), 0, prot=mmap_module.PROT_READ) for _ in range(4)]
    for name, (got, _) in leftover.items():
        assert torch.equal(got[(path, name)], tensors[name]), name
    for m in maps:
        m.close()


def test_a_failing_call_gives_back_the_buffers_read_for_the_next_one(odd_file):
    """Buffers read ahead for the next call are handed over when a call ends well; when it fails
    (a write refused with ENOSPC, an interrupt), there is no next call to take them: they go
    back, so that a failure never leaves the read-ahead's budget counted as lent."""
    path, _ = odd_file
    _evict(path)  # read from storage into buffers, not viewed in the page cache
    entries = list(read_header(path).values())

    class T:
        def __init__(self, e):
            self.name, self.a, self.b, self.inputs = e.name, e, None, (e, None)

    buffers = Buffers()
    with pytest.raises(OSError, match="No space left"):
        with ReadAhead([T(e) for e in entries], buffers, keep_from=1) as ahead:
            ahead.take(0)
            ahead._thread.join(timeout=30)  # the next call's tensors are read
            assert buffers.lent_bytes > 0
            raise OSError(28, "No space left on device")
    assert ahead.leftover == {}
    assert buffers.lent_bytes == 0
