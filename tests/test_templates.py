"""The cluster templates against their schemas (cluster/schemas/README.md says which, from where),
and the parts of them that run here: the image's install, the CI workflow's scripts, the wait for
GPU workers."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "cluster")
SCHEMAS = os.path.join(ROOT, "schemas")


def _load_all(name):
    with open(os.path.join(ROOT, name)) as f:
        return list(yaml.safe_load_all(f))


def _errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# --- the cluster launcher (ray up) -------------------------------------------------------------

def _launcher_config():
    (config,) = _load_all("ray-cluster.yaml")
    return config


def test_cluster_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    # What `ray up` does: fill in the provider's defaults, then check against ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 2
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_cluster_launcher_starts_its_gpu_workers_with_token_auth():
    config = _launcher_config()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "GPU workers"
    for t in gpu_types:
        # raymerge sizes a merge from live nodes: GPU workers that only an autoscaler would add
        # (min_workers 0) are never asked for, and the merge runs on the head's CPUs.
        assert t["min_workers"] == t["max_workers"] > 0
    assert config["max_workers"] >= sum(t["min_workers"] for t in types.values())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert [c for c in starts if "ray start" in c] == [c for c in starts if "RAY_AUTH_MODE=token ray start" in c]
    assert all("0.0.0.0" not in c for c in starts), "the dashboard stays on the head's loopback"
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    checkout = config["file_mounts"]["/home/ubuntu/raymerge"]
    assert os.path.isfile(os.path.join(REPO, checkout, "pyproject.toml")), "run from the checkout's root"
    assert config["rsync_filter"] == [".gitignore"] and ".git" in config["rsync_exclude"]
    setup = "\n".join(config["setup_commands"])
    assert "mount" in setup and "/home/ubuntu/raymerge" in setup and "export RAY_AUTH_MODE=token" in setup


def _wait_resources(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "wait-resources.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_wait_resources_returns_once_the_cluster_has_them(ray_head):
    proc = _wait_resources("CPU=1", "--address", ray_head.address)
    assert proc.returncode == 0, proc.stderr
    assert "wait-resources: the cluster has CPU=1" in proc.stdout


def test_wait_resources_gives_up_at_its_timeout(ray_head):
    proc = _wait_resources("CPU=1", "GPU=2", "--timeout", "2", "--address", ray_head.address)
    assert proc.returncode == 1
    assert "still short of GPU=2 after 2 s (the cluster has CPU=1, GPU=0)" in proc.stderr, proc.stderr


# --- Kubernetes: the RayJob and its volume claim ------------------------------------------------

def _strict(schema):
    """Refuse fields a CRD schema does not name, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def kubernetes():
    with open(os.path.join(SCHEMAS, "kubernetes-v1.35.json")) as f:
        bundle = json.load(f)
    registry = Registry().with_resource(bundle["$id"], Resource.from_contents(bundle))

    def validator(schema):
        return jsonschema.Draft202012Validator(schema, registry=registry)

    with open(os.path.join(SCHEMAS, "kuberay-rayjob-v1.yaml")) as f:
        rayjob = validator(_strict(yaml.safe_load(f)["openAPIV3Schema"]))
    pvc = validator({"$ref": bundle["$id"] + "#/$defs/io.k8s.api.core.v1.PersistentVolumeClaim"})
    return rayjob, pvc


def test_rayjob_and_claim_pass_kuberay_and_kubernetes_schemas(kubernetes):
    rayjob, pvc = kubernetes
    claim, job = _load_all("rayjob.yaml")
    assert _errors(pvc, claim) == []
    assert _errors(rayjob, job) == []


@pytest.mark.parametrize("where,field,value", [
    (("spec",), "activeDeadline", 60),                                    # a misspelt RayJob field
    (("spec", "rayClusterSpec", "authOptions"), "mode", "tokens"),        # not in the enum
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
     "tolerations", []),                                                  # a pod field on a container
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0), "replicas", "2"),  # a string for an int32
])
def test_rayjob_schema_check_refuses_what_kubernetes_would(kubernetes, where, field, value):
    rayjob, _ = kubernetes
    _, job = _load_all("rayjob.yaml")
    node = job
    for key in where:
        node = node[key]
    node[field] = value
    assert _errors(rayjob, job), f"{'.'.join(map(str, where))}.{field} = {value!r} was accepted"


def test_rayjob_runs_the_image_with_token_auth_gpu_tolerations_and_a_deadline():
    claim, job = _load_all("rayjob.yaml")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("raymerge merge ")
    assert "pip" not in spec.get("runtimeEnvYAML", ""), "raymerge is in the image, not on an index"
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
    assert spec["shutdownAfterJobFinishes"] is True and 0 <= spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["backoffLimit"] == 0
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert "enableInTreeAutoscaling" not in cluster
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and not images.pop().startswith("rayproject/"), "every pod runs cluster/Dockerfile's image"
    for group in groups:
        pod = group["template"]["spec"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]]
        assert claims == [claim["metadata"]["name"]]
        assert pod["containers"][0]["volumeMounts"][0]["name"] == pod["volumes"][0]["name"]
    for group in cluster["workerGroupSpecs"]:
        assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] > 0
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            group["template"]["spec"]["tolerations"]


def test_bucket_rayjob_passes_kuberays_schema_and_needs_no_volume(kubernetes):
    """rayjob-s3.yaml: the same cluster as rayjob.yaml, parents and output in a bucket, the
    credentials from one Secret in every Ray container, and no volume anywhere."""
    rayjob, _ = kubernetes
    [job] = _load_all("rayjob-s3.yaml")
    assert _errors(rayjob, job) == []
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["raymerge", "merge"] and words[2].startswith("s3://") and words[3].startswith("s3://")
    assert words[words.index("-o") + 1].startswith("s3://")
    cluster = job["spec"]["rayClusterSpec"]
    _, plain = _load_all("rayjob.yaml")
    assert cluster["authOptions"] == plain["spec"]["rayClusterSpec"]["authOptions"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert "volumes" not in pod
        for container in pod["containers"]:
            assert "volumeMounts" not in container
            assert container["envFrom"] == [{"secretRef": {"name": "raymerge-s3"}}]


# --- the image (cluster/Dockerfile) -------------------------------------------------------------

def _dockerfile():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    (base,) = [line.split()[1] for line in lines if line.startswith("FROM ")]
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ")]
    sources = [src for args in copies for src in args[:-1] if not src.startswith("--")]
    return base, sources


def test_one_ray_version_everywhere():
    base, _ = _dockerfile()
    (_, job) = _load_all("rayjob.yaml")
    version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert base == f"rayproject/ray:{version}-py311-gpu"
    [bucket_job] = _load_all("rayjob-s3.yaml")
    assert bucket_job["spec"]["rayClusterSpec"]["rayVersion"] == version
    pins = re.findall(r"ray\[default\]==([\w.]+)", "\n".join(_launcher_config()["setup_commands"]))
    (wf,) = _load_all("ci-submit.yml")
    pins += [p for s in _steps(wf) for p in re.findall(r"ray\[default\]==([\w.]+)", s.get("run", ""))]
    assert pins and set(pins) == {version}


def test_the_image_installs_raymerge_from_what_it_copies(tmp_path):
    """The Dockerfile's COPY sources (and only those pass its .dockerignore) are enough to build
    raymerge: the same pip install, without the network (the venv's setuptools)."""
    _, sources = _dockerfile()
    with open(os.path.join(ROOT, "Dockerfile.dockerignore")) as f:
        allowed = [line[1:].rstrip("/\n") for line in f if line.startswith("!")]
    assert sorted(allowed) == sorted(sources)
    src = tmp_path / "raymerge-src"
    src.mkdir()
    for name in sources:
        if os.path.isdir(os.path.join(REPO, name)):
            shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(REPO, name), src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = os.listdir(tmp_path / "wheel")
    with zipfile.ZipFile(tmp_path / "wheel" / wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "raymerge = raymerge.cli:entry" in z.read(entry_points).decode()
    package = os.path.join(REPO, "raymerge")
    files = sorted(os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(package) for f in fs
                   if f.endswith((".py", ".c")))  # the modules and the kernel's source (raymerge/native)
    assert sorted(n for n in names if n.startswith("raymerge/")) == files


# --- the CI workflow ----------------------------------------------------------------------------

def _workflow():
    (wf,) = _load_all("ci-submit.yml")
    wf["on"] = wf.pop(True)  # YAML 1.1 reads a bare `on` as True
    return wf


def _steps(wf):
    return [s for job in wf["jobs"].values() for s in job["steps"]]


def test_ci_workflow_passes_schemastores_schema():
    with open(os.path.join(SCHEMAS, "github-workflow.json")) as f:
        validator = jsonschema.Draft7Validator(json.load(f))
    wf = _workflow()
    assert _errors(validator, wf) == []
    wf["jobs"]["merge"]["timeout"] = 10  # not a job key (timeout-minutes is)
    assert _errors(validator, wf)


def test_ci_workflow_keeps_expressions_out_of_scripts():
    wf = _workflow()
    for step in _steps(wf):
        assert "${{" not in step.get("run", ""), f"an expression inside the script of {step.get('name')!r}"
    (job,) = wf["jobs"].values()
    # Inputs reach the scripts through the job's environment only.
    raw = yaml.safe_dump({k: v for k, v in job.items() if k != "env"})
    assert "inputs." not in raw
    assert {re.sub(r"\s", "", v) for k, v in job["env"].items() if "inputs." in v} == \
        {f"${{{{inputs.{name}}}}}" for name in wf["on"]["workflow_dispatch"]["inputs"]}
    for name in ("JOB_ID", "OUT"):
        assert "${{ github.run_id }}-${{ github.run_attempt }}" in job["env"][name], f"{name} is unique per run attempt"
    assert job["runs-on"] == "self-hosted"


def _job_env(**inputs) -> dict:
    """The job's environment as GitHub would set it for run 123, attempt 2."""
    context = {"github.run_id": "123", "github.run_attempt": "2", "secrets.RAY_JOB_ADDRESS": "http://head:8265",
               "secrets.RAY_AUTH_TOKEN": "t0ken", **{f"inputs.{k}": v for k, v in inputs.items()}}
    (job,) = _workflow()["jobs"].values()
    return {k: re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: context[m.group(1)], v) for k, v in job["env"].items()}


def _run_step(name: str, tmp_path, env: dict, stubs: str = "") -> subprocess.CompletedProcess:
    """Run a step's script as the runner does (`bash --noprofile --norc -eo pipefail`), with
    `ray` and `python` stubs on PATH that log their arguments, one JSON list a line."""
    (step,) = [s for s in _steps(_workflow()) if s.get("name") == name]
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for tool in ("ray", "python"):
        path = bin_ / tool
        path.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(tmp_path / 'calls')!r}, 'a').write(json.dumps([{tool!r}, *sys.argv[1:]]) + '\\n')\n"
                        + stubs)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), **env})


def _calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


GOOD = dict(t="0.5", parent_a="/shared/models/parent-a", parent_b="/shared/models/org/parent-b_v2.1")


@pytest.mark.parametrize("inputs", [GOOD, {**GOOD, "t": "0"}, {**GOOD, "t": "1"}, {**GOOD, "t": "1.0"},
                                    {**GOOD, "t": "0.125"}])
def test_ci_input_check_passes_good_inputs(inputs, tmp_path):
    proc = _run_step("Check the inputs", tmp_path, _job_env(**inputs))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("field,value", [
    ("t", "0.5; touch {pwned}"), ("t", "$(touch {pwned})"), ("t", "`touch {pwned}`"), ("t", "0.5\ntouch {pwned}"),
    ("t", "1.5"), ("t", "-0.5"), ("t", "nan"), ("t", ""), ("t", "0.5 --overwrite"),
    ("parent_a", "/shared/models/a; touch {pwned}"), ("parent_a", "/shared/models/../../etc"),
    ("parent_b", "/etc/passwd"), ("parent_b", "/shared/models/a b"), ("parent_b", "/shared/models/$(touch {pwned})"),
])
def test_ci_input_check_refuses_hostile_inputs(field, value, tmp_path):
    pwned = tmp_path / "pwned"
    proc = _run_step("Check the inputs", tmp_path, _job_env(**{**GOOD, field: value.format(pwned=pwned)}))
    assert proc.returncode != 0
    assert "must be" in proc.stderr
    assert not pwned.exists()


def test_ci_submit_passes_each_value_as_one_argument(tmp_path):
    """Even a value the check would refuse reaches `ray job submit` as one argument, unexpanded
    (Ray then quotes each argument for the head's shell with shlex.join)."""
    pwned = tmp_path / "pwned"
    env = _job_env(**{**GOOD, "t": f"0.5; touch {pwned}"})
    proc = _run_step("Submit the merge and wait for it", tmp_path, env, stubs="print('SUCCEEDED')\n")
    assert proc.returncode == 0, proc.stderr
    submit, status = _calls(tmp_path)
    assert submit == ["ray", "job", "submit", "--submission-id", "raymerge-123-2", "--", "raymerge", "merge",
                      GOOD["parent_a"], GOOD["parent_b"], "-o", "/shared/out/child-123-2", "-t", f"0.5; touch {pwned}"]
    assert status[0] == "python" and status[-1] == "raymerge-123-2"
    assert not pwned.exists()


@pytest.mark.parametrize("status", ["STOPPED", "FAILED"])
def test_ci_submit_fails_unless_the_job_succeeded(status, tmp_path):
    proc = _run_step("Submit the merge and wait for it", tmp_path, _job_env(**GOOD), stubs=f"print({status!r})\n")
    assert proc.returncode != 0


def test_ci_stops_the_job_when_cancelled(tmp_path):
    (step,) = [s for s in _steps(_workflow()) if "ray job stop" in s.get("run", "")]
    assert "cancelled()" in step["if"]
    proc = _run_step(step["name"], tmp_path, _job_env(**GOOD))
    assert proc.returncode == 0, proc.stderr
    assert _calls(tmp_path)[-1] == ["ray", "job", "stop", "raymerge-123-2"]
    # A job that was never submitted: `ray job status` fails, and there is nothing to stop.
    (tmp_path / "calls").unlink()
    proc = _run_step(step["name"], tmp_path, _job_env(**GOOD), stubs="sys.exit(1)\n")
    assert proc.returncode == 0, proc.stderr
    assert [c[:3] for c in _calls(tmp_path)] == [["ray", "job", "status"]]
