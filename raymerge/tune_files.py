"""The filesystem Tune writes a search's records through: every file whole, or not at all.

Tune rewrites its experiment state (``experiment_state-*.json``, the searcher's pickle, the trials'
results) under ``OUT/.raymerge/tune`` at every checkpoint, copying each file over the last one from
its staging directory, on a thread, while the next save may already be rewriting the staging
file. A search killed in the middle of a copy (``kill -9``, a lost node), or a copy of a staging
file being rewritten, left the record cut short, and ``--resume`` then failed on it. Tune writes
through the ``pyarrow.fs`` filesystem it is given (``RunConfig(storage_filesystem=...)``); this one
is the local filesystem, except that a file is written under a temporary name beside its own,
synced, and renamed over it when complete, and a record Tune restores from (its experiment state,
JSON; its searcher's and callbacks' state, pickles) only if it reads back: a reader finds the
previous whole record or the new one.

Example:
    >>> import tempfile, os
    >>> fs = whole_files()
    >>> path = os.path.join(tempfile.mkdtemp(), "state.json")
    >>> with fs.open_output_stream(path) as f:
    ...     _ = f.write(b"{}")
    ...     os.path.exists(path)
    False
    >>> open(path).read()
    '{}'
"""

from __future__ import annotations

import io
import json
import os
import pickle
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

PARTIAL = ".partial"  # a file being written (left by a kill: never read, and matches none of Tune's names)


class _Replacing(io.FileIO):
    """A new file at a temporary name beside ``path``, moved onto ``path`` once closed."""

    def __init__(self, path: str):
        self.final = path
        super().__init__(f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}", "wb")

    def close(self) -> None:
        if self.closed:
            return
        os.fsync(self.fileno())
        super().close()
        if _reads_back(self.final, self.name):
            os.replace(self.name, self.final)
        else:  # a copy of a staging file caught mid-rewrite: the last whole record stays
            os.remove(self.name)


def _reads_back(final: str, written: str) -> bool:
    """Whether ``written`` is whole, for the records Tune restores from (other files: always)."""
    name = os.path.basename(final)
    try:
        if name.startswith("experiment_state-") and name.endswith(".json"):
            with open(written) as f:
                json.load(f)
        elif name.endswith(".pkl"):
            with open(written, "rb") as f:
                pickle.load(f)
    except Exception:  # noqa: BLE001 - cut short: any error of JSON or of unpickling
        return False
    return True


class WholeFiles(pafs.FileSystemHandler):
    """``pyarrow.fs.LocalFileSystem`` whose written files appear whole (see the module)."""

    def __init__(self):
        self.local = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, WholeFiles)

    def get_type_name(self) -> str:
        return "raymerge-whole-files"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the filesystem's root")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        with self.local.open_input_stream(src) as f, self.open_output_stream(dest, None) as out:
            while chunk := f.read(2**20):
                out.write(chunk)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Replacing(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)


def whole_files() -> pafs.FileSystem:
    """The filesystem for ``RunConfig(storage_filesystem=...)`` and ``Tuner.restore``."""
    return pafs.PyFileSystem(WholeFiles())
