"""The shard writer against safetensors' own save_file, byte for byte, and header validation."""

import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymerge import shards
from raymerge.errors import InputError
from raymerge.shards import DTYPE_NAMES, ShardFile, WriteBehind, layout_shard, read_header


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.10.mlp.up_proj.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.layers.2.mlp.up_proj.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(5, generator=g),
        "ids": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2, generator=g).half(),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def _write_streamed(path, tensors, reverse=False, behind=False):
    layout = layout_shard([(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    f = ShardFile(str(path), layout.header)
    # Writers may fill tensors in any order (several actors share a shard), directly or through
    # the background writer the actors use.
    with WriteBehind(depth=2) as writer:
        for name in sorted(tensors, reverse=reverse):
            if behind:
                writer.submit(f, layout.offsets[name][0], tensors[name])
            else:
                f.write_tensor(layout.offsets[name][0], tensors[name])
    f.close()
    return layout


@pytest.mark.parametrize("reverse,behind", [(False, False), (True, False), (False, True)])
def test_streamed_shard_is_byte_identical_to_save_file(tmp_path, reverse, behind):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    layout = _write_streamed(tmp_path / "ours.safetensors", tensors, reverse, behind)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert layout.size == len(ours)
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def _large_tensors():
    # Big enough for whole pages to go around the page cache; odd sizes, so tensors start and end
    # inside pages that two of them share.
    g = torch.Generator().manual_seed(1)
    return {"emb": torch.randn(1001, 67, generator=g).to(torch.bfloat16),
            "up": torch.randn(517, 129, generator=g),
            "odd": torch.randn(3, generator=g).half(),
            "down": torch.randn(97, 1023, generator=g).to(torch.bfloat16)}


@pytest.mark.parametrize("staging", [shards.STAGING_BYTES, 3 * shards.DIRECT_ALIGN])
def test_direct_writes_by_several_writers_are_byte_identical_to_save_file(tmp_path, monkeypatch, staging):
    monkeypatch.setattr(shards, "STAGING_BYTES", staging)  # small: runs fill the stage many times
    (tmp_path / "probe").touch()
    probe = shards.open_direct(str(tmp_path / "probe"), os.O_WRONLY)
    if probe is None:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(probe)
    tensors = _large_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    layout = layout_shard([(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    path = str(tmp_path / "ours.safetensors")
    # Two writers of one shard (as two actors), each writing its tensors in row blocks, interleaved.
    writers = [ShardFile(path, layout.header), ShardFile(path, layout.header)]
    assert all(w.direct_fd is not None for w in writers)
    jobs = []
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name]
        row = t[0].numel() * t.element_size() if t.dim() > 1 else t.element_size()
        step = max(1, 300_000 // row)
        for r0 in range(0, t.shape[0], step):
            jobs.append((writers[i % 2], layout.offsets[name][0] + r0 * row, t[r0:r0 + step]))
    for w, offset, block in jobs[::2] + jobs[1::2]:
        w.write_tensor(offset, block)
    assert all(w.direct_fd is not None for w in writers)
    for w, offset, block in jobs[::3]:  # written twice, as a retried call does
        w.write_tensor(offset, block)
    for w in writers:
        w.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_direct_write_the_kernel_refuses_is_written_plainly(tmp_path):
    # O_DIRECT refuses a misaligned offset with EINVAL (as some file systems refuse any O_DIRECT
    # write): that write, and the file's later ones, go through the page cache.
    path = tmp_path / "s.bin"
    f = ShardFile(str(path), b"")
    if f.direct_fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    data = torch.arange(50_000, dtype=torch.int32).view(torch.uint8)
    f.write_tensor(8192, data)
    f._run = (f._run[0] + 8, f._run[1] + 8)  # the staged run moved off its page boundary
    f.flush()
    if f.direct_fd is not None:
        f.close()
        pytest.skip("this file system accepts misaligned O_DIRECT writes")
    f.write_tensor(300_000, data)
    f.close()
    raw = path.read_bytes()
    assert raw[8192 + 8:8192 + 8 + data.numel()] == data.numpy().tobytes()
    assert raw[300_000:] == data.numpy().tobytes()


def test_background_write_failure_is_raised_naming_the_file(tmp_path):
    # A write that fails on the background thread (here: the descriptor is gone, as on a lost
    # disk) surfaces in the caller with the shard's path, not silently.
    layout = layout_shard([("x", "F32", (4,))])
    f = ShardFile(str(tmp_path / "s.safetensors"), layout.header)
    os.close(f.fd)
    with pytest.raises(OSError, match="s.safetensors"):
        with WriteBehind(depth=1) as writer:
            for _ in range(3):
                writer.submit(f, layout.offsets["x"][0], torch.zeros(4))


def test_read_header_gives_absolute_offsets(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    entries = read_header(path)
    raw = path.read_bytes()
    e = entries["ids"]
    assert torch.equal(torch.frombuffer(bytearray(raw[e.start:e.end]), dtype=torch.int64), tensors["ids"])


def test_truncated_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    os.truncate(path, os.path.getsize(path) - 3)
    with pytest.raises(InputError, match="x.safetensors.*truncated or corrupt"):
        read_header(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(InputError, match="corrupt safetensors header"):
        read_header(path)
