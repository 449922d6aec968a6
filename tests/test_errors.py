"""The one-line error contract, for failures no check foresaw: whatever the CLI meets (a Ray
error, a private Ray API that changed, a bug), it ends with one `raymerge: error:` line and exit
status 1; `--debug` shows the traceback."""

from __future__ import annotations

import json

import pytest

from raymerge import cli, placement


def test_an_unforeseen_error_is_one_line_naming_its_type(tiny_parents, ray_head, tmp_path, capfd, monkeypatch):
    import raymerge.driver

    def broken(options, session):
        raise RuntimeError("the actor pool is gone\n  (a second line Ray would add)")

    monkeypatch.setattr(raymerge.driver, "merge", broken)
    a, b = tiny_parents
    args = ["merge", a, b, "-o", str(tmp_path / "out"), "--quiet"]
    assert cli.run(args) == 1
    err = capfd.readouterr().err
    assert err == ("raymerge: error: RuntimeError: the actor pool is gone (rerun with --debug for the "
                   "traceback)\n"), err
    with pytest.raises(RuntimeError, match="the actor pool is gone"):
        cli.run([*args, "--debug"])


@pytest.mark.parametrize("report", [RuntimeError("no such key"), b"not json", json.dumps([1, 2]).encode(),
                                    json.dumps({"autoscaler_report": {"node_type_mapping": [1],
                                                                      "pending_nodes": [7]}}).encode()],
                         ids=["api-raises", "not-json", "a-list", "other-shape"])
def test_a_changed_private_ray_api_means_no_autoscaler_not_a_crash(report, ray_head, monkeypatch):
    """What raymerge reads through Ray's private API (the autoscaler's report in the GCS) may be
    missing or shaped otherwise in another Ray: the merge then knows of no autoscaler."""
    import ray.experimental.internal_kv as internal_kv

    def get(key, *args, **kwargs):
        if isinstance(report, Exception):
            raise report
        return report

    monkeypatch.setattr(internal_kv, "_internal_kv_get", get)
    assert placement.cluster_autoscales() is False
    assert placement._launching() == ""


def test_a_head_just_started_is_asked_again_until_its_monitor_reports(ray_head, monkeypatch):
    """Right after a head starts, Ray's monitor has published no report yet: that is not a fixed
    cluster. The answer waits for the first report (a GPU merge sent to an autoscaling head
    seconds after it started was refused as if no autoscaler could add GPU nodes)."""
    import ray.experimental.internal_kv as internal_kv

    # Its first statuses may also come before its autoscaler's first round: load metrics only.
    early = json.dumps({"load_metrics_report": {"usage": {}}}).encode()
    reports = iter([None, early, early, json.dumps({"autoscaler_report": {"node_type_mapping": {
        "0a1b": "ray.head.default", "2c3d": "gpu_workers"}}}).encode()])
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, *a, **kw: next(reports))
    assert placement.cluster_autoscales() is True
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, *a, **kw: None)
    monkeypatch.setattr(placement, "FIRST_REPORT_S", 0.6)
    assert placement.cluster_autoscales() is False, "no report within FIRST_REPORT_S: a fixed cluster"
