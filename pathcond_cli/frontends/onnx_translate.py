"""Translating ONNX nodes into pathcond's IR, the second part of the ONNX front end
(:mod:`.onnx_frontend` tells the whole story): the translation context (:class:`_Context`), the
converters, one per ONNX op type, with their table :data:`CONVERTERS`, and the whole-graph
translation (:func:`_translate`: heads, live nodes, input preprocessing, offenders). It reads the
model through :mod:`.onnx_read`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..errors import HardRefusal, Offender, UnsupportedModelError
from ..ir import Graph, GraphError, Node
from ..segments import OpaqueSource, hard_refusal, opaque_graph, opaque_op_count
from .onnx_read import (_attr, _Folder, _fold_graph, _Names, _names, _opset, _ParamRef, _Refuse,
                        _text_attr, _Transform)
from .onnx_tokens import channels_last, convert_token_major, ir_shape, reads_token_major

HEAD_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid"})
#: ops that draw random values: the model's outputs are not a function of its inputs, even under --partial
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                        "Multinomial"})
#: ops known not to be positively homogeneous (f(a x) != a f(x) for some a > 0)
NOT_HOMOGENEOUS = frozenset(
    {
        "Clip", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Exp", "Log", "Softmax",
        "LogSoftmax", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish", "Swish", "Sqrt", "Pow",
        "LayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization",
        "LRN", "Abs", "Neg", "Reciprocal", "Sin", "Cos", "ThresholdedRelu", "Shrink",
    }
)
# Parameter-free layout and normalisation ops. A chain of them straight from the graph inputs that the
# network's converters cannot read (an NHWC -> NCHW Transpose, a Cast, ...) is input preprocessing: the
# rescaling never touches it, so the analysed network starts at its result (see _preprocessing).
PREPROCESSING_OPS = frozenset({"Transpose", "Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
                               "Identity", "Sub", "Div", "Mul", "Add", "Slice", "Pad", "Resize", "Upsample"})


# --------------------------------------------------------------------------------------------------
# Translation context.


@dataclass
class _Context:
    model: onnx.ModelProto
    folder: _Folder
    node_names: list[str]
    names: _Names
    nodes: list[Node] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    refs: dict[str, _ParamRef] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)
    offenders: list[Offender] = field(default_factory=list)
    offender_nodes: list[int] = field(default_factory=list)  # ONNX node index of each offender
    opaque: list[OpaqueSource] = field(default_factory=list)  # each offender, as partial rescaling keeps it
    last: set[str] = field(default_factory=set)  # token-major values (channels on the last axis, .onnx_tokens)
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
        if np.asarray(stored).dtype.kind in "OSU":  # strings (bfloat16 and float8 are kind V)
            raise _Refuse(f"its input {slot} ({name!r}) is not a numeric tensor")
        value = transform.forward(stored)
        if not np.all(np.isfinite(value)):  # the path statistics would overflow without saying where
            raise _Refuse(f"its input {slot} ({name!r}) holds inf or NaN")
        self.refs[key] = _ParamRef(key, kind, base, self.index, slot, stored, transform, name)
        self.params[key] = _ir_tensor(value, stored.dtype)
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


def _ir_tensor(value: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    """The IR tensor of a parameter, in its stored dtype. A stored tensor used as it is (the common case)
    is shared, not copied: the arrays read from the file are read-only, and nothing writes into an IR
    parameter (the engine makes its own copies: path statistics, ``rescaled_params``)."""
    array = value if value.dtype == dtype else value.astype(dtype)
    if not array.flags.c_contiguous:
        array = np.array(array, order="C")
    torch_dtype = _ML_DTYPES.get(array.dtype.name)
    with warnings.catch_warnings():  # torch warns once about read-only arrays; these are never written
        warnings.simplefilter("ignore", UserWarning)
        if torch_dtype is not None:  # an ml_dtypes array (bfloat16, float8): torch reads only its bits
            bits = np.uint16 if array.dtype.itemsize == 2 else np.uint8
            return torch.from_numpy(array.view(bits)).view(torch_dtype)
        return torch.from_numpy(array)


#: the floating dtypes onnx reads as ml_dtypes arrays (numpy has none of them), by name: their torch dtype
_ML_DTYPES = {
    name: getattr(torch, name)
    for name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
}


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


def _gemm(ctx: _Context, op: str = "linear") -> None:
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
    ctx.emit(op, [ctx.x(0)], params)


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
    ceil_mode = bool(_attr(node, "ceil_mode", 0))
    if not ceil_mode:
        pads = _clipped_window_pads(ctx.shape(0)[2:], kernel, strides, dilations, pads)
    return {"kernel": kernel, "stride": strides, "dilation": dilations, "pads": pads, "ceil_mode": ceil_mode}


def _clipped_window_pads(spatial, kernel, strides, dilations, pads: list[int]) -> list[int]:
    """onnxruntime sizes a pool as ``(span // stride) + 1`` with C's division, which rounds toward zero:
    a window a little longer than its (padded) input still gives one output, over the values it covers.
    The TorchScript exporter writes such pools (an adaptive max pool sized from ONNX's shape inference,
    which counts one ceil-mode window too many upstream). Padding the end so that the window fits gives
    the same output: padded values are ignored by max pooling and by averages without
    ``count_include_pad``."""
    d = len(kernel)
    pads = list(pads)
    for i, length in enumerate(spatial):
        span = length + pads[i] + pads[d + i] - dilations[i] * (kernel[i] - 1) - 1
        if -strides[i] < span < 0:
            pads[d + i] -= span
    return pads


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
    if attrs["count_include_pad"] and attrs["pads"] != list(_spatial_pads(ctx, attrs["kernel"], attrs["stride"],
                                                                          attrs["dilation"])):
        raise _Refuse("its window is longer than its padded input and it counts padding in the average "
                      "(onnxruntime's result there is not a plain average pool)")
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
        ratio = ctx.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        zero = ratio is not None and ratio.size == 1 and float(ratio.reshape(-1)[0]) == 0.0  # drops nothing
        if len(node.input) > 2 and node.input[2] and bool(ctx.static(2, "training_mode").reshape(-1)[0]) and not zero:
            raise HardRefusal("it runs in training mode: it zeroes values at random")
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
    if len(shape) < 2:
        raise _Refuse(f"its input of shape {tuple(shape)} has no channel axis (pathcond reads (batch, channels, ...))")
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


def _factor_operands(ctx: _Context) -> tuple[int, int, bool] | None:
    """Mul / Div of an activation by a constant: (activation slot, constant slot, divide), the constant
    checked; None when the constant is a scalar, which is then emitted as a ``scale`` node."""
    xs, cs = _split_operands(ctx)
    divide = ctx.node.op_type == "Div"
    if divide and xs == 1:
        raise _Refuse("it divides a constant by an activation")
    c = ctx.const(ctx.node.input[cs])
    _check_factor(c, divide)
    if c.size == 1 and c.ndim <= len(ctx.shape(xs)):
        value = float(c.reshape(-1)[0])
        ctx.emit("scale", [ctx.x(xs)], attrs={"value": 1.0 / value if divide else value})
        return None
    return xs, cs, divide


def _mul(ctx: _Context) -> None:
    operands = _factor_operands(ctx)
    if operands is None:
        return
    xs, cs, divide = operands
    channels, layout = _per_channel(ctx, xs, cs, "a per-channel factor")
    transform = _Transform((channels,), reciprocal=divide, expanded_shape=layout)
    ctx.emit("affine", [ctx.x(xs)], {"weight": ctx.param(cs, transform)})


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
        emitted = len(ctx.nodes)
        try:
            if node.op_type in RANDOM_OPS and node.domain in ("", "ai.onnx"):
                raise HardRefusal("it draws random values")
            if converter is None:
                raise _Refuse(_why_unsupported(node))
            if reads_token_major(ctx, ctx.last):
                convert_token_major(ctx, ctx.last)
            elif node.output and node.output[0] in ctx.last:
                raise _Refuse("it lays channel-first activations out token-major (features on the last axis)")
            else:
                converter(ctx)
        except _Refuse as exc:  # keep going so that every offender is reported
            del ctx.nodes[emitted:]  # a converter that emitted a first step before refusing
            ctx.offenders.append(Offender(ctx.node_names[index], node.op_type, str(exc),
                                          opaque_ok=not isinstance(exc, HardRefusal)))
            ctx.offender_nodes.append(index)
            acts = tuple(ctx.alias.get(n, n) for n in node.input if n and n not in ctx.folder.values)
            ctx.opaque.append(OpaqueSource(ctx.node_names[index], node.op_type, str(exc), acts,
                                           tuple(o for o in node.output if o)))


def _fuse_linear_bias(nodes: list[Node], outputs: list[str]) -> list[Node]:
    """MatMul + Add of a (O,) constant -> one linear node with a bias."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            readers.setdefault(value, []).append(node)
    fused, dropped = {}, set()
    for node in nodes:
        nexts = readers.get(node.output, [])
        if node.op in ("linear", "token_linear") and "bias" not in node.params and node.output not in outputs \
                and len(nexts) == 1 and nexts[0].op == "bias":
            b = nexts[0]
            fused[id(b)] = Node(node.name, node.op, node.inputs, b.output,
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
        shapes[name] = ir_shape(ctx.folder, ctx.last, name) or (1,) + tuple(int(d) for d in shape[1:])
    return shapes


def _translate(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], warnings: list[str],
               names: list[str] | None = None, partial: bool = False, data: Mapping[str, np.ndarray] | None = None):
    """``data``: the initializer values held out of ``model`` (onnx_read._detach_data)."""
    folder, _ = _fold_graph(model, shapes, _opset(model), data)  # the model is at MIN_OPSET or later (_upgrade)
    names = names or _node_names(model)
    stored = _names(model, folder)
    ctx = _Context(model, folder, names, stored)
    heads = _heads(model, folder)
    for head in heads.values():
        warnings.append(f"head {head.op_type} {names[list(model.graph.node).index(head)]!r} ignored for the "
                        "statistics: they are computed on its input")
    outputs = [heads[v.name].input[0] if v.name in heads else v.name for v in model.graph.output]
    live = _live_nodes(model, folder, outputs)
    last = channels_last(model, folder, live, all(shape[0] == 1 for shape in shapes.values() if shape))
    ctx.last = last
    _convert(ctx, live)
    pre = _preprocessing(model, folder, live, list(shapes), ctx.offender_nodes) if ctx.offenders else []
    if pre:  # again, with the network starting after the input preprocessing
        ctx = _Context(model, folder, names, stored, last=last)
        _convert(ctx, [i for i in live if i not in set(pre)])
    _check_outputs(ctx, outputs)
    if pre:
        ir_inputs = _frontier_inputs(ctx, model, pre, list(shapes), outputs)
        warnings.append(
            "input preprocessing left out of the analysis and unchanged: "
            + ", ".join(f"{model.graph.node[i].op_type} {names[i]!r}" for i in pre)
            + f"; the network is analysed from {', '.join(repr(n) for n in ir_inputs)}")
    else:
        ir_inputs = {name: ir_shape(folder, last, name) or (1,) + tuple(shape[1:]) for name, shape in shapes.items()}
    if ctx.offenders:
        return _partial(ctx, ir_inputs, outputs, partial, warnings), ctx.refs, stored
    nodes = _fuse_linear_bias(ctx.nodes, outputs)
    used = {key for node in nodes for key in node.params.values()}
    try:
        graph = Graph(ir_inputs, nodes, [ctx.alias.get(o, o) for o in outputs],
                      {k: v for k, v in ctx.params.items() if k in used}, partial=partial)
    except GraphError as exc:
        raise UnsupportedModelError(f"the model cannot be represented: {exc}") from exc
    return graph, ctx.refs, stored


def _partial(ctx: _Context, ir_inputs: dict[str, tuple[int, ...]], outputs: list[str], partial: bool,
             warnings: list[str]) -> Graph:
    """The graph with every offender kept as opaque (pathcond_cli.segments) under ``--partial``; else
    the refusal, saying how many hidden units ``--partial`` would rescale."""
    listing = "; ".join(f"{o.node} ({o.op}): {o.why}" for o in ctx.offenders)
    hard = hard_refusal(f"the model is not a ReLU network pathcond can rescale: {listing}.", ctx.offenders)
    if hard is not None:
        raise hard
    nodes = _fuse_linear_bias(ctx.nodes, outputs)
    # a stored tensor an opaque node reads too (a tied embedding, or equal tensors the exporter merged) needs
    # no freezing: the writer gives a rescaled role a tensor of its own (onnx_write._plan_names)
    try:
        graph = opaque_graph(ir_inputs, nodes, outputs, ctx.params, ctx.opaque,
                             lambda name: ir_shape(ctx.folder, ctx.last, name))
    except GraphError as exc:
        if partial:
            raise UnsupportedModelError(f"partial rescaling: the model's homogeneous segments cannot be represented "
                                        f"({exc}); unsupported: {listing}", ctx.offenders) from exc
        graph = None
    if not partial:
        raise UnsupportedModelError(f"the model is not a ReLU network pathcond can rescale: {listing}.", ctx.offenders,
                                    graph)
    warnings.append(f"partial rescaling: {opaque_op_count(graph)} node(s) kept unchanged as opaque (not positively "
                    "homogeneous or not supported); the homogeneous segments between them are rescaled")
    return graph


def _check_outputs(ctx: _Context, outputs: list[str]) -> None:
    produced = {node.output for node in ctx.nodes} | set(ctx.alias)
    for name in outputs:
        if name not in produced and not ctx.offenders:
            raise UnsupportedModelError(f"graph output {name!r} is not computed by any supported layer "
                                        "(it is a constant or a graph input)")
