"""Writing new parameter values into an ONNX model, the last part of the ONNX front end
(:mod:`.onnx_frontend` tells the whole story): the name plan (:func:`_plan_names`: which value every
name gets), writing it into the ModelProto (stored tensors in place, views replaced by initializers,
new tensors where needed), and saving the file with the external data layout (:func:`_save_proto`),
serialised piece by piece with the large tensors' bytes written from the arrays that hold them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import UnsupportedModelError
from .onnx_read import _all_tensors, _Names, _subgraph_reads, data_file_for, detached_value


# --------------------------------------------------------------------------------------------------
# The name plan: the value every name holding a static value gets.


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN equals itself), without copying large tensors."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "O":
        return bool(np.array_equal(a, b))
    bits = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (a, b)]
    # chunk by chunk: a rescaled tensor differs from the original within its first entries, so the
    # usual answer (different) costs one chunk instead of a pass over both tensors
    for start in range(0, bits[0].size, _SAME_CHUNK):
        stop = start + _SAME_CHUNK
        if not np.array_equal(bits[0][start:stop], bits[1][start:stop]):
            return False
    return True


_SAME_CHUNK = 1 << 16  # bytes compared at a time by _same


def _pick(candidates: list[np.ndarray], original: np.ndarray) -> np.ndarray:
    """The value a name shared by conflicting readers keeps: its own if a reader still wants it
    (graph outputs, non-parameter readers, unchanged roles), else the first reader's."""
    return original if any(_same(c, original) for c in candidates) else candidates[0]


@dataclass
class _NamePlan:
    """What the writer does: new values of stored tensors, views replaced by initializers of the same
    name, and (only where one name is read directly by roles given different values) new tensors."""

    roots: dict[str, np.ndarray] = field(default_factory=dict)  # stored tensor -> new value, in place
    views: dict[str, np.ndarray] = field(default_factory=dict)  # view output -> value of its initializer
    fresh: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (node, slot) -> own new tensor


def _plan_names(names: _Names, wanted: Mapping[tuple[int, int], np.ndarray | None]) -> _NamePlan:
    """Give every name the value its direct readers want.

    ``wanted`` holds the new value of each changed role, in the layout of the name it reads (None: the
    value does not fit that name's shape, e.g. a broadcast scalar split per channel). Readers not in it
    want the name's current value. A name with no direct reader (the start of an Identity chain) takes
    a value one of the names below it wants, so that a chain with a single role is written in place."""
    children: dict[str, list[str]] = {}
    for name, (_, up) in names.parent.items():
        children.setdefault(up, []).append(name)
    plan, final = _NamePlan(), {}

    def wants(name: str) -> list[np.ndarray]:
        own = [wanted.get(r, names.values[name]) for r in names.readers.get(name, [])]
        return [w for w in own if w is not None]

    def alias(child: str) -> bool:
        """A view that only gives its parent's value another name (``Identity``): a name of its own,
        shared by the exporter; a layout view (``Transpose``, ``Reshape``) is the same tensor."""
        return child not in names.perm and names.values[child].shape == names.values[names.parent[child][1]].shape

    def below(name: str) -> list[np.ndarray]:
        """Values wanted by the readers of ``name`` and of its views, in its layout: its own readers
        first, then those reading it through layout views, then through other names (aliases)."""
        kids = sorted(children.get(name, []), key=alias)
        return wants(name) + [names.up(child, w) for child in kids for w in below(child)]

    def visit(name: str, inherited: np.ndarray) -> None:
        original, own = names.values[name], wants(name)
        if names.origin[name] == ("computed", name):  # a computed value cannot be written in place
            value = original
        elif own:
            value = _pick(own, original)
        else:
            deeper = below(name)
            value = inherited if not deeper or any(_same(inherited, w) for w in deeper) else _pick(deeper, original)
        final[name] = value
        if name in names.parent and not _same(value, inherited):
            plan.views[name] = value
        elif name not in names.parent and not _same(value, original):
            plan.roots[name] = value
        for reader in names.readers.get(name, []):
            if reader in wanted and (wanted[reader] is None or not _same(wanted[reader], value)):
                plan.fresh[reader] = wanted[reader]
        for child in children.get(name, []):
            visit(child, names.down(child, value))

    for name in names.values:
        if name not in names.parent:
            visit(name, names.values[name])
    return plan


# --------------------------------------------------------------------------------------------------
# Writing the plan into the model, and the model into its file(s).


def _fresh_name(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}.{i}", i + 1
    taken.add(name)
    return name


def _add_initializer(model: onnx.ModelProto, value: np.ndarray, name: str) -> None:
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    if model.ir_version < 4:  # before IR 4 every initializer is also a graph input
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, value.shape))


def _apply_plan(model: onnx.ModelProto, plan: _NamePlan, layouts: Mapping[tuple[int, int], np.ndarray],
                data: dict[str, np.ndarray] | None = None) -> list[tuple[int, int, str, str]]:
    """Write ``plan`` into ``model``: stored tensors in place, views replaced by initializers of their
    name (the view node goes), and the rare role that needs a tensor of its own (new name, rewired).
    ``data``: the values held out of ``model``'s initializers (onnx_read._detach_data); the new value of
    such a tensor replaces its entry there. Returns those rewired inputs: (node index, slot, name read
    before, new name)."""
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    taken |= {v.name for v in model.graph.input}
    rewired = []
    for (index, slot), value in plan.fresh.items():
        node = model.graph.node[index]
        value = layouts[(index, slot)] if value is None else value
        name = _fresh_name(f"{node.input[slot]}.pathcond.{slot}", taken)
        _add_initializer(model, value, name)
        rewired.append((index, slot, node.input[slot], name))
        node.input[slot] = name
    for name, value in plan.roots.items():
        _write_in_place(model, name, value, data if data is not None else {})
    dropped = {i for i, node in enumerate(model.graph.node) if node.output and node.output[0] in plan.views}
    for name, value in plan.views.items():
        _add_initializer(model, value, name)
    for index in sorted(dropped, reverse=True):
        del model.graph.node[index]
    _drop_orphans(model, [old for _, _, old, _ in rewired])
    return rewired


#: nodes that only hold or reshape a static value: removed when a rewiring leaves their output unread
_STATIC_OPS = frozenset({"Constant", "Identity", "Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Expand"})


def _drop_orphans(model: onnx.ModelProto, names: list[str]) -> None:
    """Remove the static values that rewired roles read before and that nothing reads now (a scalar
    Constant split per channel, say), with the static nodes feeding only them, so that the output
    holds no unused initializer or node (onnxruntime warns about each on every load). Graph inputs
    and outputs are kept."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    pending = list(dict.fromkeys(names))
    while pending:
        name = pending.pop()
        read = {i for n in graph.node for i in n.input} | set().union(*(_subgraph_reads(n) for n in graph.node))
        if not name or name in read or name in keep:
            continue
        producer = next((i for i, n in enumerate(graph.node) if name in n.output), None)
        if producer is None:
            for index, tensor in enumerate(graph.initializer):
                if tensor.name == name:
                    del graph.initializer[index]
                    break
        elif graph.node[producer].op_type in _STATIC_OPS and not set(graph.node[producer].output) & read:
            pending.extend(graph.node[producer].input)
            del graph.node[producer]


def _set_tensor(tensor: TensorProto, value: np.ndarray) -> None:
    """Give an initializer a new value (same name, doc string and metadata), with one copy of the bytes:
    ``CopyFrom`` of a ``numpy_helper.from_array`` tensor would copy them twice."""
    kept = TensorProto(name=tensor.name, metadata_props=tensor.metadata_props)
    if tensor.HasField("doc_string"):
        kept.doc_string = tensor.doc_string
    if value.dtype.kind not in "fiub" or value.dtype.itemsize == 1 and value.dtype.kind == "f":
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))  # strings, float8...: onnx's rules
    else:
        tensor.Clear()
        tensor.dims.extend(value.shape)
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.raw_data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    tensor.MergeFrom(kept)


def _write_in_place(model: onnx.ModelProto, name: str, stored: np.ndarray, data: dict[str, np.ndarray]) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            old = detached_value(tensor, data)
            if old is not None and old.shape == stored.shape and old.dtype == stored.dtype:
                data[name] = stored  # written as its raw bytes by _save_proto; the tensor's other fields stay
            else:
                _set_tensor(tensor, stored)
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(stored)))
            return
    raise KeyError(f"stored tensor {name!r} not found")  # pragma: no cover - names come from this model


#: an initializer goes to the external data file when it holds at least this many bytes (onnx's own
#: default threshold) and is not an integer or boolean tensor: shapes, axes and indices stay inline, as
#: exporters keep them, because onnxruntime's shape inference cannot read external tensors.
EXTERNAL_MIN_BYTES = 1024
_INLINE_TYPES = frozenset({
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
    TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL, TensorProto.STRING})


def _goes_external(tensor: TensorProto) -> bool:
    if tensor.data_type in _INLINE_TYPES:
        return False
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return math.prod(tensor.dims) * itemsize >= EXTERNAL_MIN_BYTES


def _save_proto(model: onnx.ModelProto, path: Path, external: bool, data: Mapping[str, np.ndarray] | None = None) -> None:
    """Write ``model`` (its tensors loaded, or held out of it in ``data``: onnx_read._detach_data); with
    ``external``, large float initializers go to ``data_file_for(path)`` beside it, whatever the input's
    own layout was. The report's sha256 of ``path`` is computed from the bytes as they are written."""
    data = dict(data or {})
    for tensor in _all_tensors(model.graph):  # onnx.load keeps the input's external markers
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    if external:
        _write_external_data(model, data_file_for(path), data)
    _write_serialised(model, path, data)


def _write_external_data(model: onnx.ModelProto, data_file: Path, data: dict[str, np.ndarray]) -> None:
    """Move the initializers that go external (:func:`_goes_external`) into ``data_file``, one after the
    other in graph order, with the markers ``onnx.save_model`` gives them (location, offset, length).
    Their entries leave ``data``. No file is made when no tensor goes there."""
    if data_file.exists():  # a stale file of that name is replaced, never appended to
        data_file.unlink()
    going = [tensor for tensor in model.graph.initializer if _goes_external(tensor)]
    if not going:
        return
    with open(data_file, "wb") as fh:
        for tensor in going:
            value = detached_value(tensor, data)
            if value is None and not tensor.HasField("raw_data"):  # typed fields: onnx's own raw layout
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            offset = fh.tell()
            if value is None:
                fh.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                fh.write(_raw_bytes(value))
                del data[tensor.name]
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, entry in (("location", data_file.name), ("offset", offset), ("length", fh.tell() - offset)):
                tensor.external_data.add(key=key, value=str(entry))


# -- the model file, serialised piece by piece --------------------------------------------------------
#
# A protobuf message is serialised as its fields in field-number order, each a key and (for messages and
# bytes) a length then the payload, and unknown fields last. So a ModelProto whose large initializers'
# raw bytes are held in numpy arrays (data) is written as: the model's fields before ``graph``, graph's
# key and length, graph's fields before ``initializer``, each initializer (key, length, its fields before
# ``raw_data``, raw_data's key, length and the array's bytes, its fields after), graph's fields after, the
# model's fields after. The bytes are those of ``SerializeToString()`` on the model with every raw_data
# put back (asserted in the tests), without making that model nor its serialisation: at no time is the
# model held twice (VGG-16: 0.55 GB each).

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto
#: protobuf's limit on a serialised message, as onnx checks it before saving
_MAX_PROTOBUF = 2**31


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


def _split(message, number: int) -> tuple[bytes, bytes]:
    """The serialised fields of ``message`` numbered below ``number``, and those above it with its unknown
    fields (serialised last). The fields below are copied one by one, those above with the unknown ones by
    copying the message less them: each field is copied once."""
    below, above = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number >= number:
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(below, field.name).extend(value)
        elif field.message_type is not None:
            getattr(below, field.name).CopyFrom(value)
        else:
            setattr(below, field.name, value)
    above.CopyFrom(message)
    for field, _ in message.ListFields():
        if field.number <= number:
            above.ClearField(field.name)
    return below.SerializeToString(), above.SerializeToString()


def _raw_bytes(value: np.ndarray) -> memoryview:
    """The bytes of ``value`` as ``raw_data`` holds them (little-endian, C order), without a copy where
    the array already is laid out so."""
    if value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def _size(pieces: list) -> int:
    """The length of serialised pieces: bytes, or arrays written as their raw bytes."""
    return sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in pieces)


def _pieces(model: onnx.ModelProto, data: Mapping[str, np.ndarray]) -> list:
    """The serialisation of ``model`` with the values in ``data`` as raw_data, in pieces (see above)."""
    tensors: list = []
    for tensor in model.graph.initializer:
        value = detached_value(tensor, data)
        if value is None:
            body: list = [tensor.SerializeToString()]
        else:
            below, above = _split(tensor, _TENSOR_RAW_DATA)
            body = [below, _key(_TENSOR_RAW_DATA, value.nbytes), value, above]
        tensors += [_key(_GRAPH_INITIALIZER, _size(body))] + body
    graph_below, graph_above = _split(model.graph, _GRAPH_INITIALIZER)
    graph = [graph_below] + tensors + [graph_above]
    model_below, model_above = _split(model, _MODEL_GRAPH)
    return [model_below, _key(_MODEL_GRAPH, _size(graph))] + graph + [model_above]


def _write_serialised(model: onnx.ModelProto, path: Path, data: Mapping[str, np.ndarray]) -> None:
    """Write ``model`` with ``data``'s values to ``path``, and record the sha256 of what was written (each
    large piece hashed in a thread while it is written: hashlib and file writes release the GIL)."""
    import hashlib
    import threading

    from .base import record_digest

    pieces = _pieces(model, data)
    if _size(pieces) >= _MAX_PROTOBUF:  # only when new tensors push an inline model over the limit
        raise UnsupportedModelError(
            f"the rescaled model would be {_size(pieces) / 2**30:.2f} GiB in one file, over protobuf's 2 GiB "
            "limit (tensors shared by layers that get different values are stored anew); store the input's "
            "weights as external data (onnx.save_model(model, path, save_as_external_data=True)) and "
            "rescale that: the output then keeps its weights in a .data file beside it")
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for piece in pieces:
            chunk = _raw_bytes(piece) if isinstance(piece, np.ndarray) else piece
            if len(chunk) < 1 << 20:
                digest.update(chunk)
                fh.write(chunk)
                continue
            thread = threading.Thread(target=digest.update, args=(chunk,), daemon=True)
            thread.start()
            fh.write(chunk)
            thread.join()
            del chunk
    record_digest(path, digest.hexdigest())
