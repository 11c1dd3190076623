"""Brute-force path statistics, written from MATH.md (§1-3, §7) and independent of ``pathcond_cli.stats``.

A tiny IR graph is expanded into an explicit neuron-level DAG: every element of every value is a neuron,
every weight an edge, every bias a start point. Then every path is enumerated by depth-first search from
each input neuron and each bias to each output neuron. Only :class:`pathcond_cli.ir.Graph` (the data
structure) is used from the package; the geometry of convolutions and pools is re-derived here.

Parameter elements are identified as ``(tag, flat_index)``: ``tag`` is the parameter key, or
``(node name, "weight" | "bias")`` for BatchNorm, whose parameters are a = γ/√(var+ε) and b = β − aμ.
Fixed weights (pool windows, residual adds) carry the id ``None``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import product

import numpy as np


@dataclass
class NeuronNet:
    """An explicit DAG of neurons. ``succ[n]`` lists ``(target, weight, param id)``."""

    succ: list[list[tuple[int, float, object]]] = field(default_factory=list)
    biases: list[tuple[int, float, object]] = field(default_factory=list)  # (neuron, value, param id)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # input value -> neuron ids (its shape)
    outputs: list[int] = field(default_factory=list)  # output neurons, graph outputs flattened in order

    def new(self, shape) -> np.ndarray:
        start = len(self.succ)
        size = int(np.prod(shape))
        self.succ.extend([] for _ in range(size))
        return np.arange(start, start + size).reshape(shape)

    def edge(self, src, dst, weight, pid=None) -> None:
        self.succ[int(src)].append((int(dst), float(weight), pid))

    def bias(self, dst, value, pid) -> None:
        self.biases.append((int(dst), float(value), pid))


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def pool_windows(length: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool):
    """Per output position: (input positions inside the map, count of positions inside the padded map).

    Output size as in PyTorch / ONNX: ceil mode may add a window overhanging the padded map, but never one
    that starts in the end padding."""
    span = length + pb + pe - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= length + pb:
        out -= 1
    windows = []
    for o in range(out):
        taps = [o * s - pb + j * d for j in range(k)]
        windows.append(([t for t in taps if 0 <= t < length], sum(-pb <= t < length + pe for t in taps)))
    return windows


def _spatial_windows(node, shape):
    """2-D pooling windows: list of ((oh, ow), [(ih, iw) inside], padded count), and the output size."""
    kh, kw = node.attrs["kernel"]
    sh, sw = node.attrs.get("stride") or (1, 1)
    dh, dw = node.attrs.get("dilation") or (1, 1)
    pt, pl, pb, pr = node.attrs.get("pads") or (0, 0, 0, 0)
    ceil = bool(node.attrs.get("ceil_mode", False))
    rows = pool_windows(shape[2], kh, sh, pt, pb, dh, ceil)
    cols = pool_windows(shape[3], kw, sw, pl, pr, dw, ceil)
    out = []
    for (oh, (ih, nh)), (ow, (iw, nw)) in product(enumerate(rows), enumerate(cols)):
        out.append(((oh, ow), list(product(ih, iw)), nh * nw))
    return out, (len(rows), len(cols))


def _linear(net, x, w, wtag, b, btag):
    y = net.new((1, w.shape[0]))
    for o, i in product(range(w.shape[0]), range(w.shape[1])):
        net.edge(x[0, i], y[0, o], w[o, i], (wtag, o * w.shape[1] + i))
    if b is not None:
        for o in range(w.shape[0]):
            net.bias(y[0, o], b[o], (btag, o))
    return y


def _token_linear(net, x, w, wtag, b, btag):
    """The same dense layer at every position: x (1, I, P) -> y (1, O, P), W[o, i] on every edge x_i(p) -> y_o(p)."""
    positions = int(np.prod(x.shape[2:]))
    xf = x.reshape(1, x.shape[1], positions)
    y = net.new((1, w.shape[0], positions))
    for o, i, q in product(range(w.shape[0]), range(w.shape[1]), range(positions)):
        net.edge(xf[0, i, q], y[0, o, q], w[o, i], (wtag, o * w.shape[1] + i))
    if b is not None:
        for o, q in product(range(w.shape[0]), range(positions)):
            net.bias(y[0, o, q], b[o], (btag, o))
    return y.reshape(1, w.shape[0], *x.shape[2:])


def _conv(net, node, x, w, wtag, b, btag):
    _, c, h, wd = x.shape
    o_ch, c_per, kh, kw = w.shape
    sh, sw = node.attrs.get("stride") or (1, 1)
    dh, dw = node.attrs.get("dilation") or (1, 1)
    pt, pl, pb, pr = node.attrs.get("pads") or (0, 0, 0, 0)
    groups = int(node.attrs.get("groups", 1))
    oh_n = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow_n = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    y = net.new((1, o_ch, oh_n, ow_n))
    for o, oh, ow in product(range(o_ch), range(oh_n), range(ow_n)):
        first_in = (o // (o_ch // groups)) * c_per
        for ci, i, j in product(range(c_per), range(kh), range(kw)):
            ih, iw = oh * sh - pt + i * dh, ow * sw - pl + j * dw
            if 0 <= ih < h and 0 <= iw < wd:
                pid = (wtag, int(np.ravel_multi_index((o, ci, i, j), w.shape)))
                net.edge(x[0, first_in + ci, ih, iw], y[0, o, oh, ow], w[o, ci, i, j], pid)
        if b is not None:
            net.bias(y[0, o, oh, ow], b[o], (btag, o))
    return y


def _conv_transpose(net, node, x, w, wtag, b, btag):
    """Transposed 2-D convolution, written from its definition as the adjoint of a convolution: input
    pixel (ih, iw) reaches output (ih·s − p_begin + i·d, ...) through w[o, ci, i, j] (IR layout
    (O, I/groups, kh, kw), no kernel flip); the end is cropped by p_end − output_padding."""
    _, c, h, wd = x.shape
    o_ch, c_per, kh, kw = w.shape
    sh, sw = node.attrs.get("stride") or (1, 1)
    dh, dw = node.attrs.get("dilation") or (1, 1)
    pt, pl, pb, pr = node.attrs.get("pads") or (0, 0, 0, 0)
    eh, ew = node.attrs.get("output_padding") or (0, 0)
    groups = int(node.attrs.get("groups", 1))
    oh_n = (h - 1) * sh + dh * (kh - 1) + 1 - pt - pb + eh
    ow_n = (wd - 1) * sw + dw * (kw - 1) + 1 - pl - pr + ew
    y = net.new((1, o_ch, oh_n, ow_n))
    for o, ci, ih, iw, i, j in product(range(o_ch), range(c_per), range(h), range(wd), range(kh), range(kw)):
        oh, ow = ih * sh - pt + i * dh, iw * sw - pl + j * dw
        if 0 <= oh < oh_n and 0 <= ow < ow_n:
            first_in = (o // (o_ch // groups)) * c_per
            pid = (wtag, int(np.ravel_multi_index((o, ci, i, j), w.shape)))
            net.edge(x[0, first_in + ci, ih, iw], y[0, o, oh, ow], w[o, ci, i, j], pid)
    if b is not None:
        for o, oh, ow in product(range(o_ch), range(oh_n), range(ow_n)):
            net.bias(y[0, o, oh, ow], b[o], (btag, o))
    return y


def _per_channel(net, x, a, atag, b, btag):
    """y = a_c·x + b_c per channel (BatchNorm, affine)."""
    y = net.new(x.shape)
    for idx in np.ndindex(*x.shape):
        c = idx[1]
        net.edge(x[idx], y[idx], a[c], (atag, c))
        if b is not None:
            net.bias(y[idx], b[c], (btag, c))
    return y


def _pool(net, node, x, average: bool):
    windows, (oh_n, ow_n) = _spatial_windows(node, x.shape)
    y = net.new((1, x.shape[1], oh_n, ow_n))
    include_pad = bool(node.attrs.get("count_include_pad", False))
    for c in range(x.shape[1]):
        for (oh, ow), taps, padded in windows:
            n = padded if include_pad else len(taps)
            for ih, iw in taps:
                net.edge(x[0, c, ih, iw], y[0, c, oh, ow], 1.0 / n if average else 1.0)
    return y


def _global_avgpool(net, node, x):
    keep = bool(node.attrs.get("keepdim", False))
    y = net.new((1, x.shape[1], 1, 1) if keep else (1, x.shape[1]))
    n = int(np.prod(x.shape[2:]))
    for c in range(x.shape[1]):
        for src in x[0, c].reshape(-1):
            net.edge(src, y.reshape(-1)[c], 1.0 / n)
    return y


def _resize_linear(net, node, x):
    """Fixed weights from torch itself: the interpolation of a one-hot image at each input pixel
    (half_pixel is torch's align_corners=False)."""
    import torch

    spatial = x.shape[2:]
    mode = {1: "linear", 2: "bilinear"}[len(spatial)]
    corners = {"half_pixel": False, "align_corners": True}[node.attrs["coords"]]
    size = tuple(int(n) for n in node.attrs["size"])
    y = net.new((*x.shape[:2], *size))
    for src in np.ndindex(*spatial):
        impulse = torch.zeros((1, 1, *spatial), dtype=torch.float64)
        impulse[(0, 0, *src)] = 1.0
        weights = torch.nn.functional.interpolate(impulse, size=size, mode=mode, align_corners=corners)[0, 0].numpy()
        for dst in zip(*np.nonzero(weights)):
            for c in range(x.shape[1]):
                net.edge(x[(0, c, *src)], y[(0, c, *dst)], float(weights[dst]))
    return y


def _pad(net, node, x):
    """Constant-0 padding: every input neuron copied (weight 1) into the interior of a larger map; the
    border neurons have no incoming edge (a zero starts no path). Other modes: each output neuron copies
    the input neuron numpy's np.pad of the neuron ids picks (reflect, edge, wrap)."""
    pads = [int(v) for v in node.attrs["pads"]]
    mode = node.attrs.get("mode", "constant")
    d = x.ndim - 2
    y = net.new((*x.shape[:2], *(n + pads[i] + pads[d + i] for i, n in enumerate(x.shape[2:]))))
    if mode != "constant":
        src = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[d + i]) for i in range(d)], mode=mode)
        for idx in np.ndindex(*y.shape):
            net.edge(src[idx], y[idx], 1.0)
        return y
    for idx in np.ndindex(*x.shape):
        net.edge(x[idx], y[(*idx[:2], *(i + pads[k] for k, i in enumerate(idx[2:])))], 1.0)
    return y


def _add(net, xs):
    y = net.new(xs[0].shape)
    for x in xs:
        for s, t in zip(x.reshape(-1), y.reshape(-1)):
            net.edge(s, t, 1.0)
    return y


def expand(graph) -> NeuronNet:
    """The neuron-level DAG of ``graph`` (float64 values)."""
    net = NeuronNet()
    vals = {}
    for name, shape in graph.inputs.items():
        vals[name] = net.inputs[name] = net.new(shape)
    segment_outputs: list[int] = []
    computed: set[str] = set()  # values computed by homogeneous nodes
    for node in graph.nodes:
        if node.op == "opaque":  # partial rescaling (MATH §8b): its output neurons start paths like inputs,
            # and the homogeneous values it reads end them like outputs; no edge crosses it
            vals[node.output] = net.inputs[node.output] = net.new(tuple(node.attrs["shape"]))
            segment_outputs += [int(n) for v in node.inputs if v in computed for n in vals[v].reshape(-1)]
            continue
        computed.add(node.output)
        xs = [vals[v] for v in node.inputs]
        x = xs[0]

        def p(role):
            key = node.params.get(role)
            return (None, None) if key is None else (_np(graph.params[key]), key)

        op = node.op
        if op == "linear":
            vals[node.output] = _linear(net, x, *p("weight"), *p("bias"))
        elif op == "token_linear":
            vals[node.output] = _token_linear(net, x, *p("weight"), *p("bias"))
        elif op == "conv":
            vals[node.output] = _conv(net, node, x, *p("weight"), *p("bias"))
        elif op == "conv_transpose":
            vals[node.output] = _conv_transpose(net, node, x, *p("weight"), *p("bias"))
        elif op == "batchnorm":
            gamma, beta = p("weight")[0], p("bias")[0]
            a = gamma / np.sqrt(p("running_var")[0] + node.attrs["eps"])
            b = beta - a * p("running_mean")[0]
            vals[node.output] = _per_channel(net, x, a, (node.name, "weight"), b, (node.name, "bias"))
        elif op == "affine":
            vals[node.output] = _per_channel(net, x, *p("weight"), *p("bias"))
        elif op == "bias":  # bias starts on the existing neurons
            b, key = p("bias")
            for idx in np.ndindex(*x.shape):
                net.bias(x[idx], b[idx[1]], (key, idx[1]))
            vals[node.output] = x
        elif op in ("relu", "leaky_relu", "prelu", "identity"):  # weight-1 pass-through: same neurons
            vals[node.output] = x
        elif op == "scale":  # a fixed weight on every neuron
            vals[node.output] = net.new(x.shape)
            for s, t in zip(x.reshape(-1), vals[node.output].reshape(-1)):
                net.edge(s, t, node.attrs["value"])
        elif op in ("maxpool", "avgpool"):
            vals[node.output] = _pool(net, node, x, average=(op == "avgpool"))
        elif op == "global_avgpool":
            vals[node.output] = _global_avgpool(net, node, x)
        elif op == "upsample":  # each output neuron copies one input neuron
            scale = [int(f) for f in node.attrs["scale"]]
            y = net.new((*x.shape[:2], *(d * f for d, f in zip(x.shape[2:], scale))))
            for idx in np.ndindex(*y.shape):
                src = (*idx[:2], *(i // f for i, f in zip(idx[2:], scale)))
                net.edge(x[src], y[idx], 1.0)
            vals[node.output] = y
        elif op == "resize_linear":
            vals[node.output] = _resize_linear(net, node, x)
        elif op == "pad":
            vals[node.output] = _pad(net, node, x)
        elif op == "add":
            vals[node.output] = _add(net, xs)
        elif op == "concat":
            vals[node.output] = np.concatenate(xs, axis=1)
        elif op == "flatten":
            vals[node.output] = x.reshape(1, -1)
        elif op == "reshape":  # the same neurons, laid out on other spatial axes within each channel
            vals[node.output] = x.reshape(x.shape[0], x.shape[1], *node.attrs["spatial"])
        else:
            raise NotImplementedError(f"reference: op {op!r}")
    net.outputs = [int(n) for v in graph.outputs if v in computed or v in graph.inputs for n in vals[v].reshape(-1)]
    net.outputs += [n for n in dict.fromkeys(segment_outputs) if n not in set(net.outputs)]
    return net


@dataclass
class Path:
    start: int | None  # input neuron, or None for a path starting at a bias
    end: int
    items: tuple[tuple[float, object], ...]  # (weight, param id) along the path, the start bias first

    @property
    def value(self) -> float:
        return math.prod(w for w, _ in self.items)


def enumerate_paths(net: NeuronNet) -> list[Path]:
    """Every path from an input neuron or a bias to an output neuron (depth-first, deterministic order)."""
    is_output = set(net.outputs)
    found: list[Path] = []

    def walk(n, items, start):
        if n in is_output:
            found.append(Path(start, n, tuple(items)))
        for target, w, pid in net.succ[n]:
            items.append((w, pid))
            walk(target, items, start)
            items.pop()

    for ids in net.inputs.values():
        for n in ids.reshape(-1):
            walk(int(n), [], int(n))
    for n, b, pid in net.biases:
        walk(n, [(b, pid)], None)
    return found


@dataclass
class Reference:
    net: NeuronNet
    paths: list[Path]
    phi: np.ndarray  # path values, in enumeration order
    g: dict  # param id -> Σ_{p∋i} Π_{e∈p, e≠i} w_e²

    @property
    def n_paths(self) -> int:
        return len(self.paths)

    def g_of(self, tag, shape) -> np.ndarray:
        """g for every element of one parameter tensor (0 for elements on no path)."""
        n = int(np.prod(shape))
        return np.array([self.g.get((tag, i), 0.0) for i in range(n)]).reshape(shape)

    def linear_forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Σ_p Φ_p·x_start(p) per output neuron: the network's output once every ReLU is the identity
        and every max-pool a sum-pool (a self-check of the expansion)."""
        x = {int(n): float(v) for name, ids in self.net.inputs.items()
             for n, v in zip(ids.reshape(-1), np.asarray(inputs[name]).reshape(-1))}
        out = defaultdict(float)
        for path, phi in zip(self.paths, self.phi):
            out[path.end] += phi * (1.0 if path.start is None else x[path.start])
        return np.array([out[n] for n in self.net.outputs])


def reference(graph) -> Reference:
    net = expand(graph)
    paths = enumerate_paths(net)
    g: dict = defaultdict(float)
    for path in paths:
        sq = [w * w for w, _ in path.items]
        prefix = [1.0]
        for s in sq:
            prefix.append(prefix[-1] * s)
        suffix = 1.0
        for j in range(len(sq) - 1, -1, -1):  # product of the other squares: no division by θ_i
            pid = path.items[j][1]
            if pid is not None:
                g[pid] += prefix[j] * suffix
            suffix *= sq[j]
    return Reference(net, paths, np.array([p.value for p in paths]), dict(g))
