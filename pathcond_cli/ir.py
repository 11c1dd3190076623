"""pathcond's own graph IR: a small DAG of typed nodes over named parameters, and the op table.

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

The op set is closed, and :data:`OPS` is the one place an op is described: one :class:`OpSpec` row holds
its parameter roles, how it treats channels (read by ``groups``), which roles enter the objective and
whether its outputs are hidden units, its closed-form shape rule, its forward (:func:`evaluate`, used to
check that a rescaling leaves the function unchanged) and its rule in the squared network (the path
forward of ``stats``). ``groups`` and ``stats`` dispatch on the row, never on an op's name, so adding a
homogeneous op means adding a row here and the front-end rows that emit it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .errors import NumericalError

Shape = tuple[int, ...]


class Channels(enum.Enum):
    """How an op maps its input channels to its output channels (what ``groups`` needs to know)."""

    NEW = "new"  # output channels are new neurons: each starts its own rescaling group (layers)
    SAME = "same"  # output channel c is input channel c: a positive scaling commutes with the op
    UNION = "union"  # several inputs meet channel by channel (residual add): their groups unite
    CONCAT = "concat"  # the inputs' channels one after the other (concat along axis 1)
    FLATTEN = "flatten"  # (1, C, *S) -> (1, C·prod(S)): each channel repeated prod(S) times, channel-major


#: kinds of objective roles: an ``edge`` reads an input channel (a weight), a ``diag`` weight reads the
#: same channel it writes (per-channel affine), a ``bias`` starts paths; ``bn_scale`` / ``bn_shift`` stand
#: for BatchNorm's derived a = γ/√(var+ε) and b = β − aμ (MATH §7)
OBJECTIVE_KINDS = ("edge", "diag", "bias", "bn_scale", "bn_shift")


@dataclass(frozen=True, eq=False)
class OpSpec:
    """Everything pathcond knows about one IR op.

    ``shape(node, input_shapes, param_shape)`` is closed form (no tensors are run to infer shapes);
    ``forward(node, xs, p)`` computes the op with real values (``p(role)`` is a parameter or None);
    ``path(ctx, node, xs)`` is its image in the path forward with exponent ``ctx.q`` on log-scaled
    non-negative values (:class:`Scaled`): every parameter w becomes |w|^q via ``ctx.param``, every fixed
    weight c becomes |c|^q, a ReLU-like activation the identity."""

    channels: Channels
    shape: Callable[..., Shape]
    forward: Callable[..., torch.Tensor]
    path: Callable[..., Scaled]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    min_inputs: int = 1
    max_inputs: int | None = 1
    objective: Mapping[str, str] = field(default_factory=dict)  # role -> kind (OBJECTIVE_KINDS)
    hidden: bool = False  # its output channels are hidden units (a weight between input and output)
    # the objective roles stand for values derived per node (BatchNorm's a, b): a tensor shared by two
    # such nodes is two parameters, not one tied one
    derived_roles: bool = False
    pins_input: str | None = None  # why the channels it reads cannot be rescaled (None: they can)
    # roles without which its output channels cannot be rescaled, and why
    pins_output_without: tuple[tuple[str, ...], str] | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        return self.required + self.optional


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


class Sets:
    """Union-find over hashable values (value names, nodes): which of them must share one property
    (a segment, a layout)."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


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
    # built for --partial: analysed and reported by segments (pathcond_cli.segments) even without an opaque node
    partial: bool = False

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
        return Graph(dict(self.inputs), list(self.nodes), list(self.outputs), new, dict(self.frozen), self.partial)

    def with_frozen(self, frozen: Mapping[str, str]) -> Graph:
        """The same graph with more parameters marked as not writable (key -> why)."""
        unknown = [k for k in frozen if k not in self.params]
        if unknown:
            raise GraphError(f"frozen keys {unknown} are not parameters of the graph")
        return Graph(dict(self.inputs), list(self.nodes), list(self.outputs), dict(self.params),
                     {**self.frozen, **frozen}, self.partial)



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



def bn_affine(graph: Graph, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BatchNorm as y = a·x + b per channel (float64)."""
    f64 = lambda role: None if node.param(role) is None else graph.tensor(node, role).double()  # noqa: E731
    a = 1.0 / torch.sqrt(f64("running_var") + node.attrs["eps"])
    if f64("weight") is not None:
        a = a * f64("weight")
    b = -a * f64("running_mean")
    if f64("bias") is not None:
        b = b + f64("bias")
    return a, b


# --------------------------------------------------------------------------------------------------
# Log-scaled values of the path forward: the algebra every op's ``path`` rule is written in.


@dataclass
class Scaled:
    """A non-negative tensor ``t`` standing for ``t · exp(s)``."""

    t: torch.Tensor
    s: float


def log_max(x: Scaled) -> float:
    m = float(x.t.detach().max()) if x.t.numel() else 0.0
    return x.s + math.log(m) if m > 0 else -math.inf


#: a tensor whose largest entry lies within [1/BAND, BAND] is left as it is by :func:`normalize`: the
#: next op still has a factor 1e278 of headroom before float64 overflows (as much as after a division),
#: and the division by the maximum, a full pass over every value and adjoint, is skipped
NORMAL_BAND = 1e30


def normalize(x: Scaled) -> Scaled:
    """Divide by the (detached) maximum and add its log to the scale, so nothing overflows; a tensor
    already in range (:data:`NORMAL_BAND`) is kept (the same value, without a rounding)."""
    m = float(x.t.detach().max()) if x.t.numel() else 0.0
    if not math.isfinite(m):
        raise NumericalError("path statistics overflowed despite log-scaling")
    if m <= 0:  # all zero: keep the scale, gradients through this value still need it
        return x
    if 1.0 / NORMAL_BAND <= m <= NORMAL_BAND:
        return x
    return Scaled(x.t / m, x.s + math.log(m))


#: cap on a term's relative scale: an all-zero term still carries its (possibly huge) gradient factor
_MAX_EXP = 700.0


def scale_factor(s: float, top: float) -> float:
    return math.exp(min(s - top, _MAX_EXP))


def combine(terms: list[Scaled]) -> Scaled:
    """Sum of scaled terms (broadcasting), brought to a common log-scale. Terms that are all zero stay
    in the sum: their values add nothing, but their parameters' gradients must flow."""
    top = max(log_max(t) for t in terms)
    if top == -math.inf:
        top = max(t.s for t in terms)
    total = sum(t.t * scale_factor(t.s, top) for t in terms)
    shape = broadcast_shapes(*(t.t.shape for t in terms))
    return normalize(Scaled(total.expand(shape), top))


class PathContext(Protocol):
    """What a ``path`` rule may ask of the path forward running it (``stats.PathForward``)."""

    graph: Graph
    q: float

    def param(self, node: Node, role: str, value: torch.Tensor | None = None) -> torch.Tensor | None:
        """|θ|^q for one role of ``node`` (``value`` stands for a derived parameter); None if absent."""
        ...


# --------------------------------------------------------------------------------------------------
# Rules shared by several ops.


def _unfit(node: Node, why: str) -> GraphError:
    return GraphError(f"node {node.name!r} ({node.op}): shapes do not fit: {why}")


def _spatial_rank(node: Node, shape: Shape, ranks: Sequence[int]) -> int:
    """The number of spatial axes of a map input, checked against what the op supports."""
    d = len(shape) - 2
    if d not in ranks:
        raise _unfit(node, f"a rank-{len(shape)} input ({tuple(shape)}) where {sorted(r + 2 for r in ranks)} is needed")
    return d


def _window_out(node: Node, length: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> int:
    out = (length + begin + end - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise _unfit(node, f"a window of {kernel} (dilation {dilation}) does not fit {length} + pads {begin}, {end}")
    return out


def _same_shape(node: Node, shapes: list[Shape], param_shape) -> Shape:
    return shapes[0]


def _per_channel_shape(*roles: str, scalar_ok: bool = False):
    """The shape rule of an elementwise op whose parameters hold one value per channel."""

    def rule(node: Node, shapes: list[Shape], param_shape) -> Shape:
        c = shapes[0][1]
        for role in roles:
            ps = param_shape(role)
            if ps is not None and math.prod(ps) != c and not (scalar_ok and math.prod(ps) == 1):
                raise _unfit(node, f"its {role} of shape {tuple(ps)} is not one value per channel ({c})")
        return shapes[0]

    return rule


def _with_bias(ctx: PathContext, main: Scaled, bias: torch.Tensor | None) -> Scaled:
    if bias is None:
        return normalize(main)
    return combine([main, Scaled(channel_view(bias, main.t), 0.0)])


def _path_identity(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    """A weight-1 pass-through (and ReLU-like activations, which the path forward linearises)."""
    return xs[0]


def _weight_layer_rules(apply: Callable[[Node, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]):
    """(forward, path rule) of a layer ``y = apply(x, weight) + bias``: the forward applies it with the bias;
    the path rule applies it to the scaled input without the bias, then adds the bias on a common scale."""

    def forward(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
        return apply(node, xs[0], p("weight"), p("bias"))

    def path(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
        x = xs[0]
        y = apply(node, x.t, ctx.param(node, "weight"), None)
        return _with_bias(ctx, Scaled(y, x.s), ctx.param(node, "bias"))

    return forward, path


# -- linear ------------------------------------------------------------------------------------------


def _shape_linear(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, w = shapes[0], param_shape("weight")
    if len(x) != 2 or len(w) != 2 or x[1] != w[1]:
        raise _unfit(node, f"input {tuple(x)} and weight {tuple(w)} (a linear layer reads (1, I) with an (O, I) weight)")
    return (x[0], w[0])


_forward_linear, _path_linear = _weight_layer_rules(lambda node, x, w, b: F.linear(x, w, b))


# -- conv ------------------------------------------------------------------------------------------


def _conv_setup(node: Node, x: Shape, w: Shape, ranks: tuple[int, ...], layout: str = ""):
    """(spatial rank, stride, dilation, pads) of a convolution whose input and weight fit each other."""
    d = _spatial_rank(node, x, ranks)
    groups = int(node.attrs.get("groups", 1))
    if len(w) != d + 2 or x[1] != w[1] * groups or w[0] % groups:
        raise _unfit(node, f"input {tuple(x)} and weight {tuple(w)}{layout} with {groups} group(s)")
    a = node.attrs
    return d, a.get("stride") or [1] * d, a.get("dilation") or [1] * d, a.get("pads") or [0] * (2 * d)


def _shape_conv(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, w = shapes[0], param_shape("weight")
    d, stride, dilation, pads = _conv_setup(node, x, w, (1, 2, 3))
    spatial = [_window_out(node, x[2 + i], w[2 + i], stride[i], dilation[i], pads[i], pads[d + i]) for i in range(d)]
    return (x[0], w[0], *spatial)


_forward_conv, _path_conv = _weight_layer_rules(lambda node, x, w, b: conv_apply(node, x, w, b))


# -- conv_transpose ----------------------------------------------------------------------------------


def _shape_conv_transpose(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, w = shapes[0], param_shape("weight")
    d, stride, dilation, pads = _conv_setup(node, x, w, (1, 2), " (IR layout (O, I/groups, *k))")
    extra = node.attrs.get("output_padding") or [0] * d
    spatial = []
    for i in range(d):
        out = (x[2 + i] - 1) * stride[i] + dilation[i] * (w[2 + i] - 1) + 1 - pads[i] - pads[d + i] + extra[i]
        if out < 1:
            raise _unfit(node, f"the crop leaves {out} positions on spatial axis {i}")
        spatial.append(out)
    return (x[0], w[0], *spatial)


_forward_conv_transpose, _path_conv_transpose = _weight_layer_rules(
    lambda node, x, w, b: conv_transpose_apply(node, x, w, b))


# -- batchnorm (inference: y = a·x + b per channel) -------------------------------------------------


def _forward_batchnorm(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return F.batch_norm(xs[0], p("running_mean"), p("running_var"), p("weight"), p("bias"), False, 0.0,
                        node.attrs["eps"])


def _path_batchnorm(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    a, b = bn_affine(ctx.graph, node)
    x = xs[0]
    y = x.t * channel_view(ctx.param(node, "weight", a), x.t)
    return _with_bias(ctx, Scaled(y, x.s), ctx.param(node, "bias", b))


# -- affine (per-channel y = w_c x + b_c) -----------------------------------------------------------


def _forward_affine(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    x = xs[0]
    y = x * channel_view(p("weight"), x)
    b = p("bias")
    return y if b is None else y + channel_view(b, x)


def _path_affine(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    x = xs[0]
    y = x.t * channel_view(ctx.param(node, "weight"), x.t)
    return _with_bias(ctx, Scaled(y, x.s), ctx.param(node, "bias"))


# -- bias (added to existing neurons) ---------------------------------------------------------------


def _forward_bias(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return xs[0] + channel_view(p("bias"), xs[0])


def _path_bias(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    return _with_bias(ctx, xs[0], ctx.param(node, "bias"))


# -- activations and fixed scalings ---------------------------------------------------------------------


def _forward_relu(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return F.relu(xs[0])


def _forward_leaky_relu(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return F.leaky_relu(xs[0], node.attrs["alpha"])


def _forward_prelu(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    x, slope = xs[0], p("slope").reshape(-1)
    return torch.where(x >= 0, x, x * (channel_view(slope, x) if slope.numel() > 1 else slope))


def _forward_identity(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return xs[0]


def _forward_scale(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return xs[0] * node.attrs["value"]


def _path_scale(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    c = abs(float(node.attrs["value"]))
    if ctx.q == 0:
        return xs[0]
    if c == 0:
        return Scaled(torch.zeros_like(xs[0].t), 0.0)
    return Scaled(xs[0].t, xs[0].s + ctx.q * math.log(c))


# -- pooling and resizing ---------------------------------------------------------------------------


def _shape_pool(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x = shapes[0]
    d = _spatial_rank(node, x, (1, 2))
    if len(node.attrs["kernel"]) != d:
        raise _unfit(node, f"a {len(node.attrs['kernel'])}-D kernel on a {d}-D map")
    kernel, stride, dilation, pads = pool_geometry(node, x[2:])
    return (*x[:2], *(_window_out(node, x[2 + i], kernel[i], stride[i], dilation[i], pads[i], pads[d + i])
                      for i in range(d)))


def _forward_maxpool(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    x = xs[0]
    kernel, stride, dilation, pads = pool_geometry(node, x.shape[2:])
    return _window_op("max", _pad(x, pads, -math.inf), kernel, stride, dilation)


def _path_maxpool(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:  # a sum-pool
    return normalize(Scaled(window_sum(node, xs[0].t), xs[0].s))


def _forward_avgpool(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return window_sum(node, xs[0]) / window_count(node, xs[0])


def _path_avgpool(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    x = xs[0]
    counts = window_count(node, x.t)
    return normalize(Scaled(window_sum(node, x.t) / counts.pow(ctx.q), x.s))


def _shape_global_avgpool(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x = shapes[0]
    return (*x[:2], *([1] * (len(x) - 2))) if node.attrs.get("keepdim", False) else tuple(x[:2])


def _forward_global_avgpool(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    x = xs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=bool(node.attrs.get("keepdim", False)))


def _path_global_avgpool(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    x = xs[0]
    n = math.prod(x.t.shape[2:])
    y = x.t.sum(dim=tuple(range(2, x.t.dim())), keepdim=bool(node.attrs.get("keepdim", False)))
    return normalize(Scaled(y, x.s - ctx.q * math.log(n)))


def _shape_upsample(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, scale = shapes[0], [int(s) for s in node.attrs["scale"]]
    if len(scale) != len(x) - 2 or any(s < 1 for s in scale):
        raise _unfit(node, f"upsample factors {scale} on a rank-{len(x)} value")
    return (*x[:2], *(n * s for n, s in zip(x[2:], scale)))


def _forward_upsample(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return upsample_nearest(xs[0], node.attrs["scale"])


def _path_upsample(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:  # copies, weight 1
    return Scaled(upsample_nearest(xs[0].t, node.attrs["scale"]), xs[0].s)


def _shape_resize_linear(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, size = shapes[0], [int(n) for n in node.attrs["size"]]
    if len(size) != len(x) - 2 or any(n < 1 for n in size) or node.attrs["coords"] not in LINEAR_RESIZE_COORDS:
        raise _unfit(node, f"resize to {size} ({node.attrs['coords']}) on a rank-{len(x)} value")
    return (*x[:2], *size)


def _forward_resize_linear(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return resize_linear(xs[0], node.attrs["size"], node.attrs["coords"])


def _path_resize_linear(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    # fixed weights w >= 0 on every edge: w^q in the path forward
    return normalize(Scaled(resize_linear(xs[0].t, node.attrs["size"], node.attrs["coords"], ctx.q), xs[0].s))


# -- pad (spatial axes: zeros, or copies of values of the same channel) ----------------------------

#: padding modes, by their ONNX names, and torch's name of each: zeros start no path, and every other
#: mode copies a value of the same channel (weight 1), so all are positively homogeneous channel-wise
PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _shape_pad(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, pads, mode = shapes[0], [int(v) for v in node.attrs["pads"]], node.attrs.get("mode", "constant")
    d = len(x) - 2
    if d not in (1, 2) or len(pads) != 2 * d or any(v < 0 for v in pads) or mode not in PAD_MODES:
        raise _unfit(node, f"{mode!r} pads {pads} (begin..., end..., non-negative) on a rank-{len(x)} value")
    # reflect mirrors without repeating the edge, wrap copies at most one period
    limit = {"reflect": -1, "wrap": 0}.get(mode)
    if limit is not None and any(max(pads[i], pads[d + i]) > n + limit for i, n in enumerate(x[2:])):
        raise _unfit(node, f"{mode!r} pads {pads} are too large for spatial size {tuple(x[2:])}")
    return (*x[:2], *(n + pads[i] + pads[d + i] for i, n in enumerate(x[2:])))


def _padded(node: Node, x: torch.Tensor) -> torch.Tensor:
    pads, mode = node.attrs["pads"], PAD_MODES[node.attrs.get("mode", "constant")]
    if mode == "constant" or not any(pads):
        return _pad(x, pads)
    d = len(pads) // 2
    return F.pad(x, [p for i in reversed(range(d)) for p in (pads[i], pads[d + i])], mode=mode)


def _forward_pad(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return _padded(node, xs[0])


def _path_pad(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    # zeros: no edge reaches them, no path starts there; copies: one edge of weight 1 (1^q) each
    return Scaled(_padded(node, xs[0].t), xs[0].s)


# -- structure ------------------------------------------------------------------------------------


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """numpy's broadcasting rule in closed form. ``torch.broadcast_shapes`` gives the same result but
    imports sympy (symbolic shapes) on its first call: half a second of every run's start-up."""
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, d in enumerate(shape, start=rank - len(shape)):
            if d != out[i] and d != 1:
                if out[i] != 1:
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = int(d)
    return tuple(out)


def _shape_add(node: Node, shapes: list[Shape], param_shape) -> Shape:
    try:
        return broadcast_shapes(*shapes)
    except ValueError as exc:
        raise _unfit(node, f"it adds {[tuple(s) for s in shapes]}") from exc


def _forward_add(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return sum(xs[1:], xs[0])


def _path_add(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    return combine(list(xs))


def _shape_concat(node: Node, shapes: list[Shape], param_shape) -> Shape:
    rest = {(len(s), tuple(s[:1]) + tuple(s[2:])) for s in shapes}
    if len(rest) != 1:
        raise _unfit(node, f"it concatenates {[tuple(s) for s in shapes]} along channels")
    first = shapes[0]
    return (first[0], sum(s[1] for s in shapes), *first[2:])


def _forward_concat(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return torch.cat(xs, dim=1)


def _path_concat(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    top = max(log_max(x) for x in xs)
    if top == -math.inf:
        top = max(x.s for x in xs)
    return normalize(Scaled(torch.cat([x.t * scale_factor(x.s, top) for x in xs], dim=1), top))


def _shape_reshape(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, spatial = shapes[0], tuple(int(n) for n in node.attrs["spatial"])
    if math.prod(spatial) != math.prod(x[2:]) or len(spatial) > 2:
        raise _unfit(node, f"cannot lay out {tuple(x[1:])} as {(x[1], *spatial)} within each channel")
    return (*x[:2], *spatial)


def _forward_reshape(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return channel_reshape(xs[0], node.attrs["spatial"])


def _path_reshape(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:  # values keep channel and weight 1
    return Scaled(channel_reshape(xs[0].t, node.attrs["spatial"]), xs[0].s)


def _shape_flatten(node: Node, shapes: list[Shape], param_shape) -> Shape:
    return (shapes[0][0], math.prod(shapes[0][1:]))


def _forward_flatten(node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return xs[0].reshape(xs[0].shape[0], -1)


def _path_flatten(ctx: PathContext, node: Node, xs: list[Scaled]) -> Scaled:
    return Scaled(xs[0].t.reshape(1, -1), xs[0].s)


# -- token_linear (a linear layer at every position) and opaque (a boundary of partial rescaling) ----


def _shape_token_linear(node: Node, shapes: list[Shape], param_shape) -> Shape:
    x, w = shapes[0], param_shape("weight")
    if len(x) < 3 or len(w) != 2 or x[1] != w[1]:
        raise _unfit(node, f"input {tuple(x)} and weight {tuple(w)} (a token linear layer reads (1, I, *positions) "
                           "with an (O, I) weight)")
    return (x[0], w[0], *x[2:])


def token_linear_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[:, o, p] = Σ_i W[o, i] x[:, i, p] + b[o] at every position p (channels on axis 1)."""
    return F.linear(x.movedim(1, -1), weight, bias).movedim(-1, 1)


_forward_token_linear, _path_token_linear = _weight_layer_rules(lambda node, x, w, b: token_linear_apply(x, w, b))


def _shape_opaque(node: Node, shapes: list[Shape], param_shape) -> Shape:
    shape = tuple(int(n) for n in node.attrs["shape"])
    if len(shape) < 2 or shape[0] != 1 or any(n < 1 for n in shape):
        raise _unfit(node, f"an opaque value must be (1, C, ...), got {shape}")
    return shape


def _not_in_segments(node: Node, *args) -> Any:
    raise GraphError(f"node {node.name!r} is opaque (not positively homogeneous): neither the IR forward nor the "
                     "path forward runs it; cut the graph into its homogeneous segments first (segments.cut)")


# --------------------------------------------------------------------------------------------------
# The op table.

_LAYER = {"weight": "edge", "bias": "bias"}
_ELEMENTWISE = dict(channels=Channels.SAME, shape=_same_shape, path=_path_identity)

OPS: dict[str, OpSpec] = {
    # layers that create new neurons; weight (O, I); y = x W^T + b
    "linear": OpSpec(Channels.NEW, _shape_linear, _forward_linear, _path_linear, ("weight",), ("bias",),
                     objective=_LAYER, hidden=True),
    # weight (O, I/groups, *k); attrs stride, pads (begin..., end...), dilation, groups
    "conv": OpSpec(Channels.NEW, _shape_conv, _forward_conv, _path_conv, ("weight",), ("bias",),
                   objective=_LAYER, hidden=True),
    # transposed convolution; weight held like a conv's, (O, I/groups, *k) (see swap_group_axes); attrs
    # stride, dilation, groups, pads (begin..., end...) cropped from the full output, output_padding
    "conv_transpose": OpSpec(Channels.NEW, _shape_conv_transpose, _forward_conv_transpose, _path_conv_transpose,
                             ("weight",), ("bias",), objective=_LAYER, hidden=True),
    # inference BatchNorm, attrs eps; its objective roles stand for a = γ/√(var+ε) and b = β − aμ
    "batchnorm": OpSpec(Channels.NEW, _per_channel_shape("running_mean", "running_var", "weight", "bias"),
                        _forward_batchnorm, _path_batchnorm, ("running_mean", "running_var"), ("weight", "bias"),
                        objective={"weight": "bn_scale", "bias": "bn_shift"}, derived_roles=True,
                        pins_input="feeds BatchNorm: rescaling its input is not exact",
                        pins_output_without=(("weight", "bias"), "BatchNorm without affine parameters")),
    # per-channel y = w_c x + b_c
    "affine": OpSpec(Channels.NEW, _per_channel_shape("weight", "bias"), _forward_affine, _path_affine,
                     ("weight",), ("bias",), objective={"weight": "diag", "bias": "bias"}),
    # per-channel bias added to existing neurons (MatMul + Add, Conv without bias + Add, Sub of a constant)
    "bias": OpSpec(Channels.SAME, _per_channel_shape("bias"), _forward_bias, _path_bias, ("bias",),
                   objective={"bias": "bias"}),
    # positively homogeneous activations
    "relu": OpSpec(forward=_forward_relu, **_ELEMENTWISE),
    "leaky_relu": OpSpec(forward=_forward_leaky_relu, **_ELEMENTWISE),  # attrs alpha
    # slope broadcast per channel (or one scalar); not a path parameter
    "prelu": OpSpec(Channels.SAME, _per_channel_shape("slope", scalar_ok=True), _forward_prelu, _path_identity,
                    ("slope",)),
    "identity": OpSpec(forward=_forward_identity, **_ELEMENTWISE),  # dropout, no-op reshapes, ...
    # multiplication by a fixed scalar: attrs value
    "scale": OpSpec(Channels.SAME, _same_shape, _forward_scale, _path_scale),
    # pooling; attrs kernel, stride, pads, dilation, ceil_mode
    "maxpool": OpSpec(Channels.SAME, _shape_pool, _forward_maxpool, _path_maxpool),
    # attrs kernel, stride, pads, ceil_mode, count_include_pad
    "avgpool": OpSpec(Channels.SAME, _shape_pool, _forward_avgpool, _path_avgpool),
    # mean over all spatial axes; attrs keepdim
    "global_avgpool": OpSpec(Channels.SAME, _shape_global_avgpool, _forward_global_avgpool, _path_global_avgpool),
    # nearest-neighbour, integer factors: attrs scale (one per spatial axis)
    "upsample": OpSpec(Channels.SAME, _shape_upsample, _forward_upsample, _path_upsample),
    # (bi)linear resizing: attrs size (output spatial sizes), coords (LINEAR_RESIZE_COORDS)
    "resize_linear": OpSpec(Channels.SAME, _shape_resize_linear, _forward_resize_linear, _path_resize_linear),
    # padding of the spatial axes: attrs pads (begin..., end...), all >= 0, mode (PAD_MODES, default zeros)
    "pad": OpSpec(Channels.SAME, _shape_pad, _forward_pad, _path_pad),
    # structure
    "add": OpSpec(Channels.UNION, _shape_add, _forward_add, _path_add, min_inputs=2, max_inputs=None),  # residual add
    "concat": OpSpec(Channels.CONCAT, _shape_concat, _forward_concat, _path_concat, max_inputs=None),  # along axis 1
    "flatten": OpSpec(Channels.FLATTEN, _shape_flatten, _forward_flatten, _path_flatten),  # channel-major
    # (1, C, *S) -> (1, C, *spatial) with prod(spatial) = prod(S): every value stays in its channel (a unit
    # spatial axis added or removed, 1-D pooling lowered to 2-D); attrs spatial
    "reshape": OpSpec(Channels.SAME, _shape_reshape, _forward_reshape, _path_reshape),
    # a linear layer applied at every position of (1, I, *positions): the MatMul of token-major
    # activations (batch, tokens, features), held channel-first; weight (O, I), y = W x_p + b
    "token_linear": OpSpec(Channels.NEW, _shape_token_linear, _forward_token_linear, _path_token_linear,
                           ("weight",), ("bias",), objective=_LAYER, hidden=True),
    # any op (or connected region of ops) that is not positively homogeneous or not known, kept by
    # partial rescaling (see pathcond_cli.segments): its inputs end homogeneous segments, its output
    # starts one; attrs shape (its output's IR shape), ops (the source nodes it stands for), why.
    # Never run: segments.cut replaces it by segment outputs and inputs before groups and statistics.
    "opaque": OpSpec(Channels.NEW, _shape_opaque, _not_in_segments, _not_in_segments, min_inputs=0,
                     max_inputs=None, pins_input="feeds an opaque op (not positively homogeneous)"),
}

#: layers with a weight between input and output channels: their outputs are the hidden units
WEIGHT_LAYER_OPS = frozenset(op for op, spec in OPS.items() if spec.hidden)


# --------------------------------------------------------------------------------------------------
# The reference forward pass and shape inference.


def _forward_node(graph: Graph, node: Node, xs: list[torch.Tensor], p) -> torch.Tensor:
    return OPS[node.op].forward(node, xs, p)


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




def infer_shapes(graph: Graph) -> dict[str, Shape]:
    """Shapes of every value at batch 1, from each op's closed-form shape rule (no tensor is run)."""
    shapes: dict[str, Shape] = {}
    for name, shape in graph.inputs.items():
        if len(shape) < 2 or shape[0] != 1:
            raise GraphError(f"input {name!r} must have shape (1, C, ...), got {tuple(shape)}")
        shapes[name] = tuple(int(n) for n in shape)
    for node in graph.nodes:

        def param_shape(role: str, node=node) -> Shape | None:
            key = node.params.get(role)
            return None if key is None else tuple(graph.params[key].shape)

        shape = OPS[node.op].shape(node, [shapes[v] for v in node.inputs], param_shape)
        shapes[node.output] = tuple(int(n) for n in shape)
    return shapes
