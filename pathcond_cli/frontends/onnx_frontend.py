"""The ONNX front end: an ONNX ReLU network -> :class:`pathcond_cli.ir.Graph`, and back.

Reading
    The model is loaded with its external data. Input shapes are fixed (dynamic batch -> 1, other
    dynamic dims from ``--input-shape``) and ONNX shape inference gives every value a shape. A first
    pass folds every value that does not depend on the inputs (initializers, Constant nodes, Identity
    chains, shape subgraphs such as ``Shape -> Gather -> Concat`` feeding a Reshape): those are
    *static*. Each remaining node that reaches an output is translated by a converter of
    :data:`CONVERTERS`; a node that cannot be translated is collected as an
    :class:`~pathcond_cli.errors.Offender` and all of them are reported at once.

Models before opset 11
    The converters are written against opset 11 and later. An older model (the classic model zoo is
    opset 7-9, IR 3) is upgraded in memory with ``onnx.version_converter`` and that copy is translated.
    The new values are written into the *original* graph and opset when every parameter's reading node
    and stored tensor are found there unchanged (the converter adapts attributes, not parameter
    layouts); else the upgraded graph is written, with a warning. Either way verification runs the
    original file.

Parameter keys
    A parameter stored once and read by exactly one (node, input) is keyed by its initializer name
    (or by the output name of the Constant node / folded value holding it). Identity, Unsqueeze,
    Squeeze, Reshape, Flatten and Transpose of a stored tensor are *views* of it (:data:`VIEW_OPS`),
    written back through the view (``x @ W.t()`` exported as ``MatMul(x, Transpose(W))``). A stored
    tensor read by several roles (exporters deduplicate equal tensors) gets one key per role: the
    name read at that input when nothing else reads that name, else ``"<name>@<node name>:<slot>"``,
    so that each role is rescaled on its own.

Writing
    :meth:`OnnxModel.save` copies the ModelProto and gives every name the value of the role it plays
    (:func:`_plan_names`): a stored tensor is changed in place; a view whose value must now differ from
    the tensor it views (``layer1.0.bn1.weight = Identity(bn1.weight)`` when only one γ is rescaled) is
    replaced by an initializer of the same name, and its node goes. A new name
    (``<name>.pathcond.<slot>``) appears only where one name is read directly by roles given different
    values (one initializer read by two nodes, a broadcast scalar split per channel), or where the
    parameter is computed (Cast, Mul, ... of stored tensors), which cannot be written back. Transforms
    applied on reading (Gemm ``transB=0`` and ``alpha``/``beta``, MatMul's (I, O) layout, Sub's
    negation, Div's reciprocal, broadcast scalars) are inverted. With external data, float tensors of
    1 KiB or more go to ``OUT.data``; smaller and integer tensors (shapes, axes) stay inline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from ..errors import Offender, Refusal, UnsupportedModelError, UsageError
from ..ir import Graph, GraphError, Node, pool_geometry, swap_group_axes
from .base import InputSpec, LoadOptions, name_lone_shape

MIN_OPSET = 11
HEAD_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid"})
#: ops known not to be positively homogeneous (f(a x) != a f(x) for some a > 0)
NOT_HOMOGENEOUS = frozenset(
    {
        "Clip", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Exp", "Log", "Softmax",
        "LogSoftmax", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish", "Swish", "Sqrt", "Pow",
        "LayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization",
        "LRN", "Abs", "Neg", "Reciprocal", "Sin", "Cos", "ThresholdedRelu", "Shrink",
    }
)
SHAPE_READERS = frozenset({"Shape", "Size"})
#: ops whose output holds the elements of their first input, reshaped or transposed: a static value
#: read through a chain of them is a view of the stored tensor at the chain's start (see _Names)
VIEW_OPS = frozenset({"Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})
# Parameter-free layout and normalisation ops. A chain of them straight from the graph inputs that the
# network's converters cannot read (an NHWC -> NCHW Transpose, a Cast, ...) is input preprocessing: the
# rescaling never touches it, so the analysed network starts at its result (see _preprocessing).
PREPROCESSING_OPS = frozenset({"Transpose", "Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
                               "Identity", "Sub", "Div", "Mul", "Add", "Slice", "Pad", "Resize", "Upsample"})


_Refuse = Refusal  # raised by a converter: this node cannot be translated (the message says why)


# --------------------------------------------------------------------------------------------------
# Parameter transforms: stored tensor <-> IR tensor.


def _swap_groups(a: np.ndarray, groups: int) -> np.ndarray:
    """numpy twin of ir.swap_group_axes: (A, B/groups, *k) -> (B, A/groups, *k), its own inverse."""
    return swap_group_axes(torch.from_numpy(np.ascontiguousarray(a)), groups).numpy()


@dataclass(frozen=True)
class _Transform:
    """How the IR value of a parameter is derived from the stored tensor (and back)."""

    ir_shape: tuple[int, ...]
    transpose: bool = False
    swap_groups: int = 0  # > 0: a transposed convolution's weight, swapped to (O, I/groups, *k)
    factor: float = 1.0
    reciprocal: bool = False
    expanded_shape: tuple[int, ...] | None = None  # stored layout to use when a broadcast scalar splits

    def forward(self, stored: np.ndarray) -> np.ndarray:
        a = stored.astype(np.float64)
        a = a.T if self.transpose else a
        a = _swap_groups(a, self.swap_groups) if self.swap_groups else a
        a = 1.0 / a if self.reciprocal else a
        a = a * self.factor
        if a.size == math.prod(self.ir_shape):
            return a.reshape(self.ir_shape)
        return np.full(self.ir_shape, a.reshape(-1)[0])

    def inverse(self, new: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, bool]:
        """The value to store, and whether it keeps the stored dims (else it needs a new tensor)."""
        b = new.astype(np.float64) / self.factor
        b = 1.0 / b if self.reciprocal else b
        b = _swap_groups(b, self.swap_groups) if self.swap_groups else b
        b = b.T if self.transpose else b
        if b.size == stored.size:
            return b.reshape(stored.shape).astype(stored.dtype), True
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


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN equals itself), without copying large tensors."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "O":
        return bool(np.array_equal(a, b))
    bits = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (a, b)]
    return bool(np.array_equal(*bits))


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

    def below(name: str) -> list[np.ndarray]:
        return wants(name) + [names.up(child, w) for child in children.get(name, []) for w in below(child)]

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
# Reading the file and fixing the input shapes.


def _read_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise UsageError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise UsageError(f"{path} is not an ONNX model (no graph found in the file)")
    return model


def _uses_external_data(path: Path) -> bool:
    proto = onnx.load(str(path), load_external_data=False)
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return any(onnx.external_data_helper.uses_external_data(t) for t in tensors)


# -- pathcond's file checks (jobs.py): the files a model consists of, the side files a save writes ----


def external_data_files(path: Path) -> list[Path]:
    """The files holding ``path``'s external data, read from the graph alone (cheap: no tensor data is
    loaded); [] for a file that is not a readable ONNX model (loading it says why)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX: the loader reports it
        return []
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    locations = {e.value for t in tensors if onnx.external_data_helper.uses_external_data(t)
                 for e in t.external_data if e.key == "location"}
    return [path.parent / loc for loc in sorted(locations)]


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
    whether a pool was rewritten.

    ONNX's shape inference gives ceil mode one window too many when the last window would start in the
    end padding; onnxruntime and PyTorch drop that window (a (1, 11, 7) AvgPool k=2 s=2 p=1 ceil is
    (1, 11, 4), not (1, 11, 5)), so every shape after such a pool would be wrong."""
    changed = False
    for node in probe.graph.node:
        if node.op_type not in POOL_OPS or not _attr(node, "ceil_mode", 0):
            continue
        if _text_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", ""):
            continue  # ceil_mode does not apply to automatic padding
        before = info.get(node.input[0], (None, 0))[0]
        if before is None:
            return changed
        kernel = list(_attr(node, "kernel_shape"))
        d = len(kernel)
        if len(before) != d + 2:
            return changed
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
        changed = True
        if info.get(node.output[0], (None, 0))[0] != out:
            return changed
    return changed


def _infer_probe(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], folder: "_Folder") -> dict:
    """Shape inference on the probe, with ceil-mode pooling sizes as onnxruntime computes them."""
    probe = _probe(model, shapes, folder)
    info = _infer(probe)
    while _floor_next_ceil_pools(probe, info):
        info = _infer(probe)
    return info


def _fold_graph(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], opset: int):
    """Alternate folding and shape inference until no more value becomes static."""
    folder = _Folder(model, {}, opset)
    for _ in range(8):
        info = _infer_probe(model, shapes, folder)
        before = len(folder.static_nodes)
        folder = _Folder(model, info, opset)
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

    def __init__(self, model: onnx.ModelProto, info, opset: int):
        self.model, self.info, self.opset = model, info, opset
        self.values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
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


# --------------------------------------------------------------------------------------------------
# Translation context.


@dataclass
class _Context:
    model: onnx.ModelProto
    folder: _Folder
    info: dict
    node_names: list[str]
    names: _Names
    nodes: list[Node] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    refs: dict[str, _ParamRef] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)
    offenders: list[Offender] = field(default_factory=list)
    offender_nodes: list[int] = field(default_factory=list)  # ONNX node index of each offender
    index: int = -1  # the ONNX node being converted

    @property
    def node(self) -> onnx.NodeProto:
        return self.model.graph.node[self.index]

    def const(self, name: str) -> np.ndarray | None:
        return self.folder.values.get(name) if name else None

    def x(self, slot: int = 0) -> str:
        """The IR value read at this input, which must be an activation."""
        name = self.node.input[slot]
        if name in self.folder.values:
            raise _Refuse(f"input {slot} ({name!r}) is a constant where an activation is expected")
        return self.alias.get(name, name)

    def shape(self, slot: int = 0) -> tuple[int, ...]:
        name = self.node.input[slot]
        shape = self.folder._shape_of(name)
        if shape is None:
            raise _Refuse(f"the shape of {name!r} is unknown (ONNX shape inference could not tell)")
        return shape

    def static(self, slot: int, what: str) -> np.ndarray:
        value = self.const(self.node.input[slot]) if slot < len(self.node.input) else None
        if value is None:
            name = self.node.input[slot] if slot < len(self.node.input) else ""
            if name in {v.name for v in self.model.graph.input}:  # torch.onnx.export(export_params=False)
                raise _Refuse(f"its {what} (input {slot}) is the graph input {name!r}: the file stores no value for it")
            raise _Refuse(f"its {what} (input {slot}) is not a constant")
        return value

    def param(self, slot: int, transform: _Transform) -> str:
        """Key of the parameter at this input: the stored tensor's name when it has no other reader,
        else the name read here when nothing else reads that name, else ``name@node:slot``."""
        name = self.node.input[slot]
        kind, base = self.folder.origin[name]
        if kind != "computed" and self.names.tree_readers((kind, base)) <= 1:
            key = base
        elif self.names.readers.get(name) == [(self.index, slot)]:
            key = name
        else:
            key = f"{name}@{self.node_names[self.index]}:{slot}"
        stored = self.folder.values[name]
        value = transform.forward(stored)
        if not np.all(np.isfinite(value)):  # the path statistics would overflow without saying where
            raise _Refuse(f"its input {slot} ({name!r}) holds inf or NaN")
        self.refs[key] = _ParamRef(key, kind, base, self.index, slot, stored, transform, name)
        self.params[key] = torch.from_numpy(np.ascontiguousarray(value)).to(_torch_dtype(stored.dtype))
        return key

    def emit(self, op: str, inputs: Sequence[str], params=None, attrs=None, step: str = "") -> str:
        """Append an IR node for the ONNX node being converted; returns the IR value it computes.

        A converter that needs two IR nodes names the first one's ``step``: its value is private to the
        IR (``OUTPUT:step``) and its node is called ``NAME:step``."""
        node = self.node
        name, output = self.node_names[self.index], node.output[0]
        if step:
            name, output = f"{name}:{step}", f"{output}:{step}"
        self.nodes.append(Node(name, op, tuple(inputs), output, dict(params or {}), dict(attrs or {}), node.op_type))
        return output


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=dtype)).dtype


# --------------------------------------------------------------------------------------------------
# Converters: one per ONNX op type.


def _channel_vector(ctx: _Context, value: np.ndarray, rank: int, channels: int) -> tuple[int, ...] | None:
    """If ``value`` broadcasts against a (1, C, ...) tensor as a per-channel constant: the stored
    layout to use for a full per-channel vector; else None."""
    if value.ndim > rank:
        return None
    padded = (1,) * (rank - value.ndim) + tuple(value.shape)
    if padded[0] != 1 or any(d != 1 for d in padded[2:]) or padded[1] not in (1, channels):
        return None
    return (channels,) + (1,) * (rank - 2) if value.ndim < rank else (1, channels) + (1,) * (rank - 2)


def _gemm(ctx: _Context) -> None:
    node = ctx.node
    if _attr(node, "transA", 0):
        raise _Refuse("transA=1 (transposed activations) is not a linear layer on features")
    w = ctx.static(1, "weight")
    if w.ndim != 2:
        raise _Refuse("its weight is not 2-D")
    trans_b = bool(_attr(node, "transB", 0))
    out = w.shape[0] if trans_b else w.shape[1]
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    params = {"weight": ctx.param(1, _Transform((out, w.size // out), transpose=not trans_b, factor=alpha))}
    if len(node.input) > 2 and node.input[2] and beta != 0.0:
        c = ctx.static(2, "bias")
        if c.size not in (1, out) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            raise _Refuse(f"its bias of shape {c.shape} is not a vector of {out} values")
        params["bias"] = ctx.param(2, _Transform((out,), factor=beta, expanded_shape=(out,)))
    ctx.emit("linear", [ctx.x(0)], params)


def _matmul(ctx: _Context) -> None:
    if len(ctx.shape(0)) != 2:
        raise _Refuse(f"MatMul on a {len(ctx.shape(0))}-D activation acts on its last axis, not on features")
    w = ctx.static(1, "right operand")
    if w.ndim != 2:
        raise _Refuse("its right operand is not a constant 2-D matrix")
    ctx.emit("linear", [ctx.x(0)], {"weight": ctx.param(1, _Transform((w.shape[1], w.shape[0]), transpose=True))})


def _spatial_pads(ctx: _Context, kernel, strides, dilations) -> list[int]:
    node = ctx.node
    d = len(kernel)
    auto_pad = _text_attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(_attr(node, "pads", [0] * (2 * d)))
    if auto_pad == "VALID":
        return [0] * (2 * d)
    spatial = ctx.shape(0)[2:]
    begin, end = [], []
    for length, k, s, dil in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(length / s) - 1) * s + (k - 1) * dil + 1 - length)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _conv(ctx: _Context) -> None:
    node = ctx.node
    w = ctx.static(1, "weight")
    d = w.ndim - 2
    if d not in (1, 2):
        raise _Refuse(f"{d}-D convolutions are not supported (1-D and 2-D are)")
    kernel = list(w.shape[2:])
    if list(_attr(node, "kernel_shape", kernel)) != kernel:
        raise _Refuse("its kernel_shape does not match its weight")
    strides = list(_attr(node, "strides", [1] * d))
    dilations = list(_attr(node, "dilations", [1] * d))
    attrs = {"stride": strides, "dilation": dilations, "groups": int(_attr(node, "group", 1)),
             "pads": _spatial_pads(ctx, kernel, strides, dilations)}
    params = {"weight": ctx.param(1, _Transform(tuple(w.shape)))}
    if len(node.input) > 2 and node.input[2]:
        params["bias"] = ctx.param(2, _Transform((w.shape[0],), expanded_shape=(w.shape[0],)))
    ctx.emit("conv", [ctx.x(0)], params, attrs)


def _conv_transpose(ctx: _Context) -> None:
    """ConvTranspose: weight (I, O/group, *k), held swapped in the IR; the pads are what is cropped
    from the full output, from the attribute or (output_shape, SAME_*) from ONNX's rule."""
    node = ctx.node
    w = ctx.static(1, "weight")
    d = w.ndim - 2
    if d not in (1, 2):
        raise _Refuse(f"{d}-D transposed convolutions are not supported (1-D and 2-D are)")
    groups = int(_attr(node, "group", 1))
    kernel = list(w.shape[2:])
    if list(_attr(node, "kernel_shape", kernel)) != kernel:
        raise _Refuse("its kernel_shape does not match its weight")
    strides = list(_attr(node, "strides", [1] * d))
    dilations = list(_attr(node, "dilations", [1] * d))
    extra = list(_attr(node, "output_padding", [0] * d))
    auto_pad = _text_attr(node, "auto_pad", "NOTSET")
    spatial = ctx.shape(0)[2:]
    full = [(n - 1) * s + (k - 1) * dl + 1 + e for n, s, k, dl, e in zip(spatial, strides, kernel, dilations, extra)]
    out_shape = _attr(node, "output_shape", None)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") or out_shape is not None:
        target = list(out_shape)[-d:] if out_shape is not None else [n * s for n, s in zip(spatial, strides)]
        total = [f - t for f, t in zip(full, target)]
        if any(t < 0 for t in total):
            raise _Refuse(f"its output_shape {target} is larger than the full output {full}")
        upper = auto_pad == "SAME_UPPER"  # ONNX: only SAME_UPPER puts the odd pad last (output_shape: first)
        pads = [t // 2 if upper else t - t // 2 for t in total] + [t - t // 2 if upper else t // 2 for t in total]
    elif auto_pad == "VALID":
        pads = [0] * (2 * d)
    else:
        pads = list(_attr(node, "pads", [0] * (2 * d)))
    attrs = {"stride": strides, "dilation": dilations, "groups": groups, "pads": pads, "output_padding": extra}
    o = w.shape[1] * groups
    params = {"weight": ctx.param(1, _Transform((o, w.shape[0] // groups, *kernel), swap_groups=groups))}
    if len(node.input) > 2 and node.input[2]:
        params["bias"] = ctx.param(2, _Transform((o,), expanded_shape=(o,)))
    ctx.emit("conv_transpose", [ctx.x(0)], params, attrs)


def _batchnorm(ctx: _Context) -> None:
    node = ctx.node
    if _attr(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise _Refuse("training-mode BatchNormalization (batch statistics) is not an inference layer")
    c = ctx.static(1, "scale").size
    roles = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
    params = {}
    for role, slot in roles.items():
        if ctx.static(slot, role).size != c:
            raise _Refuse(f"its {role} does not have {c} values")
        params[role] = ctx.param(slot, _Transform((c,), expanded_shape=(c,)))
    ctx.emit("batchnorm", [ctx.x(0)], params, {"eps": float(_attr(node, "epsilon", 1e-5))})


def _simple(op: str, **defaults) -> Callable[[_Context], None]:
    def convert(ctx: _Context) -> None:
        attrs = {k: float(_attr(ctx.node, k, v)) for k, v in defaults.items()}
        ctx.emit(op, [ctx.x(0)], attrs=attrs)

    return convert


def _prelu(ctx: _Context) -> None:
    slope = ctx.static(1, "slope")
    channels = ctx.shape(0)[1]
    if slope.size not in (1, channels):
        raise _Refuse(f"its slope of shape {slope.shape} is not per channel")
    ctx.emit("prelu", [ctx.x(0)], {"slope": ctx.param(1, _Transform((slope.size,)))})


def _pool_attrs(ctx: _Context) -> dict:
    node = ctx.node
    kernel = list(_attr(node, "kernel_shape"))
    d = len(kernel)
    if d not in (1, 2):
        raise _Refuse(f"{d}-D pooling is not supported (1-D and 2-D are)")
    strides = list(_attr(node, "strides", [1] * d))
    dilations = list(_attr(node, "dilations", [1] * d))
    pads = _spatial_pads(ctx, kernel, strides, dilations)
    return {"kernel": kernel, "stride": strides, "dilation": dilations, "pads": pads,
            "ceil_mode": bool(_attr(node, "ceil_mode", 0))}


def _maxpool(ctx: _Context) -> None:
    node = ctx.node
    if _attr(node, "storage_order", 0) != 0:
        raise _Refuse("storage_order=1 (column-major indices) is not supported")
    if len(node.output) > 1 and node.output[1]:
        raise _Refuse("its second output (argmax indices) is used")
    ctx.emit("maxpool", [ctx.x(0)], attrs=_pool_attrs(ctx))


def _avgpool(ctx: _Context) -> None:
    attrs = _pool_attrs(ctx)
    attrs["count_include_pad"] = bool(_attr(ctx.node, "count_include_pad", 0))
    ctx.emit("avgpool", [ctx.x(0)], attrs=attrs)


def _global_avgpool(ctx: _Context) -> None:
    ctx.emit("global_avgpool", [ctx.x(0)], attrs={"keepdim": True})


def _global_maxpool(ctx: _Context) -> None:
    spatial = list(ctx.shape(0)[2:])
    if len(spatial) not in (1, 2):
        raise _Refuse("only 1-D and 2-D global max pooling is supported")
    d = len(spatial)
    attrs = {"kernel": spatial, "stride": [1] * d, "dilation": [1] * d, "pads": [0] * (2 * d), "ceil_mode": False}
    ctx.emit("maxpool", [ctx.x(0)], attrs=attrs)


def _reduce_axes(ctx: _Context, rank: int) -> list[int]:
    node = ctx.node
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.static(1, "axes").reshape(-1).tolist()
    if not axes:
        raise _Refuse("it reduces over all axes, channels included")
    return sorted(a % rank for a in axes)


def _reduce_max(ctx: _Context) -> None:
    """ReduceMax over spatial axes is a max pool whose window spans them (AdaptiveMaxPool to 1, as the
    dynamo exporter writes it); over the batch or channel axis it mixes channels and is refused."""
    shape = ctx.shape(0)
    rank = len(shape)
    axes = _reduce_axes(ctx, rank)
    if rank < 3 or axes[0] < 2:
        axis = "batch" if axes[0] == 0 else "channel"
        raise _Refuse(f"it takes the max over axes {axes}, the {axis} axis included: not a per-channel pooling")
    d = rank - 2
    if d not in (1, 2):
        raise _Refuse(f"a max over a {d}-D map is not supported (1-D and 2-D are)")
    kernel = [shape[i] if i in axes else 1 for i in range(2, rank)]
    attrs = {"kernel": kernel, "stride": [1] * d, "dilation": [1] * d, "pads": [0] * (2 * d), "ceil_mode": False}
    if _attr(ctx.node, "keepdims", 1):
        ctx.emit("maxpool", [ctx.x(0)], attrs=attrs)
        return
    pooled = ctx.emit("maxpool", [ctx.x(0)], attrs=attrs, step="max")
    after = tuple(n for i, n in enumerate(shape) if i not in axes)
    _emit_reshape(ctx, tuple(1 if i in axes else n for i, n in enumerate(shape)), after, pooled)


def _reduce_mean(ctx: _Context) -> None:
    rank = len(ctx.shape(0))
    axes = _reduce_axes(ctx, rank)
    if axes != list(range(2, rank)) or rank < 3:
        raise _Refuse(f"it averages over axes {axes}, not over exactly the spatial axes {list(range(2, rank))}")
    ctx.emit("global_avgpool", [ctx.x(0)], attrs={"keepdim": bool(_attr(ctx.node, "keepdims", 1))})


def _emit_reshape(ctx: _Context, before: tuple[int, ...], after: tuple[int, ...], value: str | None = None) -> None:
    """A reshape of ``value`` (default: the node's activation input) that keeps every value in its channel:
    the same shape, a channel-major flatten to (1, C·S), or the channel's values on other spatial axes (a
    unit spatial axis added or removed). Anything else moves values across channels (or batch items)."""
    value = ctx.x(0) if value is None else value
    after = tuple(after)
    if after[1:] == tuple(before[1:]):
        ctx.emit("identity", [value])
    elif len(after) == 2 and len(before) > 2 and after[1] == math.prod(before[1:]):
        ctx.emit("flatten", [value])
    elif (len(before) >= 2 and len(after) in (3, 4) and after[:2] == tuple(before[:2])
          and math.prod(after[2:]) == math.prod(before[2:])):
        ctx.emit("reshape", [value], attrs={"spatial": list(after[2:])})
    else:
        raise _Refuse(f"it reshapes {before} to {after}, which moves values across channels")


def _reshape_target(ctx: _Context, before: tuple[int, ...]) -> tuple[int, ...]:
    target = ctx.static(1, "target shape").reshape(-1).astype(np.int64).tolist()
    allow_zero = bool(_attr(ctx.node, "allowzero", 0))
    dims = [before[i] if t == 0 and not allow_zero else t for i, t in enumerate(target)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(before) // max(known, 1)
    return tuple(dims)


def _reshape(ctx: _Context) -> None:
    before = ctx.shape(0)
    _emit_reshape(ctx, before, _reshape_target(ctx, before))


def _flatten(ctx: _Context) -> None:
    rank = len(ctx.shape(0))
    if _attr(ctx.node, "axis", 1) % rank != 1:
        raise _Refuse("only Flatten with axis=1 keeps the batch axis apart")
    ctx.emit("flatten", [ctx.x(0)])


def _squeeze(ctx: _Context) -> None:
    before = ctx.shape(0)
    axes = _reduce_axes(ctx, len(before))
    if axes[0] < 2 or any(before[a] != 1 for a in axes):
        raise _Refuse(f"it squeezes axes {axes}, not unit spatial axes")
    _emit_reshape(ctx, before, tuple(d for i, d in enumerate(before) if i not in axes))


def _unsqueeze(ctx: _Context) -> None:
    """A unit spatial axis added (the dynamo exporter runs 1-D pooling as 2-D pooling between an Unsqueeze
    and a Squeeze): the values stay in their channels. A new batch or channel axis is refused."""
    before = ctx.shape(0)
    axes = _attr(ctx.node, "axes")
    if axes is None:
        axes = ctx.static(1, "axes").reshape(-1).tolist()
    rank = len(before) + len(axes)
    axes = sorted(int(a) % rank for a in axes)
    if not axes or axes[0] < 2:
        raise _Refuse(f"it inserts axes {axes}: only new axes after the channel axis (2 or later) keep "
                      "batch and channels apart")
    after = list(before)
    for axis in axes:
        after.insert(axis, 1)
    _emit_reshape(ctx, before, tuple(after))


def _is_read(model: onnx.ModelProto, name: str) -> bool:
    """Whether a node or the graph's outputs read this value (old exporters declare outputs nobody reads,
    such as Dropout's mask before opset 10)."""
    if not name:
        return False
    return any(name in node.input for node in model.graph.node) or any(v.name == name for v in model.graph.output)


def _identity(ctx: _Context) -> None:
    node = ctx.node
    if node.op_type == "Dropout":
        if len(node.output) > 1 and _is_read(ctx.model, node.output[1]):
            raise _Refuse("its mask output is used")
        if len(node.input) > 2 and node.input[2] and bool(ctx.static(2, "training_mode").reshape(-1)[0]):
            raise _Refuse("it runs in training mode")
    ctx.emit("identity", [ctx.x(0)])


def _split_operands(ctx: _Context) -> tuple[int, int]:
    """(slot of the activation, slot of the constant) of a binary op with one constant operand."""
    static = [ctx.const(n) is not None for n in ctx.node.input]
    if static == [False, True]:
        return 0, 1
    if static == [True, False]:
        return 1, 0
    raise _Refuse("it combines two activations")


def _per_channel(ctx: _Context, xs: int, cs: int, what: str) -> tuple[int, tuple[int, ...]]:
    shape = ctx.shape(xs)
    layout = _channel_vector(ctx, ctx.const(ctx.node.input[cs]), len(shape), shape[1])
    if layout is None:
        raise _Refuse(f"its constant of shape {ctx.const(ctx.node.input[cs]).shape} is not {what}")
    return shape[1], layout


def _add(ctx: _Context) -> None:
    node = ctx.node
    if all(ctx.const(n) is None for n in node.input):
        shapes = {ctx.shape(i)[1:] for i in range(len(node.input))}
        if len(shapes) != 1:
            raise _Refuse(f"it adds values of different shapes {sorted(shapes)}")
        ctx.emit("add", [ctx.x(i) for i in range(len(node.input))])
        return
    xs, cs = _split_operands(ctx)
    if node.op_type == "Sub" and xs == 1:
        raise _Refuse("it subtracts an activation from a constant (negates it)")
    channels, layout = _per_channel(ctx, xs, cs, "a per-channel bias")
    factor = -1.0 if node.op_type == "Sub" else 1.0
    ctx.emit("bias", [ctx.x(xs)], {"bias": ctx.param(cs, _Transform((channels,), factor=factor, expanded_shape=layout))})


def _check_factor(c: np.ndarray, divide: bool) -> None:
    """Refuse constants that leave nothing to rescale: x / 0 is ±inf or NaN, x * 0 forgets x (nothing
    before the node reaches the outputs through it), and inf or NaN factors are not linear maps.
    Channels multiplied by 0 beside others that are not are dead units, which pathcond handles."""
    values = c.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise _Refuse(f"its constant {'divisor' if divide else 'factor'} holds inf or NaN")
    if divide and np.any(values == 0):
        raise _Refuse("it divides by 0 (the result is ±inf or NaN, not a function pathcond can rescale)")
    if not divide and c.size and np.all(values == 0):
        raise _Refuse("it multiplies by 0: its output is 0 whatever its input, so the network before it "
                      "does not reach the outputs through it")


def _mul(ctx: _Context) -> None:
    xs, cs = _split_operands(ctx)
    divide = ctx.node.op_type == "Div"
    if divide and xs == 1:
        raise _Refuse("it divides a constant by an activation")
    c = ctx.const(ctx.node.input[cs])
    _check_factor(c, divide)
    if c.size == 1 and c.ndim <= len(ctx.shape(xs)):
        value = float(c.reshape(-1)[0])
        ctx.emit("scale", [ctx.x(xs)], attrs={"value": 1.0 / value if divide else value})
        return
    channels, layout = _per_channel(ctx, xs, cs, "a per-channel factor")
    transform = _Transform((channels,), reciprocal=divide, expanded_shape=layout)
    ctx.emit("affine", [ctx.x(xs)], {"weight": ctx.param(cs, transform)})


def _text_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


# (coordinate_transformation_mode, nearest_mode) pairs under which nearest-neighbour resizing by an
# integer factor s reads input[i // s]: asymmetric + floor (what torch exports), and the half-pixel
# modes with rounding (x = k + (r + 1/2)/s - 1/2 stays within half a pixel of k).
_NEAREST_REPEAT = {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                   ("half_pixel", "round_prefer_ceil"), ("pytorch_half_pixel", "round_prefer_floor"),
                   ("pytorch_half_pixel", "round_prefer_ceil")}


# linear Resize coordinate modes and the IR's names for them (pytorch_half_pixel differs only for size 1)
_LINEAR_COORDS = {"half_pixel": "half_pixel", "pytorch_half_pixel": "half_pixel", "align_corners": "align_corners",
                  "asymmetric": "asymmetric"}


def _resize_linear(ctx: _Context, coords: str) -> None:
    node = ctx.node
    if coords not in _LINEAR_COORDS:
        raise _Refuse(f"linear Resize with coordinate_transformation_mode={coords!r} is not supported")
    if int(_attr(node, "antialias", 0)):
        raise _Refuse("antialiased Resize is not supported")
    before = ctx.shape(0)
    after = ctx.folder._shape_of(node.output[0])
    if after is None or len(after) != len(before) or tuple(after[:2]) != tuple(before[:2]):
        raise _Refuse(f"it resizes {before} to {after}: only spatial axes may change")
    scales = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size and coords != "align_corners":
        for f, n_in, n_out in zip(scales.reshape(-1)[2:], before[2:], after[2:]):
            if abs(float(f) * n_in - n_out) > 1e-6 * n_out:  # coordinates use the scale: exact ratios only
                raise _Refuse(f"scale {float(f)} maps {n_in} to {n_out} only approximately")
    ctx.emit("resize_linear", [ctx.x(0)], attrs={"size": list(after[2:]), "coords": _LINEAR_COORDS[coords]})


def _resize(ctx: _Context) -> None:
    node = ctx.node
    mode = _text_attr(node, "mode", "nearest")
    coords = _text_attr(node, "coordinate_transformation_mode", "half_pixel")
    if mode == "linear":
        _resize_linear(ctx, coords)
        return
    if mode != "nearest":
        raise _Refuse(f"Resize mode {mode!r}: only nearest-neighbour upsampling by integer factors and linear "
                      "resizing are supported")
    rounding = _text_attr(node, "nearest_mode", "round_prefer_floor")
    if (coords, rounding) not in _NEAREST_REPEAT:
        raise _Refuse(f"nearest Resize with coordinate_transformation_mode={coords!r} and nearest_mode={rounding!r} "
                      "does not repeat each input pixel")
    before = ctx.shape(0)
    after = ctx.folder._shape_of(node.output[0])
    if after is None or len(after) != len(before):
        raise _Refuse("its output shape is unknown")
    scales = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size and not all(float(v).is_integer() for v in scales.reshape(-1)):
        raise _Refuse(f"scales {scales.reshape(-1).tolist()} are not whole numbers")
    if tuple(after[:2]) != tuple(before[:2]) or any(a % b for a, b in zip(after[2:], before[2:])):
        raise _Refuse(f"it resizes {before} to {after}: only whole-number upsampling of spatial axes is supported")
    ctx.emit("upsample", [ctx.x(0)], attrs={"scale": [a // b for a, b in zip(after[2:], before[2:])]})


def _concat(ctx: _Context) -> None:
    rank = len(ctx.shape(0))
    if _attr(ctx.node, "axis") % rank != 1:
        raise _Refuse("it concatenates along an axis other than channels")
    ctx.emit("concat", [ctx.x(i) for i in range(len(ctx.node.input))])


def _clip(ctx: _Context) -> None:
    node = ctx.node
    low = _attr(node, "min")
    high = _attr(node, "max")
    if low is None and len(node.input) > 1 and node.input[1]:
        low = float(ctx.static(1, "min").reshape(-1)[0])
    if high is None and len(node.input) > 2 and node.input[2]:
        high = float(ctx.static(2, "max").reshape(-1)[0])
    if low != 0.0 or (high is not None and math.isfinite(high)):
        raise _Refuse(f"Clip({low}, {high}) is not positively homogeneous (only Clip(0, inf) = ReLU is)")
    ctx.emit("relu", [ctx.x(0)])


def _pad(ctx: _Context) -> None:
    """Padding of spatial axes with zeros or copies (opset 11+: pads, constant_value, axes as inputs)."""
    node, rank, mode = ctx.node, len(ctx.shape(0)), _text_attr(ctx.node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _Refuse(f"Pad mode {mode!r} is not supported")
    given = ctx.static(1, "pads").reshape(-1).astype(np.int64).tolist()
    value = ctx.const(node.input[2]) if mode == "constant" and len(node.input) > 2 and node.input[2] else None
    if value is not None and value.size and float(value.reshape(-1)[0]) != 0.0:
        raise _Refuse(f"it pads with the constant {float(value.reshape(-1)[0])}, not 0 (not positively homogeneous)")
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % rank for a in ctx.static(3, "axes").reshape(-1)]
    pads = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        pads[axis], pads[rank + axis] = given[i], given[len(axes) + i]
    if any(pads[a] or pads[rank + a] for a in (0, 1)) or any(p < 0 for p in pads):
        raise _Refuse(f"pads {pads}: only non-negative padding of spatial axes is supported")
    ctx.emit("pad", [ctx.x(0)], attrs={"pads": pads[2:rank] + pads[rank + 2:], "mode": mode})


CONVERTERS: dict[str, Callable[[_Context], None]] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "Relu": _simple("relu"),
    "LeakyRelu": _simple("leaky_relu", alpha=0.01),
    "PRelu": _prelu,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avgpool,
    "GlobalMaxPool": _global_maxpool,
    "ReduceMean": _reduce_mean,
    "ReduceMax": _reduce_max,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Identity": _identity,
    "Dropout": _identity,
    "Add": _add,
    "Sub": _add,
    "Mul": _mul,
    "Div": _mul,
    "Concat": _concat,
    "Resize": _resize,
    "Sum": _add,
    "Clip": _clip,
    "Pad": _pad,
}


# --------------------------------------------------------------------------------------------------
# Whole-graph translation.


def _node_names(model: onnx.ModelProto) -> list[str]:
    names, seen = [], set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        names.append(name)
    return names


def _heads(model: onnx.ModelProto, folder: _Folder) -> dict[str, onnx.NodeProto]:
    """Graph output -> the trailing Softmax / LogSoftmax / Sigmoid node producing it."""
    consumed = {name for node in model.graph.node for name in node.input}
    heads = {}
    for index, node in enumerate(model.graph.node):
        out = node.output[0] if node.output else ""
        is_output = out in {v.name for v in model.graph.output}
        if node.op_type in HEAD_OPS and is_output and out not in consumed and index not in folder.static_nodes:
            heads[out] = node
    return heads


def _live_nodes(model: onnx.ModelProto, folder: _Folder, outputs: list[str]) -> list[int]:
    """The non-static nodes whose result reaches an output through data (not shape) edges."""
    producer = {name: i for i, node in enumerate(model.graph.node) for name in node.output if name}
    live, stack = set(), [producer[n] for n in outputs if n in producer]
    while stack:
        index = stack.pop()
        if index in live or index in folder.static_nodes:
            continue
        live.add(index)
        stack += [producer[n] for n in model.graph.node[index].input if n in producer]
    return sorted(live)


def _why_unsupported(node: onnx.NodeProto) -> str:
    if node.op_type in NOT_HOMOGENEOUS:
        return f"{node.op_type} is not positively homogeneous (f(a x) != a f(x) for a > 0)"
    if node.domain not in ("", "ai.onnx"):
        return f"custom op of domain {node.domain!r} is not supported"
    return f"op {node.op_type} is not supported by pathcond"


def _convert(ctx: _Context, live: list[int]) -> None:
    for index in live:
        ctx.index = index
        node = ctx.node
        converter = CONVERTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        try:
            if converter is None:
                raise _Refuse(_why_unsupported(node))
            converter(ctx)
        except _Refuse as exc:
            ctx.offenders.append(Offender(ctx.node_names[index], node.op_type, str(exc)))
            ctx.offender_nodes.append(index)
            first = next((n for n in node.input if n and n not in ctx.folder.values), None)
            if first is not None and node.output:  # keep going so that every offender is reported
                ctx.alias[node.output[0]] = ctx.alias.get(first, first)


def _fuse_linear_bias(nodes: list[Node], outputs: list[str]) -> list[Node]:
    """MatMul + Add of a (O,) constant -> one linear node with a bias."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            readers.setdefault(value, []).append(node)
    fused, dropped = {}, set()
    for node in nodes:
        nexts = readers.get(node.output, [])
        if node.op == "linear" and "bias" not in node.params and node.output not in outputs and len(nexts) == 1 \
                and nexts[0].op == "bias":
            b = nexts[0]
            fused[id(b)] = Node(node.name, "linear", node.inputs, b.output,
                                {**node.params, "bias": b.params["bias"]}, node.attrs, node.source_op)
            dropped.add(id(node))
    return [fused.get(id(n), n) for n in nodes if id(n) not in dropped]


def _preprocessing(model: onnx.ModelProto, folder: _Folder, live: list[int], inputs: Sequence[str],
                   refused: Sequence[int]) -> list[int]:
    """The refused nodes that are input preprocessing, with the nodes they depend on.

    A node qualifies when it is a PREPROCESSING_OPS op all of whose activation inputs are graph inputs
    or results of qualifying nodes: nothing on the way holds a parameter, so rescaling the network after
    it cannot change what it computes."""
    pre_values, qualifying = set(inputs), set()
    producer = {name: i for i in live for name in model.graph.node[i].output if name}
    for index in live:
        node = model.graph.node[index]
        acts = [n for n in node.input if n and n not in folder.values]
        if (node.op_type in PREPROCESSING_OPS and node.domain in ("", "ai.onnx") and acts
                and all(n in pre_values for n in acts)):
            qualifying.add(index)
            pre_values.update(o for o in node.output if o)
    chosen, stack = set(), [i for i in refused if i in qualifying]
    while stack:
        index = stack.pop()
        if index not in chosen:
            chosen.add(index)
            stack += [producer[n] for n in model.graph.node[index].input if n in producer]
    return sorted(chosen)


def _frontier_inputs(ctx: _Context, model: onnx.ModelProto, pre: list[int], inputs: Sequence[str],
                     outputs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """IR inputs when ``pre`` is cut off: the graph inputs and preprocessing results the network reads."""
    read = {v for node in ctx.nodes for v in node.inputs} | {ctx.alias.get(o, o) for o in outputs}
    candidates = list(inputs) + [o for i in pre for o in model.graph.node[i].output if o]
    shapes = {}
    for name in candidates:
        if name not in read:
            continue
        shape = ctx.folder._shape_of(name)
        if shape is None or len(shape) < 2:
            raise UnsupportedModelError(
                f"the network starts at {name!r}, the result of input preprocessing, whose shape is "
                f"{'unknown' if shape is None else shape}: pathcond needs a static (N, C, ...) shape there")
        shapes[name] = (1,) + tuple(int(d) for d in shape[1:])
    return shapes


def _translate(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], warnings: list[str],
               names: list[str] | None = None):
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"the model uses opset {opset}; pathcond reads opset {MIN_OPSET} or later "
            "(upgrade it with onnx.version_converter.convert_version)")
    folder, info = _fold_graph(model, shapes, opset)
    names = names or _node_names(model)
    stored = _names(model, folder)
    ctx = _Context(model, folder, info, names, stored)
    heads = _heads(model, folder)
    for head in heads.values():
        warnings.append(f"head {head.op_type} {names[list(model.graph.node).index(head)]!r} ignored for the "
                        "statistics: they are computed on its input")
    outputs = [heads[v.name].input[0] if v.name in heads else v.name for v in model.graph.output]
    live = _live_nodes(model, folder, outputs)
    _convert(ctx, live)
    pre = _preprocessing(model, folder, live, list(shapes), ctx.offender_nodes) if ctx.offenders else []
    if pre:  # again, with the network starting after the input preprocessing
        ctx = _Context(model, folder, info, names, stored)
        _convert(ctx, [i for i in live if i not in set(pre)])
    _check_outputs(ctx, outputs)
    if ctx.offenders:
        listing = "; ".join(f"{o.node} ({o.op}): {o.why}" for o in ctx.offenders)
        raise UnsupportedModelError(
            f"the model is not a ReLU network pathcond can rescale: {listing}", ctx.offenders)
    if pre:
        ir_inputs = _frontier_inputs(ctx, model, pre, list(shapes), outputs)
        warnings.append(
            "input preprocessing left out of the analysis and unchanged: "
            + ", ".join(f"{model.graph.node[i].op_type} {names[i]!r}" for i in pre)
            + f"; the network is analysed from {', '.join(repr(n) for n in ir_inputs)}")
    else:
        ir_inputs = {name: (1,) + tuple(shape[1:]) for name, shape in shapes.items()}
    nodes = _fuse_linear_bias(ctx.nodes, outputs)
    used = {key for node in nodes for key in node.params.values()}
    try:
        graph = Graph(ir_inputs, nodes, [ctx.alias.get(o, o) for o in outputs],
                      {k: v for k, v in ctx.params.items() if k in used})
    except GraphError as exc:
        raise UnsupportedModelError(f"the model cannot be represented: {exc}") from exc
    return graph, ctx.refs, stored


def _check_outputs(ctx: _Context, outputs: list[str]) -> None:
    produced = {node.output for node in ctx.nodes} | set(ctx.alias)
    for name in outputs:
        if name not in produced and not ctx.offenders:
            raise UnsupportedModelError(f"graph output {name!r} is not computed by any supported layer "
                                        "(it is a constant or a graph input)")


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


def _original_value(stored: Mapping, ref: _ParamRef) -> np.ndarray | None:
    """The stored tensor behind ``ref`` as the original file holds it (None when it has no such tensor)."""
    holder = stored.get((ref.kind, ref.base))
    if holder is None:
        return None
    if isinstance(holder, onnx.TensorProto):
        return numpy_helper.to_array(holder)
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


def _rebase_refs(original: onnx.ModelProto, upgraded: onnx.ModelProto,
                 refs: Mapping[str, _ParamRef]) -> tuple[dict[str, _ParamRef] | None, str]:
    """The parameter references of the upgraded model moved onto the original graph, or (None, why not).

    A reference moves when the node reading it is in the original (same op and outputs) and reads the
    same tensor name at the same input, and that tensor is stored there with the same value and readers:
    then the original op gives the parameter the meaning the analysis used (the version converter
    adapts attributes, not parameter layouts) and the values can be written into the original file."""
    index = {(n.op_type, n.domain, tuple(n.output)): i for i, n in enumerate(original.graph.node)}
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
            value = _original_value(stored, ref)
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
    index = {(n.op_type, n.domain, tuple(n.output)): i for i, n in enumerate(original.graph.node)}

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
              warnings: list[str]) -> tuple[onnx.ModelProto, dict[str, _ParamRef], _Names]:
    """The model to write the new values into, with its references and name table: the original graph
    and opset when the upgraded model's parameters can be found in it, else the upgraded model (with a
    warning)."""
    if upgraded is original:
        return original, refs, names
    opset = _opset(original)
    rebased, why = _rebase_refs(original, upgraded, refs)
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


# --------------------------------------------------------------------------------------------------
# The loaded model.


class OnnxModel:
    """An ONNX model read by :func:`load_onnx` (implements the ``LoadedModel`` protocol)."""

    format = "onnx"

    def __init__(self, path: Path, model: onnx.ModelProto, graph: Graph, refs: dict[str, _ParamRef],
                 names: _Names, specs: list[InputSpec], external: bool, warnings: list[str]):
        self.path = path
        self.graph = graph
        self.warnings = warnings
        self._model = model
        self._refs = refs
        self._names = names
        self._specs = specs
        self._external = external

    @property
    def has_batchnorm(self) -> bool:
        return False

    def input_specs(self) -> list[InputSpec]:
        return list(self._specs)

    def parameter_source(self, key: str) -> tuple[str, str]:
        """(kind, stored tensor name) behind an IR key: kind is initializer, constant or computed."""
        ref = self._refs[key]
        return ref.kind, ref.base

    def save(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        wanted: dict[tuple[int, int], np.ndarray | None] = {}  # changed role -> value under its name
        layouts: dict[tuple[int, int], np.ndarray] = {}  # ... and as a tensor of its own
        for key, value in new_params.items():
            if key not in self._refs:
                raise KeyError(f"{key!r} is not a parameter of {self.path}")
            ref = self._refs[key]
            new = value.detach().to("cpu", self.graph.params[key].dtype)
            if not torch.equal(new, self.graph.params[key]):
                stored, same_dims = ref.transform.inverse(new.double().numpy(), ref.stored)
                wanted[(ref.node_index, ref.slot)] = stored if same_dims else None
                layouts[(ref.node_index, ref.slot)] = stored
        node_names = _node_names(self._model)
        for index, slot, old, new_name in _apply_plan(model, _plan_names(self._names, wanted), layouts):
            self._note(_rewired_note(node_names[index], slot, old, new_name, self._names.origin[old][0]))
        _save_proto(model, Path(path), self._external)

    def _note(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def run(self, path: Path, inputs: Mapping[str, np.ndarray], *, train: bool = False) -> list[np.ndarray]:
        dtypes = {spec.name: spec.dtype for spec in self._specs}
        feeds = {name: np.asarray(v, dtype=dtypes.get(name)) for name, v in inputs.items()}
        try:
            session = _session(path)
        except Exception as exc:  # noqa: BLE001 - the input: say why it cannot be verified against
            if Path(path) != self.path:
                raise  # the rewritten copy: pathcond's own fault
            if self._external:
                try:
                    return self._run_relaid(exc, feeds)
                except Exception:  # noqa: BLE001 - not the external layout either: report the first error
                    pass
            raise _unrunnable(self.path, self._model, exc) from exc
        return [np.asarray(out) for out in session.run(None, feeds)]

    def _run_relaid(self, exc: Exception, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the input when onnxruntime cannot open it as stored (small shape tensors in the external
        data file: its shape inference cannot read them) from the same tensors laid out as the writer
        lays them out."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pathcond-") as folder:
            copy = onnx.ModelProto()
            copy.CopyFrom(self._model)
            relaid = Path(folder) / "input.onnx"
            _save_proto(copy, relaid, external=True)
            outputs = [np.asarray(out) for out in _session(relaid).run(None, feeds)]
        note = (f"onnxruntime cannot open {self.path.name} as stored ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); it was run with its small tensors stored inline")
        self._note(note)
        return outputs


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are about the runtime, not the model
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rewired_note(node: str, slot: int, old: str, new: str, kind: str) -> str:
    """Why a node input reads a new name: the exceptions to "every name keeps its meaning"."""
    if kind == "computed":
        why = "is computed from stored tensors (it cannot be written back into them)"
    else:
        why = "is read by other roles that keep another value"
    return (f"{node} input {slot}: {old!r} {why}; the rescaled value is stored under the new name {new!r} "
            "and read from there")


def _unrunnable(path: Path, model: onnx.ModelProto, exc: Exception) -> UnsupportedModelError:
    """The error for an input file onnxruntime cannot run: what pathcond writes is verified against it."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    opset = _opset(model)
    hint = f" (the model uses opset {opset}; onnxruntime runs opset 7 or later)" if opset < 7 else ""
    if "ShapeInferenceError" in reason and any(
            n.op_type in POOL_OPS and _attr(n, "ceil_mode", 0) for n in model.graph.node):
        hint = (" (likely ONNX's shape inference, which onnxruntime runs when it loads a model: it gives a "
                "ceil_mode pool one window more than onnxruntime and PyTorch compute when the last window "
                "would start in the padding, so a Flatten -> Gemm after it no longer fits the weight; "
                "exporting with the dynamo exporter, or without ceil_mode, avoids it)")
    return UnsupportedModelError(
        f"onnxruntime cannot run {path}{hint}, and pathcond verifies the rescaled copy against it: {reason}")


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


def _apply_plan(model: onnx.ModelProto, plan: _NamePlan,
                layouts: Mapping[tuple[int, int], np.ndarray]) -> list[tuple[int, int, str, str]]:
    """Write ``plan`` into ``model``: stored tensors in place, views replaced by initializers of their
    name (the view node goes), and the rare role that needs a tensor of its own (new name, rewired).
    Returns those rewired inputs: (node index, slot, name read before, new name)."""
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
        _write_in_place(model, name, value)
    dropped = {i for i, node in enumerate(model.graph.node) if node.output and node.output[0] in plan.views}
    for name, value in plan.views.items():
        _add_initializer(model, value, name)
    for index in sorted(dropped, reverse=True):
        del model.graph.node[index]
    return rewired


def _write_in_place(model: onnx.ModelProto, name: str, stored: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(stored, name))
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


def _goes_external(tensor: TensorProto) -> bool:
    if tensor.data_type in _INLINE_TYPES:
        return False
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return math.prod(tensor.dims) * itemsize >= EXTERNAL_MIN_BYTES


def _save_proto(model: onnx.ModelProto, path: Path, external: bool, location: str | None = None) -> None:
    """Write ``model`` (its tensors loaded); with ``external``, large float initializers go to
    ``location`` (default ``<name>.data``) beside ``path``, whatever the input's own layout was."""
    for tensor in _all_tensors(model.graph):  # onnx.load keeps the input's external markers
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    if external:
        location = location or data_file_for(path).name
        data_file = path.parent / location
        if data_file.exists():  # onnx appends to an existing data file
            data_file.unlink()
        for index, tensor in enumerate(model.graph.initializer):
            if _goes_external(tensor):
                if not tensor.HasField("raw_data"):
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                onnx.external_data_helper.set_external_data(tensor, location)
    onnx.save_model(model, str(path))


def _input_specs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[InputSpec]:
    specs = []
    for value in _real_inputs(model):
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        specs.append(InputSpec(value.name, shapes[value.name], dtype))
    return specs


def load_onnx(path: Path, options: LoadOptions | None = None) -> OnnxModel:
    """Read an ONNX file into pathcond's IR.

    Raises :class:`UsageError` for an unreadable file or a missing ``--input-shape`` and
    :class:`UnsupportedModelError` (listing every offending node) for a model that is not a ReLU network.
    """
    path = Path(path)
    options = options or LoadOptions()
    model = _read_model(path)
    external = _uses_external_data(path)
    shapes = _input_shapes(model, options)
    warnings: list[str] = []
    upgraded = _upgrade(model)
    node_names = _names_after_original(model, upgraded) if upgraded is not model else None
    graph, refs, stored = _translate(upgraded, shapes, warnings, node_names)
    model, refs, stored = _writable(model, upgraded, refs, stored, warnings)
    return OnnxModel(path, model, graph, refs, stored, _input_specs(model, shapes), external, warnings)


__all__ = ["OnnxModel", "load_onnx", "CONVERTERS"]
