"""The shard writer against safetensors' own save_file, byte for byte, and header validation."""

import os
import struct
import zlib

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


def _write_streamed(path, tensors, behind=False):
    layout = layout_shard([(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    f = ShardFile(str(path), layout.header, layout.size)
    # One writer, in file order, directly or through the background writer the actors use.
    with WriteBehind(depth=2) as writer:
        for name in sorted(tensors, key=lambda n: layout.offsets[n]):
            if behind:
                writer.submit(f, layout.offsets[name][0], tensors[name])
            else:
                f.write_tensor(layout.offsets[name][0], tensors[name])
    size, crc = f.close()
    return layout, size, crc


@pytest.mark.parametrize("behind", [False, True])
def test_streamed_shard_is_byte_identical_to_save_file(tmp_path, behind):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    layout, size, crc = _write_streamed(tmp_path / "ours.safetensors", tensors, behind)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert layout.size == size == len(ours)
    assert crc == zlib.crc32(ours), "close() reports the CRC-32 of the bytes written"
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def _large_tensors():
    # Big enough for whole pages to go around the page cache; odd sizes, so tensors start and end
    # inside pages.
    g = torch.Generator().manual_seed(1)
    return {"emb": torch.randn(1001, 67, generator=g).to(torch.bfloat16),
            "up": torch.randn(517, 129, generator=g),
            "odd": torch.randn(3, generator=g).half(),
            "down": torch.randn(97, 1023, generator=g).to(torch.bfloat16)}


def _blocks(tensors, layout):
    """Every tensor in row blocks of about 300 KB, in file order, with its offset."""
    for name in sorted(tensors, key=lambda n: layout.offsets[n]):
        t = tensors[name]
        row = t[0].numel() * t.element_size() if t.dim() > 1 else t.element_size()
        step = max(1, 300_000 // row)
        for r0 in range(0, t.shape[0], step):
            yield layout.offsets[name][0] + r0 * row, t[r0:r0 + step]


@pytest.mark.parametrize("staging", [shards.STAGING_BYTES, 3 * shards.DIRECT_ALIGN])
def test_direct_writes_in_blocks_are_byte_identical_to_save_file(tmp_path, monkeypatch, staging):
    monkeypatch.setattr(shards, "STAGING_BYTES", staging)  # small: the stage fills many times
    (tmp_path / "probe").touch()
    probe = shards.open_direct(str(tmp_path / "probe"), os.O_WRONLY)
    if probe is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("this file system refuses O_DIRECT")
    os.close(probe)
    tensors = _large_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    layout = layout_shard([(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    path = str(tmp_path / "ours.safetensors")
    w = ShardFile(path, layout.header, layout.size)
    assert w.direct_fd is not None
    for offset, block in _blocks(tensors, layout):
        w.write_tensor(offset, block)
    assert w.direct_fd is not None, "whole pages went out with O_DIRECT"
    w.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_write_out_of_order_or_a_short_file_is_refused(tmp_path):
    """The one-writer protocol holds by construction: a write anywhere but at the end of what is
    written, or a shard closed short of its planned size, is refused rather than written."""
    tensors = _large_tensors()
    layout = layout_shard([(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    blocks = list(_blocks(tensors, layout))
    w = ShardFile(str(tmp_path / "s.safetensors"), layout.header, layout.size)
    w.write_tensor(*blocks[0])
    with pytest.raises(ValueError, match="front to back"):
        w.write_tensor(*blocks[2])
    with pytest.raises(ValueError, match="front to back"):
        w.write_tensor(*blocks[0])  # a rewrite
    with pytest.raises(RuntimeError, match="bytes written"):
        w.close()
    assert w.fd is None and w.direct_fd is None, "the descriptors are closed all the same"


def test_a_direct_write_the_kernel_refuses_is_written_plainly(tmp_path):
    # O_DIRECT refuses a misaligned buffer with EINVAL (as some file systems refuse any O_DIRECT
    # write): that write, and the file's later ones, go through the page cache.
    path = tmp_path / "s.bin"
    data = torch.arange(50_000, dtype=torch.int32).view(torch.uint8)
    f = ShardFile(str(path), b"", 2 * data.numel())
    if f.direct_fd is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("this file system refuses O_DIRECT")
    f.write_tensor(0, data)
    f._stage = torch.frombuffer(bytearray(shards.STAGING_BYTES + 1), dtype=torch.uint8)[1:]  # off its alignment
    f._stage[:f._staged].copy_(data[:f._staged])
    f._write_stage(last=False)
    if f.direct_fd is not None:
        f.close(sync=False)
        pytest.skip("this file system accepts misaligned O_DIRECT writes")
    f.write_tensor(data.numel(), data)
    f.close()
    assert path.read_bytes() == data.numpy().tobytes() * 2


def test_background_write_failure_is_raised_naming_the_file(tmp_path, monkeypatch):
    # A write that fails on the background thread (here: the descriptor is gone, as on a lost
    # disk) surfaces in the caller with the shard's path, not silently.
    monkeypatch.setattr(shards, "STAGING_BYTES", 3 * shards.DIRECT_ALIGN)  # blocks go out at once
    layout = layout_shard([("x", "F32", (30_000,))])
    f = ShardFile(str(tmp_path / "s.safetensors"), layout.header, layout.size)
    for fd in (f.fd, f.direct_fd):
        if fd is not None:
            os.close(fd)
    f.direct_fd = None
    with pytest.raises(OSError, match="s.safetensors"):
        with WriteBehind(depth=1) as writer:
            for r0 in range(0, 30_000, 3000):
                writer.submit(f, layout.offsets["x"][0] + 4 * r0, torch.zeros(3000))


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
