"""The op table (``ir.OPS``) is complete and every row agrees with the brute-force oracle.

Every IR op must carry every rule (channel behaviour, shape, forward, squared-path rule, consistent
objective roles), the oracle of ``tests/reference.py`` must know it, and on a tiny graph built around
the op the engine's diag(G) and path count must equal the enumeration's and the closed-form shapes
must equal the shapes the forward computes. A new op without a sample here fails
``test_every_op_has_a_sample``; a row without a rule fails ``test_op_table_is_complete``.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import pathcond_cli
from pathcond_cli.groups import build_groups
from pathcond_cli.ir import OBJECTIVE_KINDS, OPS, Channels, Graph, Node, OpSpec, evaluate
from pathcond_cli.stats import path_statistics
from tests.reference import reference
from tests.test_core_paths import Net

RULES = ("shape", "forward", "path")


def table_problems(ops: dict[str, OpSpec]) -> list[str]:
    """Everything missing or inconsistent in an op table (empty: complete)."""
    problems = []
    for op, spec in ops.items():
        if not isinstance(spec.channels, Channels):
            problems.append(f"{op}: no channel behaviour")
        for rule in RULES:
            if not callable(getattr(spec, rule, None)):
                problems.append(f"{op}: no {rule} rule")
        roles = set(spec.required) | set(spec.optional)
        for role, kind in dict(spec.objective or {}).items():
            if role not in roles:
                problems.append(f"{op}: objective role {role!r} is not a parameter role")
            if kind not in OBJECTIVE_KINDS:
                problems.append(f"{op}: objective kind {kind!r} is unknown")
        if spec.hidden and (spec.channels is not Channels.NEW or "edge" not in dict(spec.objective).values()):
            problems.append(f"{op}: hidden units need new channels and a weight (an edge role)")
        if spec.pins_output_without is not None and not set(spec.pins_output_without[0]) <= roles:
            problems.append(f"{op}: pins on roles it does not have")
        if spec.channels is Channels.UNION and spec.min_inputs < 2:
            problems.append(f"{op}: a union of channels needs two inputs")
    return problems


def test_op_table_is_complete():
    assert table_problems(OPS) == []


@pytest.mark.parametrize("field", ("channels",) + RULES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_missing_rule_is_caught(op, field):
    """The completeness check is not vacuous: a copy of the table with one rule removed fails it."""
    broken = {**OPS, op: dataclasses.replace(OPS[op], **{field: None})}
    assert any(p.startswith(f"{op}: ") for p in table_problems(broken))


def test_an_objective_role_outside_the_roles_is_caught():
    broken = {**OPS, "linear": dataclasses.replace(OPS["linear"], objective={"weight": "edge", "gain": "bias"})}
    assert table_problems(broken) == ["linear: objective role 'gain' is not a parameter role"]


# --------------------------------------------------------------------------------------------------
# One tiny graph per op, checked against the oracle


def _head(n: Net, y: str) -> Graph:
    if len(n.shape(y)) > 2:
        y = n.op("flatten", y)
    return n.graph(n.linear(y, 2))


def _features(op: str, **attrs):
    """linear -> op -> linear on features (elementwise ops)."""

    def build(n: Net) -> Graph:
        n.inputs = {"x": (1, 3)}
        y = n.linear("x", 4)
        params = {}
        if op == "prelu":
            params["slope"] = n.rand("slope", (4,), 0.3)
        return n.graph(n.linear(n.op(op, y, params=params, **attrs), 2))

    return build


def _on_map(fn):
    """conv -> relu -> fn(n, y) -> flatten -> linear on a (1, 2, 5, 4) input."""

    def build(n: Net) -> Graph:
        n.inputs = {"x": (1, 2, 5, 4)}
        y = n.op("relu", n.conv("x", 3, 2, pads=(1, 0, 0, 1)))
        return _head(n, fn(n, y))

    return build


def _affine(n: Net) -> Graph:
    n.inputs = {"x": (1, 3)}
    y = n.linear("x", 4)
    y = n.op("affine", y, params={"weight": n.rand("a.w", (4,)), "bias": n.rand("a.b", (4,), 0.5)})
    return n.graph(n.linear(n.op("relu", y), 2))


def _bias(n: Net) -> Graph:
    n.inputs = {"x": (1, 3)}
    y = n.op("bias", n.linear("x", 4, bias=False), params={"bias": n.rand("b", (4,), 0.5)})
    return n.graph(n.linear(n.op("relu", y), 2))


def _add(n: Net, y: str) -> str:
    return n.op("relu", n.op("add", n.conv(y, 3, 1), y))


def _concat(n: Net, y: str) -> str:
    return n.op("concat", n.op("relu", n.conv(y, 2, 1)), y)


SAMPLES = {
    "linear": _features("relu"),
    "conv": _on_map(lambda n, y: n.op("relu", n.conv(y, 2, 2, stride=2, pads=(0, 1, 1, 0)))),
    "conv_transpose": _on_map(lambda n, y: n.op("relu", n.deconv(y, 2, 2, stride=2, pads=(1, 0, 0, 1)))),
    "batchnorm": _on_map(lambda n, y: n.op("relu", n.bn(n.conv(y, 2, 1)))),
    "affine": _affine,
    "bias": _bias,
    "relu": _features("relu"),
    "leaky_relu": _features("leaky_relu", alpha=0.2),
    "prelu": _features("prelu"),
    "identity": _features("identity"),
    "scale": _features("scale", value=-0.5),
    "maxpool": _on_map(lambda n, y: n.pool("maxpool", y, 2, 2, pads=(1, 0, 0, 1), ceil=True)),
    "avgpool": _on_map(lambda n, y: n.pool("avgpool", y, 2, 1, pads=(1, 1, 0, 0), include_pad=True)),
    "global_avgpool": _on_map(lambda n, y: n.op("global_avgpool", y)),
    "upsample": _on_map(lambda n, y: n.op("relu", n.conv(n.op("upsample", y, scale=[2, 1]), 2, 2))),
    "resize_linear": _on_map(lambda n, y: n.op("resize_linear", y, size=[3, 5], coords="half_pixel")),
    "add": _on_map(_add),
    "concat": _on_map(_concat),
    "flatten": _on_map(lambda n, y: n.op("flatten", y)),
}


def test_every_op_has_a_sample():
    assert sorted(SAMPLES) == sorted(OPS)


def _uses(graph: Graph, op: str) -> bool:
    return any(node.op == op for node in graph.nodes)


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_op_matches_the_oracle(op):
    graph = SAMPLES[op](Net(sorted(OPS).index(op) if op in OPS else 99, (1, 1)))
    assert _uses(graph, op)
    ref = reference(graph)  # raises NotImplementedError for an op the oracle does not know
    groups = build_groups(graph)
    stats = path_statistics(graph, groups)
    checked = 0
    for role, log_g in zip(groups.roles, stats.log_g):
        tag = (role.node.name, role.role) if OPS[role.node.op].derived_roles else role.key
        want = ref.g_of(tag, role.shape)
        np.testing.assert_allclose(torch.exp(log_g).numpy(), want, rtol=1e-9, atol=1e-300,
                                   err_msg=f"{role.node.name}.{role.role}")
        checked += want.size
    assert checked == groups.n_params > 0
    assert stats.log10_paths == pytest.approx(math.log10(ref.n_paths), rel=1e-12)


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_closed_form_shapes_match_the_forward(op):
    """The shape rules (no tensor run) give the shapes the forward actually produces."""
    graph = SAMPLES[op](Net(1, (1, 1)))
    every = Graph(dict(graph.inputs), list(graph.nodes), [n.output for n in graph.nodes], dict(graph.params))
    x = {k: torch.randn(s, dtype=torch.float64) for k, s in graph.inputs.items()}
    for name, value in evaluate(every, x).items():
        assert tuple(value.shape) == every.shapes[name], name


def test_a_shape_that_does_not_fit_is_a_graph_error():
    n = Net(0, (1, 3))
    n.params["w"] = torch.ones(2, 4, dtype=torch.float64)
    n.nodes.append(Node("fc", "linear", ("x",), "y", {"weight": "w"}))
    with pytest.raises(ValueError, match="shapes do not fit"):
        n.graph("y")


# --------------------------------------------------------------------------------------------------
# Layering of the package

#: layers bottom-up; a module may import its own layer and those below it, never one above
LAYERS = [
    {"errors", "ir", "__version__"},  # the package's version string is metadata
    {"frontends", "groups", "stats", "solver", "analysis"},
    {"verify", "outputs", "report", "jobs", "api"},
    {"cli", "__main__", "__init__"},
]
CORE = {"groups", "stats", "solver", "analysis"}


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module.split(".")[0] in layer)


def _imports(path: Path, package: Path) -> set[str]:
    """Package modules a file imports (at any depth of the file), as dotted names under the package."""
    here = path.relative_to(package).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - node.level])
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] if node.module else [".".join(base + [a.name]) for a in node.names]
            found.update(n for n in names if n)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.update(n.split(".", 1)[1] for n in names if n.startswith("pathcond_cli."))
    return found


def test_import_graph_has_no_back_edges():
    """IR at the bottom; front ends and core beside each other, never importing each other; jobs
    above them; the CLI on top."""
    package = Path(pathcond_cli.__file__).parent
    bad = []
    for path in package.rglob("*.py"):
        me = ".".join(path.relative_to(package).with_suffix("").parts)
        for target in _imports(path, package):
            mine, top = me.split(".")[0], target.split(".")[0]
            if mine == top:
                continue
            crosses = (mine == "frontends" and top in CORE) or (mine in CORE and top == "frontends")
            if _layer(target) > _layer(me) or crosses:
                bad.append(f"{me} -> {target}")
    assert bad == []
