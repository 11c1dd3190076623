"""Writing outputs so that a failure leaves nothing behind, the input is never touched and no other
file is clobbered.

Every file a run will write is checked against every other one and against the input's files before
any work (:func:`check_outputs`). Files are written into private staging folders beside their targets
(:class:`StagedOutput`) and moved into place together at the end (:func:`commit_all`): without
``--force`` a target that appeared meanwhile (another run, another user) is left alone.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError


def sha256(path: Path) -> str:
    """The file's sha256; from the bytes a front end already held when it read or wrote this version
    of the file (:func:`.frontends.base.known_digest`), else read here."""
    from .frontends.base import known_digest

    known = known_digest(path)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- checks before any work -------------------------------------------------------------------------

Role = tuple[str, Path]  # ("the output model", path): what a path is for, to name it in messages


def same_file(a: Path, b: Path) -> bool:
    """The same path once resolved (symbolic links, ``..``), or one file under two names (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_outputs(outputs: Sequence[Role], *, inputs: Sequence[Role], force: bool) -> None:
    """Refuse a run whose files clash: an output that is one of the input's files or another output,
    a folder, an existing file without ``force``, or a missing folder."""
    for i, (role, path) in enumerate(outputs):
        for in_role, in_path in inputs:
            if same_file(path, in_path):
                raise UsageError(f"{role} {path} is {in_role}: the input is never written, choose another path")
        for other_role, other in outputs[:i]:
            if same_file(path, other):
                raise UsageError(f"{role} {path} is also {other_role}: one would replace the other, "
                                 "choose another path")
        if path.is_dir():
            raise UsageError(f"{role} {path} is a directory: give a file path")
        if path.exists() and not force:
            raise UsageError(f"{role} {path} exists: pass --force to replace it")
        if not path.parent.is_dir():
            raise UsageError(f"folder {path.parent} does not exist: create it first")


# -- staging folders --------------------------------------------------------------------------------


def _owner_file(target: Path) -> str:
    """The name of the file, inside a staging folder, that says which process writes it (never the name
    of a staged file: those are the target's name and names that extend it with ``.data``)."""
    return f"{target.name}.pathcond-owner"


def _stage_prefix(target: Path) -> str:
    return f".{target.name}.pathcond-"


def _stage_folders(target: Path) -> list[Path]:
    """The staging folders of runs to ``target``: the prefix and mkdtemp's 8 random letters, digits or
    underscores (not the folders of a target whose name extends this one's, e.g. ``a.pathcond-b``)."""
    pattern = os.path.join(glob.escape(str(target.parent)), glob.escape(_stage_prefix(target)) + "?" * 8)
    found = [Path(p) for p in glob.glob(pattern)]
    return sorted(p for p in found if p.name[-8:].replace("_", "").isalnum() and p.is_dir())


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: field 22 of /proc/PID/stat), to tell a live owner from a new
    process that reuses its PID; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def _owner_alive(owner: dict) -> bool | None:
    """True / False for a process on this host; None when it cannot be told (another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        pass
    start = owner.get("start")
    return start is None or _start_time(pid) in (None, start)


def clear_stale_stages(target: Path) -> list[str]:
    """Remove the staging folders of runs to ``target`` that were killed (their process is gone), and
    return one message per folder found, removed or left."""
    messages = []
    for folder in _stage_folders(target):
        try:
            owner = json.loads((folder / _owner_file(target)).read_text())
        except (OSError, ValueError):
            messages.append(f"found the staging folder {folder} of an earlier run that recorded no owner; "
                            f"left it: remove it if no other run is writing {target}")
            continue
        alive = _owner_alive(owner)
        if alive is False:
            shutil.rmtree(folder, ignore_errors=True)
            messages.append(f"removed the stale staging folder {folder} of an earlier run to {target} "
                            f"that was killed (process {owner.get('pid')} is gone)")
        elif alive is None:
            messages.append(f"found the staging folder {folder} of a run on host {owner.get('host')}; left it: "
                            f"remove it if that run is over")
        else:
            messages.append(f"another run (process {owner.get('pid')}) seems to be writing {target}: "
                            f"left its staging folder {folder}")
    return messages


class StagedOutput:
    """A private folder beside the target where the output is written, then moved into place.

    Usage::

        with StagedOutput(target) as stage:
            write(stage.path)          # plus any side files in stage.folder
            check(stage.path)
            commit_all([stage], force=False)   # moves every staged file beside the target

    Leaving the block without a commit (an exception, a failed check) deletes everything staged. The
    folder records the process that owns it, so that a later run can tell a folder left by a killed
    run (removed by :func:`clear_stale_stages`) from one being written. Creating it is the check that
    the target's folder can be written: do it before any work.
    """

    def __init__(self, target: Path):
        self.target = target
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=_stage_prefix(target), dir=target.parent))
        except OSError as exc:
            raise UsageError(f"cannot write in folder {target.parent} ({exc.strerror or exc}): "
                             "choose a folder you can write to") from None
        self._owner = self.folder / _owner_file(target)
        self._owner.write_text(json.dumps(_owner()))
        self.path = self.folder / target.name
        self.committed: list[Path] = []  # moved into place
        self.created: list[Path] = []  # of which did not exist before (what a rollback removes)

    def __enter__(self) -> StagedOutput:
        return self

    def staged_files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p != self._owner)

    def commit(self, *, force: bool) -> list[Path]:
        """Move every staged file beside the target. With ``force`` an existing file is replaced;
        without, a file that exists raises :class:`OutputAppeared` and is left alone."""
        for staged in self.staged_files():
            final = self.target.parent / staged.name
            if force:
                existed = final.exists()
                os.replace(staged, final)
            else:
                existed = False
                _create_exclusive(staged, final)
            self.committed.append(final)
            if not existed:
                self.created.append(final)
        return self.committed

    def rollback(self) -> None:
        """Remove the files this stage created (files it replaced with ``force`` cannot come back)."""
        for path in reversed(self.created):
            path.unlink(missing_ok=True)
        self.created.clear()
        self.committed.clear()

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class OutputAppeared(UsageError):
    """A target file was created by someone else while pathcond was running."""


_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _create_exclusive(staged: Path, final: Path) -> None:
    """Give ``final`` the staged content only if ``final`` does not exist (no check-then-replace race):
    a hard link, or, on file systems without them, a copy into a file opened with ``O_EXCL``."""
    try:
        try:
            os.link(staged, final)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:  # FileExistsError (EEXIST) included: handled below
                raise
            with open(staged, "rb") as src, open(final, "xb") as dst:
                try:
                    shutil.copyfileobj(src, dst, 1 << 20)
                except BaseException:
                    final.unlink(missing_ok=True)
                    raise
    except FileExistsError:
        raise OutputAppeared(f"{final} appeared while pathcond was running (another run or user?): it was "
                             "left alone and nothing was written; pass --force to replace it") from None


def commit_all(stages: Sequence[StagedOutput], *, force: bool) -> list[Path]:
    """Commit every stage, in order, or none: on any failure (a file that appeared, an interrupt) the
    files already moved into place by this call are removed again."""
    written: list[Path] = []
    started: list[StagedOutput] = []
    try:
        for stage in stages:
            started.append(stage)
            written += stage.commit(force=force)
    except BaseException:
        for stage in reversed(started):
            stage.rollback()
        raise
    return written
