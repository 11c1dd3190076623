"""Writing outputs so that a failure leaves nothing behind and the input is never touched."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_path(target: Path, *, inputs: list[Path], force: bool) -> None:
    """Refuse an output that is an input, that exists without ``force``, or whose folder is missing."""
    resolved = target.resolve()
    for path in inputs:
        if path.exists() and resolved == path.resolve():
            raise UsageError(f"refusing to overwrite the input {path}: choose another output path")
    if target.is_dir():
        raise UsageError(f"{target} is a directory: give a file path for the output")
    if target.exists() and not force:
        raise UsageError(f"{target} exists: pass --force to replace it")
    if not target.parent.is_dir():
        raise UsageError(f"folder {target.parent} does not exist: create it first")


class StagedOutput:
    """A private folder beside the target where the output is written, then moved into place.

    Usage::

        with StagedOutput(target) as stage:
            write(stage.path)          # plus any side files in stage.folder
            check(stage.path)
            stage.commit()             # moves every staged file beside the target

    Leaving the block without :meth:`commit` (an exception, a failed check) deletes everything staged.
    """

    def __init__(self, target: Path):
        self.target = target
        self.folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.pathcond-", dir=target.parent))
        self.path = self.folder / target.name
        self.committed: list[Path] = []

    def __enter__(self) -> StagedOutput:
        return self

    def commit(self) -> list[Path]:
        for staged in sorted(self.folder.iterdir()):
            final = self.target.parent / staged.name
            os.replace(staged, final)
            self.committed.append(final)
        return self.committed

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
