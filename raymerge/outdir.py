"""The output directory: refusing unsafe targets, resume state, recording finished shards.

Layout while a merge runs::

    OUT/.raymerge/lock                   held (flock) by the merge writing into OUT, for its life
    OUT/.raymerge/state.json             the plan fingerprint (a resume must match it)
    OUT/.raymerge/done/<shard>.json      a finished shard: each output's size and CRC-32, its writer
    OUT/<sub>/<shard>                    the shards, each written in place by one actor

OUT may be a local directory or an object-store URI (``s3://bucket/child``, storage.py); on a URI
the same layout is a set of keys, and the small files of each output are written locally and
uploaded last, ``config.json`` last of all.

``<sub>`` is ``""`` for one t and ``t-<t>`` for each t of a sweep. A shard is written under its
final name, once, front to back (no rename: mounted buckets such as mountpoint-s3 have none), and
is finished only when its record exists, written after the shard was closed; a resume trusts the
record, never a file's name. ``config.json`` is written last, so a crash leaves nothing that
looks like a model; a merge refused midway (a NaN in a parent tensor) removes every shard it wrote.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable

from raymerge import storage
from raymerge.assemble import PROVENANCE_NAME, fsync_path
from raymerge.errors import InputError
from raymerge.plan import MergePlan

STATE_DIR = ".raymerge"
LOCK_NAME = "lock"


def _json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    storage.write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


class OutputDir:
    """One merge's output directory (a local path or a URI) and the sub-directories of its outputs."""

    def __init__(self, out: str, subdirs: list[str]):
        self.root = storage.normalize(out)
        self.subdirs = subdirs
        self.made = False  # whether this merge created the directory (or replaced it: --overwrite)
        self._lock_fd: int | None = None

    def keeping(self, subdirs: list[str]) -> "OutputDir":
        """This output directory, writing only the outputs ``subdirs`` (those ``--eval`` kept)."""
        kept = copy.copy(self)
        kept.subdirs = list(subdirs)
        return kept

    @property
    def is_uri(self) -> bool:
        return storage.is_uri(self.root)

    @property
    def state_dir(self) -> str:
        return storage.join(self.root, STATE_DIR)

    def output_path(self, sub: str) -> str:
        return storage.join(self.root, sub) if sub else self.root

    def record_path(self, filename: str) -> str:
        return storage.join(self.state_dir, "done", f"{filename}.json")

    def final_path(self, sub: str, filename: str) -> str:
        return storage.join(self.output_path(sub), filename)

    # ---- before any work -----------------------------------------------------------------

    def probe_dir(self) -> str:
        """Where the actors check, before any work, that they can write: OUT, or the nearest
        existing directory above it (OUT itself is created once the inputs' headers, configs
        and tokenizers are checked). In a bucket, OUT itself: keys need no directories."""
        path = self.root
        if self.is_uri:
            return path
        while not os.path.isdir(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        return path

    def check_target(self, parent_paths: list[str]) -> None:
        """Refuse an output directory that is, holds or lies inside a parent."""
        for p in parent_paths:
            if storage.is_uri(p) != self.is_uri:
                continue
            if storage.within(self.root, p):
                raise InputError(f"output {self.root} lies inside parent {p}: parents are only ever read")
            if storage.within(p, self.root):
                raise InputError(f"parent {p} lies inside output {self.root}: choose another output directory")

    def lock(self) -> None:
        """Take OUT for this merge: a second merge into the same OUT is refused until this one
        ends. The lock is the kernel's (``flock`` on ``.raymerge/lock``, which NFS clients share):
        it goes with the process, so a merge killed outright never blocks its ``--resume``. A
        bucket has no locks: on a URI, nothing is taken (see the docs: one merge per OUT). A
        local OUT is locked before anything else is done with it."""
        if self.is_uri:
            return
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise InputError(f"output {self.root} exists and is not a directory")
        self.made = not os.path.isdir(self.root)
        path = os.path.join(self.state_dir, LOCK_NAME)
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise InputError(f"output {self.root} is being written by another merge "
                                         f"({holder or 'a process'}): wait for it, or choose another output") from None
                    raise
                try:  # the file the lock is on may have been removed by a merge that just ended
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        except OSError as e:
            raise InputError(f"cannot write into output {self.root}: {storage.describe(e)}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Let OUT go. What the lock added goes with it: the lock file (unless another merge's
        has taken its place), and OUT itself when this merge made it and nothing else is there."""
        if self._lock_fd is None:
            return
        path = os.path.join(self.state_dir, LOCK_NAME)
        try:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(self._lock_fd).st_ino:
                    os.remove(path)
            for directory in [self.state_dir] + ([self.root] if self.made else []):
                with contextlib.suppress(OSError):  # not empty, or gone: left as it is
                    os.rmdir(directory)
        finally:
            os.close(self._lock_fd)  # the lock goes with the descriptor
            self._lock_fd = None

    def _own_entries(self) -> list[str]:
        """What OUT holds, but for this merge's own lock (and the state directory holding only it)."""
        entries = storage.listdir(self.root)
        if not self.is_uri and STATE_DIR in entries and os.listdir(self.state_dir) == [LOCK_NAME]:
            entries = [e for e in entries if e != STATE_DIR]
        return entries

    def _recorded_fingerprint(self) -> str | None:
        for path in (storage.join(self.state_dir, "state.json"),
                     storage.join(self.output_path(self.subdirs[0]), PROVENANCE_NAME)):
            recorded = _json(path)
            if isinstance(recorded, dict) and "plan_fingerprint" in recorded:
                return recorded["plan_fingerprint"]
        return None

    def check_existing(self, fingerprint: str, resume: bool, overwrite: bool) -> None:
        """Refuse a non-empty directory unless it is this merge resumed, or a raymerge output to replace.
        On a URI, also that the bucket can be read at all (credentials, no such bucket)."""
        try:
            if self.is_uri and not storage.bucket_exists(self.root):
                raise InputError(f"output {self.root}: no such bucket")
            if storage.isfile(self.root):
                raise InputError(f"output {self.root} exists and is not a directory")
            if not self._own_entries():
                return
        except OSError as e:
            raise InputError(f"cannot read output {self.root}: {storage.describe(e)}") from None
        recorded = self._recorded_fingerprint()
        if overwrite and recorded is None:
            raise InputError(f"output {self.root} is not empty and is not a raymerge output; "
                             "refusing to overwrite it (remove it yourself)")
        if resume and recorded != fingerprint:
            raise InputError(f"output {self.root} holds a different merge (other parents, t or "
                             "options): refusing to resume into it")
        if not (resume or overwrite):
            raise InputError(f"output {self.root} is not empty: pass --resume to continue a merge "
                             "or --overwrite to replace it")

    def create(self, fingerprint: str, overwrite: bool) -> None:
        """Create the directories and record the fingerprint a later resume must match."""
        try:
            if overwrite and self._own_entries():
                self._clear_for_overwrite()
            # A bucket prefix exists only through its keys: an empty one was made by no one. (A
            # local OUT's is known since lock(), which may have made the directory.)
            if self.is_uri:
                self.made = not storage.listdir(self.root)
            storage.makedirs(storage.join(self.state_dir, "done"))
            for sub in self.subdirs:
                storage.makedirs(self.output_path(sub))
            _write_json(storage.join(self.state_dir, "state.json"), {"plan_fingerprint": fingerprint})
        except OSError as e:
            raise InputError(f"cannot write into output {self.root}: {storage.describe(e)}") from None

    def _clear_for_overwrite(self) -> None:
        """Remove the earlier output (checked to be raymerge's), keeping this merge's lock."""
        if self.is_uri:
            storage.rmtree(self.root)
            return
        for parent, keep in ((self.root, STATE_DIR), (self.state_dir, LOCK_NAME)):
            for name in os.listdir(parent):
                path = os.path.join(parent, name)
                if name == keep:
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        self.made = True

    def finished_shards(self, plan: MergePlan) -> dict[int, dict]:
        """Shards finished by an earlier run (kept on resume), by index, with their records: a
        record written after the shard was closed (or, for a completed output, the shard's entry
        in its provenance), and every output's file of the recorded size."""
        done = {}
        for i, shard in enumerate(plan.shards):
            record = self._record(shard.filename)
            try:
                if all(record["files"][sub]["size"] == shard.layout.size
                       and storage.size(self.final_path(sub, shard.filename)) == shard.layout.size
                       for sub in self.subdirs):
                    done[i] = record
            except (OSError, KeyError, TypeError):
                continue
        return done

    def _record(self, filename: str) -> dict | None:
        """A shard's completion record, from the state directory or from every output's provenance."""
        record = _json(self.record_path(filename))
        if record is not None:
            return record
        record = {"files": {}}
        for sub in self.subdirs:
            try:
                entry = _json(storage.join(self.output_path(sub), PROVENANCE_NAME))["shards"][filename]
                record["files"][sub] = {"size": entry["size"], "crc32": entry["crc32"]}
                record["writer"] = entry["writer"]
            except (KeyError, TypeError):
                return None
        return record

    def clear_unfinished(self, plan: MergePlan, shard_ids: set[int]) -> None:
        """Remove what earlier attempts left of these shards, so that each is written from nothing."""
        for i in shard_ids:
            filename = plan.shards[i].filename
            for path in [self.record_path(filename)] + [self.final_path(sub, filename) for sub in self.subdirs]:
                storage.remove(path)

    def remove_unfinished(self, plan: MergePlan) -> None:
        """After a failure or an interrupt: every shard without a completion record goes, so that
        no half-written file stays behind."""
        if storage.isfile(storage.join(self.state_dir, "state.json")):
            self.clear_unfinished(plan, set(range(len(plan.shards))) - set(self.finished_shards(plan)))

    # ---- as work completes ---------------------------------------------------------------

    def finish_shard(self, plan: MergePlan, i: int, files: tuple[tuple[int, int], ...], writer: dict) -> dict:
        """Record a shard as finished once its writer has closed (and synced) it in every output;
        returns the record."""
        shard = plan.shards[i]
        record = {"files": {}, "writer": writer}
        for sub, (size, crc32) in zip(self.subdirs, files, strict=True):
            if size != shard.layout.size:
                raise RuntimeError(f"{self.final_path(sub, shard.filename)}: {size} bytes written, "
                                   f"{shard.layout.size} planned")
            record["files"][sub] = {"size": size, "crc32": crc32}
            if not self.is_uri:
                fsync_path(self.output_path(sub))  # the shard's directory entry, before its record
        _write_json(self.record_path(shard.filename), record)
        return record

    def write_output(self, sub: str, build: Callable[[str], None]) -> None:
        """Write one output's small files with ``build(directory)``: in place on a local disk; for
        a URI into a local directory, then uploaded, ``config.json`` last."""
        if not self.is_uri:
            build(self.output_path(sub))
            return
        staging = tempfile.mkdtemp(prefix="raymerge-output-")
        try:
            build(staging)
            storage.upload_tree(staging, self.output_path(sub), last="config.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def discard(self, plan: MergePlan) -> None:
        """Remove every model file of this merge (a parent was refused midway): OUT is left
        holding no model, and is gone if this merge created it."""
        # Finished shards, partial ones and the state: what a directory the user made held before
        # this merge stays.
        if self.made:
            storage.rmtree(self.root)
            return
        for sub in self.subdirs:
            for shard in plan.shards:
                storage.remove(self.final_path(sub, shard.filename))
        self.cleanup()

    def cleanup(self) -> None:
        storage.rmtree(self.state_dir)
