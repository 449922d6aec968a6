"""Where models live: local paths, and object-store URIs (``s3://``, ``gs://``) through pyarrow.fs.

Every function takes a local path or a URI. URIs go through ``pyarrow.fs.FileSystem.from_uri``,
so credentials and endpoints come from the standard environment as pyarrow reads it
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for
S3-compatible stores; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS), on the driver and on every
actor alike. An object store has no directories and no rename: a "directory" is a key prefix,
and an object appears whole when its upload completes (``open_output``), never before.

Example:
    >>> join("s3://bucket/model", "config.json")
    's3://bucket/model/config.json'
    >>> is_uri("/data/model"), is_uri("gs://bucket/model")
    (False, True)
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

SCHEMES = ("s3://", "gs://", "gcs://")
READ_CHUNK = 16 * 2**20  # bytes per ranged read of an object
READS_IN_FLIGHT = 4  # ranged reads of one object at once: a single GET rarely fills the network

# The standard variables that configure object-store clients (pyarrow's, like the AWS and Google
# SDKs'): the driver hands those it has to its actors, wherever Ray places them.
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_")

_filesystems: dict[str, object] = {}  # one pyarrow filesystem per scheme and bucket
_lock = threading.Lock()


def actor_runtime_env(object_storage: bool) -> dict | None:
    """A Ray ``runtime_env`` that gives actors this process's object-store configuration (its
    AWS_*, GOOGLE_* and GCS_* variables) when the run reads or writes object storage (a parent or
    OUT is a URI); otherwise, or when it has none, None.

    Only when needed: Ray starts a worker of its own for an actor with a runtime env, instead of
    one of those it started ahead (which an embedded Ray has import torch while the driver plans),
    and a shell's AWS_PROFILE or AWS_CA_BUNDLE would cost every local merge that start (~2 s)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES)} if object_storage else {}
    return {"env_vars": env} if env else None


def is_uri(path: str) -> bool:
    return path.startswith(SCHEMES)


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(root, *parts)


def normalize(path: str) -> str:
    """A URI without a trailing slash or dot segments; a local path made absolute and real."""
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest).lstrip('/')}"
    return os.path.realpath(path)


def within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (URIs compared as keys, paths resolved)."""
    path, root = normalize(path), normalize(root)
    sep = "/" if is_uri(root) else os.sep
    return path == root or path.startswith(root.rstrip(sep) + sep)


def describe(error: OSError) -> str:
    """An object store's error in one line, without its request id: ``AWS Error NO_SUCH_BUCKET
    during HeadObject operation: The specified bucket does not exist``."""
    text = error.strerror or str(error)
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return re.sub(r"\s*\(Request ID: [^)]*\)", "", text)


def _resolve(uri: str):
    """(pyarrow filesystem, its path) for a URI; one filesystem per scheme and bucket."""
    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    key = f"{scheme}://{rest.split('/', 1)[0]}"
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            fs, _ = pafs.FileSystem.from_uri(uri)
            _filesystems[key] = fs
    return fs, posixpath.normpath(rest).lstrip("/")


def _info(uri: str):
    fs, path = _resolve(uri)
    return fs.get_file_info(path)


def bucket_exists(uri: str) -> bool:
    """Whether the URI's bucket exists (and these credentials may see it)."""
    import pyarrow.fs as pafs

    fs, key = _resolve(uri)
    return fs.get_file_info(key.split("/", 1)[0]).type != pafs.FileType.NotFound


def isfile(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def size(path: str) -> int:
    if not is_uri(path):
        return os.path.getsize(path)
    info = _info(path)
    if info.size is None:
        raise FileNotFoundError(2, "No such file or directory", path)
    return info.size


def mtime_ns(path: str) -> int:
    if not is_uri(path):
        return os.stat(path).st_mtime_ns
    return _info(path).mtime_ns or 0


def listdir(path: str) -> list[str]:
    """Names directly under ``path`` (an empty list when there is nothing, or no such directory)."""
    if not is_uri(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    import pyarrow.fs as pafs

    fs, key = _resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos)


def makedirs(path: str) -> None:
    """Create a local directory and its parents; a no-op for URIs (keys need no directories)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Remove a file or object if it exists."""
    if not is_uri(path):
        if os.path.exists(path):
            os.remove(path)
        return
    if isfile(path):
        fs, key = _resolve(path)
        fs.delete_file(key)


def rmtree(path: str) -> None:
    """Remove a directory tree, or every object under a prefix, if there is one."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    import pyarrow.fs as pafs

    fs, key = _resolve(path)
    if fs.get_file_info(key).type == pafs.FileType.Directory:
        fs.delete_dir(key)  # every key under the prefix, and pyarrow's directory markers


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, key = _resolve(path)
    with fs.open_input_stream(key) as f:
        return f.read()


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes from ``offset`` (fewer at the end of the file)."""
    if not is_uri(path):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    fs, key = _resolve(path)
    with fs.open_input_file(key) as f:
        return f.read_at(length, offset)


def open_input(path: str):
    """An object opened for ranged reads (``read_into``): open it once, read it many times."""
    fs, key = _resolve(path)
    return fs.open_input_file(key)


def read_into(f, offset: int, view: memoryview) -> None:
    """Fill ``view`` with an opened object's bytes from ``offset``: large ranged reads, several
    in flight for a large range (a single GET rarely fills the network)."""
    def read(pos: int) -> None:
        n = min(READ_CHUNK, len(view) - pos)
        data = f.read_at(n, offset + pos)
        if len(data) != n:
            raise OSError(f"unexpected end of object at byte {offset + pos + len(data)}")
        view[pos:pos + n] = data

    starts = range(0, len(view), READ_CHUNK)
    if len(starts) == 1:
        read(0)
        return
    with ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="raymerge-get") as pool:
        list(pool.map(read, starts))


# What a file system without rename answers (mountpoint-s3: ENOSYS or EOPNOTSUPP; others EPERM).
NO_RENAME = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EXDEV}


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file whole: locally under a temporary name, synced, then renamed into place
    (where the file system cannot rename, a mounted bucket, written in place: a reader that finds
    it cut short, a JSON record or config, refuses it); to an object store as one upload, which
    appears whole or not at all."""
    if not is_uri(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        _write_synced(tmp, data)
        try:
            os.replace(tmp, path)
        except OSError as e:
            if e.errno not in NO_RENAME:
                raise
            os.remove(tmp)
            _write_synced(path, data)
        return
    fs, key = _resolve(path)
    with fs.open_output_stream(key) as f:
        f.write(data)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def open_output(path: str):
    """A stream that uploads an object as it is written (multipart, in the background); the
    object appears when the stream is closed."""
    fs, key = _resolve(path)
    return fs.open_output_stream(key)


def upload_tree(local_dir: str, uri: str, last: str | None = None) -> None:
    """Upload a local directory's files under ``uri``, ``last`` (e.g. config.json) after all others."""
    names = sorted(n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n)))
    for name in [n for n in names if n != last] + [n for n in names if n == last]:
        with open(os.path.join(local_dir, name), "rb") as f:
            write_bytes(join(uri, name), f.read())


def download_tree(uri: str, local_dir: str) -> None:
    """Copy the files directly under ``uri`` into a local directory."""
    for name in listdir(uri):
        if isfile(join(uri, name)):
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(read_bytes(join(uri, name)))
