"""The documentation is true as written: the mkdocs site builds with --strict, and every command
example in README.md and docs/*.md runs (against the tiny fixture parents) or is named below with
the way it is checked instead. A new example that is neither run nor listed fails the test."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL = {"", "bash", "shell", "sh", "console"}  # fences whose lines are commands
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)


def _documents() -> list[str]:
    """README.md first, then the docs pages in the site's order (mkdocs.yml's nav)."""
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        nav = yaml.safe_load(f)["nav"]
    pages = [os.path.join("docs", page) for entry in nav for page in entry.values()]
    return ["README.md", *pages]


def fenced_blocks(path: str) -> list[tuple[str, str, int]]:
    """(language, body, first line) of every fenced block of a markdown file."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return [(m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, words
    normalised by shlex (so a listed command matches however it is spaced)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [shlex.join(words) for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def _file(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def _make_target(target: str):
    def check():
        assert re.search(rf"^{target}:", _file("Makefile"), re.M), f"Makefile has no {target} target"
    return check


def _covered_by(test_file: str, test_name: str):
    """An example that cannot run here as written, and the test that runs its path for real."""
    def check():
        assert f"def {test_name}(" in _file(test_file), f"{test_file}::{test_name} is gone"
    return check


def _exists(*paths: str):
    def check():
        for p in paths:
            assert os.path.exists(os.path.join(ROOT, p)), p
    return check


def _installs():
    """`pip install .` installs the `raymerge` command; the test extra (what make install adds)
    holds the docs tools this file runs."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["raymerge"] == "raymerge.cli:entry"
    extra = " ".join(project["optional-dependencies"]["test"])
    for package in ("ray[default]", "mkdocs", "mkdocs-material", "mkdocstrings[python]"):
        assert package in extra, package
    _make_target("install")()
    assert "CONSTRAINTS ?= constraints.txt" in _file("Makefile")


def _built_by_test_mkdocs():
    assert "test_mkdocs_build_strict" in _file("tests/test_docs.py")


# Examples that do not run here as written, each with how it is checked instead.
NOT_RUN = {
    "pip install .": _installs,
    "make install": _installs,
    "make test": _make_target("test"),  # this very suite
    "make demo": _make_target("demo"),  # examples/demo.py: minutes of training on 2 CPUs
    "make bench": _make_target("bench"),  # an hour, 42 GB of disk
    "make docs": _make_target("docs"),  # mkdocs build --strict: test_mkdocs_build_strict
    # pytest inside pytest: the files (and the -k expression's tests) must exist
    ".venv/bin/python -m pytest -q tests/test_slerp.py tests/test_shards.py":
        _exists("tests/test_slerp.py", "tests/test_shards.py"),
    ".venv/bin/python -m pytest -q tests/test_sweep.py -k recipe":
        _covered_by("tests/test_sweep.py", "test_recipe_equals_t_for_flags_and_the_reference"),
    ".venv/bin/mkdocs serve": _built_by_test_mkdocs,  # a server that runs until stopped
    ".venv/bin/mkdocs build --strict": _built_by_test_mkdocs,
    # a head at http://head:8265: the job path runs for real on a loopback head in test_jobs
    "ray job submit --address http://head:8265 -- raymerge merge /shared/a /shared/b -o /shared/child":
        _covered_by("tests/test_jobs.py", "test_ray_job_submit_good_merge_succeeds"),
    "cluster/local-job.sh parent-a parent-b job-child -t 0.5":
        _covered_by("tests/test_jobs.py", "test_ray_job_submit_good_merge_succeeds"),
    # 64 trials: test_search runs a 16-trial search of the same parents
    "raymerge search parent-a parent-b -o searched --eval heldout.txt --trials 64":
        _covered_by("tests/test_search.py", "test_best_is_its_recipe_and_scores_as_the_table_says"),
    # a bucket: test_object_store merges s3:// parents into s3:// on a local S3 server
    "raymerge merge s3://models/parent-a s3://models/parent-b -o s3://models/child -t 0.5":
        _covered_by("tests/test_object_store.py", "test_s3_parents_and_output_give_the_local_merge"),
    "raymerge merge s3://models/llama-a s3://models/llama-b -o s3://models/child -t 0.5 --address auto":
        _covered_by("tests/test_object_store.py", "test_s3_parents_and_output_give_the_local_merge"),
    # the benchmark parents are 1.9 GB each
    ".venv/bin/python bench/parents.py": _exists("bench/parents.py"),
    ".venv/bin/python bench/measure.py .venv/bin/raymerge merge "
    "'~/.cache/raymerge-bench/llama-0.85b-x1/parent-a' '~/.cache/raymerge-bench/llama-0.85b-x1/parent-b' "
    "-o /tmp/child -t 0.5 --quiet": _exists("bench/measure.py", "bench/parents.py"),
}


@pytest.fixture(scope="module")
def workdir(tiny_parents, ray_head, tmp_path_factory):
    """Where the examples run: parent-a and parent-b are the tiny fixture parents (parent-c and
    parent-d two more fine-tunes of parent-a, for the SLERP family's examples), heldout.txt a
    text in their word-level vocabulary, longer than one scoring window (their 256 positions)."""
    from raymerge.synthetic import build_parent, llama_config

    work = tmp_path_factory.mktemp("docs")
    for name, parent in zip(("parent-a", "parent-b"), tiny_parents):
        os.symlink(parent, work / name)
    config = llama_config(vocab_size=1000)  # the tiny parents' (conftest.py)
    for name, seed in (("parent-c", 3), ("parent-d", 4)):
        build_parent(str(work / name), config, seed=seed, base=(config, 1))
    r = random.Random(0)
    (work / "heldout.txt").write_text(" ".join(f"w{r.randrange(900)}" for _ in range(300)) + "\n")
    return work


def _outputs(args: list[str]) -> list[str]:
    """The model directories a merge or run command writes (one per t of a sweep)."""
    out = args[args.index("-o") + 1]
    if os.path.isfile(os.path.join(out, "config.json")):
        return [out]
    return sorted(os.path.join(out, d) for d in os.listdir(out) if d.startswith(("t-", "w-")))


def run_raymerge(args: list[str]) -> str:
    """One `raymerge` command, in this process, on the session's Ray (a merge attaches to the
    Ray this process has initialised); then every model it wrote must pass `raymerge verify`."""
    from click.testing import CliRunner

    from raymerge.cli import main
    from raymerge.verify import verify

    sigterm = signal.getsignal(signal.SIGTERM)  # the CLI installs its own
    try:
        result = CliRunner().invoke(main, args)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert result.exit_code == 0, f"raymerge {shlex.join(args)}:\n{result.output}{result.exception or ''}"
    if args[0] in ("merge", "run"):
        outputs = _outputs(args)
        assert outputs, f"raymerge {shlex.join(args)} wrote no model"
        for out in outputs:
            assert verify(out) == [], out
    return result.output


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mkdocs"), "build", "--strict",
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "reference/index.html", "api/index.html", "benchmarks/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "MergeOptions" in api and "eval_text" in api, "the API page is generated from the docstrings"


def test_every_example_runs_or_is_listed(workdir, monkeypatch):
    """README.md, then the docs pages, in order, in one directory: a command runs as a user would
    paste it, after the files (`# NAME.yml` blocks) and outputs the text before it made."""
    monkeypatch.chdir(workdir)
    done: set[str] = set()
    seen: set[str] = set()
    ran = {"README.md": 0}
    for doc in _documents():
        for lang, body, line in fenced_blocks(doc):
            where = f"{doc}:{line}"
            first = body.splitlines()[0] if body else ""
            if lang in ("yaml", "yml") and re.fullmatch(r"# (\S+\.ya?ml)", first):
                (workdir / first[2:]).write_text(body)
            elif lang == "python":
                if body not in done:
                    exec(compile(body, where, "exec"), {"__name__": "__docs__"})
                    done.add(body)
                ran[doc] = ran.get(doc, 0) + 1
            elif lang in SHELL:
                for command in commands(body):
                    seen.add(command)
                    words = shlex.split(command)
                    if command in NOT_RUN:
                        NOT_RUN[command]()
                    elif words[0] == "raymerge":
                        if command not in done:  # the same example on two pages runs once
                            run_raymerge(words[1:])
                            done.add(command)
                        ran[doc] = ran.get(doc, 0) + 1
                    else:
                        pytest.fail(f"{where}: `{command}` is neither run by this test nor listed in NOT_RUN")
    assert ran["README.md"] >= 5, ran
    stale = sorted(set(NOT_RUN) - seen)
    assert not stale, f"NOT_RUN lists commands no document shows: {stale}"
    # The quick start's child, verified as the README says.
    assert os.path.isfile(workdir / "child" / "config.json")
    assert [d for d in os.listdir(workdir / "sweep") if d.startswith("t-")] != []
    assert os.path.isfile(workdir / "sweep" / "sweep.parquet")
