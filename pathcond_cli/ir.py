"""pathcond's own graph IR: a small DAG of typed nodes over named parameters.

Front ends (ONNX, torch.export) translate a model into a :class:`Graph`; everything else (rescaling
groups, path statistics, the solver) works on this IR and never on a file format.

Conventions
-----------
* Every value is a tensor of batch 1 with channels on axis 1: ``(1, C)`` for features, ``(1, C, L)`` or
  ``(1, C, H, W)`` for 1-D / 2-D maps.
* Each node has exactly one output value, named by ``Node.output``; values are named by strings.
* ``Graph.params`` maps a *parameter key* to a tensor in its stored dtype. A key is what a front end needs
  to write a new value back (a state_dict name, an ONNX initializer name, ...). A node refers to its
  parameters by *role* (``weight``, ``bias``, ...); the roles of each op are listed in :data:`OPS`.
* Nodes are listed in a topological order.

The op set is closed. Each op's rules for channels and for path statistics live in the modules that
need them (``groups``, ``stats``); :func:`evaluate` here is the reference forward pass, used to infer
shapes and to check that a rescaling leaves the function unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OpSpec:
    """What an op needs: its parameter roles (required, optional) and how many inputs it takes."""

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    min_inputs: int = 1
    max_inputs: int | None = 1


OPS: dict[str, OpSpec] = {
    # layers that create new neurons
    "linear": OpSpec(("weight",), ("bias",)),  # weight (O, I); y = x W^T + b
    "conv": OpSpec(("weight",), ("bias",)),  # weight (O, I/groups, *k); attrs stride, pads, dilation, groups
    # transposed convolution; weight held like a conv's, (O, I/groups, *k) (see swap_group_axes); attrs
    # stride, dilation, groups, pads (begin..., end...) cropped from the full output, output_padding
    "conv_transpose": OpSpec(("weight",), ("bias",)),
    "batchnorm": OpSpec(("running_mean", "running_var"), ("weight", "bias")),  # attrs eps
    "affine": OpSpec(("weight",), ("bias",)),  # per-channel y = w_c x + b_c
    # per-channel bias added to existing neurons (MatMul + Add, Conv without bias + Add, Sub of a constant)
    "bias": OpSpec(("bias",)),
    # positively homogeneous activations
    "relu": OpSpec(),
    "leaky_relu": OpSpec(),  # attrs alpha
    "prelu": OpSpec(("slope",)),  # slope broadcast per channel; not a path parameter
    "identity": OpSpec(),  # dropout, no-op reshapes, ...
    "scale": OpSpec(),  # multiplication by a fixed scalar: attrs value
    # pooling
    "maxpool": OpSpec(),  # attrs kernel, stride, pads, dilation, ceil_mode
    "avgpool": OpSpec(),  # attrs kernel, stride, pads, ceil_mode, count_include_pad
    "global_avgpool": OpSpec(),  # mean over all spatial axes; attrs keepdim
    "upsample": OpSpec(),  # nearest-neighbour, integer factors: attrs scale (one per spatial axis)
    "resize_linear": OpSpec(),  # (bi)linear resizing: attrs size (output spatial sizes), coords (see below)
    # structure
    "add": OpSpec(min_inputs=2, max_inputs=None),  # residual add of same-shape values
    "concat": OpSpec(min_inputs=1, max_inputs=None),  # along channels (axis 1)
    "flatten": OpSpec(),  # (1, C, *S) -> (1, C * prod(S)), channel-major
    # (1, C, *S) -> (1, C, *spatial) with prod(spatial) = prod(S): every value stays in its channel (a unit
    # spatial axis added or removed, 1-D pooling lowered to 2-D); attrs spatial
    "reshape": OpSpec(),
}

#: ops whose output channels are new neurons (each output channel starts its own group)
LAYER_OPS = frozenset({"linear", "conv", "conv_transpose", "batchnorm", "affine"})
#: layers with a weight between input and output channels: their outputs are the hidden units
WEIGHT_LAYER_OPS = frozenset({"linear", "conv", "conv_transpose"})


@dataclass(frozen=True, eq=False)
class Node:
    """One operation of the graph.

    ``name`` and ``source_op`` come from the original model so that reports can point at it.
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    params: Mapping[str, str] = field(default_factory=dict)  # role -> parameter key
    attrs: Mapping[str, Any] = field(default_factory=dict)
    source_op: str = ""

    def param(self, role: str) -> str | None:
        return self.params.get(role)


class GraphError(ValueError):
    """The IR is malformed: a front-end bug or a graph pathcond cannot represent."""


@dataclass(eq=False)
class Graph:
    """A ReLU DAG: input shapes, nodes in topological order, output values and parameters."""

    inputs: dict[str, tuple[int, ...]]
    nodes: list[Node]
    outputs: list[str]
    params: dict[str, torch.Tensor]
    # parameters the container cannot store a new value for (key -> why): their channels are pinned
    frozen: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = {name: [] for name in self.inputs}
        for node in self.nodes:
            self._check_node(node)
            self.producer[node.output] = node
            self.consumers[node.output] = []
            for value in node.inputs:
                self.consumers[value].append(node)
        for value in self.outputs:
            if value not in self.consumers:
                raise GraphError(f"graph output {value!r} is produced by no node")
        self.shapes: dict[str, tuple[int, ...]] = infer_shapes(self)

    def _check_node(self, node: Node) -> None:
        spec = OPS.get(node.op)
        if spec is None:
            raise GraphError(f"node {node.name!r}: unknown IR op {node.op!r}")
        if node.output in self.consumers:
            raise GraphError(f"node {node.name!r}: value {node.output!r} is defined twice")
        n = len(node.inputs)
        if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
            raise GraphError(f"node {node.name!r} ({node.op}) has {n} inputs")
        for value in node.inputs:
            if value not in self.consumers:
                raise GraphError(f"node {node.name!r} reads {value!r} before it is defined")
        for role in spec.required:
            if role not in node.params:
                raise GraphError(f"node {node.name!r} ({node.op}) lacks its {role!r} parameter")
        for role, key in node.params.items():
            if role not in spec.required + spec.optional:
                raise GraphError(f"node {node.name!r} ({node.op}) has no role {role!r}")
            if key not in self.params:
                raise GraphError(f"node {node.name!r}: parameter {key!r} is missing")

    def tensor(self, node: Node, role: str) -> torch.Tensor | None:
        key = node.params.get(role)
        return None if key is None else self.params[key]

    def with_params(self, params: Mapping[str, torch.Tensor]) -> Graph:
        """The same graph with some parameters replaced."""
        new = dict(self.params)
        new.update(params)
        return Graph(dict(self.inputs), list(self.nodes), list(self.outputs), new, dict(self.frozen))

    def with_frozen(self, frozen: Mapping[str, str]) -> Graph:
        """The same graph with more parameters marked as not writable (key -> why)."""
        unknown = [k for k in frozen if k not in self.params]
        if unknown:
            raise GraphError(f"frozen keys {unknown} are not parameters of the graph")
        return Graph(dict(self.inputs), list(self.nodes), list(self.outputs), dict(self.params),
                     {**self.frozen, **frozen})


# --------------------------------------------------------------------------------------------------
# Window geometry shared by pooling in the reference forward and in the path statistics.


def pool_geometry(node: Node, spatial: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, stride, dilation and the explicit (begin..., end...) pads, with the ceil-mode overhang
    added to the end pads, so that a plain floor-mode window op yields the right output size."""
    d = len(spatial)
    kernel = list(node.attrs["kernel"])
    stride = list(node.attrs.get("stride") or [1] * d)
    dilation = list(node.attrs.get("dilation") or [1] * d)
    pads = list(node.attrs.get("pads") or [0] * (2 * d))
    ceil_mode = bool(node.attrs.get("ceil_mode", False))
    extra = [0] * d
    for i, length in enumerate(spatial):
        span = length + pads[i] + pads[d + i] - dilation[i] * (kernel[i] - 1) - 1
        out = (math.ceil if ceil_mode else math.floor)(span / stride[i]) + 1
        if ceil_mode and (out - 1) * stride[i] >= length + pads[i]:
            out -= 1
        extra[i] = max(0, (out - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 - (length + pads[i] + pads[d + i]))
    return kernel, stride, dilation, pads[:d] + [p + e for p, e in zip(pads[d:], extra)]


def _pad(x: torch.Tensor, pads_begin_end: Sequence[int], value: float = 0.0) -> torch.Tensor:
    d = len(pads_begin_end) // 2
    torch_pads: list[int] = []
    for i in reversed(range(d)):  # F.pad wants the last axis first
        torch_pads += [pads_begin_end[i], pads_begin_end[d + i]]
    if not any(torch_pads):
        return x
    return F.pad(x, torch_pads, value=value)


def _window_op(fn_name: str, x: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    d = x.dim() - 2
    if d == 1:
        x = x.unsqueeze(-1)
        kernel, stride, dilation = [kernel[0], 1], [stride[0], 1], [dilation[0], 1]
    if fn_name == "max":
        y = F.max_pool2d(x, kernel, stride, 0, dilation)
    else:  # sum: depthwise convolution with a kernel of ones (supports dilation)
        c = x.shape[1]
        ones = torch.ones((c, 1, *kernel), dtype=x.dtype, device=x.device)
        y = F.conv2d(x, ones, None, stride, 0, dilation, c)
    return y.squeeze(-1) if d == 1 else y


def window_sum(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Sum over each pooling window (zero padding): max-pool's image in the squared network."""
    kernel, stride, dilation, pads = pool_geometry(node, x.shape[2:])
    return _window_op("sum", _pad(x, pads), kernel, stride, dilation)


def window_count(node: Node, x: torch.Tensor) -> torch.Tensor:
    """The divisor of an average pool at each output position, shape (1, 1, *out)."""
    spatial = x.shape[2:]
    kernel, stride, dilation, pads = pool_geometry(node, spatial)
    d = len(spatial)
    mask = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
    if node.attrs.get("count_include_pad", False):
        # explicit pads count, the ceil-mode overhang does not
        explicit = list(node.attrs.get("pads") or [0] * (2 * d))
        mask = _pad(mask, explicit, 1.0)
        overhang = [0] * d + [p - e for p, e in zip(pads[d:], explicit[d:])]
        mask = _pad(mask, overhang, 0.0)
    else:
        mask = _pad(mask, pads, 0.0)
    return _window_op("sum", mask, kernel, stride, dilation)


def conv_padded(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Apply a conv node's explicit pads (any asymmetry included)."""
    d = x.dim() - 2
    return _pad(x, list(node.attrs.get("pads") or [0] * (2 * d)))


def conv_apply(node: Node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    d = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    stride = node.attrs.get("stride") or [1] * d
    dilation = node.attrs.get("dilation") or [1] * d
    return conv(conv_padded(node, x), weight, bias, stride, 0, dilation, node.attrs.get("groups", 1))


def swap_group_axes(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(A, B/groups, *k) -> (B, A/groups, *k), swapping the two channel axes within each group.

    A transposed convolution stores its weight (I, O/groups, *k); the IR holds it (O, I/groups, *k),
    like a convolution's, so that output channels are on axis 0 for every layer. The map is its own
    inverse. With groups = 1 on a matrix it is the transpose (a weight used as ``x @ W``)."""
    a, b_per, k = weight.shape[0], weight.shape[1], weight.shape[2:]
    w = weight.reshape(groups, a // groups, b_per, *k).transpose(1, 2)
    return w.reshape(groups * b_per, a // groups, *k)


def conv_transpose_apply(node: Node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A transposed convolution from the IR weight layout (O, I/groups, *k): the full output, then the
    pads cropped (begin) and (end − output_padding) cropped or, when negative, zero-extended."""
    d = x.dim() - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[d]
    a = node.attrs
    groups = int(a.get("groups", 1))
    y = fn(x, swap_group_axes(weight, groups), None, a.get("stride") or [1] * d, 0, 0, groups,
           a.get("dilation") or [1] * d)
    pads = a.get("pads") or [0] * (2 * d)
    extra = a.get("output_padding") or [0] * d
    y = _pad(y, [-p for p in pads[:d]] + [o - p for p, o in zip(pads[d:], extra)])
    return y if bias is None else y + channel_view(bias, y)


def upsample_nearest(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling by integer factors: output[i] = input[i // s] on every spatial axis
    (what ONNX Resize and torch's nearest / nearest-exact modes compute for integer scales)."""
    if len(scale) != x.dim() - 2 or any(int(s) < 1 for s in scale):
        raise GraphError(f"upsample factors {list(scale)} do not fit a rank-{x.dim()} value")
    for axis, s in enumerate(scale, start=2):
        if int(s) > 1:
            x = x.repeat_interleave(int(s), dim=axis)
    return x


LINEAR_RESIZE_COORDS = ("half_pixel", "align_corners", "asymmetric")


def linear_resize_matrix(n_in: int, n_out: int, coords: str) -> torch.Tensor:
    """(n_out, n_in) float64 weights of linear interpolation along one axis: output i reads
    src = (i + 1/2)·n_in/n_out − 1/2 (half_pixel: torch's align_corners=False), i·(n_in−1)/(n_out−1)
    (align_corners) or i·n_in/n_out (asymmetric), clamped to [0, n_in − 1], split between floor(src)
    and the next sample. Every weight is ≥ 0, so the op is positively homogeneous and channel-wise."""
    if coords not in LINEAR_RESIZE_COORDS:
        raise GraphError(f"unknown linear resize coordinates {coords!r}")
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        if coords == "align_corners":
            src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        elif coords == "asymmetric":
            src = i * n_in / n_out
        else:
            src = (i + 0.5) * n_in / n_out - 0.5
        src = min(max(src, 0.0), n_in - 1.0)
        low = int(math.floor(src))
        frac = src - low
        m[i, low] += 1.0 - frac
        m[i, min(low + 1, n_in - 1)] += frac
    return m


def resize_linear(x: torch.Tensor, size: Sequence[int], coords: str, q: float = 1.0) -> torch.Tensor:
    """Apply the per-axis interpolation matrices raised to the power ``q`` entrywise (q = 0: 1 where a
    weight is not 0), axis by axis: q = 1 is the op itself, q = 2 its image in the squared network."""
    if len(size) != x.dim() - 2:
        raise GraphError(f"resize sizes {list(size)} do not fit a rank-{x.dim()} value")
    for axis, n_out in enumerate(size, start=2):
        m = linear_resize_matrix(x.shape[axis], int(n_out), coords)
        m = (m != 0).to(torch.float64) if q == 0 else m.pow(q)
        x = torch.movedim(torch.tensordot(x, m.to(x.device, x.dtype), dims=([axis], [1])), -1, axis)
    return x


def channel_reshape(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *spatial): the values of each channel, in order, laid out on other spatial axes."""
    spatial = tuple(int(s) for s in spatial)
    if math.prod(spatial) != math.prod(x.shape[2:]) or len(spatial) > 2:
        raise GraphError(f"cannot lay out {tuple(x.shape[1:])} as {(x.shape[1], *spatial)} within each channel")
    return x.reshape(x.shape[0], x.shape[1], *spatial)


def channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast over ``like`` (channels on axis 1)."""
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


# --------------------------------------------------------------------------------------------------
# The reference forward pass.


def _forward_node(graph: Graph, node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    op, a = node.op, node.attrs
    x = xs[0]
    if op == "linear":
        return F.linear(x, p("weight"), p("bias"))
    if op == "conv":
        return conv_apply(node, x, p("weight"), p("bias"))
    if op == "conv_transpose":
        return conv_transpose_apply(node, x, p("weight"), p("bias"))
    if op == "batchnorm":
        return F.batch_norm(x, p("running_mean"), p("running_var"), p("weight"), p("bias"), False, 0.0, a["eps"])
    if op == "affine":
        y = x * channel_view(p("weight"), x)
        b = p("bias")
        return y if b is None else y + channel_view(b, x)
    if op == "bias":
        return x + channel_view(p("bias"), x)
    if op == "relu":
        return F.relu(x)
    if op == "leaky_relu":
        return F.leaky_relu(x, a["alpha"])
    if op == "prelu":
        slope = p("slope").reshape(-1)
        return torch.where(x >= 0, x, x * (channel_view(slope, x) if slope.numel() > 1 else slope))
    if op == "identity":
        return x
    if op == "scale":
        return x * a["value"]
    if op == "maxpool":
        kernel, stride, dilation, pads = pool_geometry(node, x.shape[2:])
        return _window_op("max", _pad(x, pads, -math.inf), kernel, stride, dilation)
    if op == "avgpool":
        return window_sum(node, x) / window_count(node, x)
    if op == "global_avgpool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=bool(a.get("keepdim", False)))
    if op == "upsample":
        return upsample_nearest(x, a["scale"])
    if op == "resize_linear":
        return resize_linear(x, a["size"], a["coords"])
    if op == "add":
        return sum(xs[1:], xs[0])
    if op == "concat":
        return torch.cat(xs, dim=1)
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    if op == "reshape":
        return channel_reshape(x, a["spatial"])
    raise GraphError(f"no forward rule for op {op!r}")  # pragma: no cover - OPS is closed


def evaluate(
    graph: Graph,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> dict[str, torch.Tensor]:
    """Run the IR with real values; returns the graph outputs by name.

    ``params`` overrides ``graph.params``; ``dtype`` casts inputs and parameters (``None`` keeps them).
    Inputs may carry any batch size.
    """
    params = {**graph.params, **(params or {})}
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    values: dict[str, torch.Tensor] = {name: cast(inputs[name]) for name in graph.inputs}
    for node in graph.nodes:

        def p(role: str, node=node):
            key = node.params.get(role)
            return None if key is None else cast(params[key]).to(values[node.inputs[0]].device)

        values[node.output] = _forward_node(graph, node, [values[v] for v in node.inputs], p)
    return {name: values[name] for name in graph.outputs}


def infer_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Shapes of every value at batch 1, by running :func:`evaluate`'s rules on the meta device."""
    shapes: dict[str, tuple[int, ...]] = {}
    values = {name: torch.empty(shape, device="meta") for name, shape in graph.inputs.items()}
    for name, shape in graph.inputs.items():
        if len(shape) < 2 or shape[0] != 1:
            raise GraphError(f"input {name!r} must have shape (1, C, ...), got {tuple(shape)}")
        shapes[name] = tuple(shape)
    for node in graph.nodes:

        def p(role: str, node=node):
            key = node.params.get(role)
            return None if key is None else graph.params[key].to("meta", torch.float32)

        try:
            out = _forward_node(graph, node, [values[v] for v in node.inputs], p)
        except RuntimeError as exc:
            raise GraphError(f"node {node.name!r} ({node.op}): shapes do not fit: {exc}") from exc
        values[node.output] = out
        shapes[node.output] = tuple(out.shape)
    return shapes
