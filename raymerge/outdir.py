"""The output directory: refusing unsafe targets, partial shards, resume state, finishing shards.

Layout while a merge runs::

    OUT/.raymerge/state.json             the plan fingerprint (a resume must match it)
    OUT/.raymerge/partial/<sub>/<shard>  shards being written by the actors
    OUT/<sub>/<shard>                    finished shards, renamed there when complete

``<sub>`` is ``""`` for one t and ``t-<t>`` for each t of a sweep. A file only ever appears under
its final name once it is complete, so a crash leaves nothing that looks finished; a merge refused
midway (a NaN in a parent tensor) removes every shard it wrote.
"""

from __future__ import annotations

import json
import os
import shutil

from raymerge.assemble import PROVENANCE_NAME, fsync_path, write_json
from raymerge.errors import InputError
from raymerge.plan import MergePlan

STATE_DIR = ".raymerge"


def _within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


class OutputDir:
    """One merge's output directory and the sub-directories of its outputs."""

    def __init__(self, out: str, subdirs: list[str]):
        self.root = os.path.realpath(out)
        self.subdirs = subdirs
        self.made = False  # whether this merge created the directory (or replaced it: --overwrite)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, STATE_DIR)

    def output_path(self, sub: str) -> str:
        return os.path.join(self.root, sub) if sub else self.root

    def partial_path(self, sub: str, filename: str) -> str:
        return os.path.join(self.state_dir, "partial", sub, filename)

    def final_path(self, sub: str, filename: str) -> str:
        return os.path.join(self.output_path(sub), filename)

    # ---- before any work -----------------------------------------------------------------

    def probe_dir(self) -> str:
        """Where the actors check, before any work, that they can write: OUT, or the nearest
        existing directory above it (OUT itself is created once the inputs' headers, configs
        and tokenizers are checked)."""
        path = self.root
        while not os.path.isdir(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        return path

    def check_target(self, parent_paths: list[str]) -> None:
        """Refuse an output directory that is, holds or lies inside a parent."""
        for p in parent_paths:
            if _within(self.root, p):
                raise InputError(f"output {self.root} lies inside parent {p}: parents are only ever read")
            if _within(p, self.root):
                raise InputError(f"parent {p} lies inside output {self.root}: choose another output directory")

    def _recorded_fingerprint(self) -> str | None:
        for path in (os.path.join(self.state_dir, "state.json"),
                     os.path.join(self.output_path(self.subdirs[0]), PROVENANCE_NAME)):
            try:
                with open(path) as f:
                    return json.load(f)["plan_fingerprint"]
            except (OSError, ValueError, KeyError):
                continue
        return None

    def check_existing(self, fingerprint: str, resume: bool, overwrite: bool) -> None:
        """Refuse a non-empty directory unless it is this merge resumed, or a raymerge output to replace."""
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise InputError(f"output {self.root} exists and is not a directory")
        if not (os.path.isdir(self.root) and os.listdir(self.root)):
            return
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
            if overwrite and os.path.isdir(self.root):
                shutil.rmtree(self.root)
            self.made = not os.path.isdir(self.root)
            for sub in self.subdirs:
                os.makedirs(os.path.join(self.state_dir, "partial", sub), exist_ok=True)
                os.makedirs(self.output_path(sub), exist_ok=True)
            write_json(os.path.join(self.state_dir, "state.json"), {"plan_fingerprint": fingerprint})
        except OSError as e:
            raise InputError(f"cannot write into output {self.root}: {e.strerror}") from None

    def finished_shards(self, plan: MergePlan) -> set[int]:
        """Shards already complete under their final name in every output (kept on resume)."""
        done = set()
        for i, shard in enumerate(plan.shards):
            paths = [self.final_path(sub, shard.filename) for sub in self.subdirs]
            if all(os.path.isfile(p) and os.path.getsize(p) == shard.layout.size for p in paths):
                done.add(i)
        return done

    def clear_partial(self, plan: MergePlan, shard_ids: set[int]) -> None:
        """Remove leftovers of earlier attempts so the actors start each shard from nothing."""
        for i in shard_ids:
            for sub in self.subdirs:
                path = self.partial_path(sub, plan.shards[i].filename)
                if os.path.exists(path):
                    os.remove(path)

    # ---- as work completes ---------------------------------------------------------------

    def finish_shard(self, plan: MergePlan, i: int) -> None:
        """Move a shard whose every tensor is written to its final name, in every output."""
        shard = plan.shards[i]
        for sub in self.subdirs:
            src = self.partial_path(sub, shard.filename)
            size = os.path.getsize(src)
            if size != shard.layout.size:
                raise RuntimeError(f"{src}: {size} bytes written, {shard.layout.size} planned")
            os.replace(src, self.final_path(sub, shard.filename))
            fsync_path(self.output_path(sub))  # the shard's bytes were synced before its rename

    def discard(self, plan: MergePlan) -> None:
        """Remove every model file of this merge (a parent was refused midway): OUT is left
        holding no model, and is gone if this merge created it."""
        # Finished shards, partial ones and the state: what a directory the user made held before
        # this merge stays.
        if self.made:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for sub in self.subdirs:
            for shard in plan.shards:
                path = self.final_path(sub, shard.filename)
                if os.path.exists(path):
                    os.remove(path)
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
