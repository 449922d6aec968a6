"""Sweeps, per-layer schedules and mergekit recipes."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch

import raymerge
from raymerge.options import t_dirname
from raymerge.schedule import Schedule, parse_range
from reference import assert_within_one_ulp, check_merged, load_dir, mergekit_style_slerp

CLASSIC = {"self_attn": (0.0, 0.5, 0.3, 0.7, 1.0), "mlp": (1.0, 0.5, 0.7, 0.3, 0.0)}


def same_model_files(x: str, y: str) -> None:
    names = sorted(f for f in os.listdir(x) if f.endswith(".safetensors") or f.endswith("index.json"))
    assert names == sorted(f for f in os.listdir(y) if f.endswith(".safetensors") or f.endswith("index.json"))
    for n in names:
        assert filecmp.cmp(os.path.join(x, n), os.path.join(y, n), shallow=False), n


def test_sweep_equals_single_runs_byte_for_byte(tiny_parents, ray_head, tmp_path):
    a, b = tiny_parents
    sweep = str(tmp_path / "sweep")
    result = raymerge.merge(a, b, sweep, t=[0.2, 0.5, 0.8], workers=2, max_shard_size="150KB")
    assert sorted(result.outputs) == ["0.2", "0.5", "0.8"]
    for t in (0.2, 0.5, 0.8):
        single = str(tmp_path / f"single-{t}")
        raymerge.merge(a, b, single, t=t, workers=2, max_shard_size="150KB")
        sweep_t = os.path.join(sweep, f"t-{t}")
        same_model_files(sweep_t, single)
        check_merged(sweep_t, a, b, t)


def test_t_range_values_and_directory_names():
    assert parse_range("0.1:0.9:0.1") == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert parse_range("0:1:0.25") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert [t_dirname(t) for t in (0.0, 0.25, 0.5, 1.0, 0.1 + 0.2)] == ["t-0", "t-0.25", "t-0.5", "t-1", "t-0.3"]


def test_cli_sweep_from_t_range_and_repeated_t(tiny_parents, cli, tmp_path):
    """`-t 0.25 -t 1 --t-range 0.1:0.3:0.1` through the CLI: five models in the directories the
    README names, each listed in the summary, t=1 exactly parent B, t=0.3 recorded as 0.3."""
    a, b = tiny_parents
    out = tmp_path / "sweep"
    proc = cli("merge", a, b, "-o", out, "-t", "0.25", "-t", "1", "--t-range", "0.1:0.3:0.1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    names = ["t-0.25", "t-1", "t-0.1", "t-0.2", "t-0.3"]
    assert sorted(os.listdir(out)) == sorted(names), "one directory per t and nothing else (no working state)"
    for name in names:
        assert f"  t={name[2:]}: {os.path.realpath(out / name)}\n" in proc.stderr, proc.stderr
        assert os.path.isfile(out / name / "config.json") and os.path.isfile(out / name / "model.safetensors"), name
    with open(out / "t-0.3" / "raymerge.json") as f:
        assert json.load(f)["t"] == 0.3, "0.1 + 2 * 0.1 is recorded (and merged) as 0.3"
    pb, at_1 = load_dir(b), load_dir(str(out / "t-1"))
    assert sorted(at_1) == sorted(pb) and all(torch.equal(at_1[n], pb[n]) for n in pb), "t=1 is parent B exactly"
    check_merged(str(out / "t-0.2"), a, b, 0.2)


@pytest.mark.parametrize("args,expected", [
    (["-t", "0.5", "-t", "0.50"], "the same t is given twice"),
    (["-t", "0.2", "--t-range", "0.1:0.3:0.1"], "the same t is given twice"),
    (["-t", "0.2", "-t", "0.8", "--t-for", "mlp=0.3"], "--t-for takes at most one -t (the default), not a sweep"),
    (["--t-range", "0:1:0.5", "--t-for", "mlp=0.3"], "--t-for takes at most one -t (the default), not a sweep"),
])
def test_duplicate_t_and_a_schedule_with_a_sweep_are_refused(tiny_parents, cli, tmp_path, args, expected):
    proc = cli("merge", *tiny_parents, "-o", tmp_path / "out", *args)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("raymerge: error: "), proc.stderr
    assert expected in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_schedule_gives_hand_worked_t_per_tensor():
    s = Schedule(default=(0.5,), filters=tuple(CLASSIC.items()))
    # Five layers sit exactly on the five values.
    assert [s.t_for(f"model.layers.{i}.self_attn.q_proj.weight", 5) for i in range(5)] == [0, 0.5, 0.3, 0.7, 1]
    assert [s.t_for(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [1, 0.5, 0.7, 0.3, 0]
    # Four layers sit at 0, 1/3, 2/3, 1: between the values.
    got = [s.t_for(f"model.layers.{i}.self_attn.o_proj.weight", 4) for i in range(4)]
    assert got == pytest.approx([0.0, (2 / 3) * 0.5 + (1 / 3) * 0.3, (1 / 3) * 0.3 + (2 / 3) * 0.7, 1.0])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.2.input_layernorm.weight"):
        assert s.t_for(name, 5) == 0.5
    # A gradient default: outside the layers is position 0; a layer norm follows its layer.
    g = Schedule(default=(0.2, 0.8), filters=(("mlp", (0.4,)),))
    assert g.t_for("model.embed_tokens.weight", 5) == 0.2
    assert g.t_for("lm_head.weight", 5) == 0.2
    assert g.t_for("model.norm.weight", 5) == 0.2
    assert g.t_for("model.layers.4.post_attention_layernorm.weight", 5) == pytest.approx(0.8)
    assert g.t_for("model.layers.2.mlp.down_proj.weight", 5) == 0.4
    # Only one layer: mergekit puts it at position 1.
    assert g.t_for("model.layers.0.self_attn.q_proj.weight", 1) == pytest.approx(0.8)


RECIPE = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_recipe_equals_t_for_flags_and_the_reference(tiny_parents, cli, tmp_path):
    a, b = tiny_parents
    recipe = tmp_path / "slerp.yml"
    recipe.write_text(RECIPE.format(a=a, b=b))
    common = ["--quiet", "--max-shard-size", "200KB"]
    r1 = cli("run", recipe, "-o", tmp_path / "recipe", *common)
    assert r1.returncode == 0, r1.stderr
    r2 = cli("merge", a, b, "-o", tmp_path / "flags", "-t", "0.5",
             "--t-for", "self_attn=0,0.5,0.3,0.7,1", "--t-for", "mlp=1,0.5,0.7,0.3,0", *common)
    assert r2.returncode == 0, r2.stderr
    assert "schedule self_attn=[0, 0.5, 0.3, 0.7, 1]; mlp=[1, 0.5, 0.7, 0.3, 0]; default=0.5" in r2.stderr
    same_model_files(str(tmp_path / "recipe"), str(tmp_path / "flags"))
    schedule = Schedule(default=(0.5,), filters=tuple(CLASSIC.items()))
    pa, pb, child = load_dir(a), load_dir(b), load_dir(str(tmp_path / "recipe"))
    for name, got in child.items():
        t = schedule.t_for(name, 4)
        assert_within_one_ulp(got, mergekit_style_slerp(t, pa[name], pb[name]), name)


def test_models_form_recipe_equals_a_plain_merge(tiny_parents, cli, tmp_path):
    a, b = tiny_parents
    recipe = tmp_path / "models.yml"
    recipe.write_text(f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\n"
                      "parameters:\n  t: 0.3\ndtype: bfloat16\n")
    proc = cli("run", recipe, "-o", tmp_path / "r", "--quiet")
    assert proc.returncode == 0, proc.stderr
    raymerge.merge(a, b, str(tmp_path / "m"), t=0.3)
    same_model_files(str(tmp_path / "r"), str(tmp_path / "m"))


BAD_RECIPES = [
    ("merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n",
     "merge_method 'ties' is not supported"),
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: /elsewhere/c\n"
     "parameters:\n  t: 0.5\n", "exactly two models, got 3"),
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
     "      - model: {b}\n        layer_range: [0, 2]\nparameters:\n  t: 0.5\n", "does not cover every layer"),
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: [0, 1.5]\n",
     "outside [0, 1]"),
    ("merge_method: slerp\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n", "needs base_model"),
    ("merge_method: slerp\nbase_model: {a}\nmodels: [\n", "not valid YAML"),
    # Unequal layer ranges (each alone would be a full or a partial range).
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n"
     "      - model: {b}\n        layer_range: [0, 3]\nparameters:\n  t: 0.5\n",
     "the sources' layer ranges must be equal, got [[0, 4], [0, 3]]"),
    # Per-model parameters, in the models form and in a slice's sources.
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters:\n"
     "      weight: 0.3\nparameters:\n  t: 0.5\n", "per-model parameters (models) are not supported"),
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n"
     "        parameters:\n          t: 0.2\n      - model: {b}\n        layer_range: [0, 4]\nparameters:\n  t: 0.5\n",
     "per-model parameters (slice sources) are not supported"),
    # Slice-level parameters.
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n"
     "      - model: {b}\n        layer_range: [0, 4]\n    parameters:\n      t: 0.2\nparameters:\n  t: 0.5\n",
     "slice-level keys ['parameters'] are not supported"),
    # Parameters other than t, other tokenizer keys, and keys raymerge does not know.
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n"
     "  normalize: true\n", "only parameters.t is supported"),
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n"
     "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n", "only tokenizer.source is supported"),
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n"
     "modules:\n  text_decoder: {{}}\nout_dtype: float32\n", "unsupported keys modules"),
]


@pytest.mark.parametrize("text,expected", BAD_RECIPES)
def test_bad_recipes_are_refused(tiny_parents, cli, tmp_path, text, expected):
    a, b = tiny_parents
    recipe = tmp_path / "bad.yml"
    recipe.write_text(text.format(a=a, b=b))
    proc = cli("run", recipe, "-o", tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
