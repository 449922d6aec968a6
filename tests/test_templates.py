"""The cluster templates parse and carry the fields their schemas require."""

import os

import yaml

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster")


def _load_all(name):
    with open(os.path.join(ROOT, name)) as f:
        return list(yaml.safe_load_all(f))


def test_cluster_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _load_all("ray-cluster.yaml")
    # What `ray up` does: fill in the provider's defaults, then check against ray-schema.json.
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values()), "GPU workers"
    setup = "\n".join(config["setup_commands"])
    assert "mount" in setup and "raymerge" in setup


def test_rayjob_has_head_gpu_workers_and_a_shared_claim():
    pvc, job = _load_all("rayjob.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("raymerge merge ")
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["name"] and container["image"].startswith("rayproject/ray:")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]]
        assert claims == [pvc["metadata"]["name"]]
        assert container["volumeMounts"][0]["name"] == pod["spec"]["volumes"][0]["name"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert "rayStartParams" in cluster["headGroupSpec"]


def test_ci_workflow_submits_a_merge():
    (wf,) = _load_all("ci-submit.yml")
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    assert on and wf["jobs"]
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    assert any("ray job submit" in s.get("run", "") and "raymerge merge" in s.get("run", "") for s in steps)
