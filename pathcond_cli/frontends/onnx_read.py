"""Reading an ONNX model, the first part of the ONNX front end (:mod:`.onnx_frontend` tells the whole
story): the file and its external data, the input shapes, ONNX shape inference on a light copy of the
graph (the probe), folding the static part of the graph (:class:`_Folder`), the table of the names
holding static values (:class:`_Names`) and the parameter transforms between a stored tensor and its IR
tensor (:class:`_Transform`, :class:`_ParamRef`). It imports no other part of the front end."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import Refusal, UnsupportedModelError, UsageError
from ..ir import Node, pool_geometry, swap_group_axes
from .base import LoadOptions, name_lone_shape

MIN_OPSET = 11
SHAPE_READERS = frozenset({"Shape", "Size"})
#: ops whose output holds the elements of their first input, reshaped or transposed: a static value
#: read through a chain of them is a view of the stored tensor at the chain's start (see _Names)
VIEW_OPS = frozenset({"Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})


_Refuse = Refusal  # raised by a converter: this node cannot be translated (the message says why)


# --------------------------------------------------------------------------------------------------
# Parameter transforms: stored tensor <-> IR tensor.


def _swap_groups(a: np.ndarray, groups: int) -> np.ndarray:
    """numpy twin of ir.swap_group_axes: (A, B/groups, *k) -> (B, A/groups, *k), its own inverse."""
    a = a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")  # stored arrays are read-only
    return swap_group_axes(torch.from_numpy(a), groups).numpy()


@dataclass(frozen=True)
class _Transform:
    """How the IR value of a parameter is derived from the stored tensor (and back)."""

    ir_shape: tuple[int, ...]
    transpose: bool = False
    swap_groups: int = 0  # > 0: a transposed convolution's weight, swapped to (O, I/groups, *k)
    factor: float = 1.0
    reciprocal: bool = False
    expanded_shape: tuple[int, ...] | None = None  # stored layout to use when a broadcast scalar splits

    @property
    def exact(self) -> bool:
        """Whether the transform only moves entries (transpose, group swap, reshape): it is then applied
        in the stored dtype, without a float64 copy of the tensor."""
        return self.factor == 1.0 and not self.reciprocal

    def forward(self, stored: np.ndarray) -> np.ndarray:
        """The IR value: float64 when it is computed (factor, reciprocal), else in the stored dtype."""
        a = stored if self.exact else stored.astype(np.float64)
        a = a.T if self.transpose else a
        a = _swap_groups(a, self.swap_groups) if self.swap_groups else a
        a = 1.0 / a if self.reciprocal else a
        a = a * self.factor if self.factor != 1.0 else a
        if a.size == math.prod(self.ir_shape):
            return a.reshape(self.ir_shape)
        return np.full(self.ir_shape, a.reshape(-1)[0])

    def inverse(self, new: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, bool]:
        """The value to store, and whether it keeps the stored dims (else it needs a new tensor)."""
        b = new if self.exact else new.astype(np.float64) / self.factor
        b = 1.0 / b if self.reciprocal else b
        b = _swap_groups(b, self.swap_groups) if self.swap_groups else b
        b = b.T if self.transpose else b
        if b.size == stored.size:
            return b.reshape(stored.shape).astype(stored.dtype, copy=False), True
        flat = b.reshape(-1)
        if stored.size == 1 and np.all(flat == flat[0]):
            return np.full(stored.shape, flat[0]).astype(stored.dtype), True
        return b.reshape(self.expanded_shape or (-1,)).astype(stored.dtype), False


@dataclass
class _ParamRef:
    """One role of one stored tensor: where it lives, who reads it, and its transform."""

    key: str
    kind: str  # "initializer" | "constant" | "computed"
    base: str  # initializer name, Constant output name, or folded value name
    node_index: int  # the ONNX node reading it
    slot: int  # ... at this input
    stored: np.ndarray  # the value under ``name``
    transform: _Transform
    name: str  # the name read at that input: ``base`` or a view of it (Identity, Unsqueeze, ...)


@dataclass
class _Names:
    """Every name holding a static value, the stored tensor it is a view of, and what reads it.

    Exporters share equal tensors between several names: ``layer1.0.bn1.weight = Identity(bn1.weight)``
    when default-initialised BatchNorms have equal γ. The writer gives every name the value of the
    role that name plays (:func:`_plan_names`), so the names keep their meaning."""

    values: dict[str, np.ndarray]
    origin: dict[str, tuple[str, str]]  # name -> (kind, stored tensor or computed value at the chain's start)
    parent: dict[str, tuple[int, str]]  # view output -> (index of the view node, the name it reads)
    readers: dict[str, list[tuple[int, int]]]  # name -> (node, input slot) reading its value; (-1, -1): graph output
    perm: dict[str, tuple[int, ...]] = field(default_factory=dict)  # Transpose view -> its permutation
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # origin -> readers through all its names

    def __post_init__(self) -> None:
        for name, readers in self.readers.items():
            self.counts[self.origin[name]] = self.counts.get(self.origin[name], 0) + len(readers)

    def tree_readers(self, origin: tuple[str, str]) -> int:
        """How many (node, input) read the stored tensor, through any of its names."""
        return self.counts.get(origin, 0)

    def down(self, name: str, value: np.ndarray) -> np.ndarray:
        """A value of the view ``name``'s parent, seen through the view."""
        value = value.transpose(self.perm[name]) if name in self.perm else value
        return value.reshape(self.values[name].shape)

    def up(self, name: str, value: np.ndarray) -> np.ndarray:
        """A value of the view ``name``, in its parent's layout."""
        if name in self.perm:
            return value.transpose(np.argsort(self.perm[name]))
        return value.reshape(self.values[self.parent[name][1]].shape)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing scope, and more."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(n for n in inner.input if n)
                names |= _subgraph_reads(inner)
    return names


def _names(model: onnx.ModelProto, folder: "_Folder") -> _Names:
    readers: dict[str, list[tuple[int, int]]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type in SHAPE_READERS:  # reads the shape only, which no rescaling changes
            continue
        view = bool(node.output) and folder.parent.get(node.output[0], (None,))[0] == index
        for slot, name in enumerate(node.input):
            if name in folder.origin and not (view and slot == 0):
                readers.setdefault(name, []).append((index, slot))
        for name in _subgraph_reads(node) & set(folder.origin):
            readers.setdefault(name, []).append((index, -1))
    for value in model.graph.output:
        if value.name in folder.origin:
            readers.setdefault(value.name, []).append((-1, -1))
    return _Names(folder.values, folder.origin, folder.parent, readers, folder.perm)


# --------------------------------------------------------------------------------------------------
# Reading the file and fixing the input shapes.


#: the last file :func:`external_data_files` parsed, kept for the load that follows it (jobs.py checks
#: the files a run involves, then loads): one parse per run instead of two. At most one entry, taken
#: (removed) by :func:`_read_model`, keyed by the file's identity so that a changed file is parsed again.
_PARSED: dict[tuple[str, int, int], onnx.ModelProto] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _parse(path: Path) -> onnx.ModelProto:
    """The file's ModelProto without its external data (the one :func:`external_data_files` kept, if any)."""
    proto = _PARSED.pop(_file_key(path), None)
    return proto if proto is not None else _load_hashed(path)


def _load_hashed(path: Path) -> onnx.ModelProto:
    """``onnx.load`` without external data, from the bytes read once: their sha256 (for the report) is
    computed in a thread while they are parsed, so the file is not read again to hash it."""
    from .base import DigestInBackground

    data = path.read_bytes()
    digest = DigestInBackground(data)
    proto = onnx.load_model_from_string(data)
    del data
    digest.record(path)
    return proto


def _all_tensors(graph: onnx.GraphProto):
    """Every tensor of a graph: initializers, attribute tensors (Constant values), subgraphs'."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_tensors(sub)


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    """The external data files of every tensor, subgraphs' included (onnx loads them all)."""
    return sorted({e.value for t in _all_tensors(proto.graph) if onnx.external_data_helper.uses_external_data(t)
                   for e in t.external_data if e.key == "location"})


#: element types stored two to a byte
_PACKED = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n))


def _check_tensors(path: Path, model: onnx.ModelProto) -> None:
    """Every stored tensor has an element type ONNX defines and as much data as its dims say: a
    malformed one is an unreadable file (exit 2), not an error deep inside numpy. The raw bytes of
    large tensors are checked when they are read (:func:`_detach_data`), not copied here."""
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"{path}: initializer name(s) {', '.join(map(repr, twice[:5]))} appear more than once "
                         "(a corrupt or hand-made file: ONNX names each value once)")
    for t in _all_tensors(model.graph):
        if t.HasField("segment"):
            raise UsageError(f"{path}: tensor {t.name!r} is stored in segments, which onnx cannot load")
        if t.data_type == onnx.TensorProto.STRING or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            field = onnx.helper.tensor_dtype_to_field(t.data_type)
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: tensor {t.name!r} has element type {t.data_type}, which ONNX does not "
                             "define (a corrupt or hand-made file)") from None
        n = math.prod(t.dims)
        packed = t.data_type in _PACKED
        if t.HasField("raw_data"):
            if n > DETACH_MIN_ENTRIES and _detachable(t) is not None:
                continue  # _detach_data reads and checks it
            have, want = len(t.raw_data), (n + 1) // 2 if packed else n * itemsize
        else:
            have = len(getattr(t, field))
            want = (n + 1) // 2 if packed else 2 * n if t.data_type in (onnx.TensorProto.COMPLEX64,
                                                                       onnx.TensorProto.COMPLEX128) else n
        if have != want:
            raise UsageError(f"{path}: tensor {t.name!r} of shape {tuple(t.dims)} holds {have} "
                             f"{'bytes' if t.HasField('raw_data') else 'values'} of data where {want} are "
                             "expected (a corrupt or truncated file)")


def _read_model(path: Path) -> tuple[onnx.ModelProto, bool, dict[str, np.ndarray]]:
    """The model with its external data loaded, whether it had any (parsed once), and the values of
    its large initializers, which the returned model holds without their data (:func:`_detach_data`)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        model = _parse(path)
        external = bool(_external_locations(model))
        if external:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise UsageError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise UsageError(f"{path} is not an ONNX model (no graph found in the file)")
    _check_tensors(path, model)
    model, data = _detach_data(model, path)
    return model, external, data


#: an initializer stored as raw bytes with more entries than this is held out of the ModelProto once read
#: (:func:`_detach_data`); the same bound as the weights the opset upgrade leaves out (onnx_upgrade)
DETACH_MIN_ENTRIES = 4096


def _detachable(tensor: onnx.TensorProto) -> np.dtype | None:
    """The numpy dtype of this initializer's ``raw_data`` if the array read from it holds exactly those
    bytes (checked against their length by the caller), else None: typed fields (``float_data``...),
    strings, external markers, small tensors, or a big-endian host (numpy_helper swaps bytes there)."""
    if (sys.byteorder != "little" or not tensor.HasField("raw_data") or tensor.HasField("segment")
            or tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING
            or math.prod(tensor.dims) <= DETACH_MIN_ENTRIES):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):  # an element type this onnx does not know
        return None


def _detach_data(model: onnx.ModelProto, path: Path | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(the model without the data of its large raw-data initializers, their values by name).

    The values are the read-only arrays the rest of the front end reads anyway (numpy_helper.to_array of
    such a tensor is a view of a copy of its ``raw_data``), and the writer writes them back as raw bytes:
    the weights are held once, not also as the file's bytes inside the ModelProto. A protobuf message's
    memory goes only with the whole message (clearing a field frees nothing), hence the copy: ``model``'s
    tensors lose their ``raw_data`` first, so that copy is small, and the caller drops ``model``.
    Detached tensors are the top graph's initializers only, each with no ``raw_data`` field left and its
    name unique among the initializers (:func:`detached_value` tells them apart)."""
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        counts[tensor.name] = counts.get(tensor.name, 0) + 1
    data: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        dtype = _detachable(tensor)
        if dtype is None or counts[tensor.name] > 1:
            continue
        raw = tensor.raw_data  # a copy of the bytes, read once
        if len(raw) != dtype.itemsize * math.prod(tensor.dims):  # packed 4/2/6-bit types, a malformed tensor
            if path is not None and tensor.data_type not in _PACKED:
                raise UsageError(f"{path}: tensor {tensor.name!r} of shape {tuple(tensor.dims)} holds {len(raw)} "
                                 f"bytes of data where {dtype.itemsize * math.prod(tensor.dims)} are expected "
                                 "(a corrupt or truncated file)")
            continue
        data[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        tensor.ClearField("raw_data")
    if not data:
        return model, data
    light = onnx.ModelProto()
    light.CopyFrom(model)
    return light, data


def detached_value(tensor: onnx.TensorProto, data: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The value :func:`_detach_data` took out of this initializer, or None when it holds its own data."""
    if tensor.name not in data or tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return data[tensor.name]


def initializer_value(tensor: onnx.TensorProto, data: Mapping[str, np.ndarray]) -> np.ndarray:
    """An initializer's value, detached (:func:`_detach_data`) or not."""
    value = detached_value(tensor, data)
    return numpy_helper.to_array(tensor) if value is None else value


# -- pathcond's file checks (jobs.py): the files a model consists of, the side files a save writes ----


def external_data_files(path: Path) -> list[Path]:
    """The files holding ``path``'s external data, read from the graph alone (no tensor data is
    loaded); [] for a file that is not a readable ONNX model (loading it says why). The parsed graph is
    kept for the next :func:`_read_model` of the same file."""
    _PARSED.clear()
    try:
        proto = _load_hashed(path)
        _PARSED[_file_key(path)] = proto
    except Exception:  # noqa: BLE001 - not ONNX: the loader reports it
        return []
    return [path.parent / loc for loc in _external_locations(proto)]


def data_file_for(path: Path) -> Path:
    """Where :meth:`OnnxModel.save` puts the external data of a model written to ``path``."""
    return path.with_name(path.name + ".data")


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UnsupportedModelError("the model imports no standard ONNX opset")


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim]


def _shape_hint(name: str, dims: Sequence) -> str:
    guess = ["1" if i == 0 else (str(d) if isinstance(d, int) else "N") for i, d in enumerate(dims)]
    return f"--input-shape {name}={'x'.join(guess)}"


def _fixed_shape(value: onnx.ValueInfoProto, given: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    dims = _dims(value)
    if value.name in given:
        shape = tuple(int(d) for d in given[value.name])
        if dims is not None and (len(dims) != len(shape) or any(
                isinstance(d, int) and d != s for d, s in zip(dims, shape))):
            raise UsageError(f"--input-shape {value.name}: {shape} does not fit the model's shape {dims}")
        return shape
    if dims is None:
        raise UsageError(f"input {value.name!r} has no shape in the model: pass --input-shape {value.name}=1xCx...")
    shape = []
    for axis, d in enumerate(dims):
        if not isinstance(d, int) and axis > 0:
            raise UsageError(
                f"input {value.name!r} has a dynamic dimension {d or '?'} at axis {axis}: "
                f"give the full shape with {_shape_hint(value.name, dims)}")
        shape.append(d if isinstance(d, int) else 1)
    return tuple(shape)


def _input_shapes(model: onnx.ModelProto, options: LoadOptions) -> dict[str, tuple[int, ...]]:
    inputs = _real_inputs(model)
    names = [v.name for v in inputs]
    given = name_lone_shape(options.input_shapes, names)
    for name in given:
        if name not in names:
            raise UsageError(f"--input-shape names {name!r}, but the model's inputs are {names}")
    return {v.name: _fixed_shape(v, given) for v in inputs}


def _probe(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], folder: _Folder) -> onnx.ModelProto:
    """A light copy of the graph for shape inference: folded values become small initializers (or,
    when large, typed inputs), folded nodes are dropped and the inputs get their fixed shapes."""
    nodes = [n for i, n in enumerate(model.graph.node) if i not in folder.static_nodes]
    read = {name for n in nodes for name in n.input if name in folder.values}
    small = [numpy_helper.from_array(folder.values[n], n) for n in read if folder.values[n].size <= 4096]
    large = [onnx.helper.make_tensor_value_info(
        n, onnx.helper.np_dtype_to_tensor_dtype(folder.values[n].dtype), folder.values[n].shape)
        for n in read if folder.values[n].size > 4096]
    inputs = []
    for value in _real_inputs(model):
        elem = value.type.tensor_type.elem_type
        inputs.append(onnx.helper.make_tensor_value_info(value.name, elem, shapes[value.name]))
    outputs = [onnx.helper.make_empty_tensor_value_info(v.name) for v in model.graph.output]
    graph = onnx.helper.make_graph(nodes, "probe", inputs + large, outputs, small)
    # IR >= 4: before it, an initializer is only the default of a graph input and shape inference ignores
    # the folded values above (the zoo's IR 3 files would leave every shape unknown)
    probe = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=max(model.ir_version, 4))
    probe.functions.extend(model.functions)
    return probe


def _infer(probe: onnx.ModelProto) -> dict:
    """ONNX shape inference: value name -> (shape or None, elem type)."""
    try:
        probe = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help; missing shapes are reported where they matter
        pass
    info: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    for value in list(probe.graph.input) + list(probe.graph.value_info) + list(probe.graph.output):
        dims = _dims(value)
        known = dims is not None and all(isinstance(d, int) for d in dims)
        info[value.name] = (tuple(dims) if known else None, value.type.tensor_type.elem_type)
    return info


POOL_OPS = frozenset({"MaxPool", "AveragePool"})


def _floor_next_ceil_pools(probe: onnx.ModelProto, info: Mapping) -> bool:
    """Rewrite the probe's ceil-mode pools, in graph order, as floor-mode pools of the same output size
    (the ceil-mode overhang added to the end pads, ir.pool_geometry's rule); stop after the first whose
    size ONNX's inference got wrong, since what follows it was inferred from that wrong size. Returns
    whether shapes must be inferred again (a pool ONNX sized right, once rewritten, changes no shape).

    ONNX's shape inference gives ceil mode one window too many when the last window would start in the
    end padding; onnxruntime and PyTorch drop that window (a (1, 11, 7) AvgPool k=2 s=2 p=1 ceil is
    (1, 11, 4), not (1, 11, 5)), so every shape after such a pool would be wrong."""
    for node in probe.graph.node:
        if node.op_type not in POOL_OPS or not _attr(node, "ceil_mode", 0):
            continue
        if _text_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", ""):
            continue  # ceil_mode does not apply to automatic padding
        before = info.get(node.input[0], (None, 0))[0]
        if before is None:
            return False
        kernel = list(_attr(node, "kernel_shape"))
        d = len(kernel)
        if len(before) != d + 2:
            return False
        ir_node = Node(node.name, "maxpool", ("x",), "y", attrs={
            "kernel": kernel, "stride": list(_attr(node, "strides", [1] * d)),
            "dilation": list(_attr(node, "dilations", [1] * d)),
            "pads": list(_attr(node, "pads", [0] * (2 * d))), "ceil_mode": True})
        kernel, stride, dilation, pads = pool_geometry(ir_node, before[2:])
        out = tuple(before[:2]) + tuple((n + pads[i] + pads[d + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                                        for i, n in enumerate(before[2:]))
        keep = [a for a in node.attribute if a.name not in ("ceil_mode", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep + [onnx.helper.make_attribute("pads", pads)])
        if info.get(node.output[0], (None, 0))[0] != out:
            return True
    return False


def _infer_probe(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], folder: "_Folder") -> dict:
    """Shape inference on the probe, with ceil-mode pooling sizes as onnxruntime computes them."""
    probe = _probe(model, shapes, folder)
    info = _infer(probe)
    while _floor_next_ceil_pools(probe, info):
        info = _infer(probe)
    return info


def _fold_graph(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], opset: int,
                data: Mapping[str, np.ndarray] | None = None):
    """Alternate folding and shape inference until no more value becomes static. ``data``: the values
    :func:`_detach_data` took out of the model's initializers."""
    data = data or {}
    stored = {t.name: initializer_value(t, data) for t in model.graph.initializer}  # once, shared by every pass
    folder = _Folder(model, {}, opset, stored)
    for _ in range(8):
        info = _infer_probe(model, shapes, folder)
        before = len(folder.static_nodes)
        folder = _Folder(model, info, opset, stored)
        if len(folder.static_nodes) == before:
            break
    return folder, info


# --------------------------------------------------------------------------------------------------
# Folding the static part of the graph.


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _text_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    value = onnx.helper.get_attribute_value(a)
    if a.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if a.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    raise _Refuse(f"Constant with a {a.name!r} attribute is not supported")


class _Folder:
    """Evaluates the nodes whose outputs do not depend on the graph inputs."""

    def __init__(self, model: onnx.ModelProto, info, opset: int, stored: Mapping[str, np.ndarray] | None = None):
        """``stored``: the initializers as arrays (read-only; read from the model when not given, which
        then must hold their data: see _detach_data)."""
        self.model, self.info, self.opset = model, info, opset
        if stored is None:
            stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.values: dict[str, np.ndarray] = dict(stored)
        self.origin: dict[str, tuple[str, str]] = {n: ("initializer", n) for n in self.values}
        self.parent: dict[str, tuple[int, str]] = {}  # view output -> (view node index, the name it reads)
        self.perm: dict[str, tuple[int, ...]] = {}  # Transpose view output -> its permutation
        self.static_nodes: set[int] = set()
        for index, node in enumerate(model.graph.node):
            self._visit(index, node)

    def _visit(self, index: int, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx") or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            return
        outputs = self._fold(node)
        if outputs is None:
            return
        self.static_nodes.add(index)
        for name, value in zip(node.output, outputs):
            if name:
                self.values[name] = np.asarray(value)
        if node.op_type == "Constant":
            self.origin[node.output[0]] = ("constant", node.output[0])
        elif node.op_type in VIEW_OPS and node.input[0] in self.origin:
            self.origin[node.output[0]] = self.origin[node.input[0]]
            self.parent[node.output[0]] = (index, node.input[0])
            if node.op_type == "Transpose":
                rank = self.values[node.input[0]].ndim
                self.perm[node.output[0]] = tuple(_attr(node, "perm", list(range(rank))[::-1]))
        else:
            self.origin.update({name: ("computed", name) for name in node.output if name})

    def _known(self, name: str) -> bool:
        return not name or name in self.values

    def _fold(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        op = node.op_type
        try:
            if op == "Constant":
                return [_constant_value(node)]
            if op in SHAPE_READERS:
                shape = self._shape_of(node.input[0])
                if shape is None:
                    return None
                if op == "Size":
                    return [np.array(math.prod(shape), dtype=np.int64)]
                start, end = _attr(node, "start", 0), _attr(node, "end", None)
                return [np.array(shape[start:end], dtype=np.int64)]
            if op == "CastLike" and self._known(node.input[0]):
                return self._cast_like(node)
            if not all(self._known(n) for n in node.input):
                return None
            if op == "Identity":
                return [self.values[node.input[0]]]
            return self._reference(node)
        except _Refuse:
            return None

    def _shape_of(self, name: str) -> tuple[int, ...] | None:
        if name in self.values:
            return tuple(self.values[name].shape)
        return self.info.get(name, (None, 0))[0]

    def _cast_like(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        target = node.input[1]
        if target in self.values:
            return [self.values[node.input[0]].astype(self.values[target].dtype)]
        elem = self.info.get(target, (None, 0))[1]
        if not elem:
            return None
        return [self.values[node.input[0]].astype(onnx.helper.tensor_dtype_to_np_dtype(elem))]

    def _reference(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        from onnx.reference import ReferenceEvaluator

        try:
            feeds = {n: self.values[n] for n in node.input if n}
            evaluator = ReferenceEvaluator(_one_node_model(node, feeds, self.opset))
            return [np.asarray(v) for v in evaluator.run(None, feeds)]
        except Exception:
            return None


def _one_node_model(node: onnx.NodeProto, feeds: Mapping[str, np.ndarray], opset: int) -> onnx.ModelProto:
    """``node`` alone in a model of the given opset. The reference evaluator picks an op's version from
    a model's opset import; given a bare node it may run the newest version (Unsqueeze-13, reading
    ``axes`` as an input, on an opset-11 node whose ``axes`` is an attribute)."""
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for n, v in feeds.items()]
    outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
