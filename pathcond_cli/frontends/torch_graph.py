"""Translate an aten-level ``torch.export`` graph (an :class:`~torch.export.ExportedProgram`) into the IR.

The translation walks the FX graph once. Each FX node becomes one of:

* an IR value (a tensor flowing through the network, produced by an IR node or a graph input),
* a parameter reference (a placeholder lifted from a parameter or buffer: its state_dict name is the IR
  parameter key, so a tensor used by two layers is one key),
* a constant (python scalars, lifted constant tensors, shape arithmetic),
* a tuple of the above (ops with several outputs, read through ``getitem``).

Ops that are not part of a ReLU network are collected as :class:`~pathcond_cli.errors.Offender` and
reported all at once.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import Offender, Refusal, UnsupportedModelError
from ..ir import PAD_MODES, Graph, GraphError, Node, swap_group_axes
from ..segments import OpaqueSource, opaque_graph, opaque_op_count
from . import torch_tokens

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------------
# Values seen while walking the FX graph


@dataclass(frozen=True)
class TVal:
    """A tensor value of the IR (``poisoned``: it comes from an unsupported op)."""

    name: str
    poisoned: bool = False


@dataclass(frozen=True)
class PVal:
    """A parameter or buffer, by state_dict name; ``transposed`` for ``t(param)``."""

    key: str
    transposed: bool = False


@dataclass(frozen=True)
class CVal:
    """A constant (python value or a lifted constant tensor)."""

    value: Any


@dataclass(frozen=True)
class TupleVal:
    items: tuple


def _name(op: Any) -> str:
    return str(op)


def _ops(*names: str) -> frozenset:
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        pk = getattr(aten, packet, None)
        if pk is None:
            continue
        if overload:
            ov = getattr(pk, overload, None)
            if ov is not None:
                out.add(ov)
        else:
            for ov_name in pk.overloads():
                out.add(getattr(pk, ov_name))
    return frozenset(out)


LINEAR_OPS = _ops("linear")
ADDMM_OPS = _ops("addmm")
MM_OPS = _ops("mm", "matmul")
CONV_OPS = _ops("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
TRANSPOSED_CONV_OPS = _ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
BN_OPS = _ops("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
              "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "cudnn_batch_norm",
              "_batch_norm_impl_index")
RELU_OPS = _ops("relu", "relu_")
LEAKY_OPS = _ops("leaky_relu", "leaky_relu_")
PRELU_OPS = _ops("prelu", "_prelu_kernel")
MAXPOOL_OPS = _ops("max_pool1d", "max_pool2d", "max_pool2d_with_indices", "max_pool1d_with_indices")
AVGPOOL_OPS = _ops("avg_pool1d", "avg_pool2d")
ADAPTIVE_AVG_OPS = _ops("adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d")
ADAPTIVE_MAX_OPS = _ops("adaptive_max_pool1d", "adaptive_max_pool2d")
MEAN_OPS = _ops("mean.dim")
AMAX_OPS = _ops("amax")
ADD_OPS = _ops("add.Tensor", "add_.Tensor", "add.Scalar")
SUB_OPS = _ops("sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor")
MUL_OPS = _ops("mul.Tensor", "mul.Scalar", "mul_.Tensor", "mul_.Scalar")
DIV_OPS = _ops("div.Tensor", "div.Scalar", "div_.Tensor", "div_.Scalar")
NEG_OPS = _ops("neg")
CAT_OPS = _ops("cat", "concat", "concatenate")
FLATTEN_OPS = _ops("flatten.using_ints")
VIEW_OPS = _ops("view", "reshape", "_unsafe_view", "_reshape_alias", "squeeze", "squeeze_copy", "view_copy",
                "reshape_as", "view_as")
PARAM_VIEW_OPS = _ops("unsqueeze", "unsqueeze_copy", "expand", "expand_as", "unflatten")
# ... of which those that only lay an activation out differently: checked by shape in _reshape (the core
# ATen decomposition runs 1-D pooling as 2-D pooling between an unsqueeze and a squeeze)
ACTIVATION_VIEW_OPS = _ops("unsqueeze", "unsqueeze_copy", "unflatten")
IDENTITY_OPS = _ops("dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                    "clone", "alias", "alias_copy", "contiguous", "detach", "detach_", "detach_copy",
                    "_to_copy", "to", "lift_fresh_copy", "type_as", "lift_fresh")
NATIVE_DROPOUT_OPS = _ops("native_dropout")
# PReLU as the core ATen decomposition writes it: where(x > 0, x, w * x)
WHERE_OPS = _ops("where.self")
POSITIVE_TEST_OPS = _ops("gt.Scalar", "ge.Scalar")
MUL_TENSOR_OPS = _ops("mul.Tensor")
THRESHOLD_OPS = _ops("threshold", "threshold_")
CLAMP_MIN_OPS = _ops("clamp_min", "clamp_min_")
CLAMP_OPS = _ops("clamp", "clamp_")
TRANSPOSE_OPS = _ops("t", "numpy_T", "transpose.int", "permute", "t_copy", "permute_copy", "transpose_copy.int")
UPSAMPLE_NEAREST_OPS = _ops("upsample_nearest1d", "upsample_nearest2d", "_upsample_nearest_exact1d",
                           "_upsample_nearest_exact2d")
LINEAR_RESIZE_OPS = _ops("upsample_linear1d", "upsample_bilinear2d")
INTERPOLATE_OPS = _ops("upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "upsample_trilinear3d",
                       "upsample_nearest3d", "_upsample_nearest_exact3d", "grid_sampler_2d")
HEAD_OPS = _ops("softmax", "_softmax", "log_softmax", "_log_softmax", "sigmoid", "special_softmax",
                "special_log_softmax")
NON_HOMOGENEOUS = _ops("hardtanh", "hardtanh_", "relu6", "gelu", "silu", "silu_", "tanh", "sigmoid", "elu",
                       "selu", "celu", "mish", "softplus", "hardswish", "hardsigmoid", "exp", "log", "abs",
                       "pow", "sqrt", "rsqrt", "sin", "cos", "erf", "softsign", "logsigmoid", "log_sigmoid_forward",
                       "glu", "tanhshrink", "softshrink", "hardshrink", "sign", "square")
NORM_OPS = _ops("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm",
                "_fused_rms_norm")
# shape queries answered from the input's static shape: scripted modules keep `input.dim()` checks
SHAPE_QUERY_OPS = _ops("dim")
# ops without a tensor output that the exporter inserts (asserts, shape guards)
IGNORED_OPS = _ops("_assert_tensor_metadata", "_assert_async", "sym_constrain_range", "sym_constrain_range_for_size",
                   "_assert_scalar", "sym_size", "sym_numel", "sym_stride", "size", "_functional_sym_constrain_range",
                   "_functional_sym_constrain_range_for_size")


def _decomposed_prelus(graph: torch.fx.Graph) -> dict[Any, tuple[Any, Any, Any, Any]]:
    """``where(x > 0, x, w * x)`` nodes (PReLU after ``run_decompositions``) -> (x, w, test, product); the
    test and the product are parts of the PReLU when nothing else reads them."""
    found = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in WHERE_OPS or len(node.args) != 3:
            continue
        test, x, product = node.args
        if not all(isinstance(n, torch.fx.Node) for n in (test, x, product)):
            continue
        if test.target not in POSITIVE_TEST_OPS or test.args[0] is not x or test.args[1] != 0:
            continue
        if product.target not in MUL_TENSOR_OPS or x not in product.args[:2]:
            continue
        slope = product.args[1] if product.args[0] is x else product.args[0]
        if isinstance(slope, torch.fx.Node) and len(test.users) == 1 and len(product.users) == 1:
            found[node] = (x, slope, test, product)
    return found


def _arguments(node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (raw FX values)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _ints(value: Any, d: int, default: int) -> list[int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return [default] * d
    if isinstance(value, (list, tuple)):
        vals = [int(v) for v in value]
        return vals * d if len(vals) == 1 else vals
    return [int(value)] * d


def _meta_shape(node) -> tuple | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def _static(shape: Sequence) -> tuple[int | None, ...]:
    out = []
    for s in shape:
        if isinstance(s, torch.SymInt):
            s = s.node.maybe_as_int() if hasattr(s.node, "maybe_as_int") else None
        try:
            out.append(None if s is None else int(s))
        except Exception:  # symbolic size
            out.append(None)
    return tuple(out)


class _Translator:
    def __init__(self, ep: torch.export.ExportedProgram, input_names: Sequence[str] | None = None,
                 partial: bool = False):
        self.ep = ep
        self.partial = partial
        self.opaque: list[OpaqueSource] = []  # each offender, as partial rescaling keeps it
        self.last: set = set()  # FX nodes holding token-major activations (.torch_tokens)
        self.fx_of: dict[str, Any] = {}  # IR value name -> its FX node
        self.opaque_params: dict[str, str] = {}  # parameter read by an opaque op -> that op
        self.gm = ep.graph_module
        self.sig = ep.graph_signature
        self.state = ep.state_dict
        self.constants = getattr(ep, "constants", {}) or {}
        self.env: dict[Any, Any] = {}
        self.nodes: list[Node] = []
        self.used_params: dict[str, torch.Tensor] = {}
        self.offenders: list[Offender] = []
        self.warnings: list[str] = []
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.input_dtypes: dict[str, torch.dtype] = {}
        self.input_full_shapes: dict[str, tuple[int | None, ...]] = {}
        self.input_names = list(input_names) if input_names else None
        self.value_names: set[str] = set()
        self.transposed: set[str] = set()
        # keys whose IR value is swap_group_axes(stored, groups): x @ W weights, transposed convolutions
        self.swapped: dict[str, int] = {}

    # ---- helpers

    def _module_path(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else ""

    def _node_name(self, node, params: dict[str, str]) -> str:
        path = self._module_path(node)
        weight = params.get("weight") or params.get("running_mean") or params.get("slope")
        if weight and "." in weight:
            owner = weight.rsplit(".", 1)[0]
            if not path or owner == path or owner.startswith(path + "."):
                path = owner
                return f"{path}" if self._first_use(path) else f"{path}:{node.name}"
        return f"{path}:{node.name}" if path else node.name

    def _first_use(self, name: str) -> bool:
        taken = name in self.value_names
        self.value_names.add(name)
        return not taken

    def _offend(self, node, why: str) -> TVal:
        """Collect an offender; it stays in the graph as an opaque source (pathcond_cli.segments)."""
        path = self._module_path(node)
        name = f"{path}:{node.name}" if path else node.name
        self.offenders.append(Offender(name, _name(node.target), why))
        reads: list[str] = []
        for arg in [*node.args, *node.kwargs.values()]:
            for item in (arg if isinstance(arg, (list, tuple)) else [arg]):
                value = self.env.get(item) if isinstance(item, torch.fx.Node) else None
                if isinstance(value, TVal) and value.name not in reads:
                    reads.append(value.name)
        self.opaque.append(OpaqueSource(name, _name(getattr(node, "target", node.op)), why, tuple(reads), (node.name,)))
        for arg in [*node.args, *node.kwargs.values()]:  # parameters it reads: frozen if a layer reads them too
            value = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(value, PVal):
                self.opaque_params.setdefault(value.key, name)
        self.fx_of[node.name] = node
        return TVal(node.name)

    def _tensor_of(self, key: str) -> torch.Tensor:
        if key in self.state:
            return self.state[key]
        return self.constants[key]

    def _use(self, key: str, swap: int | None = None) -> str:
        """Register a parameter for the IR. ``swap`` (a group count): the model stores it with input
        channels first, (I, O/groups, ...), and the IR holds swap_group_axes of it (writers swap back)."""
        if key in self.used_params:
            if self.swapped.get(key) != swap:
                raise _Unsupported(f"parameter {key!r} is used in two layouts (both as a matrix and as its transpose)")
            return key
        value = self._tensor_of(key).detach()
        if swap is not None:
            value = swap_group_axes(value, swap)
            self.swapped[key] = swap
        self.used_params[key] = value.contiguous().clone()
        return key

    def _emit(self, fx_node, op: str, inputs: Sequence[TVal], params: dict[str, str] | None = None,
              attrs: dict[str, Any] | None = None, swap: dict[str, int] | None = None) -> TVal:
        params = {k: self._use(v, (swap or {}).get(k)) for k, v in (params or {}).items()}
        poisoned = any(v.poisoned for v in inputs)
        if not poisoned:
            name = self._node_name(fx_node, params)
            self.nodes.append(Node(name=name, op=op, inputs=tuple(v.name for v in inputs), output=fx_node.name,
                                   params=params, attrs=dict(attrs or {}), source_op=_name(fx_node.target)))
        return TVal(fx_node.name, poisoned)

    def _val(self, arg) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return [self._val(a) for a in arg]
        return CVal(arg)

    @staticmethod
    def _scalar(v) -> float | None:
        if isinstance(v, CVal):
            x = v.value
            if isinstance(x, torch.Tensor):
                return float(x.reshape(-1)[0]) if x.numel() == 1 else None
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                return float(x)
        return None

    # ---- main walk

    def run(self) -> Graph:
        sig = self.sig
        param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        const_of = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        user_inputs = list(sig.user_inputs)
        output_node = None
        prelus = _decomposed_prelus(self.gm.graph)
        absorbed = {part for parts in prelus.values() for part in parts[2:]}
        self._find_token_major(user_inputs)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node.name in param_of:
                    self.env[node] = PVal(param_of[node.name])
                elif node.name in const_of:
                    self.env[node] = CVal(self.constants[const_of[node.name]])
                elif node.name in user_inputs:
                    self._add_input(node, user_inputs.index(node.name))
                else:
                    self.env[node] = CVal(None)
            elif node.op == "call_function":
                try:
                    if node in absorbed:  # the test or product of a decomposed PReLU
                        self.env[node] = CVal(None)
                    elif node in prelus:
                        self.env[node] = self._decomposed_prelu(node, *prelus[node][:2])
                    else:
                        self.env[node] = self._call(node)
                except _Unsupported as exc:
                    self.env[node] = self._offend(node, str(exc))
            elif node.op == "get_attr":
                self.env[node] = CVal(getattr(self.gm, node.target, None))
            elif node.op == "output":
                output_node = node
            else:
                self.env[node] = self._offend(node, f"FX {node.op} nodes are not supported")
        outputs = self._outputs(output_node)
        if self.offenders:
            return self._partial(outputs)
        try:
            return Graph(dict(self.inputs), list(self.nodes), outputs, dict(self.used_params), partial=self.partial)
        except GraphError as exc:  # a translation bug or a shape the IR cannot hold
            raise UnsupportedModelError(f"the translated graph is not valid: {exc}",
                                        [Offender("<graph>", "torch.export", str(exc))]) from exc

    def _find_token_major(self, user_inputs: list[str]) -> None:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
        activations = set(placeholders) | {n for n in self.gm.graph.nodes if n.op == "call_function"}
        # symbolic sizes are read without comparing them (a comparison would specialise a dynamic batch)
        batch_one = all((_static(_meta_shape(n) or ()) or (None,))[0] in (1, None) for n in placeholders)
        self.last = torch_tokens.channels_last(self.gm.graph, activations, batch_one)

    def _partial(self, outputs: list[str]) -> Graph:
        """The graph with every offender kept as opaque under ``--partial``; else the refusal, saying how
        many hidden units ``--partial`` would rescale."""
        count = f"{len(self.offenders)} operation(s) keep this model from being treated as a ReLU network"
        shape_of = lambda name: torch_tokens.ir_shape(self.fx_of.get(name), self.last)  # noqa: E731
        try:
            graph = opaque_graph(dict(self.inputs), list(self.nodes), outputs, dict(self.used_params), self.opaque,
                                 shape_of, self.opaque_params)
        except GraphError as exc:
            if self.partial:
                raise UnsupportedModelError(f"partial rescaling: the homogeneous segments cannot be represented "
                                            f"({exc}); {count}", self.offenders) from exc
            graph = None
        if not self.partial:
            raise UnsupportedModelError(count + ".", self.offenders, graph)
        self.warnings.append(f"partial rescaling: {opaque_op_count(graph)} operation(s) kept unchanged as opaque (not "
                             "positively homogeneous or not supported); the homogeneous segments between them are "
                             "rescaled")
        return graph

    def _add_input(self, node, index: int) -> None:
        shape = _meta_shape(node)
        if shape is None:
            self.env[node] = self._offend(node, "non-tensor model inputs are not supported")
            return
        full = _static(shape)
        name = self.input_names[index] if self.input_names and index < len(self.input_names) else node.name
        rest = tuple(1 if s is None else s for s in full[1:])
        if len(full) < 2:
            self.env[node] = self._offend(node, f"input of shape {tuple(shape)} has no channel axis (need (N, C, ...))")
            return
        self.inputs[name] = torch_tokens.ir_shape(node, self.last) if node in self.last else (1, *rest)
        self.input_full_shapes[name] = full
        self.input_dtypes[name] = node.meta["val"].dtype
        self.env[node] = TVal(name)

    def _outputs(self, output_node) -> list[str]:
        names: list[str] = []
        if output_node is None:
            return names
        flat: list = []

        def walk(a):
            if isinstance(a, (list, tuple)):
                for b in a:
                    walk(b)
            else:
                flat.append(a)

        walk(output_node.args[0])
        specs = list(getattr(self.sig, "output_specs", []) or [])
        if len(specs) == len(flat):
            from torch.export.graph_signature import OutputKind

            flat = [a for a, spec in zip(flat, specs) if spec.kind == OutputKind.USER_OUTPUT]
        for a in flat:
            if not isinstance(a, torch.fx.Node):
                continue
            v = self.env.get(a)
            if isinstance(v, TVal):
                if v.name in self.inputs and not v.poisoned:  # an input returned as is
                    out = f"{v.name}_output"
                    self.nodes.append(Node(out, "identity", (v.name,), out, source_op="output"))
                    names.append(out)
                else:
                    names.append(v.name)
            elif isinstance(v, (PVal, CVal)):
                self.offenders.append(Offender(a.name, _name(getattr(a, "target", a.op)),
                                               "a model output that does not depend on the input"))
        return names

    # ---- one op

    def _call(self, node):
        t = node.target
        if t is operator.getitem:
            return self._getitem(node)
        if t in IGNORED_OPS:
            return CVal(None)
        val = node.meta.get("val")
        if t in SHAPE_QUERY_OPS:
            shape = _meta_shape(node.args[0])
            if shape is not None:
                return CVal(len(shape))
        if not isinstance(val, (torch.Tensor, tuple, list)) and t not in HEAD_OPS:
            # shape arithmetic (sym ints) and other non-tensor results
            if not any(isinstance(self._val(a), TVal) for a in node.args if isinstance(a, torch.fx.Node)):
                return CVal(val)
        handler = _DISPATCH.get(t)
        if handler is None:
            raise _Unsupported("operation not supported by pathcond")
        a = _arguments(node)
        first = next(iter(a.values()), None)
        x = self._val(first) if isinstance(first, torch.fx.Node) else None
        if any(isinstance(arg, torch.fx.Node) and arg in self.last and isinstance(self.env.get(arg), TVal)
               for arg in node.args):
            return torch_tokens.convert(self, node, a, first, x)
        if node in self.last:
            raise _Unsupported("it lays channel-first activations out token-major (features on the last axis)")
        return handler(self, node, a, first, x)

    # -- handlers, one per family of aten ops (see _HANDLERS) -------------------------------------
    def _getitem(self, node):
        src = self._val(node.args[0])
        if not isinstance(src, TupleVal):
            raise _Unsupported("indexing into a tensor is not supported")
        item = src.items[node.args[1]]
        if isinstance(item, _Unusable):
            if not node.users:
                return CVal(None)
            raise _Unsupported(item.why)
        return item

    def _op_head(self, node, a, first, x):
        if node.users and all(u.op == "output" for u in node.users) and isinstance(x, TVal):
            # an output head (softmax, log-softmax, sigmoid): the analysed network ends at its input
            self.warnings.append(f"output head {node.name} ({_name(node.target)}) is left out of the analysis: "
                                 f"the network analysed ends at its input {x.name}")
            return x
        raise _Unsupported("not positively homogeneous (only allowed as the final output head)")

    def _op_linear(self, node, a, first, x):
        bias = self._val(a["bias"]) if a["bias"] is not None else None
        return self._linear(node, first, self._val(a["weight"]), bias)

    def _op_addmm(self, node, a, first, x):
        if self._scalar(CVal(a["beta"])) != 1.0 or self._scalar(CVal(a["alpha"])) != 1.0:
            raise _Unsupported("addmm with alpha/beta != 1")
        return self._matrix_product(node, a["mat1"], self._val(a["mat2"]), self._val(a["self"]))

    def _op_mm(self, node, a, first, x):
        return self._matrix_product(node, first, self._val(node.args[1]), None)

    def _matrix_product(self, node, x_node, w, b):
        """x @ W.t() (W stored (out, in), as nn.Linear) or x @ W (W stored (in, out))."""
        if not isinstance(w, PVal) or self._tensor_of(w.key).dim() != 2:
            raise _Unsupported("matrix product with something other than a 2-D parameter")
        if w.transposed:
            return self._linear(node, x_node, PVal(w.key), b)
        return self._linear(node, x_node, w, b, stored_in_out=True)

    def _op_transpose(self, node, a, first, x):
        if not (isinstance(x, PVal) and not x.transposed):
            raise _Unsupported("transposes and permutations of activations are not supported")
        dims = [d for k, d in a.items() if k not in ("self",)]
        if _name(node.target).startswith("aten.permute") and [int(i) for i in dims[0]] != [1, 0]:
            raise _Unsupported("permutation of a parameter")
        return PVal(x.key, True)

    def _op_conv(self, node, a, first, x):
        return self._conv(node, a, x, transposed=bool(a.get("transposed")) or node.target in TRANSPOSED_CONV_OPS)

    def _op_relu(self, node, a, first, x):
        return self._emit(node, "relu", [self._tensor(x)])

    def _op_threshold(self, node, a, first, x):
        if self._scalar(CVal(a["threshold"])) == 0.0 and self._scalar(CVal(a["value"])) == 0.0:
            return self._op_relu(node, a, first, x)
        raise _Unsupported("threshold other than ReLU's (0, 0)")

    def _op_clamp(self, node, a, first, x):
        if self._scalar(self._val(a.get("min"))) == 0.0 and a.get("max") is None:
            return self._op_relu(node, a, first, x)
        raise _Unsupported("clamping (e.g. ReLU6/hardtanh) is not positively homogeneous")

    def _op_leaky(self, node, a, first, x):
        alpha = self._scalar(CVal(a["negative_slope"]))
        return self._emit(node, "leaky_relu", [self._tensor(x)], attrs={"alpha": alpha})

    def _op_prelu(self, node, a, first, x):
        w = self._val(a["weight"])
        if not isinstance(w, PVal) or w.transposed:
            raise _Unsupported("PReLU slope is not a parameter")
        return self._emit(node, "prelu", [self._tensor(x)], {"slope": w.key})

    def _decomposed_prelu(self, node, x_node, slope_node):
        x = self._tensor(self._val(x_node))
        w = self._val(slope_node)
        if not isinstance(w, PVal) or w.transposed:
            raise _Unsupported("where(x > 0, x, w * x) with a slope w that is not a parameter")
        if self._tensor_of(w.key).numel() != 1 and not self._per_channel(slope_node, w, _static(_meta_shape(x_node) or ())):
            raise _Unsupported("where(x > 0, x, w * x) with a slope w that is not per channel")
        return self._emit(node, "prelu", [x], {"slope": w.key})

    def _op_upsample(self, node, a, first, x):
        """Nearest (or nearest-exact) upsampling by whole factors: each input pixel repeated."""
        before, after = _meta_shape(first), _meta_shape(node)
        if before is None or after is None or len(before) != len(after):
            raise _Unsupported("upsampling with unknown shapes")
        given = [a.get(k) for k in a if k.startswith("scale")]
        flat = [f for v in given if v is not None for f in (v if isinstance(v, (list, tuple)) else [v])]
        if not all(float(f).is_integer() for f in flat):
            raise _Unsupported(f"upsampling by scale factors {flat} that are not whole numbers")
        if tuple(after[:2]) != tuple(before[:2]) or any(int(o) % int(i) for o, i in zip(after[2:], before[2:])):
            raise _Unsupported(f"resizing {tuple(before)} to {tuple(after)}: only whole-number upsampling is supported")
        scale = [int(o) // int(i) for o, i in zip(after[2:], before[2:])]
        return self._emit(node, "upsample", [self._tensor(x)], attrs={"scale": scale})

    def _op_resize_linear(self, node, a, first, x):
        """(Bi)linear resizing: fixed non-negative weights. With scale factors and align_corners=False,
        torch maps coordinates with the factor, which is the IR's n_in/n_out only when it is exact."""
        before, after = _meta_shape(first), _meta_shape(node)
        if before is None or after is None or len(before) != len(after) or tuple(after[:2]) != tuple(before[:2]):
            raise _Unsupported("linear resizing with unknown or channel-changing shapes")
        corners = bool(a.get("align_corners"))
        given = [a.get(k) for k in a if k.startswith("scale")]
        flat = [f for v in given if v is not None for f in (v if isinstance(v, (list, tuple)) else [v])]
        if not corners and len(flat) == len(after) - 2:
            for f, n_in, n_out in zip(flat, before[2:], after[2:]):
                if f is not None and abs(float(f) * int(n_in) - int(n_out)) > 1e-9 * int(n_out):
                    raise _Unsupported(f"linear resizing by scale factor {f} from {n_in} to {n_out} (not exact)")
        attrs = {"size": [int(n) for n in after[2:]], "coords": "align_corners" if corners else "half_pixel"}
        return self._emit(node, "resize_linear", [self._tensor(x)], attrs=attrs)

    def _op_neg(self, node, a, first, x):
        return self._emit(node, "scale", [self._tensor(x)], attrs={"value": -1.0})

    def _op_view(self, node, a, first, x):
        if isinstance(x, PVal) and not x.transposed:
            return x  # a reshaped parameter (a bias viewed as (1, C, 1, 1), ...): checked where it is used
        if node.target in PARAM_VIEW_OPS and node.target not in ACTIVATION_VIEW_OPS:
            raise _Unsupported("expanding an activation copies its values (only flattening to (N, features) "
                               "and adding or removing unit spatial axes are supported)")
        return self._reshape(node, x)

    def _op_identity(self, node, a, first, x):
        if isinstance(x, TVal):
            return self._emit(node, "identity", [x])
        return x  # a copy of a parameter or constant

    def _op_native_dropout(self, node, a, first, x):
        out = self._emit(node, "identity", [self._tensor(x)])
        return TupleVal((out, _Unusable("the dropout mask is not supported")))

    def _tensor(self, v) -> TVal:
        if isinstance(v, TVal):
            return v
        raise _Unsupported("expects an activation here, got a parameter or constant")

    def _in_shape(self, node) -> tuple[int | None, ...] | None:
        first = node.args[0] if node.args else None
        if isinstance(first, torch.fx.Node):
            s = _meta_shape(first)
            return None if s is None else _static(s)
        return None

    def _linear(self, node, x_node, w, b, stored_in_out: bool = False):
        x = self._tensor(self._val(x_node))
        if not isinstance(w, PVal) or w.transposed:
            raise _Unsupported("linear weight is not an (out, in) parameter")
        shape = _meta_shape(x_node) if isinstance(x_node, torch.fx.Node) else None
        if shape is not None and len(shape) != 2:
            raise _Unsupported(f"linear layer applied to a rank-{len(shape)} tensor (only (N, features) inputs)")
        params = {"weight": w.key}
        if b is not None and not (isinstance(b, CVal) and b.value is None):
            if not isinstance(b, PVal) or b.transposed:
                raise _Unsupported("linear bias is not a parameter")
            params["bias"] = b.key
        return self._emit(node, "linear", [x], params, swap={"weight": 1} if stored_in_out else None)

    def _conv(self, node, a, x, transposed: bool = False):
        x = self._tensor(x)
        w = self._val(a["weight"])
        if not isinstance(w, PVal) or w.transposed:
            raise _Unsupported("convolution weight is not a parameter")
        wshape = self._tensor_of(w.key).shape
        d = len(wshape) - 2
        if transposed:
            return self._conv_transpose(node, a, x, w, d)
        stride = _ints(a.get("stride"), d, 1)
        dilation = _ints(a.get("dilation"), d, 1)
        padding = a.get("padding")
        if isinstance(padding, str):
            if padding == "valid":
                pads = [0] * (2 * d)
            elif padding == "same":
                total = [dilation[i] * (wshape[2 + i] - 1) for i in range(d)]
                pads = [t // 2 for t in total] + [t - t // 2 for t in total]
            else:
                raise _Unsupported(f"padding mode {padding!r}")
        else:
            p = _ints(padding, d, 0)
            pads = p + p
        if a.get("output_padding") and any(int(v) for v in a["output_padding"]):
            raise _Unsupported("output_padding is not supported")
        attrs = {"stride": stride, "pads": pads, "dilation": dilation, "groups": int(a.get("groups") or 1)}
        return self._emit(node, "conv", [x], self._conv_params(a, w), attrs)

    def _conv_params(self, a, w: PVal) -> dict[str, str]:
        params = {"weight": w.key}
        b = a.get("bias")
        if b is not None:
            bv = self._val(b)
            if not isinstance(bv, PVal):
                raise _Unsupported("convolution bias is not a parameter")
            params["bias"] = bv.key
        return params

    def _conv_transpose(self, node, a, x, w, d):
        """The weight is stored (I, O/groups, *k); the IR holds it swapped to (O, I/groups, *k)."""
        if d not in (1, 2):
            raise _Unsupported(f"{d}-D transposed convolutions are not supported (1-D and 2-D are)")
        if isinstance(a.get("padding"), str):
            raise _Unsupported(f"padding mode {a['padding']!r}")
        groups = int(a.get("groups") or 1)
        p = _ints(a.get("padding"), d, 0)
        attrs = {"stride": _ints(a.get("stride"), d, 1), "dilation": _ints(a.get("dilation"), d, 1), "groups": groups,
                 "pads": p + p, "output_padding": _ints(a.get("output_padding"), d, 0)}
        return self._emit(node, "conv_transpose", [x], self._conv_params(a, w), attrs, swap={"weight": groups})

    def _op_batchnorm(self, node, a, first, x):
        x = self._tensor(x)
        if a.get("training", False):
            raise _Unsupported("BatchNorm in training mode (export the model in eval mode)")
        mean, var = a.get("running_mean"), a.get("running_var")
        if mean is None or var is None:
            raise _Unsupported("BatchNorm without running statistics")
        params = {}
        for role, arg in (("running_mean", mean), ("running_var", var), ("weight", a.get("weight")),
                          ("bias", a.get("bias"))):
            if arg is None:
                continue
            v = self._val(arg)
            if not isinstance(v, PVal):
                raise _Unsupported(f"BatchNorm {role} is not a parameter or buffer")
            params[role] = v.key
        eps = a.get("eps", a.get("epsilon"))
        eps = float(1e-5 if eps is None else eps)
        out = self._emit(node, "batchnorm", [x], params, {"eps": eps})
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return TupleVal((out,) + tuple(_Unusable("BatchNorm saved statistics are not supported")
                                           for _ in range(len(val) - 1)))
        return out

    def _op_maxpool(self, node, a, first, x):
        x = self._tensor(x)
        shape = self._in_shape(node)
        d = 1 if "1d" in _name(node.target) else 2
        kernel = _ints(a["kernel_size"], d, 1)
        stride = _ints(a.get("stride"), d, 0)
        if not a.get("stride") or all(s == 0 for s in stride):
            stride = list(kernel)
        p = _ints(a.get("padding"), d, 0)
        dilation = _ints(a.get("dilation"), d, 1)
        if shape is not None and len(shape) != d + 2:
            raise _Unsupported(f"pooling over a rank-{len(shape)} tensor (need (N, C, *spatial))")
        out = self._emit(node, "maxpool", [x], attrs={"kernel": kernel, "stride": stride, "pads": p + p,
                                                      "dilation": dilation, "ceil_mode": bool(a.get("ceil_mode"))})
        if isinstance(node.meta.get("val"), (tuple, list)):
            return TupleVal((out, _Unusable("max-pool indices are not supported")))
        return out

    def _op_avgpool(self, node, a, first, x):
        x = self._tensor(x)
        shape = self._in_shape(node)
        d = 1 if "1d" in _name(node.target) else 2
        if a.get("divisor_override") is not None:
            raise _Unsupported("avg_pool divisor_override is not supported")
        if shape is not None and len(shape) != d + 2:
            raise _Unsupported(f"pooling over a rank-{len(shape)} tensor (need (N, C, *spatial))")
        kernel = _ints(a["kernel_size"], d, 1)
        stride = list(kernel) if not a.get("stride") else _ints(a.get("stride"), d, 1)
        p = _ints(a.get("padding"), d, 0)
        return self._emit(node, "avgpool", [x], attrs={"kernel": kernel, "stride": stride, "pads": p + p,
                                                       "ceil_mode": bool(a.get("ceil_mode")),
                                                       "count_include_pad": bool(a.get("count_include_pad", True))})

    def _op_adaptive(self, node, a, first, x):
        is_max = node.target in ADAPTIVE_MAX_OPS
        x = self._tensor(x)
        shape = self._in_shape(node)
        if shape is None or any(s is None for s in shape[2:]):
            raise _Unsupported("adaptive pooling over an input of unknown size")
        spatial = list(shape[2:])
        out_size = _ints(a.get("output_size"), len(spatial), 1)
        if not is_max and all(o == 1 for o in out_size):
            result = self._emit(node, "global_avgpool", [x], attrs={"keepdim": True})
        elif all(s % o == 0 for s, o in zip(spatial, out_size)):
            kernel = [s // o for s, o in zip(spatial, out_size)]
            op = "maxpool" if is_max else "avgpool"
            attrs = {"kernel": kernel, "stride": kernel, "pads": [0] * (2 * len(kernel)), "ceil_mode": False}
            if is_max:
                attrs["dilation"] = [1] * len(kernel)
            else:
                attrs["count_include_pad"] = False
            result = self._emit(node, op, [x], attrs=attrs)
        else:
            raise _Unsupported(f"adaptive pooling from {spatial} to {out_size} (windows of unequal size)")
        if isinstance(node.meta.get("val"), (tuple, list)):
            return TupleVal((result, _Unusable("max-pool indices are not supported")))
        return result

    def _op_mean(self, node, a, first, x):
        x = self._tensor(x)
        shape = self._in_shape(node)
        if shape is None:
            raise _Unsupported("mean over a tensor of unknown rank")
        r = len(shape)
        dims = sorted({int(d) % r for d in (a.get("dim") or range(r))})
        if r < 3 or dims != list(range(2, r)):
            raise _Unsupported("mean over axes other than all the spatial ones")
        return self._emit(node, "global_avgpool", [x], attrs={"keepdim": bool(a.get("keepdim"))})

    def _op_amax(self, node, a, first, x):
        """A max over spatial axes (``x.amax(dim=(2, 3))``, a hand-written global max pool) is a max pool
        whose window spans them; over the batch or channel axis it mixes channels."""
        x = self._tensor(x)
        shape = self._in_shape(node)
        if shape is None or any(s is None for s in shape[1:]):
            raise _Unsupported("max over a tensor of unknown shape")
        r = len(shape)
        dims = sorted({int(d) % r for d in (a.get("dim") or range(r))})
        if r < 3 or dims[0] < 2:
            axis = "batch" if dims[0] == 0 else "channel"
            raise _Unsupported(f"max over axes {dims}, the {axis} axis included: not a per-channel pooling")
        if r - 2 not in (1, 2):
            raise _Unsupported(f"max over a {r - 2}-D map (1-D and 2-D are supported)")
        d = r - 2
        attrs = {"kernel": [shape[i] if i in dims else 1 for i in range(2, r)], "stride": [1] * d,
                 "dilation": [1] * d, "pads": [0] * (2 * d), "ceil_mode": False}
        if a.get("keepdim"):
            return self._emit(node, "maxpool", [x], attrs=attrs)
        pooled = TVal(f"{node.name}:max", x.poisoned)
        if not x.poisoned:
            self.nodes.append(Node(name=f"{self._node_name(node, {})}:max", op="maxpool", inputs=(x.name,),
                                   output=pooled.name, attrs=attrs, source_op=_name(node.target)))
        kept = [int(shape[i]) for i in range(2, r) if i not in dims]
        if not kept:
            return self._emit(node, "flatten", [pooled])
        return self._emit(node, "reshape", [pooled], attrs={"spatial": kept})

    def _per_channel(self, p_node, p: PVal, x_shape) -> bool:
        """Whether the parameter (as the graph sees it at ``p_node``) broadcasts along channels only."""
        t = self._tensor_of(p.key)
        if x_shape is None or len(x_shape) < 2 or x_shape[1] is None:
            return False
        seen = _meta_shape(p_node) if isinstance(p_node, torch.fx.Node) else None
        ps = _static(seen) if seen is not None else tuple(t.shape)
        if t.numel() != x_shape[1]:
            return False
        if len(ps) > len(x_shape):
            return False
        padded = (1,) * (len(x_shape) - len(ps)) + ps
        return padded[1] == x_shape[1] and all(s == 1 for i, s in enumerate(padded) if i != 1)

    def _op_add(self, node, a, first, x):
        other = self._val(a["other"])
        alpha = self._scalar(CVal(a.get("alpha", 1)))
        if alpha is not None and alpha != 1.0:
            raise _Unsupported("add with alpha != 1")
        if isinstance(x, TVal) and isinstance(other, TVal):
            if x.name == other.name:
                return self._emit(node, "scale", [x], attrs={"value": 2.0})
            out_shape = _static(_meta_shape(node) or ())
            for arg in (node.args[0], node.args[1]):
                if _static(_meta_shape(arg) or ()) != out_shape:
                    raise _Unsupported("addition of tensors of different shapes (broadcasting)")
            return self._emit(node, "add", [x, other])
        t, p = (x, other) if isinstance(x, TVal) else (other, x)
        if isinstance(t, TVal) and isinstance(p, PVal) and not p.transposed:
            t_node, p_node = (node.args[0], node.args[1]) if isinstance(x, TVal) else (node.args[1], node.args[0])
            if self._per_channel(p_node, p, _static(_meta_shape(t_node) or ())):
                return self._emit(node, "bias", [t], {"bias": p.key})
            raise _Unsupported("addition of a parameter that is not a per-channel bias")
        if isinstance(t, TVal):
            raise _Unsupported("addition of a constant (not positively homogeneous)")
        raise _Unsupported("addition of two parameters/constants")

    def _op_mul(self, node, a, first, x):
        divide = node.target in DIV_OPS
        other = self._val(a["other"])
        if not isinstance(x, TVal) and isinstance(other, TVal) and not divide:
            x, other = other, x
            t_node, p_node = node.args[1], node.args[0]
        else:
            t_node, p_node = node.args[0], (node.args[1] if len(node.args) > 1 else None)
        x = self._tensor(x)
        if isinstance(other, TVal):
            raise _Unsupported("product of two activations is not positively homogeneous")
        if a.get("rounding_mode") is not None:
            raise _Unsupported("division with rounding")
        value = self._scalar(other)
        if value is not None:
            if divide:
                if value == 0:
                    raise _Unsupported("division by zero")
                value = 1.0 / value
            return self._emit(node, "scale", [x], attrs={"value": value})
        if isinstance(other, PVal) and not divide and self._per_channel(p_node, other, _static(_meta_shape(t_node) or ())):
            return self._emit(node, "affine", [x], {"weight": other.key})
        raise _Unsupported("multiplication by a tensor that is neither a scalar nor a per-channel parameter")

    def _op_cat(self, node, a, first, x):
        items = self._val(a["tensors"])
        shape = _meta_shape(node)
        r = len(shape) if shape is not None else None
        dim = int(a.get("dim") or 0)
        if r is not None:
            dim %= r
        if dim != 1:
            raise _Unsupported(f"concatenation along axis {dim} (only channels, axis 1)")
        return self._emit(node, "concat", [self._tensor(v) for v in items])

    def _reshape(self, node, x):
        x = self._tensor(x)
        src = self._in_shape(node)
        dst = _meta_shape(node)
        if src is None or dst is None:
            raise _Unsupported("reshape of unknown shapes")
        dst = _static(dst)
        if src[1:] == dst[1:] and len(src) == len(dst):
            return self._emit(node, "identity", [x])
        if len(src) >= 2 and len(dst) >= 2 and None not in src[1:] and None not in dst[1:]:
            same_batch = src[0] == dst[0] or None in (src[0], dst[0])
            if same_batch and len(dst) == 2 and dst[1] == math.prod(src[1:]):
                return self._emit(node, "flatten", [x])
            if same_batch and src[1] == dst[1] and len(dst) in (3, 4) and math.prod(src[2:]) == math.prod(dst[2:]):
                # each channel's values laid out on other spatial axes (a unit axis added or removed)
                return self._emit(node, "reshape", [x], attrs={"spatial": [int(n) for n in dst[2:]]})
        raise _Unsupported(f"reshape from {tuple(src)} to {tuple(dst)} moves values across channels (only "
                           "flattening to (N, features) and reshapes within each channel are supported)")


def _refuse(why: str):
    def handler(self, node, a, first, x):
        raise _Unsupported(why)

    return handler


def _op_pad(self, node, a, first, x):
    """F.pad on spatial axes (pads last axis first): zeros, or copies (reflect, replicate, circular)."""
    shape, given = _meta_shape(first), [int(v) for v in (a.get("pad") or a.get("padding") or [])]
    name = str(node.target)
    mode = "reflect" if "reflection" in name else "replicate" if "replication" in name else a.get("mode", "constant")
    modes = {torch_mode: onnx_mode for onnx_mode, torch_mode in PAD_MODES.items()}  # torch's names -> the IR's
    if mode not in modes or (mode == "constant" and float(a.get("value") or 0.0) != 0.0):
        raise _Unsupported(f"padding in mode {mode!r} with value {a.get('value')}: only zeros or copies")
    d = 0 if shape is None else len(shape) - 2
    if d < 1 or len(given) % 2 or len(given) > 2 * d or any(v < 0 for v in given):
        raise _Unsupported(f"padding {given} of a {shape} value: only non-negative padding of spatial axes")
    pairs = [(0, 0)] * (d - len(given) // 2) + [(given[2 * k], given[2 * k + 1]) for k in reversed(range(len(given) // 2))]
    attrs = {"pads": [b for b, _ in pairs] + [e for _, e in pairs], "mode": modes[mode]}
    return self._emit(node, "pad", [self._tensor(x)], attrs=attrs)


#: aten op families and their handlers, in priority order (the first family that lists an op wins:
#: sigmoid is a head before it is a non-homogeneous activation)
_HANDLERS = [
    (HEAD_OPS, _Translator._op_head),
    (LINEAR_OPS, _Translator._op_linear),
    (ADDMM_OPS, _Translator._op_addmm),
    (MM_OPS, _Translator._op_mm),
    (TRANSPOSE_OPS, _Translator._op_transpose),
    (CONV_OPS, _Translator._op_conv),
    (TRANSPOSED_CONV_OPS, _Translator._op_conv),
    (BN_OPS, _Translator._op_batchnorm),
    (RELU_OPS, _Translator._op_relu),
    (THRESHOLD_OPS, _Translator._op_threshold),
    (CLAMP_MIN_OPS | CLAMP_OPS, _Translator._op_clamp),
    (LEAKY_OPS, _Translator._op_leaky),
    (PRELU_OPS, _Translator._op_prelu),
    (MAXPOOL_OPS, _Translator._op_maxpool),
    (AVGPOOL_OPS, _Translator._op_avgpool),
    (ADAPTIVE_AVG_OPS | ADAPTIVE_MAX_OPS, _Translator._op_adaptive),
    (UPSAMPLE_NEAREST_OPS, _Translator._op_upsample),
    (LINEAR_RESIZE_OPS, _Translator._op_resize_linear),
    (INTERPOLATE_OPS, _refuse("only nearest-neighbour upsampling by whole factors and (bi)linear resizing are "
                              "supported (bicubic, antialiased and 3-D resizing are not)")),
    (MEAN_OPS, _Translator._op_mean),
    (AMAX_OPS, _Translator._op_amax),
    (ADD_OPS, _Translator._op_add),
    (SUB_OPS, _refuse("subtraction is not supported (only residual additions)")),
    (MUL_OPS | DIV_OPS, _Translator._op_mul),
    (NEG_OPS, _Translator._op_neg),
    (CAT_OPS, _Translator._op_cat),
    (FLATTEN_OPS | VIEW_OPS | PARAM_VIEW_OPS, _Translator._op_view),
    (IDENTITY_OPS, _Translator._op_identity),
    (NATIVE_DROPOUT_OPS, _Translator._op_native_dropout),
    (NON_HOMOGENEOUS, _refuse("activation is not positively homogeneous (only ReLU, LeakyReLU, PReLU are)")),
    (NORM_OPS, _refuse("LayerNorm/GroupNorm/InstanceNorm/RMSNorm normalise with statistics of the input itself: "
                       "not positively homogeneous per unit (only BatchNorm in eval mode is supported)")),
    (_ops("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d"),
     _op_pad),
]
_DISPATCH: dict = {}
for _ops_family, _handler in _HANDLERS:
    for _op in _ops_family:
        _DISPATCH.setdefault(_op, _handler)


_Unsupported = Refusal  # raised by a handler: this node is not supported (the message says why)


@dataclass(frozen=True)
class _Unusable:
    why: str


@dataclass
class Translation:
    graph: Graph
    warnings: list[str]
    input_full_shapes: dict[str, tuple[int | None, ...]]
    input_dtypes: dict[str, torch.dtype]
    swapped: dict[str, int] = field(default_factory=dict)  # IR value = swap_group_axes(stored, groups)


def translate(ep: torch.export.ExportedProgram, input_names: Sequence[str] | None = None,
              partial: bool = False) -> Translation:
    """The IR of an exported program, with warnings and the inputs' full shapes/dtypes as exported.
    ``partial``: keep unsupported ops as opaque (pathcond_cli.segments) instead of refusing the model."""
    tr = _Translator(ep, input_names, partial)
    graph = tr.run()
    return Translation(graph, tr.warnings, tr.input_full_shapes, tr.input_dtypes, dict(tr.swapped))


__all__ = ["Translation", "translate"]
