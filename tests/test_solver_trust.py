"""Issue 9: the solver on models nobody here wrote.

A. Dead units (g = 0 on some parameters): the criterion runs over g > 0 only (MATH §5), so the solver
   can never raise the reported score; its minimum is scipy's on the objective written from brute-force
   path enumeration (tests/reference.py), not from the engine's statistics.
B. Scales beyond the storage dtype: the solve is bounded so that every rescaled parameter stays finite
   and normal in its dtype, and the report says when the bounds were active.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from scipy.optimize import LinearConstraint, minimize

from pathcond_cli.analysis import analyze, rescaled_params, role_log_factor
from pathcond_cli.frontends.torch_frontend import module_to_graph
from pathcond_cli.ir import Graph, evaluate
from pathcond_cli.solver import build_blocks, solve
from pathcond_cli.stats import path_statistics
from tests import nets
from tests.reference import reference
from tests.test_cli import invoke, ort_outputs
from tests.test_core_paths import Net, mlp, role_tag
from tests.conftest import slow_params
from tests.test_core_solver import PerParamObjective

# --------------------------------------------------------------------------------------------------
# Random small nets with dead units, built directly as IR graphs (float64)


def _kill(graph: Graph, updates: dict[str, torch.Tensor], key: str, index) -> None:
    value = updates.get(key, graph.params[key]).clone()
    value[index] = 0.0
    updates[key] = value


def dead_mlp(seed: int, widest: int = 7, depth: tuple[int, int] = (3, 6)) -> Graph:
    """An MLP with random widths in [2, widest), one random scale for all layers, and one to seven dead
    units: a unit whose incoming weights and bias are zero (its outgoing weights get g = 0) or whose
    outgoing weights are zero (its incoming weights and bias get g = 0)."""
    rng = np.random.default_rng(seed)
    widths = tuple(int(w) for w in rng.integers(2, widest, size=int(rng.integers(*depth))))
    graph = mlp(seed, widths, scale=float(rng.choice([0.1, 1.0, 3.0])))
    layers = [n for n in graph.nodes if n.op == "linear"]
    updates: dict[str, torch.Tensor] = {}
    for _ in range(int(rng.integers(1, 8))):
        layer = int(rng.integers(0, len(layers) - 1))
        unit = int(rng.integers(0, widths[layer + 1]))
        if rng.integers(0, 2) == 0:
            _kill(graph, updates, layers[layer].params["weight"], unit)
            _kill(graph, updates, layers[layer].params["bias"], unit)
        else:
            _kill(graph, updates, layers[layer + 1].params["weight"], (slice(None), unit))
    return graph.with_params(updates)


def dead_cnn(seed: int) -> Graph:
    """conv-relu-conv-relu-flatten-linear with a zeroed channel (its kernel and bias, or the next
    layer's kernel slice that reads it)."""
    rng = np.random.default_rng(seed)
    n = Net(seed, (1, 2, 4, 4))
    h = n.op("relu", n.conv("x", 3, 3, pads=(1, 1, 1, 1)))
    first = n.nodes[-2]
    h = n.op("relu", n.conv(h, 3, 2))
    second = n.nodes[-2]
    graph = n.graph(n.linear(n.op("flatten", h), 3))
    updates: dict[str, torch.Tensor] = {}
    channel = int(rng.integers(0, 3))
    if rng.random() < 0.5:
        _kill(graph, updates, first.params["weight"], channel)
        _kill(graph, updates, first.params["bias"], channel)
    else:
        _kill(graph, updates, second.params["weight"], (slice(None), channel))
    return graph.with_params(updates)


def brute_force_objective(graph: Graph, groups) -> PerParamObjective:
    """The per-parameter objective over g > 0, with g from explicit path enumeration."""
    ref = reference(graph)
    with np.errstate(divide="ignore"):
        log_g = [torch.from_numpy(np.log(ref.g_of(role_tag(r), r.shape))) for r in groups.roles]
    return PerParamObjective(groups, log_g)


def movable_groups(obj: PerParamObjective) -> np.ndarray:
    """Free groups with incoming and outgoing mass (g > 0): the others have no finite optimum."""
    has_in = np.zeros(obj.n, dtype=bool)
    has_out = np.zeros(obj.n, dtype=bool)
    cross = obj.out != obj.inn
    has_in[obj.out[cross]] = True
    has_out[obj.inn[cross]] = True
    movable = has_in & has_out
    movable[0] = False
    return movable


# --------------------------------------------------------------------------------------------------
# A. Dead units


@pytest.mark.parametrize("seed", range(120))
def test_dead_units_never_raise_the_score(seed):
    """Property: whatever dead units a net has, the solved score is never above the starting score."""
    graph = dead_mlp(seed, widest=12, depth=(3, 7))
    sol = analyze(graph, device="cpu", tol=1e-6).solution
    assert sol.converged
    assert sol.log_score_after <= sol.log_score_before + 1e-12, (
        math.exp(sol.log_score_before), math.exp(sol.log_score_after))


@pytest.mark.parametrize("build,seed", [(dead_mlp, s) for s in range(12)] + [(dead_cnn, s) for s in range(6)])
def test_dead_units_reach_the_brute_force_minimum(build, seed):
    """The reported objective and scores are those of the objective written from enumerated paths, and
    the reported minimum is scipy's minimum of it (over the groups that have a finite optimum)."""
    graph = build(seed)
    analysis = analyze(graph, device="cpu", tol=1e-10, max_sweeps=20000)
    sol = analysis.solution
    obj = brute_force_objective(graph, analysis.groups)
    assert obj.G < obj.n_all  # the net really has parameters with g = 0
    movable = movable_groups(obj)
    degenerate = {j for j, _ in sol.degenerate}
    assert degenerate == set(np.nonzero(~movable[1:])[0] + 1)  # the solver pins exactly those
    zero = np.zeros(obj.n)
    f_star = obj.minimise(movable)[0] if movable.any() else obj.value(zero)
    u = sol.u.numpy()
    assert sol.objective_before == pytest.approx(obj.value(zero), rel=1e-10, abs=1e-9)
    assert sol.objective_after == pytest.approx(obj.value(u), rel=1e-10, abs=1e-9)
    assert sol.objective_after == pytest.approx(f_star, rel=1e-7, abs=1e-7)
    assert sol.log_score_before == pytest.approx(obj.log_score(zero), rel=1e-9, abs=1e-12)
    assert sol.log_score_after == pytest.approx(obj.log_score(u), rel=1e-7, abs=1e-10)
    assert sol.log_score_after <= sol.log_score_before + 1e-12
    # F = G₊·ln(AM/GM) + const: the score falls by exactly the fall of F over G₊
    drop = (sol.objective_before - sol.objective_after) / obj.G
    assert sol.log_score_before - sol.log_score_after == pytest.approx(drop, rel=1e-7, abs=1e-10)


# --------------------------------------------------------------------------------------------------
# B. Scales beyond the storage dtype


def constrained_minimum(graph: Graph, groups, obj: PerParamObjective) -> float:
    """scipy's minimum of the brute-force objective under one constraint per nonzero parameter:
    ln|θ_i| + (Bu)_i within [BOTTOM·tiny, √max] of its dtype; a value above that range may not grow,
    a value below it is not held."""
    rows, lows, highs = [], [], []
    for role in groups.roles:
        stored = graph.params[role.key]
        info = torch.finfo(stored.dtype)
        low, high = math.log(info.tiny * BOTTOM), math.log(ceiling(info))
        values = stored.double().numpy()
        for idx in np.ndindex(*role.shape):
            if values[idx] == 0:
                continue
            if role.in_idx is None:
                i = 0
            elif role.in_idx.dim() == 1:
                i = int(role.in_idx[idx[1]])
            else:
                i = int(role.in_idx[idx[0], idx[1] if len(idx) > 1 else 0])
            o = int(role.out_idx[idx[0]])
            if o == i:
                continue
            row = np.zeros(obj.n)
            row[o], row[i] = 1.0, -1.0
            magnitude = math.log(abs(values[idx]))
            rows.append(row)
            lows.append(low - magnitude if magnitude >= low else -np.inf)  # below L: not held
            highs.append(max(high - magnitude, 0.0))
    free = np.arange(obj.n) > 0

    def fun(x):
        u = obj.full(x, free)
        return obj.value(u) / obj.G, obj.grad(u)[free] / obj.G

    constraint = LinearConstraint(np.array(rows)[:, free], np.array(lows), np.array(highs))
    res = minimize(fun, np.zeros(int(free.sum())), jac=True, method="trust-constr", constraints=[constraint],
                   options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 20000})
    u = obj.full(res.x, free)
    assert (np.array(rows) @ u >= np.array(lows) - 1e-9).all() and (np.array(rows) @ u <= np.array(highs) + 1e-9).all()
    return obj.value(u)


def half_mlp_with_scaled_layer(seed: int) -> Graph:
    """A float16 MLP with one layer scaled by 3e-3 or 3e2: its optimum leaves float16's normal range."""
    rng = np.random.default_rng(seed)
    widths = tuple(int(w) for w in rng.integers(2, 6, size=int(rng.integers(4, 10))))
    graph = mlp(seed, widths)
    layers = [n for n in graph.nodes if n.op == "linear"]
    key = layers[int(rng.integers(0, len(layers)))].params["weight"]
    scale = float(rng.choice([3e-3, 3e2]))
    return graph.with_params({**{k: v.half() for k, v in graph.params.items()}, key: (graph.params[key] * scale).half()})


BOTTOM = 2.0  # the bounds keep every value at least 2x the dtype's tiny and at most √max (its ceiling)


def ceiling(info) -> float:
    return math.sqrt(float(info.max))


def leaves_range(graph: Graph, groups, u: torch.Tensor, slack: float = 1.0) -> bool:
    """Whether θ·e^{Bu} puts a parameter outside [BOTTOM·tiny, √max] of its dtype (``slack`` widens
    it for rounding): above it and larger than it was, or below it while it was not, in float64."""
    for role in groups.roles:
        stored = graph.params[role.key]
        info = torch.finfo(stored.dtype)
        theta = stored.double().abs()
        new = theta * torch.exp(role_log_factor(role, u))
        too_big = (new > ceiling(info) * slack) & (new > theta)
        too_small = (new * slack < info.tiny * BOTTOM) & (theta >= info.tiny * BOTTOM)
        if bool((too_big | too_small).any()):
            return True
    return False


@pytest.mark.parametrize("seed", slow_params([4, 6, 10, 14, 20, 29], lambda seed: seed != 6))
def test_bounded_solve_reaches_scipy_constrained_minimum(seed):
    """When the unbounded optimum leaves float16's range, the bounded solve reaches scipy's minimum of the
    brute-force objective under the per-parameter range constraints, and the result stays inside."""
    graph = half_mlp_with_scaled_layer(seed)
    analysis = analyze(graph, device="cpu", tol=1e-9, max_sweeps=50000)
    sol = analysis.solution
    unbounded = solve(analysis.blocks, tol=1e-9, max_sweeps=50000)
    assert leaves_range(graph, analysis.groups, unbounded.u)  # the bounds are really needed
    assert sol.bounds_active and sol.bounded_groups >= 1
    assert not leaves_range(graph, analysis.groups, sol.u, slack=1 + 1e-9)
    obj = brute_force_objective(graph, analysis.groups)
    f_star = constrained_minimum(graph, analysis.groups, obj)
    assert sol.objective_after == pytest.approx(obj.value(sol.u.numpy()), rel=1e-10)
    assert sol.objective_after <= f_star + 1e-7 * abs(f_star)
    assert sol.objective_after == pytest.approx(f_star, rel=1e-7)
    assert sol.log_score_after <= sol.log_score_before
    new = rescaled_params(analysis)  # no longer refused
    assert all(bool(torch.isfinite(v).all()) for v in new.values())


def test_unbounded_case_is_unchanged():
    """A model whose optimum fits its dtype: bounds inactive and the very same solution as without them."""
    graph = module_to_graph(nets.mlp(widths=(8, 64, 4, 32, 3)), [(1, 8)])
    analysis = analyze(graph, device="cpu")
    sol = analysis.solution
    plain = solve(analysis.blocks)
    assert not sol.bounds_active and sol.bounded_groups == 0
    assert torch.equal(sol.u, plain.u) and sol.sweeps == plain.sweeps
    assert sol.log_score_after == plain.log_score_after < sol.log_score_before


# --------------------------------------------------------------------------------------------------
# B, end to end: ONNX exports through the CLI


def chain(dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """300 linear layers of width 4, PyTorch's default init: the optimum's factors leave float32."""
    return nets.mlp(0, widths=(4,) * 301).to(dtype), (1, 4)


def scaled_layer(scale: float, dtype: torch.dtype, layer: int = 2) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A 6-8-8-8-3 MLP whose ``layer``-th linear layer's weight is multiplied by ``scale``."""
    model = nets.mlp(1, widths=(6, 8, 8, 8, 3))
    with torch.no_grad():
        model.net[2 * layer].weight.mul_(scale)
    return model.to(dtype), (1, 6)


MODELS = {
    "chain300-f32": lambda: chain(torch.float32),
    "chain300-f16": lambda: chain(torch.float16),
    "layer1e-37-f32": lambda: scaled_layer(1e-37, torch.float32),
    "layer3e-3-f16": lambda: scaled_layer(3e-3, torch.float16),
    "layer1e-3-f16": lambda: scaled_layer(1e-3, torch.float16, layer=3),
}


def export(model: torch.nn.Module, shape, path: Path, dtype: torch.dtype) -> Path:
    torch.onnx.export(model.eval(), (torch.randn(*shape, dtype=dtype),), str(path), dynamo=False,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                      do_constant_folding=False)
    return path


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("name", slow_params(MODELS, lambda name: name not in ("layer1e-37-f32", "layer1e-3-f16")))
def test_rescale_beyond_dtype_range_is_bounded(name, tmp_path):
    model, shape = MODELS[name]()
    dtype = next(model.parameters()).dtype
    graph = module_to_graph(model.float(), [shape])
    graph = graph.with_params({k: v.to(dtype) for k, v in graph.params.items()})
    model = model.to(dtype)
    groups = analyze(graph, device="cpu").groups
    # what the unbounded optimum would write leaves the dtype's normal range (2^4 inside)
    plain = solve(build_blocks(groups.roles, path_statistics(graph, groups).log_g, groups.n_free))
    assert leaves_range(graph, groups, plain.u)

    source = export(model, shape, tmp_path / "in.onnx", dtype)
    out = tmp_path / "out.onnx"
    result = invoke("rescale", source, out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # every written parameter finite; inside [BOTTOM·tiny, √max] unless it was outside already (checked
    # on the written file: the cast rounds, hence the slack)
    before, after = initializers(source), initializers(out)
    info = np.finfo(next(iter(before.values())).dtype)
    slack = 1 + 2.0 ** -8
    changed = 0
    for key, old in before.items():
        new = after[key]
        assert np.isfinite(new).all(), key
        big, small = np.abs(new.astype(np.float64)), np.abs(old.astype(np.float64))
        held = small >= float(info.tiny) * BOTTOM
        assert (big[held] * slack >= float(info.tiny) * BOTTOM).all(), key  # no held value subnormal or 0
        assert (big <= np.maximum(ceiling(info), small) * slack).all(), key
        changed += int(not np.array_equal(new, old))
    assert changed > 0
    assert report["verification"]["passed"]
    cond = report["conditioning"]
    assert cond["bounds_active"] is True and cond["bounded_groups"] >= 1
    assert "Bounds were active" in report["verdict"]
    assert cond["log10_score_after"] <= cond["log10_score_before"]
    inspected = invoke("inspect", source, "--json", "--device", "cpu")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["conditioning"]["log10_score_after"] == cond["log10_score_after"]
    assert json.loads(inspected.stdout)["conditioning"]["bounds_active"] is True

    # outputs checked here with onnxruntime on fresh inputs
    x = np.random.default_rng(7).standard_normal((6, shape[1])).astype(info.dtype)
    a, b = ort_outputs(source, x).astype(np.float64), ort_outputs(out, x).astype(np.float64)
    assert np.isfinite(b).all()
    tol = 1e-4 if info.dtype == np.float32 else 3e-2
    assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(a))


@pytest.mark.parametrize("scale", [1e-3, 3e2])
@pytest.mark.parametrize("build", [nets.small_cnn, nets.resnet_like])
def test_bounded_conv_bn_residual_half(build, scale):
    """Convolutions, BatchNorm (γ and β are what gets scaled) and residual adds in float16 with one conv
    scaled: the bounds hold for every written value, and the rescaled network computes the same function
    (float64 evaluation of the float16 values)."""
    model = build(0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        convs[1].weight.mul_(scale)
    graph = module_to_graph(model, [(1, 3, 16, 16)])
    graph = graph.with_params({k: v.half() for k, v in graph.params.items()})
    analysis = analyze(graph, device="cpu")
    sol = analysis.solution
    plain = solve(analysis.blocks)
    assert leaves_range(graph, analysis.groups, plain.u)
    assert sol.bounds_active and sol.converged
    assert not leaves_range(graph, analysis.groups, sol.u, slack=1 + 1e-9)
    assert plain.log_score_after <= sol.log_score_after <= sol.log_score_before
    new = rescaled_params(analysis)
    assert new and all(v.dtype == torch.float16 and bool(torch.isfinite(v).all()) for v in new.values())
    wide = graph.with_params({k: v.double() for k, v in graph.params.items()})
    x = {k: torch.randn((4, *s[1:]), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
         for k, s in graph.inputs.items()}
    y0 = evaluate(wide, x)[graph.outputs[0]]
    y1 = evaluate(wide.with_params({k: v.double() for k, v in new.items()}), x)[graph.outputs[0]]
    assert float((y1 - y0).abs().max()) <= 1e-2 * float(y0.abs().max())


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_rescale_scaled_layer_within_range_needs_no_bounds(scale, tmp_path):
    """A float32 layer scaled by 1e±20: the optimum brings it back towards the others and stays inside
    float32, so the bounds stay inactive; the output is verified and finite."""
    model, shape = scaled_layer(scale, torch.float32)
    graph = module_to_graph(model, [shape])
    analysis = analyze(graph, device="cpu")
    assert not leaves_range(graph, analysis.groups, solve(analysis.blocks).u)
    source = export(model, shape, tmp_path / "in.onnx", torch.float32)
    out = tmp_path / "out.onnx"
    result = invoke("rescale", source, out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["passed"] and report["conditioning"]["bounds_active"] is False
    assert "Bounds were active" not in report["verdict"]
    assert report["conditioning"]["log10_score_after"] < report["conditioning"]["log10_score_before"]
    assert all(np.isfinite(v).all() for v in initializers(out).values())
