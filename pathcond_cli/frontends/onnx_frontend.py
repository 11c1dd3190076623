"""The ONNX front end: an ONNX ReLU network -> :class:`pathcond_cli.ir.Graph`, and back.

Reading
    The model is loaded with its external data. The values of its large initializers stored as raw
    bytes then leave the ModelProto the model keeps: they are held once, as the read-only arrays the IR
    parameters are views of (``OnnxModel._data``, :func:`.onnx_read._detach_data`). Input shapes are fixed (dynamic batch -> 1, other
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
    1 KiB or more go to ``OUT.data``; smaller and integer tensors (shapes, axes) stay inline. The file
    is serialised piece by piece, each held-out tensor's bytes written from its array (unchanged ones
    byte for byte as read), so that the model is never held twice nor serialised whole in memory.

Modules
    This module holds the loaded model (:class:`OnnxModel`) and :func:`load_onnx`, which drive the
    parts: :mod:`.onnx_read` (the file, input shapes, shape inference, folding, the name table,
    parameter transforms), :mod:`.onnx_translate` (ONNX nodes -> IR: the converters and
    :data:`CONVERTERS`), :mod:`.onnx_upgrade` (models before opset 11) and :mod:`.onnx_write` (the
    name plan, writing tensors, the external data layout). The imports go one way: translate and write
    import read, upgrade imports read, translate and write, and no part imports this module.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import UnsupportedModelError
from ..ir import Graph
from .base import InputSpec, LoadOptions
from .onnx_read import POOL_OPS, _all_tensors, _attr, _input_shapes, _Names, _opset, _ParamRef, _read_model, _real_inputs
from .onnx_translate import _node_names, _translate
from .onnx_upgrade import _names_after_original, _upgrade, _writable
from .onnx_write import _apply_plan, _plan_names, _save_proto

# Names other code reads from this module (jobs.py's file checks, tests), now defined in its parts.
from .onnx_read import _Refuse, data_file_for, external_data_files  # noqa: F401 - jobs.py and tests import them here
from .onnx_translate import CONVERTERS  # noqa: F401 - re-exported


# --------------------------------------------------------------------------------------------------
# The loaded model.


class OnnxModel:
    """An ONNX model read by :func:`load_onnx` (implements the ``LoadedModel`` protocol)."""

    format = "onnx"
    # onnxruntime draws no torch random numbers and releases the GIL while it runs: verification may run
    # the original in a thread while the rewritten copy runs (pathcond_cli.verify)
    concurrent_runs = True

    def __init__(self, path: Path, model: onnx.ModelProto, graph: Graph, refs: dict[str, _ParamRef],
                 names: _Names, specs: list[InputSpec], external: bool, warnings: list[str],
                 data: dict[str, np.ndarray] | None = None):
        self.path = path
        self.graph = graph
        self.warnings = warnings
        self._model = model
        self._data = data or {}  # the large initializers' values, held out of the model (onnx_read._detach_data)
        self._refs = refs
        self._names = names
        self._specs = specs
        self._external = external
        self._held = threading.local()  # each thread's onnxruntime session (verification), see _session_for

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
        wanted: dict[tuple[int, int], np.ndarray | None] = {}  # changed role -> value under its name
        layouts: dict[tuple[int, int], np.ndarray] = {}  # ... and as a tensor of its own
        for key, value in new_params.items():
            if key not in self._refs:
                raise KeyError(f"{key!r} is not a parameter of {self.path}")
            ref = self._refs[key]
            new = value.detach().to("cpu", self.graph.params[key].dtype)
            if not torch.equal(new, self.graph.params[key]):
                # a transform that only moves entries is undone in the stored dtype (no float64 copy)
                exact = ref.transform.exact and new.dtype in _NUMPY_FLOATS
                stored, same_dims = ref.transform.inverse(new.numpy() if exact else new.double().numpy(), ref.stored)
                wanted[(ref.node_index, ref.slot)] = stored if same_dims else None
                layouts[(ref.node_index, ref.slot)] = stored
        plan = _plan_names(self._names, wanted)
        model = onnx.ModelProto()  # all of it, unknown fields too; small: the large weights are in _data
        model.CopyFrom(self._model)
        data = dict(self._data)  # the detached tensors' values: new ones replace their entries
        node_names = _node_names(self._model)
        for index, slot, old, new_name in _apply_plan(model, plan, layouts, data):
            self._note(_rewired_note(node_names[index], slot, old, new_name, self._names.origin[old][0]))
        _save_proto(model, Path(path), self._external, data)

    def _note(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def run(self, path: Path, inputs: Mapping[str, np.ndarray], *, train: bool = False,
            threads: int | None = None) -> list[np.ndarray]:
        """``threads``: onnxruntime's intra-op threads (None: its default, one per core); verification
        passes 1 when it runs the original and the rewritten copy at once, each on a core."""
        dtypes = {spec.name: spec.dtype for spec in self._specs}
        feeds = {name: np.asarray(v, dtype=dtypes.get(name)) for name, v in inputs.items()}
        try:
            session = self._session_for(Path(path), threads)
        except Exception as exc:  # noqa: BLE001 - the input: say why it cannot be verified against
            if Path(path) != self.path:
                raise  # the rewritten copy: pathcond's own fault
            if self._external:
                try:
                    return self._run_relaid(exc, feeds, threads)
                except Exception:  # noqa: BLE001 - not the external layout either: report the first error
                    pass
            raise _unrunnable(self.path, self._model, exc) from exc
        try:
            return [np.asarray(out) for out in session.run(None, feeds)]
        except Exception as exc:  # noqa: BLE001 - loaded, but fails on these inputs (an index out of range...)
            if Path(path) != self.path:
                raise
            raise _unrunnable(self.path, self._model, exc) from exc

    @property
    def stored_bytes(self) -> int:
        """The bytes of every stored tensor (initializers, parameters or not, Constant values, subgraphs'),
        as an onnxruntime session holds them."""
        total = 0
        for tensor in _all_tensors(self._model.graph):
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            except (KeyError, TypeError, ValueError):  # strings and other types without a fixed size
                itemsize = 1
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        return total

    @property
    def _sessions(self) -> dict[tuple, object]:
        """The calling thread's sessions by (file version, threads): at most one."""
        if not hasattr(self._held, "sessions"):
            self._held.sessions = {}
        return self._held.sessions

    def _session_for(self, path: Path, threads: int | None = None):
        """The onnxruntime session of ``path``, made once per version of the file: verification runs the
        original and the rewritten model on several inputs, and a session costs more than a run.

        One session held per thread: verification runs every case on the original, then on the rewritten
        copy, so the first session (the model's weights, a second time) can go when the second is made;
        running both at once, it runs them in two threads."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, threads)
        sessions = self._sessions
        if key not in sessions:
            sessions.clear()
            sessions[key] = _session(path, threads)
        return sessions[key]

    def load_runtime(self) -> None:
        """Import onnxruntime in the calling thread (verification does it before starting a second one)."""
        import onnxruntime  # noqa: F401

    def release_runtime(self) -> None:
        """Drop the calling thread's onnxruntime session (it holds the model's weights once more)."""
        self._sessions.clear()

    def _run_relaid(self, exc: Exception, feeds: Mapping[str, np.ndarray], threads: int | None) -> list[np.ndarray]:
        """Run the input when onnxruntime cannot open it as stored (small shape tensors in the external
        data file: its shape inference cannot read them) from the same tensors laid out as the writer
        lays them out."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pathcond-") as folder:
            copy = onnx.ModelProto()
            copy.CopyFrom(self._model)
            relaid = Path(folder) / "input.onnx"
            _save_proto(copy, relaid, external=True, data=self._data)
            outputs = [np.asarray(out) for out in _session(relaid, threads).run(None, feeds)]
        note = (f"onnxruntime cannot open {self.path.name} as stored ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); it was run with its small tensors stored inline")
        self._note(note)
        return outputs


_NUMPY_FLOATS = frozenset({torch.float16, torch.float32, torch.float64})


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are about the runtime, not the model
    # no pre-packed copies of the MatMul/Gemm/Conv weights: a kernel-internal layout (not a graph change)
    # that doubles those weights in memory and costs more to build than the few runs here gain from it
    # (VGG-16, 2 cores: 1.3 s instead of 1.9 s a session, runs no slower)
    options.add_session_config_entry("session.disable_prepacking", "1")
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
    model, external, data = _read_model(path)
    shapes = _input_shapes(model, options)
    warnings: list[str] = []
    upgraded = _upgrade(model)
    node_names = _names_after_original(model, upgraded) if upgraded is not model else None
    graph, refs, stored = _translate(upgraded, shapes, warnings, node_names, options.partial, data)
    model, refs, stored = _writable(model, upgraded, refs, stored, warnings, data)
    return OnnxModel(path, model, graph, refs, stored, _input_specs(model, shapes), external, warnings, data)


__all__ = ["OnnxModel", "load_onnx", "CONVERTERS"]
