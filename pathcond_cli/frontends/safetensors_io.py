"""safetensors files and sharded safetensors checkpoints, read and written with the ``safetensors`` package.

A safetensors file is an 8-byte little-endian header length, a JSON header that starts with ``{`` (each
tensor's dtype, shape and byte range, and an optional ``__metadata__`` dict of strings), then the tensors'
bytes. A sharded checkpoint is an index (``model.safetensors.index.json``) whose ``weight_map`` names, for
every tensor, the shard file beside the index that holds it (``model-00001-of-00002.safetensors``).

A :class:`Layout` is what a rewrite must keep: which file holds which tensor, each file's metadata, and
the index itself. Rewritten, a sharded checkpoint keeps its shard names (beside the output's index) and
its index unchanged (the tensors keep their names, dtypes and shapes, so ``total_size`` still holds).
Every malformed file is a :class:`~pathcond_cli.errors.UsageError` that names the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

MAX_HEADER = 100_000_000  # bytes: the safetensors package refuses larger headers
_INDEX_SNIFF = 1 << 16  # bytes read to tell an index from other JSON


def sniff(path: Path) -> str | None:
    """``"file"`` (a safetensors file), ``"index"`` (a sharded checkpoint's index) or None, from the
    first bytes: a header length below 2**32 (its four high bytes zero) followed by ``{``; or JSON with
    a ``weight_map``. Nothing is validated here: reading does that, with a message."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_INDEX_SNIFF)
    except OSError:
        return None
    if len(head) >= 9 and head[4:8] == b"\0\0\0\0" and head[8:9] == b"{":
        return "file"
    if head.lstrip()[:1] == b"{" and b'"weight_map"' in head:
        return "index"
    return None


#: the names of safetensors files and of sharded checkpoints' indexes
NAME_SUFFIXES = (".safetensors", ".safetensors.index.json")


def misnamed(path: Path) -> str | None:
    """Why a file named as safetensors (or as a sharded checkpoint's index) is not a readable one, when its
    content is neither (:func:`sniff` does not recognise it) nor begins as an ONNX model does; else None.
    Detection stays by content: the name only picks this message over the ONNX loader's."""
    name = path.name.lower()
    if not name.endswith(NAME_SUFFIXES) or sniff(path) is not None:
        return None
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError:
        return None
    if first == b"\x08":  # an ONNX ModelProto begins with its ir_version field (tag 0x08): the ONNX loader reads it
        return None
    try:
        _index(path) if name.endswith(".index.json") else _header(path)
    except UsageError as exc:
        why = str(exc).removeprefix(f"{path}: ")
    else:  # readable, though not as sniff expects it (a header that does not start with '{')
        why = "its header does not start right after its 8-byte length with '{'"
    return f"{path} is not a readable safetensors {'index' if name.endswith('.index.json') else 'file'} ({why})"


@dataclass(frozen=True)
class Shard:
    """One safetensors file: its name (beside the index; the file itself when not sharded), the
    tensors it holds and its ``__metadata__`` (None when it has none)."""

    name: str
    keys: tuple[str, ...]
    metadata: dict[str, str] | None


@dataclass(frozen=True)
class Layout:
    """How a checkpoint is stored: one file (``index`` None, one shard: the file) or an index and its shards."""

    path: Path  # the file given: the safetensors file or the index
    index: dict | None  # the index's JSON (None: a single file)
    shards: tuple[Shard, ...]

    def shard_path(self, shard: Shard, where: Path | None = None) -> Path:
        """Where ``shard`` lies for the checkpoint given as ``where`` (default: this one's path)."""
        where = self.path if where is None else where
        return where if self.index is None else where.parent / shard.name


def _header_text(path: Path) -> tuple[bytes, int]:
    """The header's bytes and how many bytes of tensor data follow it, checked against the file's size so
    that a truncated file is named as such (the package's own messages do not say it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise UsageError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(raw_len, "little")
            if n > MAX_HEADER:
                raise UsageError(f"{path}: corrupt safetensors file (header length {n} bytes)")
            if n > size - 8:
                raise UsageError(f"{path}: truncated safetensors file: its header needs {n} bytes, "
                                 f"the file holds {size - 8} after the length")
            return fh.read(n), size - 8 - n
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _header(path: Path) -> tuple[dict, dict[str, str] | None]:
    """The tensors' entries and the ``__metadata__`` of the safetensors file at ``path``."""
    text, data = _header_text(path)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: corrupt safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: corrupt safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise UsageError(f"{path}: corrupt safetensors file: __metadata__ is not a mapping of strings to strings")
    ends = [_data_end(path, name, entry) for name, entry in header.items()]
    if ends and max(ends) > data:
        raise UsageError(f"{path}: truncated safetensors file: its tensors need {max(ends)} bytes after the "
                         f"header, the file holds {data}")
    return header, metadata


def _data_end(path: Path, name: str, entry: object) -> int:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise UsageError(f"{path}: corrupt safetensors file: tensor {name!r} has no valid data_offsets")
    return offsets[1]


def _file_shard(path: Path, name: str) -> Shard:
    header, metadata = _header(path)
    return Shard(name, tuple(header), metadata)


def _index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: not a valid safetensors index (not JSON: {exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise UsageError(f"{path}: not a valid safetensors index: its weight_map must map tensor names to "
                         "shard file names")
    for shard in set(weight_map.values()):
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise UsageError(f"{path}: shard {shard!r} is not a file name: pathcond reads and writes shards "
                             "that lie beside their index")
    return index


def shard_names(index_path: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names, in the order they first appear."""
    return list(dict.fromkeys(_index(index_path)["weight_map"].values()))


def read_layout(path: Path) -> Layout:
    """The checkpoint at ``path`` (a safetensors file or an index): every file checked, every shard
    present, and the index agreeing with what the shards hold."""
    path = Path(path)
    if sniff(path) != "index":
        return Layout(path, None, (_file_shard(path, path.name),))
    index = _index(path)
    weight_map: dict[str, str] = index["weight_map"]
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard_path = path.parent / name
        if not shard_path.is_file():
            count = sum(1 for v in weight_map.values() if v == name)
            raise UsageError(f"{path}: shard {name} (named in the index for {count} tensor(s)) is missing: "
                             f"no such file in {path.parent}")
        shard = _file_shard(shard_path, name)
        listed = {k for k, v in weight_map.items() if v == name}
        if set(shard.keys) != listed:
            extra = sorted(set(shard.keys) - listed)[:5]
            absent = sorted(listed - set(shard.keys))[:5]
            raise UsageError(f"{path}: the index and shard {name} disagree"
                             + (f"; in the shard, not in the index: {', '.join(extra)}" if extra else "")
                             + (f"; in the index, not in the shard: {', '.join(absent)}" if absent else ""))
        shards.append(shard)
    return Layout(path, index, tuple(shards))


def load_tensors(layout: Layout) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by name, on the CPU."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in layout.shards:
        path = layout.shard_path(shard)
        try:
            tensors.update(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001 - the package's errors are about the file
            raise UsageError(f"{path}: cannot read this safetensors file: {type(exc).__name__}: {exc}") from None
    return tensors


def write_like(layout: Layout, tensors: Mapping[str, torch.Tensor], target: Path) -> list[Path]:
    """These tensors stored like ``layout``: each into the file of the same name (the shards beside
    ``target``, the index's content at ``target``), with each file's metadata. Returns the files written."""
    from safetensors.torch import save_file

    written = []
    for shard in layout.shards:
        path = layout.shard_path(shard, target)
        save_file({k: tensors[k].contiguous() for k in shard.keys}, str(path), metadata=shard.metadata)
        written.append(path)
    if layout.index is not None:
        shutil.copyfile(layout.path, target)  # the same tensors, dtypes and shards: the index holds as it is
        written.append(target)
    return written


def shard_roles(index: Path, target: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(the shards the output will write, the input's shards), each with its role, for
    :func:`pathcond_cli.outputs.check_outputs`. The output keeps the input's shard names, so it must go
    to another folder than the input's: refused here with that said, before the generic clash message."""
    names = shard_names(index)
    if target.name.endswith(".safetensors"):
        raise UsageError(f"{index} is a sharded checkpoint (an index and {len(names)} shard(s)) and is written as one: "
                         f"name the output like its index, e.g. {target.parent / 'model.safetensors.index.json'}")
    try:
        same_folder = target.parent.resolve() == index.parent.resolve() or target.parent.samefile(index.parent)
    except OSError:  # the output's folder does not exist: check_outputs says so
        same_folder = False
    if same_folder:
        raise UsageError(f"the output {target} is in the input's folder: a sharded checkpoint is written with its "
                         f"shards' names ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), which would "
                         "replace the input's shards: write it to another folder")
    outputs = [("the output's shard", target.parent / name) for name in names]
    inputs = [("the input's shard", index.parent / name) for name in names]
    return outputs, inputs
