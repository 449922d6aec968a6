"""The last step of a merge is durable: every file and the directory synced before config.json."""

from __future__ import annotations


def test_every_file_is_durable_before_config_json(tiny_parents, ray_head, tmp_path, monkeypatch):
    import os

    import raymerge

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    a, b = tiny_parents
    out = os.path.realpath(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.5, workers=1, max_shard_size="200KB")
    files = sorted(n for n in os.listdir(out) if not n.endswith(".safetensors"))
    assert "tokenizer.json" in files and "model.safetensors.index.json" in files
    # write_atomic syncs config.json under its temporary name, before the rename.
    config = next(i for i, p in enumerate(synced) if p.startswith(os.path.join(out, "config.json")))
    for name in files:
        if name != "config.json":
            assert os.path.join(out, name) in synced[:config], f"{name} is not synced before config.json"
    assert out in synced[:config], "the directory is synced before config.json"
    assert synced[-1] == out, "and after config.json's rename"
