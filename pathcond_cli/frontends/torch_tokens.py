"""Token-major activations in an aten graph (the torch twin of :mod:`.onnx_tokens`, which tells the
story): values whose features are on the **last** axis, (batch, tokens, features) or (batch·tokens,
features), held in the IR as (1, features, positions).

:func:`channels_last` finds them: the input and output of ``aten.linear`` on a rank ≥ 3 activation (or of
linear / addmm / mm on a 2-D one with N > 1 rows when the inputs are at batch 1), and every value joined
to one of those by an op that keeps the last axis in place. :func:`convert` translates the ops that
keep a token-major value token-major; any other op reading one is refused (opaque under ``--partial``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import Refusal
from .base import SameLayout


def _shape(node) -> tuple | None:
    """The static shape of an FX tensor, None for each symbolic size (read without comparing it: a
    comparison would specialise a dynamic batch)."""
    from .torch_graph import _static

    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return _static(val.shape)


def _act_of(node, g) -> Any:
    """The activation argument of a linear / addmm / mm node."""
    return node.args[1] if node.target in g.ADDMM_OPS else node.args[0]


def channels_last(graph: torch.fx.Graph, activations: set, batch_one: bool) -> set:
    """The FX nodes holding token-major activations (``activations``: FX nodes that are activations,
    not parameters or constants)."""
    from . import torch_graph as g

    keep = g.RELU_OPS | g.LEAKY_OPS | g.IDENTITY_OPS | g.ADD_OPS | g.MUL_OPS | g.DIV_OPS
    views = g.FLATTEN_OPS | g.VIEW_OPS | g.ACTIVATION_VIEW_OPS
    products = g.LINEAR_OPS | g.ADDMM_OPS | g.MM_OPS
    sets, seeds, pairs = SameLayout(), set(), []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        out = _shape(node)
        if node.target in products:
            x = _act_of(node, g)
            shape = _shape(x)
            if x not in activations or shape is None:
                continue
            pairs.append((x, node))
            flat_tokens = batch_one and len(shape) == 2 and shape[0] is not None and shape[0] > 1
            if (len(shape) >= 3 and node.target in g.LINEAR_OPS) or flat_tokens:
                seeds.update((x, node))
        elif node.target in keep | views and out is not None and len(out) >= 2:
            for a in node.args:
                shape = _shape(a)
                if a not in activations or shape is None or len(shape) < 2 or shape[-1] is None \
                        or shape[-1] != out[-1]:
                    continue
                if node.target in views or len(shape) == len(out):
                    sets.union(a, node)
    return sets.token_major(seeds, pairs)  # a product reading a token-major value writes one


def ir_shape(node, last: set) -> tuple[int, ...] | None:
    """The IR shape of an FX activation (channel-first), None when it is not a float (N, C, ...) tensor."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    shape = _shape(node)
    if shape is None or len(shape) < 2 or not val.dtype.is_floating_point or None in shape[1:] or min(shape[1:]) < 1:
        return None
    shape = (1, *shape[1:]) if shape[0] is None else shape  # a dynamic batch is analysed at 1
    if node in last:
        return (1, shape[-1], math.prod(shape[:-1]))
    return (1, *shape[1:])


def convert(tr, node, a: dict, first, x) -> Any:
    """Translate ``node`` (tr: torch_graph._Translator), which reads a token-major activation."""
    from . import torch_graph as g

    t = node.target
    if t in g.LINEAR_OPS:
        return _linear(tr, node, a["input"], tr._val(a["weight"]), a.get("bias"))
    if t in g.ADDMM_OPS:
        if tr._scalar(g.CVal(a["beta"])) != 1.0 or tr._scalar(g.CVal(a["alpha"])) != 1.0:
            raise Refusal("addmm with alpha/beta != 1")
        return _linear(tr, node, a["mat1"], tr._val(a["mat2"]), a["self"], matrix=True)
    if t in g.MM_OPS:
        return _linear(tr, node, node.args[0], tr._val(node.args[1]), None, matrix=True)
    if t in g.RELU_OPS | g.LEAKY_OPS | g.IDENTITY_OPS:
        return g._DISPATCH[t](tr, node, a, first, x)
    if t in g.ADD_OPS:
        return _add(tr, node, a, x)
    if t in g.MUL_OPS | g.DIV_OPS:
        return _mul(tr, node, a, first, x)
    if t in g.FLATTEN_OPS | g.VIEW_OPS | g.ACTIVATION_VIEW_OPS:
        before, after = _shape(first), _shape(node)
        if node in tr.last and before and after and before[-1] == after[-1]:
            return tr._emit(node, "identity", [tr._tensor(x)])
        raise Refusal(f"reshape of the token-major {before} to {after} moves values across features")
    raise Refusal("operation on a token-major activation (features on the last axis): only linear layers, biases, "
                  "residual adds, ReLU-like activations, scalar factors and reshapes that keep the last axis are "
                  "supported")


def _linear(tr, node, x_node, w, b, matrix: bool = False) -> Any:
    from . import torch_graph as g

    x = tr._tensor(tr._val(x_node))
    if not isinstance(w, g.PVal) or tr._tensor_of(w.key).dim() != 2:
        raise Refusal("token-major linear layer whose weight is not a 2-D parameter")
    swap = None
    if matrix:  # x @ W.t() (W stored (out, in)) or x @ W (W stored (in, out))
        swap, w = (None, g.PVal(w.key)) if w.transposed else (1, w)
    elif w.transposed:
        raise Refusal("linear weight is not an (out, in) parameter")
    params = {"weight": w.key}
    bias = tr._val(b) if isinstance(b, torch.fx.Node) else None
    if bias is not None:
        if not isinstance(bias, g.PVal) or bias.transposed or tr._tensor_of(bias.key).dim() != 1:
            raise Refusal("linear bias is not a 1-D parameter")
        params["bias"] = bias.key
    return tr._emit(node, "token_linear", [x], params, swap={"weight": 1} if swap else None)


def _per_feature(tr, p, p_node, features: int) -> bool:
    """Whether the parameter broadcasts along the last axis only, one value per feature."""
    from . import torch_graph as g

    seen = _shape(p_node) if isinstance(p_node, torch.fx.Node) else None
    return (isinstance(p, g.PVal) and not p.transposed and tr._tensor_of(p.key).numel() == features
            and (seen is None or all(s == 1 for s in seen[:-1])))


def _mul(tr, node, a, first, x) -> Any:
    """A scalar factor, or a per-feature parameter (a norm's learned scale written as its own product)."""
    from . import torch_graph as g

    other = tr._val(a["other"])
    if isinstance(x, g.TVal) and tr._scalar(other) is not None:
        return g._DISPATCH[node.target](tr, node, a, first, x)
    t, p, p_node = (x, other, node.args[1]) if isinstance(x, g.TVal) else (other, x, node.args[0])
    if node.target in g.MUL_OPS and isinstance(t, g.TVal) and _per_feature(tr, p, p_node, (_shape(node) or (0,))[-1]):
        return tr._emit(node, "affine", [t], {"weight": p.key})
    raise Refusal("multiplication of a token-major activation by something other than a scalar or a per-feature "
                  "parameter")


def _add(tr, node, a, x) -> Any:
    from . import torch_graph as g

    other = tr._val(a["other"])
    alpha = tr._scalar(g.CVal(a.get("alpha", 1)))
    if alpha is not None and alpha != 1.0:
        raise Refusal("add with alpha != 1")
    if isinstance(x, g.TVal) and isinstance(other, g.TVal):
        if not (node.args[0] in tr.last and node.args[1] in tr.last) or _shape(node.args[0]) != _shape(node.args[1]):
            raise Refusal("addition of a token-major activation and a value of another layout or shape")
        return tr._emit(node, "add", [x, other])
    t, p, p_node = (x, other, node.args[1]) if isinstance(x, g.TVal) else (other, x, node.args[0])
    if isinstance(t, g.TVal) and _per_feature(tr, p, p_node, (_shape(node) or (0,))[-1]):
        return tr._emit(node, "bias", [t], {"bias": p.key})
    raise Refusal("addition to a token-major activation of something other than a per-feature bias")
