"""Path statistics and rescaling of the core engine against the brute-force reference (tests/reference.py).

Tiny DAGs are built directly as IR graphs with float64 parameters; every path is enumerated by the
reference, and g = diag(G), the path count, the path norms and the path-lifting Φ are compared with the
engine's. The rescaling must leave Φ and the network's outputs unchanged while changing the parameters.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch

from pathcond_cli.analysis import analyze, layer_rows, rescaled_params, role_factor
from pathcond_cli.errors import NumericalError
from pathcond_cli.groups import build_groups
from pathcond_cli.ir import Graph, Node, evaluate
from pathcond_cli.stats import LOG10, path_statistics
from tests import conftest
from tests.reference import pool_windows, reference

# --------------------------------------------------------------------------------------------------
# Builders


class Net:
    """Builds an IR graph node by node with float64 random parameters (fixed seed)."""

    def __init__(self, seed: int, shape: tuple[int, ...]):
        self.rng = np.random.default_rng(seed)
        self.inputs = {"x": tuple(shape)}
        self.nodes: list[Node] = []
        self.params: dict[str, torch.Tensor] = {}

    def shape(self, value: str) -> tuple[int, ...]:
        return Graph(dict(self.inputs), list(self.nodes), [value], dict(self.params)).shapes[value]

    def rand(self, key: str, shape, scale: float = 1.0, low: float | None = None) -> str:
        if low is None:
            data = self.rng.standard_normal(shape) * scale
        else:  # positive values in [low, low + scale)
            data = low + self.rng.random(shape) * scale
        self.params[key] = torch.tensor(data, dtype=torch.float64)
        return key

    def op(self, op: str, *inputs: str, params=None, **attrs) -> str:
        name = f"{op}{len(self.nodes)}"
        self.nodes.append(Node(name, op, tuple(inputs), name, dict(params or {}), attrs))
        return name

    def _next(self, op: str) -> str:
        return f"{op}{len(self.nodes)}"

    def linear(self, x: str, out: int, bias=True, scale=1.0, weight: str | None = None, fan_in=None) -> str:
        name, fan_in = self._next("linear"), fan_in or self.shape(x)[1]
        params = {"weight": weight or self.rand(f"{name}.weight", (out, fan_in), scale / math.sqrt(fan_in))}
        if bias:
            params["bias"] = self.rand(f"{name}.bias", (out,), scale * 0.5)
        return self.op("linear", x, params=params)

    def conv(self, x: str, out: int, k: int, stride=1, pads=(0, 0, 0, 0), groups=1, bias=True, dilation=1) -> str:
        name, cin = self._next("conv"), self.shape(x)[1]
        fan_in = cin // groups * k * k
        params = {"weight": self.rand(f"{name}.weight", (out, cin // groups, k, k), 1 / math.sqrt(fan_in))}
        if bias:
            params["bias"] = self.rand(f"{name}.bias", (out,), 0.5)
        return self.op("conv", x, params=params, stride=[stride, stride], pads=list(pads), groups=groups,
                       dilation=[dilation, dilation])

    def deconv(self, x: str, out: int, k: int, stride=1, pads=(0, 0, 0, 0), output_padding=(0, 0), groups=1,
               bias=True, dilation=1) -> str:
        """A transposed convolution; its weight in the IR layout (O, I/groups, k, k)."""
        name, cin = self._next("conv_transpose"), self.shape(x)[1]
        params = {"weight": self.rand(f"{name}.weight", (out, cin // groups, k, k), 1 / math.sqrt(cin // groups * k))}
        if bias:
            params["bias"] = self.rand(f"{name}.bias", (out,), 0.5)
        return self.op("conv_transpose", x, params=params, stride=[stride, stride], pads=list(pads), groups=groups,
                       dilation=[dilation, dilation], output_padding=list(output_padding))

    def bn(self, x: str) -> str:
        name, c = self._next("batchnorm"), self.shape(x)[1]
        params = {
            "weight": self.rand(f"{name}.weight", (c,), 1.0, low=0.5),
            "bias": self.rand(f"{name}.bias", (c,), 0.3),
            "running_mean": self.rand(f"{name}.running_mean", (c,), 0.3),
            "running_var": self.rand(f"{name}.running_var", (c,), 1.0, low=0.5),
        }
        return self.op("batchnorm", x, params=params, eps=1e-5)

    def pool(self, op: str, x: str, k: int, stride: int, pads=(0, 0, 0, 0), ceil=False, include_pad=False,
             dilation=1) -> str:
        attrs = dict(kernel=[k, k], stride=[stride, stride], pads=list(pads), ceil_mode=ceil)
        if op == "avgpool":
            attrs["count_include_pad"] = include_pad
        else:
            attrs["dilation"] = [dilation, dilation]
        return self.op(op, x, **attrs)

    def graph(self, *outputs: str) -> Graph:
        return Graph(dict(self.inputs), list(self.nodes), list(outputs), dict(self.params))


def mlp(seed: int = 0, widths=(3, 5, 2, 4), bias: bool = True, scale: float = 1.0) -> Graph:
    n = Net(seed, (1, widths[0]))
    x = "x"
    for i, w in enumerate(widths[1:]):
        x = n.linear(x, w, bias=bias, scale=scale, fan_in=widths[i])
        if i < len(widths) - 2:
            x = n.op("relu", x)
    return n.graph(x)


def zero_bias_mlp() -> Graph:
    """biases initialised to zero (the usual init): their g is not zero, and neither is their factor."""
    graph = mlp(9, (4, 6, 3, 2))
    return graph.with_params({k: torch.zeros_like(v) for k, v in graph.params.items() if k.endswith(".bias")})


def conv_pools() -> Graph:
    """conv + bias op on the map + max-pool (ceil overhang) + avg-pools (asymmetric pads,
    count_include_pad True; ceil overhang, count_include_pad False) + flatten + linear."""
    n = Net(1, (1, 1, 7, 7))
    x = n.conv("x", 2, 3, pads=(1, 1, 1, 1), bias=False)
    x = n.op("relu", n.op("bias", x, params={"bias": n.rand("map.bias", (2,), 0.5)}))
    x = n.pool("maxpool", x, 2, 2, ceil=True)  # 7 -> 4, the last window overhangs
    x = n.pool("avgpool", x, 2, 1, pads=(1, 1, 0, 0), include_pad=True)  # 4 -> 4
    x = n.pool("avgpool", x, 3, 2, ceil=True, include_pad=False)  # 4 -> 2, overhang of 1
    return n.graph(n.linear(n.op("flatten", x), 2))


def residual() -> Graph:
    """stem conv-relu, then conv-relu-conv + identity shortcut, relu, max-pool, flatten, linear."""
    n = Net(2, (1, 1, 4, 4))
    h = n.op("relu", n.conv("x", 2, 3, pads=(1, 1, 1, 1)))
    y = n.conv(n.op("relu", n.conv(h, 2, 3, pads=(1, 1, 1, 1))), 2, 1)
    y = n.op("relu", n.op("add", y, h))
    y = n.op("flatten", n.pool("maxpool", y, 2, 2))
    return n.graph(n.linear(y, 2))


def concat_branches() -> Graph:
    """two conv branches concatenated, avg-pool with ceil overhang and count_include_pad True."""
    n = Net(3, (1, 1, 4, 4))
    a = n.op("relu", n.conv("x", 2, 3, pads=(1, 1, 1, 1)))
    b = n.op("relu", n.conv("x", 1, 1))
    y = n.op("concat", a, b)
    y = n.pool("avgpool", y, 3, 2, pads=(1, 1, 1, 1), ceil=True, include_pad=True)  # 4 -> 3
    y = n.op("relu", n.conv(y, 2, 2))
    return n.graph(n.linear(n.op("flatten", y), 2))


def conv_bn() -> Graph:
    """conv + BN + ReLU twice (the second conv without bias), global average pool, linear head."""
    n = Net(4, (1, 2, 3, 3))
    y = n.op("relu", n.bn(n.conv("x", 3, 2)))
    y = n.op("relu", n.bn(n.conv(y, 2, 1, bias=False)))
    return n.graph(n.linear(n.op("global_avgpool", y), 2))


def grouped_conv() -> Graph:
    """a dilated depthwise conv, a dilated max-pool, a 2-group 1x1 conv, global pool with keepdim."""
    n = Net(5, (1, 1, 3, 3))
    y = n.op("relu", n.conv("x", 4, 3, pads=(1, 1, 1, 1)))
    y = n.op("relu", n.conv(y, 4, 3, pads=(2, 2, 2, 2), groups=4, dilation=2))
    y = n.pool("maxpool", y, 2, 1, pads=(1, 1, 1, 1), dilation=2)  # 3 -> 3
    y = n.op("relu", n.conv(y, 2, 1, groups=2))
    y = n.op("flatten", n.op("global_avgpool", y, keepdim=True))
    return n.graph(n.linear(y, 3))


def tied_weight() -> Graph:
    """one weight tensor used by two parallel linear layers (same role), concatenated."""
    n = Net(6, (1, 3))
    h = n.op("relu", n.linear("x", 4))
    shared = n.rand("shared.weight", (4, 4), 0.5)
    a = n.op("relu", n.linear(h, 4, weight=shared))
    b = n.op("relu", n.linear(h, 4, weight=shared))
    return n.graph(n.linear(n.op("concat", a, b), 2))


def tied_chain() -> Graph:
    """one square weight used twice in a row (h0 -> W -> h1 -> W -> h2): some paths hold one entry twice."""
    n = Net(10, (1, 2))
    h = n.op("relu", n.linear("x", 3))
    shared = n.rand("chain.weight", (3, 3), 0.6)
    h = n.op("relu", n.linear(h, 3, weight=shared))
    h = n.op("relu", n.linear(h, 3, weight=shared))
    return n.graph(n.linear(h, 2))


def misc_ops() -> Graph:
    """linear without bias + a separate bias op, leaky ReLU, per-channel affine, PReLU, a fixed negative
    scale, identity, and two graph outputs."""
    n = Net(7, (1, 3))
    y = n.linear("x", 4, bias=False)
    y = n.op("bias", y, params={"bias": n.rand("extra.bias", (4,), 0.5)})
    y = n.op("leaky_relu", y, alpha=0.1)
    y = n.op("affine", y, params={"weight": n.rand("aff.weight", (4,), 1.0), "bias": n.rand("aff.bias", (4,), 0.5)})
    y = n.op("prelu", y, params={"slope": n.rand("slope", (4,), 0.2, low=0.05)})
    y = n.op("scale", n.op("identity", n.linear(y, 3)), value=-0.5)
    return n.graph(n.linear(n.op("relu", y), 2), n.linear(y, 1))


def unet_like() -> Graph:
    """a small U-Net: conv, max-pool down, conv, nearest upsampling (2x3, uneven factors), concat with
    the skip connection, conv head."""
    n = Net(11, (1, 1, 2, 4))
    skip = n.op("relu", n.conv("x", 2, 3, pads=(1, 1, 1, 1)))
    down = n.pool("maxpool", skip, 2, 2)  # 2x4 -> 1x2
    deep = n.op("relu", n.conv(down, 2, 1))
    up = n.op("upsample", deep, scale=[2, 2])
    y = n.op("relu", n.conv(n.op("concat", skip, up), 2, 3, pads=(1, 1, 1, 1)))
    y = n.op("upsample", y, scale=[1, 3])  # 2x4 -> 2x12
    return n.graph(n.conv(y, 1, 1))


def bilinear() -> Graph:
    """linear resizing between layers: bilinear half-pixel (torch's default) by 2, then align-corners
    from 3 to 4 (not a multiple), then a 1x1 conv head."""
    n = Net(13, (1, 1, 2, 2))
    y = n.op("relu", n.conv("x", 2, 1))
    y = n.op("resize_linear", y, size=[4, 4], coords="half_pixel")
    y = n.op("relu", n.conv(y, 2, 2))  # 4x4 -> 3x3
    y = n.op("resize_linear", y, size=[4, 3], coords="align_corners")
    return n.graph(n.conv(y, 1, 1))


def decoder() -> Graph:
    """a DCGAN-like generator from a small map: transposed convolutions
    (stride 2 with pads and output_padding; a 2-group one with dilation) with BN and ReLU."""
    n = Net(12, (1, 3, 2, 2))  # 2x2: every kernel tap reaches an output despite the crops
    y = n.op("relu", n.bn(n.deconv("x", 4, 3, stride=2, pads=(1, 0, 0, 1), output_padding=(1, 0))))
    y = n.op("relu", n.deconv(y, 4, 2, stride=1, groups=2, dilation=2))
    return n.graph(n.deconv(y, 1, 3, stride=2, pads=(1, 1, 1, 1)))


DAGS = {
    "mlp": mlp,
    "zero_bias": zero_bias_mlp,
    "conv_pools": conv_pools,
    "residual": residual,
    "concat": concat_branches,
    "conv_bn": conv_bn,
    "grouped_conv": grouped_conv,
    "tied_weight": tied_weight,
    "tied_chain": tied_chain,
    "misc_ops": misc_ops,
    "unet_like": unet_like,
    "decoder": decoder,
    "bilinear": bilinear,
}


@functools.lru_cache(maxsize=None)
def case(name: str):
    """(graph, groups, engine stats, reference) for one DAG, computed once."""
    graph = DAGS[name]()
    groups = build_groups(graph)
    return graph, groups, path_statistics(graph, groups), reference(graph)


@functools.lru_cache(maxsize=None)
def rescaled(name: str):
    graph = case(name)[0]
    analysis = analyze(graph, device="cpu", tol=1e-8)
    new = rescaled_params(analysis)
    return analysis, new, graph.with_params(new)


def role_tag(role):
    return (role.node.name, role.role) if role.node.op == "batchnorm" else role.key


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_inputs(graph: Graph, batch: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in conftest.random_inputs(graph, seed, batch).items()}


# --------------------------------------------------------------------------------------------------
# The reference checks itself


def test_pool_windows_match_torch_output_size_and_divisor():
    """The reference's window geometry agrees with PyTorch's avg_pool1d (sizes and divisors)."""
    for length, k, s, pad, ceil, include in [(7, 2, 2, 0, True, False), (4, 3, 2, 1, True, True),
                                             (4, 3, 2, 0, True, False), (5, 3, 2, 1, False, True),
                                             (6, 3, 3, 1, True, True), (4, 2, 1, 1, False, False)]:
        x = torch.arange(1.0, length + 1, dtype=torch.float64).reshape(1, 1, -1)
        want = torch.nn.functional.avg_pool1d(x, k, s, pad, ceil, include).reshape(-1).numpy()
        windows = pool_windows(length, k, s, pad, pad, 1, ceil)
        got = [sum(t + 1 for t in taps) / (n if include else len(taps)) for taps, n in windows]
        np.testing.assert_allclose(got, want, rtol=1e-15)


@pytest.mark.parametrize("name", DAGS)
def test_reference_expansion_is_the_network_without_relus(name):
    """Σ_p Φ_p·x_start(p) equals the IR forward once (P/leaky) ReLUs are identities and max-pools
    average-pools: a check of the expansion itself."""
    graph = case(name)[0]
    linear_nodes = []
    for node in graph.nodes:
        if node.op in ("relu", "leaky_relu", "prelu"):
            node = Node(node.name, "identity", node.inputs, node.output)
        elif node.op == "maxpool":  # same windows, but linear
            attrs = {**node.attrs, "count_include_pad": False}
            node = Node(node.name, "avgpool", node.inputs, node.output, attrs=attrs)
        linear_nodes.append(node)
    linear = Graph(dict(graph.inputs), linear_nodes, list(graph.outputs), dict(graph.params))
    x = random_inputs(graph, batch=1)
    want = torch.cat([v.reshape(-1) for v in evaluate(linear, x).values()]).numpy()
    got = reference(linear).linear_forward({k: v.numpy() for k, v in x.items()})
    assert rel_err(got, want) < 1e-12


# --------------------------------------------------------------------------------------------------
# 1. Engine statistics against the enumeration


@pytest.mark.parametrize("name", DAGS)
def test_diag_g_matches_enumeration(name):
    graph, groups, stats, ref = case(name)
    assert len(groups.roles) == len(stats.log_g)
    checked = 0
    for role, log_g in zip(groups.roles, stats.log_g):
        got = torch.exp(log_g).numpy()
        want = ref.g_of(role_tag(role), role.shape)
        assert got.shape == want.shape
        assert (want > 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=f"{role.node.name}.{role.role}")
        checked += want.size
    assert checked == groups.n_params


@pytest.mark.parametrize("name", DAGS)
def test_every_objective_parameter_is_a_role(name):
    """The roles cover every parameter element the enumeration sees on a path (BN as a and b)."""
    graph, groups, _, ref = case(name)
    tags = {pid[0] for pid in ref.g}
    assert tags == {role_tag(r) for r in groups.roles}
    assert sum(r.numel for r in groups.roles) == len(ref.g)


@pytest.mark.parametrize("name", DAGS)
def test_path_count_and_norms_match_enumeration(name):
    _, _, stats, ref = case(name)
    assert ref.n_paths > 10
    assert 10**stats.log10_paths == pytest.approx(ref.n_paths, rel=1e-9)
    assert 10**stats.log10_path1_norm == pytest.approx(np.abs(ref.phi).sum(), rel=1e-9)
    assert 10**stats.log10_path2_norm == pytest.approx(np.sqrt((ref.phi**2).sum()), rel=1e-9)


@pytest.mark.parametrize("name", DAGS)
def test_rescaling_keeps_path_lifting(name):
    graph, _, _, ref = case(name)
    analysis, new, graph2 = rescaled(name)
    assert new, "the rescaling changed nothing"
    assert any((v - graph.params[k]).abs().max() > 1e-3 * graph.params[k].abs().max() for k, v in new.items())
    assert analysis.solution.max_abs_log_scale > 1e-3
    phi2 = reference(graph2).phi
    assert phi2.shape == ref.phi.shape
    np.testing.assert_allclose(phi2, ref.phi, rtol=1e-9, atol=1e-12 * np.abs(ref.phi).max())


@pytest.mark.parametrize("name", DAGS)
def test_rescaled_diag_is_g_times_factor(name):
    """g̃_i = g_i · e^{−2(Bu)_i} (MATH §4), checked on the enumeration of the rescaled network."""
    _, groups, stats, _ = case(name)
    analysis, _, graph2 = rescaled(name)
    ref2 = reference(graph2)
    for role, log_g in zip(groups.roles, stats.log_g):
        want = torch.exp(log_g) / role_factor(role, analysis.u) ** 2
        np.testing.assert_allclose(ref2.g_of(role_tag(role), role.shape), want.numpy(), rtol=1e-9)


@pytest.mark.parametrize("name", DAGS)
def test_layer_rows_match_enumeration(name):
    """The per-layer table: min / lower median / max of log10 g over each node's parameters, before
    (enumeration of the network) and after (enumeration of the rescaled network)."""
    graph, groups, _, ref = case(name)
    analysis, _, graph2 = rescaled(name)
    ref2 = reference(graph2)
    rows = {row.node: row for row in layer_rows(analysis)}
    assert set(rows) == {r.node.name for r in groups.roles}
    for node_name, row in rows.items():
        roles = [r for r in groups.roles if r.node.name == node_name]
        assert row.params == sum(r.numel for r in roles)
        for figures, enumeration in ((row.log10_g_before, ref), (row.log10_g_after, ref2)):
            values = np.sort(np.concatenate([enumeration.g_of(role_tag(r), r.shape).reshape(-1) for r in roles]))
            want = np.log10(values[[0, (len(values) - 1) // 2, -1]])
            np.testing.assert_allclose(figures, want, rtol=1e-9, atol=1e-12, err_msg=node_name)


# --------------------------------------------------------------------------------------------------
# 2. The rescaled network computes the same function


@pytest.mark.parametrize("name", DAGS)
def test_rescaled_network_same_outputs(name):
    graph = case(name)[0]
    _, _, graph2 = rescaled(name)
    x = random_inputs(graph, batch=6, seed=1)
    y0, y1 = evaluate(graph, x), evaluate(graph2, x)
    for key in graph.outputs:
        assert rel_err(y1[key], y0[key]) < 1e-10
        assert y0[key].abs().max() > 0


def test_rescaled_params_keep_dtype_and_refuse_overflow():
    """New values come in each tensor's dtype; a factor that overflows that dtype (float16 here, fine
    in float64) is an error, not an inf written to the checkpoint."""
    graph = mlp(5, (3, 6, 4, 2))
    graph = graph.with_params({k: v.to(torch.float16) for k, v in graph.params.items()})
    analysis = analyze(graph, device="cpu")
    new = rescaled_params(analysis)
    assert new and all(v.dtype == torch.float16 for v in new.values())
    analysis.solution.u[1:] = 20.0  # e^20 ≈ 4.9e8 > float16's 65504
    with pytest.raises(NumericalError, match="not finite in torch.float16"):
        rescaled_params(analysis)
    # float64 holds far more: a value beyond float32's range is finite and written
    wide = mlp(5, (3, 6, 4, 2))
    analysis = analyze(wide, device="cpu")
    analysis.solution.u[1:] = 100.0  # e^100 ≈ 2.7e43 > float32's 3.4e38
    new = rescaled_params(analysis)
    assert all(v.dtype == torch.float64 and bool(torch.isfinite(v).all()) for v in new.values())
    assert max(float(v.abs().max()) for v in new.values()) > 1e39


# --------------------------------------------------------------------------------------------------
# 5. Deep and tiny networks: exact figures without overflow / underflow

def chain_layers(graph: Graph) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of each linear node of a plain MLP graph, float64."""
    layers = []
    for node in graph.nodes:
        if node.op == "linear":
            layers.append((graph.params[node.params["weight"]].numpy(), graph.params[node.params["bias"]].numpy()))
    return layers


def chain_exact_paths(widths: list[int]) -> int:
    """Paths into each neuron = Σ paths into its predecessors + 1 (its bias), in exact integers."""
    into = [1] * widths[0]
    for w in widths[1:]:
        total = sum(into)
        into = [total + 1] * w
    return sum(into)


def chain_decimal_masses(layers):
    """Forward mass (Σ of squared path values into each neuron, bias starts included) and backward mass
    (Σ of squared path values from each neuron to the outputs), in Decimal: 40 digits, exponents to 1e±999999."""
    with localcontext() as ctx:
        ctx.prec = 40
        square = lambda a: [[Decimal(float(v)) ** 2 for v in row] for row in np.atleast_2d(a)]  # noqa: E731
        sq = [(square(w), square(b)[0]) for w, b in layers]
        fwd = [[Decimal(1)] * layers[0][0].shape[1]]
        for w2, b2 in sq:
            fwd.append([sum((wji * f for wji, f in zip(row, fwd[-1])), Decimal(0)) + bj for row, bj in zip(w2, b2)])
        bwd = [[Decimal(1)] * layers[-1][0].shape[0]]
        for w2, _ in reversed(sq):
            cols = range(len(w2[0]))
            bwd.insert(0, [sum((w2[j][i] * bk for j, bk in enumerate(bwd[0])), Decimal(0)) for i in cols])
    return fwd, bwd


def chain_log10(x: Decimal) -> float:
    with localcontext() as ctx:
        ctx.prec = 40
        return float(x.log10())


def narrow_deep_mlp(depth: int, width: int, scale: float, seed: int) -> Graph:
    widths = [width] + [width + (i % 2) for i in range(depth - 1)] + [2]
    return mlp(seed, tuple(widths), bias=True, scale=scale)


DEEP_KINDS = ["deep", "tiny", "tiny_deep"]


@functools.lru_cache(maxsize=None)
def deep_case(kind: str):
    if kind == "deep":  # 1000 layers of width 3-4, Kaiming-like scale: ~1e540 paths
        graph = narrow_deep_mlp(1000, 3, 1.0, seed=11)
    elif kind == "tiny":  # weights (and biases) of std 1e-3, 30 layers of width 8: g down to ~1e-150
        graph = mlp(12, (8,) * 30 + (3,), bias=True, scale=1e-3 * math.sqrt(8))
    else:  # std 1e-3, 80 layers of width 4: the first layers' g ~ 1e-428, below float64's range
        graph = mlp(13, (4,) * 80 + (3,), bias=True, scale=2e-3)
    groups = build_groups(graph)
    return graph, groups, path_statistics(graph, groups)


def log10_close(got: float, want: float, rel: float = 1e-9) -> bool:
    return abs(got - want) <= rel * max(1.0, abs(want))


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_deep_and_tiny_path_count_exact(kind):
    graph, _, stats = deep_case(kind)
    widths = [graph.inputs["x"][1]] + [w.shape[0] for w, _ in chain_layers(graph)]
    exact = chain_exact_paths(widths)
    assert math.isfinite(stats.log10_paths)
    assert log10_close(stats.log10_paths, math.log10(exact), 1e-12)
    if kind == "deep":
        assert stats.log10_paths > 308  # overflows float64 without log-scaling


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_deep_and_tiny_path2_norm(kind):
    graph, _, stats = deep_case(kind)
    fwd, _ = chain_decimal_masses(chain_layers(graph))
    assert math.isfinite(stats.log10_path2_norm)
    assert log10_close(stats.log10_path2_norm, 0.5 * chain_log10(sum(fwd[-1], Decimal(0))))


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_deep_and_tiny_diag_g(kind):
    """g(W_l[j, i]) = fwd_l[i] · bwd_{l+1}[j] and g(b_l[j]) = bwd_{l+1}[j], from the Decimal masses."""
    graph, groups, stats = deep_case(kind)
    fwd, bwd = chain_decimal_masses(chain_layers(graph))
    by_key = {r.key: lg for r, lg in zip(groups.roles, stats.log_g)}
    lowest = 0.0
    for layer, node in enumerate(n for n in graph.nodes if n.op == "linear"):
        lg_w, lg_b = by_key[node.params["weight"]], by_key[node.params["bias"]]
        assert torch.isfinite(lg_w).all() and torch.isfinite(lg_b).all(), f"g = 0 or inf at {node.name}"
        got_w = lg_w.numpy() / math.log(10)
        got_b = lg_b.numpy() / math.log(10)
        for j, i in np.ndindex(*got_w.shape):
            want = chain_log10(fwd[layer][i] * bwd[layer + 1][j])
            assert log10_close(got_w[j, i], want), (node.name, j, i, got_w[j, i], want)
            lowest = min(lowest, want)
        for j in range(len(got_b)):
            assert log10_close(got_b[j], chain_log10(bwd[layer + 1][j])), (node.name, j)
    if kind == "tiny_deep":
        assert lowest < -308  # the case really leaves float64's range


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_deep_and_tiny_solve_converges(kind):
    graph, _, _ = deep_case(kind)
    analysis = analyze(graph, device="cpu")
    sol = analysis.solution
    assert sol.converged
    assert not sol.degenerate  # no unit is dead in these nets
    assert torch.isfinite(sol.u).all()
    assert sol.log_score_after < sol.log_score_before
    assert sol.objective_after < sol.objective_before
    new = rescaled_params(analysis)
    assert new and all(torch.isfinite(v).all() for v in new.values())


# --------------------------------------------------------------------------------------------------
# 7. Rescaling groups


def pins_by_reason(groups, word: str):
    return [p for p in groups.pins if word in p.reason]


def test_groups_pin_graph_input_and_output():
    graph, groups, _, _ = case("mlp")
    last = graph.nodes[-1]
    inp = pins_by_reason(groups, "graph input")
    out = pins_by_reason(groups, "graph output")
    assert [(p.node, p.value, p.channels) for p in inp] == [("x", "x", 3)]
    assert [(p.node, p.value, p.channels) for p in out] == [(last.name, last.output, 4)]
    assert (groups.value_groups["x"] == 0).all() and (groups.value_groups[last.output] == 0).all()
    hidden = [v for v in groups.value_groups if v not in ("x", last.output)]
    free = np.concatenate([groups.value_groups[v] for v in hidden])
    assert (free > 0).all() and len(set(free.tolist())) == 5 + 2 == groups.n_free
    assert groups.n_pinned == 3 + 4  # one per channel: input and output channels are distinct groups


def test_groups_pin_batchnorm_inputs():
    graph, groups, _, _ = case("conv_bn")
    bns = [n for n in graph.nodes if n.op == "batchnorm"]
    pins = pins_by_reason(groups, "BatchNorm")
    assert sorted((p.node, p.value) for p in pins) == sorted((n.name, n.inputs[0]) for n in bns)
    for bn in bns:
        assert (groups.value_groups[bn.inputs[0]] == 0).all()  # the conv feeding it: pinned
        assert (groups.value_groups[bn.output] > 0).all()  # BN output: a new free group per channel
    conv = next(r for r in groups.roles if r.node.op == "conv" and r.role == "weight")
    assert (conv.out_idx == 0).all()
    bn_roles = [r for r in groups.roles if r.node.op == "batchnorm"]
    assert {r.role for r in bn_roles} == {"weight", "bias"} and all(r.in_idx is None for r in bn_roles)


def test_groups_residual_add_joins_stream():
    graph, groups, _, _ = case("residual")
    add = next(n for n in graph.nodes if n.op == "add")
    vg = groups.value_groups
    branch, shortcut = add.inputs
    assert np.array_equal(vg[branch], vg[shortcut]) and np.array_equal(vg[add.output], vg[shortcut])
    assert (vg[add.output] > 0).all() and len(set(vg[add.output].tolist())) == 2  # per channel, free
    stem = graph.producer[graph.producer[shortcut].inputs[0]]
    assert np.array_equal(vg[stem.output], vg[add.output])  # the stem conv's channels joined the stream
    inner = graph.producer[graph.producer[branch].inputs[0]].output  # relu between the two convs
    assert not set(vg[inner].tolist()) & set(vg[add.output].tolist())
    assert groups.n_free == 2 + 2


def test_groups_concat_and_flatten_by_index():
    graph, groups, _, _ = case("concat")
    vg = groups.value_groups
    cat = next(n for n in graph.nodes if n.op == "concat")
    assert np.array_equal(vg[cat.output], np.concatenate([vg[v] for v in cat.inputs]))
    flat = next(n for n in graph.nodes if n.op == "flatten")
    spatial = int(np.prod(graph.shapes[flat.inputs[0]][2:]))
    assert np.array_equal(vg[flat.output], np.repeat(vg[flat.inputs[0]], spatial))


def test_groups_tied_weight_same_role_unites():
    graph, groups, _, _ = case("tied_weight")
    users = [n for n in graph.nodes if n.params.get("weight") == "shared.weight"]
    assert len(users) == 2
    vg = groups.value_groups
    assert np.array_equal(vg[users[0].output], vg[users[1].output]) and (vg[users[0].output] > 0).all()
    assert [r.key for r in groups.roles].count("shared.weight") == 1  # one parameter, one role
    assert not groups.pins or all("shared" not in p.reason for p in groups.pins)


def shared_across_roles() -> Graph:
    """one tensor used as a linear layer's bias and as a per-channel affine weight."""
    n = Net(8, (1, 3))
    n.rand("t", (4,), 1.0, low=0.5)
    lin = n.op("linear", "x", params={"weight": n.rand("w0", (4, 3)), "bias": "t"})
    aff = n.op("affine", n.op("relu", lin), params={"weight": "t"})
    return n.graph(n.linear(n.op("relu", aff), 2))


def test_groups_parameter_shared_in_different_roles_is_pinned():
    graph = shared_across_roles()
    groups = build_groups(graph)
    pins = pins_by_reason(groups, "shared in different roles")
    lin, aff = graph.nodes[0], graph.nodes[2]
    assert {p.node for p in pins} == {lin.name, aff.name}
    assert all("'t'" in p.reason and lin.name in p.reason and aff.name in p.reason for p in pins)
    assert (groups.value_groups[lin.output] == 0).all() and (groups.value_groups[aff.output] == 0).all()
    assert groups.n_free == 0


def test_broadcast_shapes_is_numpys_rule():
    """The closed-form broadcast rule used for shapes (torch's imports sympy) against numpy's own."""
    from pathcond_cli.ir import broadcast_shapes

    rng = np.random.default_rng(0)
    for _ in range(500):
        shapes = [tuple(int(d) for d in rng.integers(0, 4, size=rng.integers(0, 5))) for _ in range(rng.integers(1, 4))]
        try:
            want = np.broadcast_shapes(*shapes)
        except ValueError:
            with pytest.raises(ValueError):
                broadcast_shapes(*shapes)
        else:
            assert broadcast_shapes(*shapes) == want, shapes


@pytest.mark.parametrize("name", sorted(DAGS))
def test_rescaled_params_in_blocks_equal_the_whole_tensor_product(name, monkeypatch):
    """New values are made a few output channels at a time (float64 temporaries stay small); they are
    the same bits as the whole tensor times e^{(Bu)_i} in float64 rounded once, for every layout (dense,
    grouped and depthwise conv, transposed conv, per-channel, BatchNorm, tied tensors)."""
    import pathcond_cli.analysis as analysis_module

    analysis = rescaled(name)[0]
    monkeypatch.setattr(analysis_module, "CHUNK_ENTRIES", 7)  # many blocks, some of one row
    before = {k: v.clone() for k, v in analysis.graph.params.items()}
    new = rescaled_params(analysis)
    assert all(torch.equal(v, before[k]) for k, v in analysis.graph.params.items())  # the model is untouched
    want = {}
    for role in analysis.groups.roles:
        stored = analysis.graph.params[role.key]
        exact = stored.to(torch.float64) * role_factor(role, analysis.u)
        if not torch.equal(exact, stored.to(torch.float64)):
            want[role.key] = exact.to(stored.dtype)
    assert set(want) <= set(new)
    for key, value in new.items():
        stored = analysis.graph.params[key]
        assert value.dtype == stored.dtype and value.shape == stored.shape
        if key in want:
            assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_any_inf_or_nan(dtype):
    """The finiteness check on rescaled values (extremes, one pass) against torch.isfinite on every entry."""
    from pathcond_cli.analysis import _all_finite

    t = torch.randn(1000).to(dtype)
    assert _all_finite(t) == bool(torch.isfinite(t).all()) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[517] = bad
        assert _all_finite(u) == bool(torch.isfinite(u).all()) is False
    assert _all_finite(t[:0])
