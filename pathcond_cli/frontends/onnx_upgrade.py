"""Models before opset 11, a part of the ONNX front end (:mod:`.onnx_frontend` tells the whole story):
the in-memory upgrade with ``onnx.version_converter``, and moving the upgraded model's parameter
references and name table back onto the original graph, so that the new values are written into the
original file's graph and opset (:func:`_writable`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx

from ..errors import UnsupportedModelError
from .onnx_read import MIN_OPSET, _constant_value, _Names, _opset, _ParamRef, _Refuse, initializer_value
from .onnx_translate import _node_names
from .onnx_write import _fresh_name


# --------------------------------------------------------------------------------------------------
# Models before opset 11 (the classic model zoo is opset 7-9): read an upgraded copy, write the original.


def _upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset MIN_OPSET or later: itself, or an in-memory copy upgraded by onnx.version_converter
    (the converters are written against one opset; the file itself is never changed)."""
    opset = _opset(model)
    if opset >= MIN_OPSET:
        return model
    from onnx import version_converter

    light, heavy = _without_weight_data(model)
    try:
        upgraded = version_converter.convert_version(light, MIN_OPSET)
    except Exception as exc:  # the converter's adapters assert on what they cannot express
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"the model uses opset {opset} and onnx.version_converter cannot upgrade it to opset {MIN_OPSET}, "
            f"which pathcond reads: {reason}") from exc
    if _opset(upgraded) < MIN_OPSET:  # pragma: no cover - a converter that silently did nothing
        raise UnsupportedModelError(f"the model uses opset {opset}; onnx.version_converter did not upgrade it")
    for tensor in upgraded.graph.initializer:
        if tensor.name in heavy:
            tensor.CopyFrom(heavy[tensor.name])
    return upgraded


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _without_weight_data(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of the model whose large initializers keep their type and dims but no data, and those
    initializers by name. The converter serialises its input twice and works on graph structure and
    small constant inputs: without the weights, upgrading a VGG is instant instead of seconds."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    heavy = {t.name: t for t in model.graph.initializer if math.prod(t.dims) > 4096}
    for tensor in light.graph.initializer:
        if tensor.name in heavy:
            for name in _DATA_FIELDS:
                tensor.ClearField(name)
    return light, heavy


def _names_after_original(original: onnx.ModelProto, upgraded: onnx.ModelProto) -> list[str]:
    """Names for the upgraded model's nodes as the user sees them in the original file: an unnamed node
    is called after its op and index there, not after its index in the upgraded graph (the converter
    inserts Constant nodes, and turns Upsample into Resize)."""
    names = _node_names(original)
    where = {tuple(n.output): i for i, n in enumerate(original.graph.node)}
    result, seen = [], set(names)
    for index, node in enumerate(upgraded.graph.node):
        j = where.get(tuple(node.output))
        name = names[j] if j is not None else _fresh_name(node.name or f"{node.op_type}_{index}", seen)
        result.append(name)
    return result


def _stored_tensors(model: onnx.ModelProto) -> dict[tuple[str, str], onnx.TensorProto | onnx.NodeProto]:
    """(kind, name) -> the initializer or Constant node holding a stored tensor."""
    stored: dict[tuple[str, str], onnx.TensorProto | onnx.NodeProto] = {
        ("initializer", t.name): t for t in model.graph.initializer}
    stored.update({("constant", n.output[0]): n for n in model.graph.node if n.op_type == "Constant" and n.output})
    return stored


def _original_value(stored: Mapping, ref: _ParamRef, data: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The stored tensor behind ``ref`` as the original file holds it (None when it has no such tensor);
    ``data``: the initializer values held out of the model (onnx_read._detach_data)."""
    holder = stored.get((ref.kind, ref.base))
    if holder is None:
        return None
    if isinstance(holder, onnx.TensorProto):
        return initializer_value(holder, data)
    try:
        return _constant_value(holder)
    except _Refuse:
        return None


def _read_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs and graph outputs read each value."""
    counts: dict[str, int] = {}
    for name in [n for node in model.graph.node for n in node.input] + [v.name for v in model.graph.output]:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _node_index(model: onnx.ModelProto) -> dict[tuple, int]:
    """Each node's position, keyed by what identifies it across an upgrade: op, domain and outputs."""
    return {(n.op_type, n.domain, tuple(n.output)): i for i, n in enumerate(model.graph.node)}


def _rebase_refs(original: onnx.ModelProto, upgraded: onnx.ModelProto, refs: Mapping[str, _ParamRef],
                 data: Mapping[str, np.ndarray]) -> tuple[dict[str, _ParamRef] | None, str]:
    """The parameter references of the upgraded model moved onto the original graph, or (None, why not).

    A reference moves when the node reading it is in the original (same op and outputs) and reads the
    same tensor name at the same input, and that tensor is stored there with the same value and readers:
    then the original op gives the parameter the meaning the analysis used (the version converter
    adapts attributes, not parameter layouts) and the values can be written into the original file."""
    index = _node_index(original)
    readers_before, readers_after = _read_counts(original), _read_counts(upgraded)
    stored = _stored_tensors(original)
    rebased = {}
    for key, ref in refs.items():
        node = upgraded.graph.node[ref.node_index]
        target = index.get((node.op_type, node.domain, tuple(node.output)))
        if target is None or len(original.graph.node[target].input) <= ref.slot \
                or original.graph.node[target].input[ref.slot] != node.input[ref.slot]:
            where = node.name or node.output[0]
            return None, f"the upgrade changed {node.op_type} node {where!r}, which reads {ref.base!r}"
        if ref.kind != "computed":
            value = _original_value(stored, ref, data)
            if value is None or value.dtype != ref.stored.dtype or not np.array_equal(value, ref.stored):
                return None, f"the upgrade changed the stored tensor {ref.base!r}"
            if readers_before.get(ref.base, 0) != readers_after.get(ref.base, 0):
                return None, f"the upgrade changed the nodes reading {ref.base!r}"
        rebased[key] = _ParamRef(ref.key, ref.kind, ref.base, target, ref.slot, ref.stored, ref.transform,
                                 ref.name)
    return rebased, ""


def _rebase_names(original: onnx.ModelProto, upgraded: onnx.ModelProto, names: _Names,
                  refs: Mapping[str, _ParamRef]) -> _Names | None:
    """The name table of the upgraded model moved onto the original graph, or None when a node that
    reads (or is a view of) a parameter's stored tensor is not in the original. Names unrelated to any
    parameter (the converter's own Constant nodes: Unsqueeze axes, Resize scales) are left out: the
    writer never changes them."""
    index = _node_index(original)

    def move(i: int) -> int | None:
        if i < 0:
            return i
        node = upgraded.graph.node[i]
        return index.get((node.op_type, node.domain, tuple(node.output)))

    roots = {names.origin[r.name] for r in refs.values() if r.name in names.origin}
    keep = {name for name, origin in names.origin.items() if origin in roots}
    readers: dict[str, list[tuple[int, int]]] = {}
    for name in keep:
        moved = []
        for i, slot in names.readers.get(name, []):
            j = move(i)
            if j is None or (j >= 0 and slot >= 0 and name not in original.graph.node[j].input[slot:slot + 1]):
                return None
            moved.append((j, slot))
        readers[name] = moved
    parent = {}
    for name in keep & set(names.parent):
        i, up = names.parent[name]
        j = move(i)
        if j is None:
            return None
        parent[name] = (j, up)
    return _Names({n: names.values[n] for n in keep}, {n: names.origin[n] for n in keep}, parent, readers,
                  {n: p for n, p in names.perm.items() if n in keep})


def _writable(original: onnx.ModelProto, upgraded: onnx.ModelProto, refs: dict[str, _ParamRef], names: _Names,
              warnings: list[str], data: Mapping[str, np.ndarray] | None = None,
              ) -> tuple[onnx.ModelProto, dict[str, _ParamRef], _Names]:
    """The model to write the new values into, with its references and name table: the original graph
    and opset when the upgraded model's parameters can be found in it, else the upgraded model (with a
    warning). ``data``: the initializer values held out of both models (onnx_read._detach_data; the
    upgrade copies the original's large initializers by name)."""
    if upgraded is original:
        return original, refs, names
    opset = _opset(original)
    rebased, why = _rebase_refs(original, upgraded, refs, data or {})
    moved = _rebase_names(original, upgraded, names, refs) if rebased is not None else None
    if rebased is not None and moved is None:
        why = "the upgrade changed a node that reads a parameter under another name"
    if rebased is not None and moved is not None:
        warnings.append(f"the model uses opset {opset}: it was analysed after an in-memory upgrade to opset "
                        f"{MIN_OPSET} (onnx.version_converter); the output keeps opset {opset} and its graph")
        return original, rebased, moved
    warnings.append(f"the model uses opset {opset}: it was analysed after an upgrade to opset {MIN_OPSET} "
                    f"(onnx.version_converter), and the output is that upgraded graph at opset {MIN_OPSET}, "
                    f"because {why}")
    return upgraded, refs, names
