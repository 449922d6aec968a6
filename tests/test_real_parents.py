"""Parents as transformers saves them, for ten architectures: configs read and compared through
transformers, ties resolved as transformers resolves them, refusals before any work."""

from __future__ import annotations

import json
import os

import pytest
import torch

import raymerge
from hfparents import edit_config, save_parent, tiny_config
from reference import assert_within_one_ulp, check_merged, load_dir, mergekit_style_slerp

ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "mixtral"]


def _pair(root, arch: str, **overrides) -> tuple[str, str]:
    config = tiny_config(arch, **overrides)
    a = save_parent(str(root / f"{arch}-a"), config, seed=1)
    b = save_parent(str(root / f"{arch}-b"), config, seed=1, noise_seed=2)
    return a, b


def _load_child(out: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reports {problems}"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 11]])).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_merges_and_loads(arch, ray_head, tmp_path):
    a, b = _pair(tmp_path, arch)
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.3, workers=2)
    child = check_merged(out, a, b, 0.3)  # every tensor against an independent SLERP
    model = _load_child(out)
    # What transformers holds is what the files hold (no tensor initialised at random).
    state = model.state_dict()
    for name, tensor in child.items():
        if name in state:
            assert torch.equal(state[name].to(tensor.dtype), tensor), name


def _one_line_error(cli, *args) -> str:
    proc = cli(*args)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymerge: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("gpt2", True)])
def test_config_without_tie_follows_the_class_default(arch, tied, ray_head, tmp_path):
    a, b = _pair(tmp_path, arch)
    for p in (a, b):
        edit_config(p, drop=("tie_word_embeddings",))
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.5, workers=1)
    child = check_merged(out, a, b, 0.5)
    assert ("lm_head.weight" in child) is (not tied), "the trained head is kept exactly when untied"
    model = _load_child(out)
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    if tied:
        assert head.data_ptr() == emb.data_ptr()
    else:
        assert torch.equal(head, child["lm_head.weight"].to(head.dtype)), "the head is the merged one"


@pytest.mark.parametrize("arch,override,attribute", [
    ("llama", {"num_hidden_layers": 3}, "num_hidden_layers"),
    # 4 heads of 8 against 2 heads of 16: every tensor has the same shape.
    ("llama", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}, "num_attention_heads"),
    ("gemma", {"head_dim": 16}, "head_dim"),
    ("mixtral", {"num_local_experts": 2}, "num_local_experts"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope"),
])
def test_configs_that_disagree_are_refused_before_any_work(arch, override, attribute, cli, tmp_path):
    a = save_parent(str(tmp_path / "a"), tiny_config(arch), seed=1)
    b = save_parent(str(tmp_path / "b"), tiny_config(arch, **override), seed=2)
    out = tmp_path / "out"
    msg = _one_line_error(cli, "merge", a, b, "-o", out, "-t", "0.5")
    assert attribute in msg and "cannot be merged" in msg, msg
    assert not out.exists(), "nothing is written"


def test_a_harmless_difference_is_merged_with_a_note(cli, tmp_path):
    a = save_parent(str(tmp_path / "a"), tiny_config("llama"), seed=1)
    b = save_parent(str(tmp_path / "b"), tiny_config("llama", max_position_embeddings=4096), seed=1, noise_seed=2)
    edit_config(b, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    out = str(tmp_path / "child")
    proc = cli("merge", a, b, "-o", out, "-t", "0.5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "note: config: rope_theta differs (A 10000.0, B 500000.0); the child takes A's value" in proc.stderr
    assert "note: config: max_position_embeddings differs (A 2048, B 4096)" in proc.stderr
    with open(os.path.join(out, "config.json")) as f, open(os.path.join(a, "config.json")) as g:
        child, parent = json.load(f), json.load(g)
    assert child["rope_parameters"] == parent["rope_parameters"]
    assert child["max_position_embeddings"] == parent["max_position_embeddings"]
    with open(os.path.join(out, "raymerge.json")) as f:
        notes = json.load(f)["notes"]
    assert any(n.startswith("config: rope_theta differs") for n in notes)
    check_merged(out, a, b, 0.5)


def test_untied_config_without_a_head_is_refused(cli, tmp_path):
    a = save_parent(str(tmp_path / "a"), tiny_config("gpt2"), seed=1)  # tied: no lm_head in the files
    b = save_parent(str(tmp_path / "b"), tiny_config("gpt2"), seed=1, noise_seed=2)
    edit_config(b, tie_word_embeddings=False)
    msg = _one_line_error(cli, "merge", a, b, "-o", tmp_path / "out")
    assert "parent B" in msg and os.path.join(os.path.realpath(b), "config.json") in msg
    assert "tie_word_embeddings is false" in msg and "lm_head.weight" in msg


def test_a_layer_only_one_parents_files_hold_is_refused(cli, tmp_path):
    a = save_parent(str(tmp_path / "a"), tiny_config("llama", num_hidden_layers=3), seed=1)
    edit_config(a, num_hidden_layers=2)  # files hold 3 layers, the config says 2
    b = save_parent(str(tmp_path / "b"), tiny_config("llama"), seed=1, noise_seed=2)
    msg = _one_line_error(cli, "merge", a, b, "-o", tmp_path / "out")
    assert "layer 2" in msg and "only parent A" in msg and "2 layers" in msg


def test_tensor_shapes_that_disagree_with_equal_configs_are_refused_with_both_shapes(cli, tmp_path):
    a = save_parent(str(tmp_path / "a"), tiny_config("llama"), seed=1)
    b = save_parent(str(tmp_path / "b"), tiny_config("llama", intermediate_size=48), seed=2)
    edit_config(b, intermediate_size=64)  # the config hides the difference; the files do not
    msg = _one_line_error(cli, "merge", a, b, "-o", tmp_path / "out")
    assert "A [32, 64] vs B [32, 48]" in msg, msg


@pytest.mark.parametrize("tied_first", [True, False], ids=["a-tied", "b-tied"])
def test_embed_out_head_with_one_tied_parent_becomes_lm_head(tied_first, ray_head, tmp_path):
    """GPT-NeoX checkpoints call the head ``embed_out.weight`` (transformers saves it so). With the
    other parent tied, the child is untied and its merged head is ``lm_head.weight`` (align.py),
    SLERP(tied parent's embed_in, untied parent's embed_out), and transformers loads it as the head."""
    tied = save_parent(str(tmp_path / "tied"), tiny_config("gpt_neox", tie_word_embeddings=True), seed=1)
    untied = save_parent(str(tmp_path / "untied"), tiny_config("gpt_neox", tie_word_embeddings=False), seed=1,
                         noise_seed=2)
    assert "embed_out.weight" in load_dir(untied) and "embed_out.weight" not in load_dir(tied)
    a, b = (tied, untied) if tied_first else (untied, tied)
    out = str(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.3, workers=2)
    pa, pb, child = load_dir(a), load_dir(b), load_dir(out)
    assert "embed_out.weight" not in child and "lm_head.weight" in child
    head_a = pa.get("embed_out.weight", pa["gpt_neox.embed_in.weight"])
    head_b = pb.get("embed_out.weight", pb["gpt_neox.embed_in.weight"])
    assert_within_one_ulp(child["lm_head.weight"], mergekit_style_slerp(0.3, head_a, head_b), "lm_head.weight")
    assert sorted(child) == sorted((set(pa) | set(pb) | {"lm_head.weight"}) - {"embed_out.weight"})
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False
    model = _load_child(out)
    assert torch.equal(model.get_output_embeddings().weight, child["lm_head.weight"])
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
