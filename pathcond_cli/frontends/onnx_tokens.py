"""Token-major activations in ONNX: values whose channels (the features a MatMul acts on) are on the
**last** axis, as Transformers write them: (batch, tokens, features), or (batch·tokens, features) once
flattened.

:func:`channels_last` finds them: a MatMul or Gemm with a constant right operand whose activation has
rank 3 or more acts on the last axis, so its input and output are token-major; so is every value joined
to one of those by an op that keeps the last axis in place (ReLU-like activations, biases, residual adds,
scalar or per-feature factors, reshapes that merge or split the axes before the last one), and the
output of any MatMul / Gemm reading a token-major value.

The IR holds a token-major value of ONNX shape (a_0, ..., a_k, D) channel-first, as (1, D, a_0·…·a_k):
every position (batch item and token alike) is one position of a 1-D map, which is exact for the path
statistics because the weights are shared by all positions, like a convolution's. A reshape that keeps
the last axis is then the identity of the IR. :data:`TOKEN_CONVERTERS` translate the ops that keep a
token-major value token-major; any other op reading one is refused (opaque under ``--partial``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx

from .base import SameLayout
from .onnx_read import _Folder, _Refuse, _Transform

# ops through which the last axis of an activation stays the last axis of the result
_KEEP_LAST = frozenset({"Relu", "LeakyRelu", "Dropout", "Identity", "Add", "Sub", "Sum", "Mul", "Div"})
_RESHAPES = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_PRODUCTS = frozenset({"MatMul", "Gemm"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16})


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape)


def channels_last(model: onnx.ModelProto, folder: _Folder, live: list[int], batch_one: bool) -> set[str]:
    """The ONNX values (activations) that are token-major, see the module's docstring. With every graph
    input at batch 1 (``batch_one``), a 2-D activation (N, D) with N > 1 read by a MatMul or Gemm holds
    N tokens (batch and tokens flattened together) and is token-major as well."""
    sets = SameLayout()
    products: list[tuple[str, str]] = []  # (activation input, output) of MatMul / Gemm on a constant
    seeds: set[str] = set()
    for index in live:
        node = model.graph.node[index]
        acts = [n for n in node.input if n and n not in folder.values]
        out = node.output[0] if node.output else ""
        if not out or not acts:
            continue
        out_shape = folder._shape_of(out)
        if node.op_type in _PRODUCTS and acts == [node.input[0]]:
            products.append((acts[0], out))
            shape = folder._shape_of(acts[0])
            flat_tokens = batch_one and shape is not None and len(shape) == 2 and _known(shape) and shape[0] > 1
            if shape is not None and ((len(shape) >= 3 and node.op_type == "MatMul") or flat_tokens):
                seeds.update((acts[0], out))
        elif node.op_type in _KEEP_LAST | _RESHAPES and out_shape is not None and len(out_shape) >= 2:
            for a in acts:
                shape = folder._shape_of(a)
                if shape is None or len(shape) < 2 or shape[-1] != out_shape[-1]:
                    continue
                if node.op_type in _RESHAPES or len(shape) == len(out_shape):
                    sets.union(a, out)
    return sets.token_major(seeds, products)  # a product reading a token-major value writes one


def ir_shape(folder: _Folder, last: set[str], name: str) -> tuple[int, ...] | None:
    """The IR shape of an ONNX activation ((1, C, ...), channel-first), or None when it is not one (an
    integer or boolean tensor, a scalar or vector, an unknown shape)."""
    shape = folder._shape_of(name)
    elem = folder.info.get(name, (None, 0))[1]
    if not _known(shape) or len(shape) < 2 or (elem and elem not in FLOAT_TYPES):
        return None
    if name in last:
        return (1, int(shape[-1]), int(math.prod(shape[:-1])))
    return (1, *(int(d) for d in shape[1:]))


def reads_token_major(ctx, last: set[str]) -> bool:
    return any(n in last for n in ctx.node.input if n and n not in ctx.folder.values)


# --------------------------------------------------------------------------------------------------
# Converters for ops reading token-major values (ctx: onnx_translate._Context)


def _matmul(ctx) -> None:
    if ctx.node.input[0] in ctx.folder.values:
        raise _Refuse("its left operand is a constant (a product acting on the token axis)")
    w = ctx.static(1, "right operand")
    if w.ndim != 2:
        raise _Refuse("its right operand is not a constant 2-D matrix")
    ctx.emit("token_linear", [ctx.x(0)], {"weight": ctx.param(1, _Transform((w.shape[1], w.shape[0]), transpose=True))})


def _feature_vector(ctx, slot: int, features: int, what: str) -> tuple[int, ...]:
    """The stored layout of a constant that broadcasts along the last axis only (one value per feature,
    or one for all); refused otherwise."""
    c = ctx.const(ctx.node.input[slot])
    rank = len(ctx.shape(1 - slot))
    if c.ndim > rank or any(d != 1 for d in c.shape[:-1]) or (c.ndim and c.shape[-1] not in (1, features)):
        raise _Refuse(f"its constant of shape {c.shape} is not {what} (one value per feature, on the last axis)")
    return (features,) if c.ndim <= 1 else (1,) * (c.ndim - 1) + (features,)


def _both_token_major(ctx, last: set[str]) -> None:
    names = [n for n in ctx.node.input if n]
    if not all(n in last for n in names):
        raise _Refuse("it combines a token-major activation (features on the last axis) with a channel-first one")
    if len({tuple(ctx.shape(i)) for i in range(len(names))}) != 1:
        raise _Refuse("it adds token-major values of different shapes (broadcasting)")


def _add(ctx, last: set[str]) -> None:
    node = ctx.node
    if all(ctx.const(n) is None for n in node.input):
        _both_token_major(ctx, last)
        ctx.emit("add", [ctx.x(i) for i in range(len(node.input))])
        return
    from .onnx_translate import _split_operands

    xs, cs = _split_operands(ctx)
    if node.op_type == "Sub" and xs == 1:
        raise _Refuse("it subtracts an activation from a constant (negates it)")
    features = ctx.shape(xs)[-1]
    layout = _feature_vector(ctx, cs, features, "a per-feature bias")
    factor = -1.0 if node.op_type == "Sub" else 1.0
    transform = _Transform((features,), factor=factor, expanded_shape=layout)
    ctx.emit("bias", [ctx.x(xs)], {"bias": ctx.param(cs, transform)})


def _mul(ctx, last: set[str]) -> None:
    from .onnx_translate import _factor_operands

    operands = _factor_operands(ctx)
    if operands is None:
        return
    xs, cs, divide = operands
    features = ctx.shape(xs)[-1]
    layout = _feature_vector(ctx, cs, features, "a per-feature factor")
    ctx.emit("affine", [ctx.x(xs)], {"weight": ctx.param(cs, _Transform((features,), reciprocal=divide,
                                                                          expanded_shape=layout))})


def _reshape(ctx, last: set[str]) -> None:
    before, after = ctx.shape(0), ctx.folder._shape_of(ctx.node.output[0])
    if after is None or ctx.node.output[0] not in last or len(after) < 2 or after[-1] != before[-1]:
        raise _Refuse(f"it reshapes the token-major {tuple(before)} to {after}, which moves values across features")
    ctx.emit("identity", [ctx.x(0)])


@functools.cache
def _token_converters() -> dict[str, Callable]:
    from .onnx_translate import _gemm, _identity, _simple

    same = {"Relu": _simple("relu"), "LeakyRelu": _simple("leaky_relu", alpha=0.01), "Dropout": _identity,
            "Identity": _identity}
    table: dict[str, Callable] = {op: (lambda conv: lambda ctx, last: conv(ctx))(conv) for op, conv in same.items()}
    table.update({"MatMul": lambda ctx, last: _matmul(ctx), "Gemm": lambda ctx, last: _gemm(ctx, "token_linear"),
                  "Add": _add, "Sub": _add, "Sum": _add, "Mul": _mul, "Div": _mul})
    table.update({op: _reshape for op in _RESHAPES})
    return table


def convert_token_major(ctx, last: set[str]) -> None:
    """Translate the node being converted, which reads a token-major value."""
    converter = _token_converters().get(ctx.node.op_type)
    if converter is None:
        raise _Refuse(f"{ctx.node.op_type} on a token-major activation (features on the last axis) is not "
                      "supported: only MatMul/Gemm, biases, residual adds, ReLU-like activations, constant factors "
                      "and reshapes that keep the last axis are")
    converter(ctx, last)
