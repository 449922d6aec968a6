"""raymerge verify: passes a good output, names the problem in each damaged one."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import raymerge



@pytest.fixture(scope="module")
def good(tiny_parents, ray_head, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("verify") / "good")
    raymerge.merge(*tiny_parents, out, t=0.5, max_shard_size="150KB")
    return out


def test_good_output_passes_with_load(good, cli):
    proc = cli("verify", good, "--load")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(": ok")


def _first_shard(path):
    return os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0])


def _truncate(path):
    shard = _first_shard(path)
    os.truncate(shard, os.path.getsize(shard) - 100)


def _nan(path):
    shard = _first_shard(path)
    tensors = load_file(shard)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})


def _edit_json(name, change):
    def edit(path):
        p = os.path.join(path, name)
        with open(p) as f:
            data = json.load(f)
        change(data)
        with open(p, "w") as f:
            json.dump(data, f)
    return edit


DAMAGE = [
    (_truncate, "truncated or corrupt"),
    (_nan, "holds NaN or inf"),
    (_edit_json("model.safetensors.index.json", lambda d: d["metadata"].update(total_size=1)), "total_size"),
    (_edit_json("config.json", lambda d: d.update(vocab_size=999)), "vocab_size is 999"),
    (lambda p: os.remove(os.path.join(p, "raymerge.json")), "raymerge.json is missing"),
]


@pytest.mark.parametrize("damage,expected", DAMAGE)
def test_damaged_outputs_are_named(good, cli, tmp_path, damage, expected):
    copy = str(tmp_path / "copy")
    shutil.copytree(good, copy)
    damage(copy)
    proc = cli("verify", copy)
    assert proc.returncode == 1
    assert expected in proc.stderr, proc.stderr
