"""One S3 bucket seen by two Ray nodes through their own s3fs mounts, all on this machine.

A moto server (``python -m moto.server``) serves the S3 API on 127.0.0.1; a head and a worker
Ray node each run in their own mount namespace (``unshare -m``), where an s3fs-fuse daemon mounts
the bucket at the same path. That path is an empty directory in every other namespace, so what a
node writes there reaches the other node only through the S3 server, as on two real machines
sharing a bucket. ``run_in_node`` runs a command (the raymerge CLI) in a node's namespace, and
``start_in_node`` starts one there; ``S3Mount``, ``read_object`` and ``list_objects`` read the
bucket back independently of both nodes.

Every process here is stopped by the process id it was started with, and every mount made in
this process's namespace is unmounted; the nodes' mounts go with their namespaces.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

from raynodes import RayNode, descendants, free_port

ACCESS_KEY, SECRET_KEY, REGION = "testing", "testing", "us-east-1"


def missing() -> str | None:
    """Why these fixtures cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "not root: unshare -m and FUSE mounts need root"
    for tool in ("s3fs", "unshare", "nsenter", "fusermount", "mountpoint"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install s3fs util-linux)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        return "unshare --mount is refused (no CAP_SYS_ADMIN in this container?)"
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "moto[server] is not installed (pip install -e '.[test]')"
    return None


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard variables that point boto3, pyarrow.fs and the AWS CLI at the test server."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true"}  # no probing for an EC2 instance's role or region


class S3Server:
    """moto's S3 server as a subprocess (not in pytest's process: the nodes and s3fs reach it
    whatever the test process is doing, and its threads cannot hold pytest's GIL)."""

    def __init__(self, log_path: str, env: dict | None = None):
        """``env``: more of moto's settings (``INITIAL_NO_AUTH_ACTION_COUNT=0`` checks credentials)."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **s3_env(self.endpoint), **(env or {})})

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: see {self.log.name}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()  # ListBuckets, unsigned: moto allows it
                return
            except urllib.error.HTTPError:  # an answer all the same (a server that checks credentials)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"moto server did not answer in {timeout} s: see {self.log.name}")

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=name)

    def stop(self) -> None:
        self.proc.kill()  # moto keeps everything in memory: nothing to flush
        self.proc.wait(timeout=30)
        self.log.close()


def s3fs_argv(bucket: str, mountpoint: str, endpoint: str, passwd_file: str) -> list[str]:
    """s3fs in the foreground (``-f``: the process we start is the daemon, so we can stop it).
    moto needs path-style requests (``bucket.127.0.0.1`` does not resolve) and a region for the
    signature; the stat cache is left as deployed s3fs has it (900 s)."""
    return ["s3fs", bucket, mountpoint, "-f", "-o", f"url={endpoint}", "-o", "use_path_request_style",
            "-o", f"endpoint={REGION}", "-o", f"passwd_file={passwd_file}", "-o", "dbglevel=warn"]


def write_passwd_file(path: str) -> str:
    # s3fs refuses a password file others can read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    return path


def is_mount(path: str) -> bool:
    """Whether ``path`` is a mount point in this process's mount namespace."""
    return subprocess.run(["mountpoint", "-q", path]).returncode == 0


class S3Mount:
    """The bucket mounted by s3fs in this process's namespace at a fresh directory, as a context
    manager: a mount made after the fact, with no cache from the nodes' mounts."""

    def __init__(self, bucket: str, endpoint: str, passwd_file: str, log_path: str, timeout: float = 30):
        self.path = tempfile.mkdtemp(prefix="raymerge-s3mount-")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(s3fs_argv(bucket, self.path, endpoint, passwd_file),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"s3fs did not mount {bucket} at {self.path}: see {self.log.name}")
            time.sleep(0.1)

    def close(self) -> None:
        if is_mount(self.path):
            subprocess.run(["fusermount", "-u", self.path], check=False)  # s3fs -f exits on unmount
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            subprocess.run(["fusermount", "-u", "-z", self.path], check=False)  # a dead daemon's mount
        self.log.close()
        os.rmdir(self.path)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        self.close()


def pyarrow_s3(endpoint: str):
    from pyarrow import fs

    return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION, scheme="http",
                           endpoint_override=endpoint.removeprefix("http://"))


def read_object(endpoint: str, bucket: str, key: str) -> bytes:
    """An object's bytes through pyarrow.fs (what actors reading s3:// URIs use), not s3fs."""
    with pyarrow_s3(endpoint).open_input_stream(f"{bucket}/{key}") as f:
        return f.read()


def list_objects(endpoint: str, bucket: str, prefix: str) -> dict[str, int]:
    """The objects under ``prefix/`` (keys relative to it) and their sizes, through pyarrow.fs:
    what the bucket holds, whatever any s3fs mount has cached. Empty if there are none."""
    from pyarrow import fs

    infos = pyarrow_s3(endpoint).get_file_info(fs.FileSelector(f"{bucket}/{prefix}", recursive=True,
                                                                allow_not_found=True))
    root = f"{bucket}/{prefix}/"
    return {i.path.removeprefix(root): i.size for i in infos if i.type == fs.FileType.File}


def mounted_node(log_path: str, mount_argv: list[str], mountpoint: str, **node_kw) -> RayNode:
    """A Ray node in a mount namespace of its own, where ``mount_argv`` (s3fs -f) has mounted
    ``mountpoint`` before ``ray start`` runs. The shell execs Ray, so ``node.proc`` is the node
    (for ``nsenter``) and the s3fs daemon is its child (``RayNode.stop`` kills it with the node).
    s3fs logs to ``log_path + ".s3fs"``."""
    script = (f'{shlex.join(mount_argv)} >{shlex.quote(log_path)}.s3fs 2>&1 & s3fs=$!; '
              f'for i in $(seq 300); do mountpoint -q {shlex.quote(mountpoint)} && exec "$@"; '
              'kill -0 $s3fs || break; sleep 0.1; done; '
              f'echo s3fs did not mount: see {shlex.quote(log_path + ".s3fs")} >&2; kill $s3fs; exit 1')
    # --propagation private: the mount must not leak into the namespace we came from.
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    return RayNode(log_path, wrap=wrap, **node_kw)


def run_in_node(node: RayNode, argv: list[str], env: dict | None = None, timeout: float = 600,
                ) -> subprocess.CompletedProcess:
    """Run ``argv`` in ``node``'s mount namespace (it sees the node's s3fs mount), with this
    process's environment plus ``env`` (pass ``BucketCluster.env`` for s3:// URIs); output
    captured as text."""
    return subprocess.run(["nsenter", "-t", str(node.proc.pid), "-m", "--", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def start_in_node(node: RayNode, argv: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    """Start ``argv`` in ``node``'s mount namespace, in a session of its own (kill it with
    ``os.killpg(proc.pid, ...)``), its output to ``log_path``; otherwise as ``run_in_node``."""
    with open(log_path, "w") as log:  # the child has its own copy of the descriptor
        return subprocess.Popen(["nsenter", "-t", str(node.proc.pid), "-m", "--", *argv], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})


def s3fs_open_files(node: RayNode) -> list[str]:
    """The temporary files the node's s3fs daemon holds: one for each file open on its mount,
    kept until the file is released (closed by every process) and what was written to it is
    uploaded. None: the bucket holds everything written on this node, even by a killed process
    (whose files the kernel releases after it is gone)."""
    held = []
    for pid in descendants(node.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(b"s3fs\0"):
                    continue
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        held += [link for link in links if os.path.basename(link).startswith("s3fstmp.")]
    return held


@dataclass
class BucketCluster:
    endpoint: str           # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str]     # AWS_* for boto3 / pyarrow.fs / the AWS CLI
    passwd_file: str        # s3fs's KEY:SECRET file, for more mounts (S3Mount)
    mount: str              # where both nodes (and nothing else) have the bucket mounted
    head: RayNode           # resources {"node_a": 1}, 1 CPU
    worker: RayNode         # resources {"node_b": 1}, 1 CPU
    workdir: str            # logs: moto.log, head.log(.s3fs), worker.log(.s3fs)

    @property
    def address(self) -> str:
        return self.head.address


@contextmanager
def bucket_cluster(workdir: str, bucket: str = "raymerge-test"):
    """Start the S3 server, the bucket, and the two mounted nodes; stop all of them on exit."""
    server = S3Server(os.path.join(workdir, "moto.log"))
    nodes: list[tuple[RayNode, str | None]] = []  # each node, and its mount namespace once known
    mount = tempfile.mkdtemp(prefix="raymerge-bucket-")  # the mount point exists everywhere, empty
    left: list[int] = []
    try:
        server.wait_ready()
        server.create_bucket(bucket)
        passwd = write_passwd_file(os.path.join(workdir, "s3fs.passwd"))
        argv = s3fs_argv(bucket, mount, server.endpoint, passwd)
        env = s3_env(server.endpoint)
        for name, resource in (("head", "node_a"), ("worker", "node_b")):
            peer = {"head": False, "address": nodes[0][0].address} if nodes else {}
            node = mounted_node(os.path.join(workdir, f"{name}.log"), argv, mount, num_cpus=1,
                                resources=f'{{"{resource}": 1}}', env=env, dashboard=False, **peer)
            nodes.append((node, None))
            node.wait_ready()  # by now unshare has made the namespace and sh has exec-ed Ray
            nodes[-1] = (node, _mount_ns(node.proc.pid))
        assert not is_mount(mount), f"{mount} is mounted in the test's own namespace: the unshare leaked"
        (head, _), (worker, _) = nodes
        yield BucketCluster(server.endpoint, bucket, env, passwd, mount, head, worker, workdir)
    finally:
        for node, ns in reversed(nodes):
            node.stop()
            left += _empty_namespace(ns) if ns else []
        server.stop()
        os.rmdir(mount)  # fails if anything is still mounted there
    assert not left, f"processes {left} were left in the nodes' mount namespaces (killed them)"


def _mount_ns(pid: int) -> str:
    ns = os.readlink(f"/proc/{pid}/ns/mnt")  # "mnt:[inode]"
    assert ns != os.readlink("/proc/self/ns/mnt"), "the node runs in the test's own mount namespace"
    return ns


def _in_namespace(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                pids.append(int(entry))
        except OSError:  # gone, or a zombie (its namespaces are already released)
            pass
    return pids


def _empty_namespace(ns: str, timeout: float = 10) -> list[int]:
    """Wait until no process is left in a node's namespace (then it, and its s3fs mount, are
    gone); kill any still there, and return them. RayNode.stop kills the processes it saw, s3fs
    among them, but one spawned after it last looked would keep the namespace alive. Only this
    fixture's processes can be in a namespace this fixture created."""
    deadline = time.monotonic() + timeout
    while (left := _in_namespace(ns)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
