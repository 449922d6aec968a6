"""Merges by the SLERP family (multislerp, karcher, nuslerp) of 3 and 4 parents and of two parents
plus a base, on parents as transformers writes them (Llama, Qwen2, Mixtral), against the direct
float64 transcriptions of mergekit's formulas in test_family.py.

The numeric cases run the merge actor in this process (the plan, the reductions and the writes a
merge makes, without Ray); ``test_actor_counts_write_the_same_bytes`` runs the same merges on the
session's Ray with 1, 2 and 3 actors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hfparents import save_parent, tiny_config
from reference import load_dir, ulp
from test_family import karcher_direct, multislerp_direct, nuslerp_merge_direct

from raymerge import readahead
from raymerge.actors import MergeActor, WriteJob
from raymerge.cli import build_options
from raymerge.driver import load_parents
from raymerge.family import FamilyMethod
from raymerge.plan import build_plan
from raymerge.readahead import ReadAhead

F64 = torch.float64
ARCHS = ["llama", "qwen2", "mixtral"]


@pytest.fixture(scope="session")
def families(session_dir):
    """Per architecture: a base and four fine-tunes of it (small task vectors, as fine-tunes have)."""
    made = {}
    for arch in ARCHS:
        root = session_dir / "family" / arch
        config = tiny_config(arch)
        base = save_parent(str(root / "base"), config, seed=1)
        tunes = [save_parent(str(root / f"ft{i}"), config, seed=1, noise_seed=10 + i, noise=0.05) for i in range(4)]
        made[arch] = (base, tunes)
    return made


def merge_here(out, *, max_shard_size: int = 10**9, **values) -> dict[str, dict[str, torch.Tensor]]:
    """Plan and write a merge with one in-process MergeActor; every output's tensors, by subdir."""
    options = build_options(out=str(out), max_shard_size=str(max_shard_size), **values)
    inputs = load_parents(options)
    plan = build_plan(inputs, options, 1)
    actor = MergeActor(options.block_bytes)
    subdirs = options.output_dirs()
    for sub in subdirs:
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for i, shard in enumerate(plan.shards):
        mine = plan.shard_tensors(i)
        ts = {t.name: options.t_for(t.name, plan.n_layers) for t in mine if t.op in ("slerp", "mix")}
        paths = tuple(os.path.join(out, sub, shard.filename) for sub in subdirs)
        done = actor.write(WriteJob.for_shard(plan, i, paths, ts=ts))
        assert done.refused is None
    return {sub: load_dir(os.path.join(out, sub)) for sub in subdirs}


def check_within_one_ulp(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """``got`` (the output dtype) within one of its ulps of the float64 ``want``."""
    bad = (got.to(F64) - want).abs() > ulp(want.to(got.dtype)).to(F64)
    assert not bad.any(), f"{name}: {int(bad.sum())} of {got.numel()} elements more than one ulp off"


def multislerp_or_base(xs, weights, base):
    """mergekit's multislerp; where every task vector is zero (a tensor no fine-tune changed),
    the base, where mergekit stops with an error for three parents or more (a documented
    deviation, family.py)."""
    if all(not bool((x - (0 if base is None else base)).any()) for x in xs) and len(xs) > 2:
        with pytest.raises(AssertionError):  # the direct version refuses: mergekit's ValueError
            multislerp_direct(xs, weights, base=base)
        return torch.zeros_like(xs[0]) if base is None else base.clone()
    return multislerp_direct(xs, weights, base=base)


def check_all(child: dict, parents: list[dict], base: dict | None, direct) -> None:
    assert sorted(child) == sorted(parents[0])
    for name, got in child.items():
        xs = [p[name].to(F64) for p in parents]
        want = direct(xs, None if base is None else base[name].to(F64))
        assert got.dtype == parents[0][name].dtype
        check_within_one_ulp(got, want, name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n, with_base", [(2, True), (3, False), (4, True)])
def test_multislerp_matches_the_direct_formula(families, arch, n, with_base, tmp_path):
    base_dir, tunes = families[arch]
    weights = [(1.0, 2.0, 0.5, 1.5)[:n], (1.0,) * n]
    children = merge_here(tmp_path, parents=tuple(tunes[:n]), method="multislerp",
                          base=base_dir if with_base else None,
                          weights=tuple(",".join(str(w) for w in ws) for ws in weights))
    parents, base = [load_dir(d) for d in tunes[:n]], load_dir(base_dir) if with_base else None
    for ws, child in zip(weights, children.values()):
        check_all(child, parents, base, lambda xs, b, ws=ws: multislerp_or_base(xs, list(ws), b))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [3, 4])
def test_karcher_matches_the_direct_formula(families, arch, n, tmp_path):
    _, tunes = families[arch]
    (child,) = merge_here(tmp_path, parents=tuple(tunes[:n]), method="karcher").values()
    check_all(child, [load_dir(d) for d in tunes[:n]], None, lambda xs, b: karcher_direct(xs))


def _recipe(path, models, method, base=None, **parameters) -> str:
    doc = {"models": [{"model": m, "parameters": {"weight": w}} for m, w in models], "merge_method": method}
    if base:
        doc["base_model"] = base
    if parameters:
        doc["parameters"] = parameters
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)],
                         ids=["flatten", "columns", "rows"])
@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "base"])
@pytest.mark.parametrize("arch", ARCHS)
def test_nuslerp_matches_the_direct_formula(families, arch, flatten, row_wise, with_base, tmp_path):
    from raymerge.recipe import load_recipe

    base_dir, tunes = families[arch]
    recipe = load_recipe(_recipe(tmp_path / "r.yml", [(tunes[0], 1.0), (tunes[1], 3.0)], "nuslerp",
                                 base_dir if with_base else None, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise))
    (child,) = merge_here(tmp_path / "out", **recipe.merge_values()).values()
    parents, base = [load_dir(d) for d in tunes[:2]], load_dir(base_dir) if with_base else None
    # mergekit's documented layout (family.FamilyMethod.vectors): row vectors, along the last
    # dimension, with row_wise; columns, along the first, without. Its code has them the other way.
    check_all(child, parents, base, lambda xs, b: nuslerp_merge_direct(
        xs, [1.0, 3.0], base=b, dim=-1 if row_wise else 0, flatten=flatten))


SWEEP = ["1,1,1,1", "2,1,1,1", "1,2,1,1", "1,1,2,1", "1,1,1,2"]
READ_CASES = {
    "multislerp, base, 5 weight vectors": dict(parents=4, base=True, method="multislerp", weights=SWEEP),
    "nuslerp per column, base, 5 weight vectors": dict(parents=2, base=True, method="nuslerp",
                                                       weights=["1,1", "2,1", "1,2", "3,1", "1,3"],
                                                       family=FamilyMethod("nuslerp", base=True, nuslerp_flatten=False)),
    "karcher": dict(parents=4, base=False, method="karcher", weights=[]),
}


@pytest.mark.parametrize("case", READ_CASES)
def test_a_merge_reads_every_input_byte_once(families, tmp_path, monkeypatch, case):
    """A sweep's children (or one child) from one read of every tensor of every input."""
    spec = dict(READ_CASES[case])
    base_dir, tunes = families["llama"]
    reads = []
    read, mapped = readahead.read_entry, ReadAhead._mapped
    monkeypatch.setattr(readahead, "read_entry", lambda fds, e, buf: reads.append((e.file, e.name)) or read(fds, e, buf))
    monkeypatch.setattr(ReadAhead, "_mapped", lambda self, e: reads.append((e.file, e.name)) or mapped(self, e))
    parents = tunes[:spec.pop("parents")]
    base = base_dir if spec.pop("base") else None
    sweep = spec.pop("weights")
    children = merge_here(tmp_path, parents=tuple(parents), base=base, weights=tuple(sweep), max_shard_size=20_000,
                          **spec)
    assert sorted(children) == (sorted(f"w-{w}" for w in sweep) if len(sweep) > 1 else [""])
    inputs = [*parents, *([base] if base else [])]
    want = sorted((os.path.join(d, "model.safetensors"), name) for d in inputs
                  for name in load_file(os.path.join(d, "model.safetensors")))
    assert sorted(reads) == want, "every tensor of every input read exactly once"
    if spec["method"] == "multislerp":
        loaded, base_tensors = [load_dir(d) for d in parents], load_dir(base)
        for w in sweep:
            check_all(children[f"w-{w}"], loaded, base_tensors,
                      lambda xs, b, w=w: multislerp_or_base(xs, [float(x) for x in w.split(",")], b))


ACTOR_COUNT_ARGS = {
    "multislerp": lambda base, tunes: [*tunes[:3], "--method", "multislerp", "--base", base, "--weights", "1,2,3",
                                       "--weights", "3,2,1"],
    "karcher": lambda base, tunes: [*tunes, "--method", "karcher"],
    "nuslerp": lambda base, tunes: [*tunes[:2], "--method", "nuslerp", "--base", base, "--weights", "1,3"],
}


@pytest.fixture(scope="module")
def by_actor_count(families, ray_head, tmp_path_factory):
    """{method: [the shards' bytes with 1, 2 and 3 actors]}, on the session's Ray. The merges go
    by actor count, so that each count's actors serve every method (pool.py keeps them)."""
    from raymerge import cli

    base_dir, tunes = families["qwen2"]
    root = tmp_path_factory.mktemp("actor-counts")
    written: dict[str, list] = {method: [] for method in ACTOR_COUNT_ARGS}
    for workers in (1, 2, 3):
        for method, args in ACTOR_COUNT_ARGS.items():
            out = root / f"{method}-{workers}"
            argv = ["merge", *map(str, args(base_dir, tunes)), "-o", str(out), "--workers", str(workers),
                    "--max-shard-size", "20KB", "--quiet"]
            assert cli.run(argv) == 0, argv
            written[method].append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))})
    return written


@pytest.mark.parametrize("method", list(ACTOR_COUNT_ARGS))
def test_actor_counts_write_the_same_bytes(by_actor_count, method):
    one, two, three = by_actor_count[method]
    assert len(one) >= 3, "several shards, so that several actors share them"
    assert two == one
    assert three == one


REFUSALS = [
    # (arguments after the parents' placeholders, the refusal's words)
    (["{ft0}", "--method", "multislerp"], "give at least two parents"),
    (["{ft0}", "{ft1}", "{ft2}"], "slerp merges two parents; for 3, choose --method multislerp or karcher"),
    (["{ft0}", "{ft1}", "{ft2}", "--method", "nuslerp"], "nuslerp merges exactly two parents"),
    (["{ft0}", "{ft1}", "--method", "nuslerp", "--base", "{ft1}"], "is also one of the parents"),
    (["{ft0}", "{ft1}", "--method", "multislerp", "--weights", "1,-1"], "sum to zero, so they cannot be normalised"),
    (["{ft0}", "{ft1}", "{ft2}", "--method", "multislerp", "--weights", "1,2"], "2 weights for 3 parents"),
    (["{ft0}", "{ft1}", "--method", "karcher", "--weights", "1,2"], "karcher takes no weights"),
    (["{ft0}", "{ft1}", "--method", "karcher", "--base", "{base}"], "karcher takes no base_model"),
    (["{ft0}", "{ft1}", "--method", "multislerp", "-t", "0.3"], "-t, --t-range and --t-for are SLERP's"),
    (["{ft0}", "{ft1}", "--method", "karcher", "--eval", "text.txt"], "--eval is not supported with karcher"),
    (["{ft0}", "{other}", "--method", "karcher"], "the parents' configs differ in intermediate_size (A 64, B 96)"),
]

BAD_RECIPES = [
    ("merge_method: multislerp\nmodels:\n  - model: {ft0}\n    parameters: {{weight: 1}}\n"
     "  - model: {ft1}\n    parameters: {{weight: 1}}\nparameters:\n  nuslerp_flatten: false\n",
     "multislerp takes no parameter 'nuslerp_flatten' (it takes normalize_weights, eps, weight)"),
    ("merge_method: karcher\nmodels:\n  - model: {ft0}\n  - model: {ft1}\nparameters:\n  max_iter: [1, 2]\n",
     "max_iter must be a single int"),
    ("merge_method: multislerp\nmodels:\n  - model: {ft0}\n    parameters: {{weight: 1}}\n  - model: {ft1}\n",
     "multislerp needs a weight for every model (mergekit has no default); none for {ft1}"),
    ("merge_method: nuslerp\nbase_model: {ft0}\nmodels:\n  - model: {ft0}\n    parameters: {{weight: 1}}\n"
     "  - model: {ft1}\n    parameters: {{weight: 1}}\n",
     "nuslerp merges at least two models besides the base_model; got 1 ({ft0} is the base)"),
    ("merge_method: multislerp\nslices:\n  - sources:\n      - model: {ft0}\n        layer_range: [0, 2]\n",
     "multislerp takes its parents as 'models'"),
    ("merge_method: karcher\nmodels:\n  - model: {ft0}\n    parameters: {{density: 0.5}}\n  - model: {ft1}\n",
     "per-model parameters density (models) are not supported"),
    ("merge_method: ties\nmodels:\n  - model: {ft0}\n  - model: {ft1}\n", "merge_method 'ties' is not supported"),
]


@pytest.fixture(scope="module")
def other_config(families, tmp_path_factory):
    """A Llama like the family's, with a wider MLP: its tensors' shapes differ."""
    return save_parent(str(tmp_path_factory.mktemp("wider") / "wide"), tiny_config("llama", intermediate_size=96), seed=3)


@pytest.mark.parametrize("args, expected", REFUSALS)
def test_family_refusals_are_one_line(families, other_config, cli, tmp_path, args, expected):
    base, tunes = families["llama"]
    names = {"ft0": tunes[0], "ft1": tunes[1], "ft2": tunes[2], "base": base, "other": other_config}
    (tmp_path / "text.txt").write_text("w1 w2\n")
    done = cli("merge", *[a.format(**names) for a in args], "-o", tmp_path / "out", "--quiet")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", BAD_RECIPES)
def test_family_recipes_refused_in_one_line(families, cli, tmp_path, text, expected):
    _, tunes = families["llama"]
    names = {"ft0": tunes[0], "ft1": tunes[1]}
    recipe = tmp_path / "bad.yml"
    recipe.write_text(text.format(**names))
    done = cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and expected.format(**names) in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_three_vocabularies_are_aligned_by_token_string(cli, tmp_path):
    """Three parents whose tokenizers add different tokens: the child's vocabulary is the first's
    tokens, then each next parent's new ones in its id order; a row a parent lacks is the first
    other parent's (in order) that has the token; the child's tokenizer gives those ids."""
    from transformers import AutoTokenizer

    from raymerge.synthetic import build_parent, llama_config

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    c100, c102 = llama_config(vocab_size=100, **small), llama_config(vocab_size=102, **small)
    p0 = build_parent(str(tmp_path / "p0"), c100, seed=1)
    p1 = build_parent(str(tmp_path / "p1"), c102, seed=2, base=(c100, 1), base_vocab=100)  # + <extra_0>, <extra_1>
    p2 = build_parent(str(tmp_path / "p2"), c102, seed=3, base=(c100, 1), tokenizer=False)
    tok = AutoTokenizer.from_pretrained(p0)
    tok.add_tokens(["<extra_1>", "<p2_only>"])
    tok.save_pretrained(p2)
    parents = [p0, p1, p2]
    vocabs = [AutoTokenizer.from_pretrained(p).get_vocab() for p in parents]
    union = sorted(vocabs[0], key=vocabs[0].get)
    for v in vocabs[1:]:
        union += [t for t in sorted(v, key=v.get) if t not in union]
    assert union[100:] == ["<extra_0>", "<extra_1>", "<p2_only>"]

    out = tmp_path / "child"
    done = cli("merge", *parents, "-o", out, "--method", "multislerp", "--weights", "1,2,3", "--quiet")
    assert done.returncode == 0, done.stderr
    child_tok = AutoTokenizer.from_pretrained(out)
    assert [child_tok.convert_ids_to_tokens(i) for i in range(len(union))] == union
    assert json.load(open(out / "config.json"))["vocab_size"] == len(union)

    weights = [load_dir(p) for p in parents]
    child = load_dir(out)

    def aligned(i: int, name: str) -> torch.Tensor:
        rows = []
        for token in union:
            owner = i if token in vocabs[i] else next(j for j in range(3) if token in vocabs[j])
            rows.append(weights[owner][name][vocabs[owner][token]])
        return torch.stack(rows).to(F64)

    for name, got in child.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            xs = [aligned(i, name) for i in range(3)]
        else:
            xs = [w[name].to(F64) for w in weights]
        check_within_one_ulp(got, multislerp_direct(xs, [1.0, 2.0, 3.0]), name)


def test_recipe_weights_vary_by_filter_and_layer(families, tmp_path):
    """Per-model weights as gradients and filters: each tensor is merged at its own weights,
    mergekit's gradient across the layers (schedule.py), still from one pass."""
    from raymerge.recipe import load_recipe
    from raymerge.schedule import position

    base_dir, tunes = families["qwen2"]
    text = (f"merge_method: multislerp\nbase_model: {base_dir}\nmodels:\n"
            f"  - model: {tunes[0]}\n    parameters:\n      weight: [{{filter: mlp, value: [0.5, 2]}}, {{value: 1}}]\n"
            f"  - model: {tunes[1]}\n    parameters:\n      weight: [1, 3]\n"
            f"  - model: {tunes[2]}\n    parameters:\n      weight: 1\n")
    (tmp_path / "r.yml").write_text(text)
    (child,) = merge_here(tmp_path / "out", **load_recipe(str(tmp_path / "r.yml")).merge_values()).values()
    parents, base = [load_dir(d) for d in tunes[:3]], load_dir(base_dir)
    n_layers = 2
    for name, got in child.items():
        x = position(name, n_layers)
        weights = [0.5 + 1.5 * x if "mlp" in name else 1.0, 1.0 + 2.0 * x, 1.0]
        want = multislerp_or_base([p[name].to(F64) for p in parents], weights, base[name].to(F64))
        check_within_one_ulp(got, want, name)


@pytest.mark.parametrize("method", [FamilyMethod("multislerp"), FamilyMethod("karcher"),
                                    FamilyMethod("nuslerp", nuslerp_flatten=False)])
def test_a_tensor_of_no_elements_has_a_zero_gram_matrix(method):
    from raymerge.mix import GramSums

    for shape in ((0,), (0, 4), (4, 0)):
        gram, finite = GramSums(method, shape, 2).result()  # no blocks were added
        assert all(finite) and not gram.any()
        method.coefficients(gram, [1.0, 1.0])


def test_a_recipe_may_take_the_third_models_tokenizer(families, tmp_path):
    from raymerge.recipe import load_recipe

    _, tunes = families["llama"]
    text = ("merge_method: karcher\nmodels:\n" + "".join(f"  - model: {t}\n" for t in tunes[:3])
            + f"tokenizer_source: {tunes[2]}\n")
    (tmp_path / "r.yml").write_text(text)
    recipe = load_recipe(str(tmp_path / "r.yml"))
    options = build_options(out=str(tmp_path / "out"), **recipe.merge_values(), vocab=recipe.vocab)
    assert options.vocab == "c"
