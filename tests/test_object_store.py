"""Parents and outputs as object-store URIs (``s3://``) on a local S3 server (moto), merged by the
session's Ray head: the same bytes as a merge on local disk, a resume in the bucket, and one-line
refusals (missing bucket, bad credentials, a parent without weights, an upload refused midway)
that leave nothing in the bucket that looks like a model."""

from __future__ import annotations

import http.client
import json
import os
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import raymerge
from raymerge import storage
from buckets import S3Server, pyarrow_s3, s3_env

SHARD = "200KB"  # the tiny parents' ~560 KB of tensors in four shards
PROVENANCE = {"raymerge.json", "README.md"}  # they name the parents' paths, which differ


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_parents):
    """A moto S3 server with bucket ``models`` holding the tiny parents under ``parents/a``, ``parents/b``."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("moto[server] is not installed")
    server = S3Server(str(tmp_path_factory.mktemp("s3") / "moto.log"))
    try:
        server.wait_ready()
        server.create_bucket("models")
        fs = pyarrow_s3(server.endpoint)
        for label, parent in zip("ab", tiny_parents):
            for name in os.listdir(parent):
                with open(os.path.join(parent, name), "rb") as f, fs.open_output_stream(f"models/parents/{label}/{name}") as o:
                    o.write(f.read())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_merge(tiny_parents, ray_head, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "child")
    raymerge.merge(*tiny_parents, out, t=0.4, max_shard_size=SHARD, workers=2)
    return out


def _objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``bucket/prefix``, by its key below the prefix."""
    from pyarrow import fs as pafs

    fs = pyarrow_s3(endpoint)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                found[info.path[len(prefix) + 1:]] = f.read()
    return found


def _s3_env(monkeypatch, endpoint: str) -> None:
    """The standard AWS variables pointing at ``endpoint`` (nothing raymerge-specific), and no
    filesystem kept from another server."""
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_filesystems", {})


def _merge(cli, monkeypatch, endpoint: str, *args):
    """The CLI, in this process, with the AWS variables pointing at ``endpoint``. The session's
    Ray head has none of them: the driver hands them to the actors."""
    _s3_env(monkeypatch, endpoint)
    return cli("merge", *args, "-t", "0.4", "--max-shard-size", SHARD, "--workers", "2", "--quiet")


def _same_as_local(objects: dict[str, bytes], local: str) -> None:
    expected = {n for n in os.listdir(local) if n not in PROVENANCE}
    assert expected <= set(objects), sorted(expected - set(objects))
    assert not [k for k in objects if k.startswith(".raymerge")], "the merge's state is removed at the end"
    for name in sorted(expected):
        with open(os.path.join(local, name), "rb") as f:
            assert objects[name] == f.read(), f"{name} differs from the local merge"
    shards = json.loads(objects["raymerge.json"])["shards"]
    for name, record in shards.items():
        assert record["size"] == len(objects[name]) and record["crc32"] == zlib.crc32(objects[name]), name
        assert set(record["writer"]) == {"host", "pid", "node"}


def test_s3_parents_and_output_give_the_local_merge(s3, cli, monkeypatch, local_merge):
    """Parents read by ranged GETs, shards uploaded by the actors, the small files by the driver:
    byte for byte what a merge on local disk writes; ``raymerge verify`` reads it in place."""
    done = _merge(cli, monkeypatch, s3.endpoint, "s3://models/parents/a", "s3://models/parents/b", "-o",
                  "s3://models/child")
    assert done.returncode == 0, done.stderr
    _same_as_local(_objects(s3.endpoint, "models/child"), local_merge)
    _s3_env(monkeypatch, s3.endpoint)
    verified = cli("verify", "s3://models/child")
    assert verified.returncode == 0 and verified.stdout == "s3://models/child: ok\n", verified.stderr


class _RefusingProxy:
    """An HTTP proxy in front of the S3 server that refuses (403 AccessDenied, as a bucket policy
    or a quota would) every upload request whose key contains ``refuse``; the rest passes through."""

    def __init__(self, upstream: str, refuse: str):
        host = upstream.removeprefix("http://")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return body

            def _forward(self):
                body = self._body()
                if self.command in ("PUT", "POST") and refuse in self.path:
                    error = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(host, timeout=60)
                # The body is read already: forward it whole (no 100-continue handshake upstream).
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("expect", "connection", "transfer-encoding", "content-length")}
                conn.request(self.command, self.path, body, headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                # A HEAD answers with the object's length, and no body.
                length = reply.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_an_upload_refused_midway_leaves_no_model_and_resumes(s3, cli, monkeypatch, local_merge):
    """The bucket refuses one shard's upload after others are done: one line, exit 1, no
    config.json and no shard without its completion record in the bucket; ``--resume`` (the
    bucket writable again) keeps the recorded shards and completes the same bytes."""
    proxy = _RefusingProxy(s3.endpoint, refuse="model-00003-of-00004")
    try:
        failed = _merge(cli, monkeypatch, proxy.endpoint, "s3://models/parents/a", "s3://models/parents/b", "-o",
                        "s3://models/resumed")
    finally:
        proxy.close()
    assert failed.returncode == 1
    [line] = failed.stderr.strip().splitlines()[-1:]
    assert line.startswith("raymerge: error: s3://models/resumed/model-00003-of-00004.safetensors:") \
        and "ACCESS_DENIED" in line, failed.stderr
    left = _objects(s3.endpoint, "models/resumed")
    assert "config.json" not in left
    shards = {k for k in left if k.endswith(".safetensors")}
    recorded = {k[len(".raymerge/done/"):-len(".json")] for k in left if k.startswith(".raymerge/done/")}
    assert shards == recorded, "every shard left behind has its completion record"
    resumed = _merge(cli, monkeypatch, s3.endpoint, "s3://models/parents/a", "s3://models/parents/b", "-o",
                     "s3://models/resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_as_local(_objects(s3.endpoint, "models/resumed"), local_merge)


@pytest.fixture(scope="module")
def locked_s3(tmp_path_factory):
    """An S3 server that checks credentials (moto's IAM: the test keys are unknown to it)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("moto[server] is not installed")
    server = S3Server(str(tmp_path_factory.mktemp("locked") / "moto.log"), env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["missing bucket", "bad credentials", "no weights", "missing parent"])
def test_refusals_are_one_line_and_leave_no_model(s3, locked_s3, cli, monkeypatch, tiny_parents, case):
    a, b = tiny_parents
    endpoint, out = s3.endpoint, "s3://models/refused"
    if case == "missing bucket":
        args, expected = (a, b, "-o", "s3://no-such-bucket/child"), "output s3://no-such-bucket/child: no such bucket"
    elif case == "bad credentials":
        endpoint = locked_s3.endpoint
        args, expected = ("s3://models/parents/a", b, "-o", out), "parent A: cannot list s3://models/parents/a"
    elif case == "no weights":
        fs = pyarrow_s3(endpoint)
        with fs.open_output_stream("models/config-only/config.json") as f:
            f.write(open(os.path.join(a, "config.json"), "rb").read())
        args, expected = ("s3://models/config-only", b, "-o", out), "s3://models/config-only: no weights found"
    else:
        args, expected = (a, "s3://models/parents/nothing", "-o", out), "parent B: s3://models/parents/nothing holds nothing"
    proc = _merge(cli, monkeypatch, endpoint, *args)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"raymerge: error: {expected}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not _objects(s3.endpoint, "models/refused"), "nothing written"


def test_reading_ahead_from_a_bucket_gives_the_bytes_and_every_buffer_back(s3, tiny_parents, monkeypatch):
    """The read-ahead fetches a bucket's tensors several at once: each is the parent's tensor,
    and every buffer lent for them is returned, also when a fetch fails (an object cut short)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from raymerge import storage
    from raymerge.options import MergeOptions
    from raymerge.parents import load_parent
    from raymerge.plan import build_plan
    from raymerge.readahead import Buffers, ReadAhead

    for k, v in s3_env(s3.endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_filesystems", {})  # this server's, not another test's
    a, b = "s3://models/parents/a", "s3://models/parents/b"
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), MergeOptions(a=a, b=b, out="unused"), 1)
    local = load_file(os.path.join(tiny_parents[0], "model.safetensors"))
    buffers = Buffers()
    with ReadAhead(plan.tensors, buffers) as ahead:
        for i, t in enumerate(plan.tensors):
            assert ahead.take(i)[(t.a.file, t.a.name)].equal(local[t.name]), t.name
    assert buffers.lent_bytes == 0
    cut = list(plan.tensors)
    cut[3] = replace(cut[3], a=replace(cut[3].a, start=cut[3].a.start + 10**9, end=cut[3].a.end + 10**9))
    with pytest.raises(OSError):
        with ReadAhead(cut, buffers) as ahead:
            for i in range(len(cut)):
                ahead.take(i)
    assert buffers.lent_bytes == 0


def test_small_files_are_written_in_place_where_rename_is_refused(tmp_path, monkeypatch):
    """A bucket mounted with mountpoint-s3 has no rename (ENOSYS): completion records, configs and
    tokenizer files are then written in place, leaving no temporary file. (mountpoint-s3 is not
    packaged for this machine: its refusal is reproduced here.) Any other failure is raised."""
    import errno

    from raymerge import storage

    def no_rename(src, dst):
        raise OSError(errno.ENOSYS, "Function not implemented", src)

    monkeypatch.setattr(os, "replace", no_rename)
    storage.write_bytes(str(tmp_path / "config.json"), b"{}\n")
    assert os.listdir(tmp_path) == ["config.json"] and (tmp_path / "config.json").read_bytes() == b"{}\n"

    def denied(src, dst):
        raise OSError(errno.EACCES, "Permission denied", src)

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        storage.write_bytes(str(tmp_path / "other.json"), b"{}\n")


def test_actors_get_the_credentials_only_where_a_path_is_a_uri(monkeypatch):
    """A merge of local paths gives its actors no runtime_env, whatever AWS_* the shell holds (an
    actor with one never takes a worker Ray started ahead); a parent or OUT in a bucket gives them
    the driver's object-store variables."""
    from raymerge.family import FamilyMethod
    from raymerge.options import MergeOptions

    monkeypatch.setenv("AWS_PROFILE", "merger")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/keys/merger.json")
    local = MergeOptions(a="/models/a", b="org/b", out="/models/out").cluster
    assert not local.object_storage and storage.actor_runtime_env(local.object_storage) is None
    for paths in (("s3://bucket/a", "/models/b", "/models/out"), ("/models/a", "/models/b", "gs://bucket/out")):
        cluster = MergeOptions(a=paths[0], b=paths[1], out=paths[2]).cluster
        env = storage.actor_runtime_env(cluster.object_storage)["env_vars"]
        assert cluster.object_storage and env["AWS_PROFILE"] == "merger", paths
        assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/keys/merger.json"
    family = MergeOptions(a="/models/a", b="/models/b", more=("/models/c",), out="/models/out",
                          base="s3://bucket/base", family=FamilyMethod("multislerp", base=True)).cluster
    assert family.object_storage, "a base model in a bucket counts too"
