"""Tensors in one parent only, non-float tensors, non-finite values and bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import raymerge
from reference import load_dir

CLI = [sys.executable, "-m", "raymerge.cli"]


def clone_with(src: str, dst: str, changes: dict) -> str:
    """Copy a single-file parent, replacing, adding (a tensor) or dropping (None) tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _indexed(src: str, dst: str, bad_name: str) -> str:
    """A copy whose index maps one tensor to ``bad_name`` (missing, or outside the directory)."""
    shutil.copytree(src, dst)
    names = sorted(load_file(os.path.join(dst, "model.safetensors")))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = bad_name
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


def test_one_parent_tensors_are_copied_and_non_float_equal_tensors_kept(tiny_parents, ray_head, tmp_path):
    a, b = tiny_parents
    extra_b = torch.linspace(-1, 1, 64, dtype=torch.float32)
    ids = torch.arange(10, dtype=torch.int64)
    a2 = clone_with(a, str(tmp_path / "a"), {"model.rotary.ids": ids})
    b2 = clone_with(b, str(tmp_path / "b"), {"model.extra.scale": extra_b, "model.rotary.ids": ids,
                                              "model.layers.0.mlp.gate_proj.weight": None})
    out = str(tmp_path / "out")
    result = raymerge.merge(a2, b2, out, t=0.5, workers=2)
    child, pa = load_dir(out), load_dir(a2)
    assert torch.equal(child["model.extra.scale"], extra_b.to(torch.bfloat16)), "cast, never scaled"
    assert torch.equal(child["model.layers.0.mlp.gate_proj.weight"], pa["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(child["model.rotary.ids"], ids)
    assert any("model.extra.scale: only in parent B" in n for n in result.notes)
    assert any("gate_proj.weight: only in parent A" in n for n in result.notes)


def test_differing_non_float_tensors_are_refused(tiny_parents, cli, tmp_path):
    a, b = tiny_parents
    a2 = clone_with(a, str(tmp_path / "a"), {"model.rotary.ids": torch.arange(10)})
    b2 = clone_with(b, str(tmp_path / "b"), {"model.rotary.ids": torch.arange(10) + 1})
    proc = cli("merge", a2, b2, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 1
    assert proc.stderr == ("raymerge: error: non-float tensor 'model.rotary.ids' differs between the parents: "
                           "it cannot be merged\n"), proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_parent_is_refused_before_anything_is_written(tiny_parents, cli, tmp_path, bad):
    a, b = tiny_parents
    w = load_file(os.path.join(b, "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"].clone()
    w[3, 5] = bad
    b2 = clone_with(b, str(tmp_path / "b"), {"model.layers.1.self_attn.q_proj.weight": w})
    before = tree_digest(b2)
    proc = cli("merge", a, b2, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 1
    assert proc.stderr == (f"raymerge: error: parent B: {os.path.realpath(b2)}/model.safetensors: tensor "
                           "'model.layers.1.self_attn.q_proj.weight' holds NaN or inf\n"), proc.stderr
    assert not (tmp_path / "out").exists()
    assert tree_digest(b2) == before


def test_bad_inputs_get_one_line_and_exit_1(tiny_parents, cli, tmp_path):
    a, b = tiny_parents
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    truncated = str(tmp_path / "truncated")
    shutil.copytree(b, truncated)
    st = os.path.join(truncated, "model.safetensors")
    os.truncate(st, os.path.getsize(st) - 1000)
    escaping = _indexed(b, str(tmp_path / "escaping"), "../../outside.safetensors")
    missing_shard = _indexed(b, str(tmp_path / "missing-shard"), "model-00002-of-00002.safetensors")
    cases = [
        (["merge", a, truncated, "-o", str(tmp_path / "o5")], "truncated or corrupt"),
        (["merge", a, escaping, "-o", str(tmp_path / "o6")], "a path outside the model directory"),
        (["merge", a, missing_shard, "-o", str(tmp_path / "o7")], "which does not exist"),
        (["merge", str(tmp_path / "missing"), b, "-o", str(tmp_path / "o1")], "is not a directory"),
        (["merge", a, str(not_model), "-o", str(tmp_path / "o2")], "has no config.json"),
        (["merge", a, b, "-o", str(tmp_path / "o3"), "-t", "1.5"], "outside [0, 1]"),
        (["merge", a, b, "-o", os.path.join(a, "child")], "lies inside parent"),
        (["merge", a, b, "-o", str(nonempty)], "is not empty"),
        (["merge", a, b, "-o", str(nonempty / "keep.txt")], "exists and is not a directory"),
        (["merge", a, b, "-o", str(nonempty), "--overwrite"], "not a raymerge output"),
        (["merge", a, b, "-o", str(tmp_path / "o4"), "--max-shard-size", "lots"], "cannot read size"),
    ]
    digests = [tree_digest(a), tree_digest(b)]
    for args, expected in cases:
        proc = cli(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (args, proc.stderr)
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)
    assert [tree_digest(a), tree_digest(b)] == digests
    assert (nonempty / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


@pytest.fixture
def tiny_fs(tmp_path):
    """A 300 KiB tmpfs (needs root, as CI and the dev machines have): a really full disk."""
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_an_actor_error_prints_as_one_line(tiny_parents, ray_head, tiny_fs):
    """A real actor failure: the shards (552 KB) do not fit on a 300 KiB tmpfs, so an actor's
    write of the shard fails with ENOSPC inside Ray, and Ray hands the driver that
    exception wrapped in a RayTaskError with the actor's traceback. The user sees exactly one
    line, naming the file, and exit status 1: Ray adds nothing to stderr here (worker output is
    not forwarded to the driver, and the driver logs at ERROR level only)."""
    a, b = tiny_parents
    digests = [tree_digest(a), tree_digest(b)]
    out = tiny_fs / "out"
    # In a process of its own (the CLI's own Ray connection, as a user has it): what Ray could add
    # to stderr is part of what is checked.
    full = subprocess.run([*CLI, "merge", a, b, "-o", str(out), "--address", ray_head.address, "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 1
    shard = os.path.join(os.path.realpath(out), "model.safetensors")
    assert full.stderr == f"raymerge: error: {shard}: No space left on device\n", full.stderr
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert [tree_digest(a), tree_digest(b)] == digests


def test_read_only_output_storage(tiny_parents, cli, tiny_fs):
    a, b = tiny_parents
    digests = [tree_digest(a), tree_digest(b)]
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    # Without --quiet: the refusal comes before pass 1, so not even a progress line precedes it.
    ro = cli("merge", a, b, "-o", tiny_fs / "other")
    assert ro.returncode == 1
    # OUT does not exist yet: the driver, taking OUT for the merge (its lock), cannot create it.
    other = os.path.join(os.path.realpath(tiny_fs), "other")
    assert ro.stderr == f"raymerge: error: cannot write into output {other}: Read-only file system\n", ro.stderr
    assert [tree_digest(a), tree_digest(b)] == digests


def test_a_nan_found_after_shards_were_finished_leaves_no_model(tiny_parents, cli, tmp_path):
    """Tensor values are checked as each tensor is read, in one pass: a NaN in the last tensor of
    the last shard is met after the other shards were written and renamed, and they all go."""
    from raymerge.options import MergeOptions, parse_size
    from raymerge.parents import load_parent
    from raymerge.plan import build_plan

    a, b = tiny_parents
    options = MergeOptions(a=a, b=b, out=str(tmp_path / "x"), max_shard_size=parse_size("100KB"))
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), options, 1)
    assert len(plan.shards) > 2
    last = [t for t in plan.tensors if t.shard == len(plan.shards) - 1][-1].name
    w = load_file(os.path.join(b, "model.safetensors"))[last].clone()
    w.view(-1)[-1] = float("nan")
    b2 = clone_with(b, str(tmp_path / "b"), {last: w})
    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            out.mkdir()
        proc = cli("merge", a, b2, "-o", out, "--max-shard-size", "100KB", "--workers", "1", "--quiet")
        assert proc.returncode == 1
        assert proc.stderr.endswith(f"tensor {last!r} holds NaN or inf\n"), proc.stderr
        if existed:
            assert os.listdir(out) == [], "a directory the user made is left, empty"
        else:
            assert not out.exists(), "a directory this merge made is removed"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_parents_are_refused_in_one_line(tiny_parents, cli, tmp_path, dtype):
    a, b = tiny_parents
    name = "model.layers.0.mlp.down_proj.weight"
    w = load_file(os.path.join(b, "model.safetensors"))[name].to(dtype)
    b2 = clone_with(b, str(tmp_path / "b"), {name: w})
    proc = cli("merge", a, b2, "-o", tmp_path / "out")
    assert proc.returncode == 1
    label = "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2"
    assert proc.stderr == (f"raymerge: error: parent B: {os.path.realpath(b2)}/model.safetensors: tensor {name!r} "
                           f"is {label} (float8): FP8 checkpoints, whose weights come with scale tensors, cannot be "
                           "merged by SLERP; merge the parents' bf16 or fp16 weights\n"), proc.stderr
    assert not (tmp_path / "out").exists()
