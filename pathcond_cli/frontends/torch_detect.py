"""Which torch file format a file is, told from its content (never from its name).

Two steps: :func:`detect_torch_format` reads the zip archive's top-level records (torch.export,
TorchScript, or a plain ``torch.save`` file); a ``torch.save`` file is then unpickled and
:func:`pickle_format` tells a state_dict / checkpoint dict from a pickled ``nn.Module``. :func:`detect`
does both and returns a key of :data:`.torch_formats.FORMAT_CLASSES`. A safetensors file (or a sharded
checkpoint's index) is told by its first bytes (:func:`.safetensors_io.sniff`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import UsageError
from .base import LoadOptions
from .safetensors_io import sniff as sniff_safetensors
from .torch_checkpoint import _find_module


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{path}: not a readable zip archive: {exc}") from exc


def archive_records(names: Sequence[str]) -> set[str]:
    """The archive's records: member names below the one folder every member sits in.

    ``torch.save``, ``torch.jit.save`` and ``torch.export.save`` write every record under a folder named
    after the file (``model/data.pkl``); ``torch.export.save`` before PyTorch 2.6 wrote its records at
    the root. The folder's name says nothing (a file ``models.pt`` gives ``models/``), nor do paths deeper
    down (TorchScript keeps the model's code at ``code/__torch__/<its package path>/``)."""
    first = names[0].split("/", 1) if names else []
    if len(first) == 2 and all(n.startswith(first[0] + "/") for n in names):
        return {n[len(first[0]) + 1:] for n in names}
    return set(names)


def _records_format(records: set[str]) -> str | None:
    """The torch format a set of archive records is laid out in (see :func:`archive_records`), or None.

    * ``torch.export.save``: an ``archive_format`` record (the PT2 archive, PyTorch >= 2.6) or a
      ``serialized_exported_program.json`` record (earlier versions);
    * ``torch.jit.save``: ``constants.pkl`` and the model's code under ``code/``, beside ``data.pkl``;
    * ``torch.save``: ``data.pkl`` alone (its tensors under ``data/``)."""
    if "archive_format" in records or "serialized_exported_program.json" in records:
        return "torch-export"
    if "data.pkl" in records and "constants.pkl" in records and any(r.startswith("code/") for r in records):
        return "torchscript"
    if "data.pkl" in records and "constants.pkl" not in records:
        return "torch-pickle"
    return None


def detect_torch_format(path: Path) -> str:
    """"torch-export", "torchscript" or "torch-pickle" (a plain ``torch.save`` file: state dict,
    checkpoint or pickled module, told apart when loading), from the archive's top-level records; or
    "safetensors" (a safetensors file, or the index of a sharded one), from its first bytes: it is no
    archive, and it is told first since its tensors' bytes could look like a zip directory's end."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    if sniff_safetensors(path) is not None:
        return "safetensors"
    if zipfile.is_zipfile(path):
        fmt = _records_format(archive_records(_zip_names(path)))
        if fmt is None:
            raise UsageError(f"{path}: a zip archive that is neither a torch.save, torch.jit.save nor "
                             "torch.export.save file")
        return fmt
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":
        return "torch-pickle"
    raise UsageError(f"{path}: not a PyTorch file (no torch.save / torch.jit.save / torch.export.save content)")


def _load_weights_only(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


class Unpickled(NamedTuple):
    """A ``torch.save`` file's content, and whether reading it needed full unpickling (``--trust-pickle``:
    code from the file ran); the rewrite reads the file back the same way."""

    obj: Any
    full_pickle: bool


def _load_pickle(path: Path, trust: bool) -> Unpickled:
    """The file's content: tensors and plain containers only, unless ``trust`` allows full unpickling."""
    try:
        return Unpickled(_load_weights_only(path), False)
    except pickle.UnpicklingError as exc:
        if not trust:
            import re

            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            hint = f" (it references {found.group(1)})" if found else ""
            raise UsageError(
                f"{path} holds pickled Python objects (most likely a whole nn.Module saved with torch.save(model))"
                f"{hint}. Loading it would run arbitrary code from the file, so pathcond refuses by default. "
                "If you trust the file, pass --trust-pickle; better, save model.state_dict() and pass "
                "--arch package.module:factory, or use torch.export.save."
            ) from exc
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read this torch file: {type(exc).__name__}: {exc}") from exc
    try:
        return Unpickled(torch.load(path, map_location="cpu", weights_only=False), True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot unpickle this torch file: {type(exc).__name__}: {exc}") from exc


def pickle_format(path: Path, content: Unpickled, options: LoadOptions) -> str:
    """"torch-module" or "torch-state-dict": what a ``torch.save`` file holds decides how it is rebuilt.

    A pickled ``nn.Module`` (alone, or in a checkpoint dict read with ``--trust-pickle`` and no
    ``--arch``) runs as it is; a state_dict or a checkpoint dict that holds one needs ``--arch``."""
    obj = content.obj
    if isinstance(obj, nn.Module):
        return "torch-module"
    if not isinstance(obj, Mapping):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict, checkpoint dict or nn.Module")
    if content.full_pickle and not options.arch and _find_module(obj, options.key) is not None:
        return "torch-module"
    return "torch-state-dict"


def detect(path: Path, options: LoadOptions) -> tuple[str, Unpickled | None]:
    """The file's format (a key of :data:`.torch_formats.FORMAT_CLASSES`) and, for a ``torch.save``
    file, its content: it had to be read to tell a state_dict from a pickled module."""
    container = detect_torch_format(path)
    if container != "torch-pickle":
        return container, None
    content = _load_pickle(path, options.trust_pickle)
    return pickle_format(path, content, options), content
