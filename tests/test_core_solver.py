"""The PathCond solver (MATH §5-6) against an independent per-parameter objective minimised by scipy,
the constant-diagonal case, and dead units."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp, softmax

from pathcond_cli.analysis import analyze, rescaled_params, role_factor
from pathcond_cli.groups import build_groups
from pathcond_cli.ir import Graph, evaluate
from pathcond_cli import solver
from pathcond_cli.solver import _prepare, build_blocks, colour_classes, solve
from pathcond_cli.stats import path_statistics
from tests.conftest import slow_params
from tests.reference import reference
from tests.test_core_paths import DAGS, Net, case, mlp, random_inputs, rel_err

# --------------------------------------------------------------------------------------------------
# An independent objective: one row per parameter element, no blocks


class PerParamObjective:
    """F(u) = G₊·ln Σ_i g_i e^{−2(Bu)_i} + 2 Σ_i (Bu)_i, (Bu)_i = u[out(i)] − u[in(i)], u[0] = 0, every
    sum over the parameters with g_i > 0 and G₊ their number (MATH §5)."""

    def __init__(self, groups, log_g):
        logs, outs, ins = [], [], []
        for role, lg in zip(groups.roles, log_g):
            lg = lg.detach().cpu().double().numpy()
            for idx in np.ndindex(*role.shape):
                o = idx[0]
                if role.in_idx is None:  # bias, BatchNorm a and b
                    i = 0
                elif role.in_idx.dim() == 1:  # dense weight: input channel on axis 1
                    i = int(role.in_idx[idx[1]])
                else:  # grouped conv (O, I/groups, ...) or per-channel diag (O,)
                    i = int(role.in_idx[o, idx[1] if len(idx) > 1 else 0])
                logs.append(lg[idx])
                outs.append(int(role.out_idx[o]))
                ins.append(i)
        self.n_all = len(logs)
        logs, outs, ins = np.array(logs), np.array(outs), np.array(ins)
        pos = np.isfinite(logs)  # g = 0: −∞ in ln det whatever u is, no information on u
        self.log_g, self.out, self.inn = logs[pos], outs[pos], ins[pos]
        self.G = int(pos.sum())
        self.n = groups.n_free + 1

    def full(self, u_free: np.ndarray, free: np.ndarray) -> np.ndarray:
        u = np.zeros(self.n)
        u[free] = u_free
        return u

    def bu(self, u: np.ndarray) -> np.ndarray:
        return u[self.out] - u[self.inn]

    def value(self, u: np.ndarray) -> float:
        bu = self.bu(u)
        return float(self.G * logsumexp(self.log_g - 2 * bu) + 2 * bu.sum())

    def grad(self, u: np.ndarray) -> np.ndarray:
        d = 2.0 - 2.0 * self.G * softmax(self.log_g - 2 * self.bu(u))  # ∂F/∂(Bu)_i
        out = np.zeros(self.n)
        np.add.at(out, self.out, d)
        np.add.at(out, self.inn, -d)
        return out

    def log_score(self, u: np.ndarray) -> float:
        """ln(AM/GM) of the rescaled diagonal over the parameters with g > 0."""
        lg = self.log_g - 2 * self.bu(u)
        return float(logsumexp(lg) - math.log(len(lg)) - lg.mean())

    def minimise(self, free: np.ndarray) -> tuple[float, np.ndarray]:
        """scipy's minimum over the groups in ``free`` (the others stay at u = 0)."""
        scale = self.G  # F/G is O(1): tight tolerances mean something

        def fun(x):
            u = self.full(x, free)
            return self.value(u) / scale, self.grad(u)[free] / scale

        options = {"ftol": 1e-16, "gtol": 1e-12, "maxiter": 20000, "maxcor": 50}
        res = minimize(fun, np.zeros(int(free.sum())), jac=True, method="L-BFGS-B", options=options)
        u = self.full(res.x, free)
        assert np.abs(self.grad(u)[free]).max() / scale < 1e-8, res.message
        return self.value(u), u


# --------------------------------------------------------------------------------------------------
# Problems


def uneven_chain() -> Graph:
    """40 layers with widths drawn in 2..7: the slow 'ramp' mode of coordinate descent."""
    widths = tuple(int(w) for w in np.random.default_rng(21).integers(2, 8, size=41))
    return mlp(21, widths, bias=True, scale=1.0)


PROBLEMS = {**DAGS, "uneven_mlp": lambda: mlp(22, (8, 32, 4, 16, 3)), "uneven_chain": uneven_chain}


LAYOUTS = {"pairs": math.inf, "dense": 0}  # build_blocks(dense_min=...): no weight / every weight as a matrix


@functools.lru_cache(maxsize=None)
def problem(name: str):
    """(groups, stats, the per-parameter objective, scipy's minimum)."""
    if name in DAGS:
        _, groups, stats, _ = case(name)
    else:
        graph = PROBLEMS[name]()
        groups = build_groups(graph)
        stats = path_statistics(graph, groups)
    obj = PerParamObjective(groups, stats.log_g)
    free = np.arange(obj.n) > 0
    return groups, stats, obj, obj.minimise(free)


def blocks_of(name: str, layout: str = "pairs"):
    """The solver's problem; ``layout`` "pairs" keeps every block as an (out, in) pair, "dense" keeps
    every dense weight as a matrix (the two code paths of the solver)."""
    groups, stats, _, _ = problem(name)
    return build_blocks(groups.roles, stats.log_g, groups.n_free, torch.from_numpy(groups.levels), LAYOUTS[layout])


def run_cases():
    for name in PROBLEMS:
        for method in ("auto", "lbfgs", "bcd", "sequential"):
            for layout in ("pairs", "dense"):
                if not (name == "uneven_chain" and method == "sequential"):  # too slow for the suite
                    yield name, method, layout


def slow_problem(case) -> bool:
    """uneven_chain (41 layers) takes seconds per case: `make test-all` only."""
    return (case[0] if isinstance(case, tuple) else case) == "uneven_chain"


# --------------------------------------------------------------------------------------------------
# 3. Solver against scipy


@pytest.mark.parametrize("name,method,layout", slow_params(run_cases(), slow_problem))
def test_solver_reaches_scipy_minimum(name, method, layout):
    _, _, obj, (f_star, _) = problem(name)
    blocks = blocks_of(name, layout)
    if layout == "dense":
        assert blocks.dense  # the matrix path is really taken
    sol = solve(blocks, method=method, tol=1e-9, max_sweeps=50000)
    assert not sol.degenerate
    # tol = 1e-9 is below what F's float64 resolution can certify: the run may end on a stall instead
    assert sol.converged or sol.max_abs_log_x < 1e-6
    assert sol.sweeps <= 50000
    f = obj.value(sol.u.numpy())
    assert abs(f - f_star) <= 1e-6 * max(1.0, abs(f_star)), (f, f_star)
    assert f <= obj.value(np.zeros(obj.n))
    assert sol.u[0] == 0.0


@pytest.mark.parametrize("layout", ["pairs", "dense"])
@pytest.mark.parametrize("name", slow_params(PROBLEMS, slow_problem))
def test_solution_figures_match_independent_objective(name, layout):
    _, _, obj, (f_star, u_star) = problem(name)
    blocks = blocks_of(name, layout)
    sol = solve(blocks, tol=1e-6)
    u = sol.u.numpy()
    zero = np.zeros(obj.n)
    assert sol.converged and sol.max_abs_log_x <= 1e-6
    assert sol.objective_after == pytest.approx(obj.value(u), rel=1e-11, abs=1e-9)
    assert sol.objective_before == pytest.approx(obj.value(zero), rel=1e-11, abs=1e-9)
    assert sol.log_score_before == pytest.approx(obj.log_score(zero), rel=1e-9, abs=1e-12)
    assert sol.log_score_after == pytest.approx(obj.log_score(u), rel=1e-7, abs=1e-10)
    assert sol.log_score_after < sol.log_score_before
    # F = G·ln(AM/GM) + const: the score decreases by exactly the decrease of F over G
    drop = (sol.objective_before - sol.objective_after) / obj.G
    assert sol.log_score_before - sol.log_score_after == pytest.approx(drop, rel=1e-7, abs=1e-10)
    # the same minimiser as scipy's (F is strictly convex in u here)
    assert np.abs(u - u_star).max() < 1e-4


@pytest.mark.parametrize("layout", ["pairs", "dense"])
@pytest.mark.parametrize("name", slow_params(PROBLEMS, slow_problem))
def test_colour_classes_are_independent_sets(name, layout):
    """BCD moves a colour class at once: no two of its groups may share a block (checked against every
    (out, in) pair, dense weights expanded), and the classes cover each free group exactly once."""
    blocks = blocks_of(name, layout)
    fixed = torch.zeros(blocks.n_groups + 1, dtype=torch.bool)
    fixed[0] = True
    pairs = [torch.stack([blocks.out, blocks.inn], 1)]
    pairs += [torch.cartesian_prod(d.out, d.inn).reshape(-1, 2) for d in blocks.dense]
    pairs = torch.cat(pairs)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    classes = colour_classes(blocks, fixed)
    assert (torch.stack(classes).sum(0) == (~fixed).long()).all()
    for colour in classes:
        assert not bool((colour[pairs[:, 0]] & colour[pairs[:, 1]]).any())


@pytest.mark.parametrize("rows_chunk", [None, 3])
@pytest.mark.parametrize("layout", ["pairs", "dense"])
@pytest.mark.parametrize("name", ["conv_bn", "grouped_conv", "residual", "uneven_mlp"])
def test_blocks_aggregate_every_parameter_with_zero_entries(name, layout, rows_chunk, monkeypatch):
    """A fifth of the entries of g set to 0: the blocks still give F, the score and the parameter
    counts of the per-parameter objective at an arbitrary u (the path for g = 0 is a separate one);
    also when the sums run one output row at a time (``rows_chunk``, as on VGG-16's fc6)."""
    if rows_chunk is not None:
        monkeypatch.setattr(solver, "_ROWS_CHUNK", rows_chunk)
    groups, stats, _, _ = problem(name)
    gen = torch.Generator().manual_seed(3)
    log_g = [torch.where(torch.rand(lg.shape, generator=gen) < 0.2, -math.inf, lg) for lg in stats.log_g]
    obj = PerParamObjective(groups, log_g)
    blocks = build_blocks(groups.roles, log_g, groups.n_free, torch.from_numpy(groups.levels), LAYOUTS[layout])
    assert blocks.n_params == obj.n_all
    assert blocks.n_params_pos == obj.G
    state, _ = _prepare(blocks)
    u = np.random.default_rng(4).normal(size=obj.n)
    u[0] = 0.0
    assert state.objective(torch.from_numpy(u)) == pytest.approx(obj.value(u), rel=1e-12)
    assert state.log_score(torch.from_numpy(u)) == pytest.approx(obj.log_score(u), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# 4. A constant diagonal: PathCond does nothing


def equal_magnitude_net(n_in: int = 3, hidden: int = 5, n_out: int = 3, c: float = 0.7, seed: int = 0):
    """x -> linear (no bias) -> ReLU -> linear (no bias), every weight ±c.

    g(W1[j, i]) = Σ_k W2[k, j]² = n_out·c², g(W2[k, j]) = Σ_i W1[j, i]² = n_in·c²:
    constant iff n_in = n_out."""
    n = Net(seed, (1, n_in))
    h = n.op("relu", n.linear("x", hidden, bias=False))
    graph = n.graph(n.linear(h, n_out, bias=False))
    signs = {k: torch.sign(v) for k, v in graph.params.items()}
    return graph.with_params({k: c * s for k, s in signs.items()})


def test_constant_diagonal_gives_zero_rescaling():
    graph = equal_magnitude_net()
    ref = reference(graph)
    assert np.allclose(list(ref.g.values()), 3 * 0.7**2, rtol=1e-14)  # the diagonal really is constant
    analysis = analyze(graph, device="cpu", tol=1e-12)
    logs = torch.cat([lg.reshape(-1) for lg in analysis.stats.log_g])
    assert float(logs.max() - logs.min()) < 1e-12
    sol = analysis.solution
    assert sol.u.abs().max() < 1e-9
    assert math.exp(sol.log_score_before) == pytest.approx(1.0, abs=1e-12)
    assert math.exp(sol.log_score_after) == pytest.approx(1.0, abs=1e-12)
    assert sol.objective_after == pytest.approx(sol.objective_before, rel=1e-14)
    assert rescaled_params(analysis) == {} or all(
        torch.allclose(v, graph.params[k], rtol=1e-9, atol=0) for k, v in rescaled_params(analysis).items()
    )


def test_non_constant_diagonal_moves():
    """The same net with n_in != n_out: the diagonal is not constant and u != 0 (the test above can fail)."""
    analysis = analyze(equal_magnitude_net(n_in=3, n_out=2), device="cpu", tol=1e-12)
    assert analysis.solution.log_score_before > 1e-3
    assert analysis.solution.u.abs().max() > 1e-2
    # per hidden unit: A = 3 weights of g = 2c² in, C = 2 weights of g = 3c² out, k = 1; G = 25
    g_in, g_out = 2 * 0.7**2, 3 * 0.7**2
    n_in, n_out, G, hidden = 3, 2, 25, 5
    k = n_in - n_out
    a, c = n_in * g_in, n_out * g_out
    # all hidden units are symmetric, so they move together; F along the common u reduces to a 1-D problem

    def f(u):
        return G * math.log(hidden * (a * math.exp(-2 * u) + c * math.exp(2 * u))) + 2 * hidden * k * u

    u_star = minimize_scalar(f, bounds=(-5, 5), method="bounded", options={"xatol": 1e-12}).x
    u = analysis.solution.u[1:].numpy()
    assert np.allclose(u, u_star, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# 6. A dead unit


def dead_unit_net(dead: int = 2):
    n = Net(31, (1, 3))
    h = n.op("relu", n.linear("x", 5))
    h2 = n.op("relu", n.linear(h, 4))
    graph = n.graph(n.linear(h2, 2))
    key = graph.nodes[2].params["weight"]  # (4, 5): the outgoing weights of the first hidden layer
    w = graph.params[key].clone()
    w[:, dead] = 0.0
    return graph.with_params({key: w}), h


def test_dead_unit_is_pinned_and_reported():
    graph, hidden = dead_unit_net(dead=2)
    analysis = analyze(graph, device="cpu", tol=1e-6)
    group = int(analysis.groups.value_groups[hidden][2])
    assert group > 0  # a free group before the solver looked at it
    reasons = dict(analysis.solution.degenerate)
    assert list(reasons) == [group]
    assert "dead unit" in reasons[group]
    pins = [p for p in analysis.pinned if "dead unit" in p.reason]
    assert len(pins) == 1 and pins[0].node == graph.nodes[0].name
    assert analysis.u[group] == 0.0
    first = next(r for r in analysis.groups.roles if r.node is graph.nodes[0] and r.role == "weight")
    bias = next(r for r in analysis.groups.roles if r.node is graph.nodes[0] and r.role == "bias")
    assert (role_factor(first, analysis.u)[2] == 1.0).all()
    assert role_factor(bias, analysis.u)[2] == 1.0
    # the other units did move, and the enumerated g is 0 exactly where the engine says so
    others = [int(j) for j in analysis.groups.value_groups[hidden] if int(j) != group]
    assert analysis.u[others].abs().max() > 1e-3
    assert torch.isinf(analysis.stats.log_g[0][2]).all()
    assert (reference(graph).g_of(first.key, first.shape)[2] == 0).all()


def test_dead_unit_rescaled_network_same_outputs():
    graph, _ = dead_unit_net(dead=2)
    analysis = analyze(graph, device="cpu", tol=1e-6)
    assert analysis.solution.converged
    new = rescaled_params(analysis)
    assert new
    x = random_inputs(graph, batch=6, seed=3)
    y0, y1 = evaluate(graph, x), evaluate(graph.with_params(new), x)
    assert rel_err(y1[graph.outputs[0]], y0[graph.outputs[0]]) < 1e-10


def test_integer_parameter_is_a_clear_refusal_not_a_math_error():
    """ParamBox (the dtype bounds) refuses a parameter stored as integers (a front end lets none through)."""
    from pathcond_cli.errors import UnsupportedModelError

    graph = mlp(3)
    key = next(k for k in graph.params if k.endswith(".bias"))
    graph = graph.with_params({key: torch.zeros(graph.params[key].shape, dtype=torch.int64)})
    with pytest.raises(UnsupportedModelError, match=f"{key!r} is stored as int64"):
        analyze(graph, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_parameters_are_solved_within_their_range(dtype):
    """8-bit floats: the bounds come from float32 copies (torch has no min/max/isfinite for them), and every
    rescaled value stays finite and within the dtype's normal range, as computed here from finfo."""
    graph = mlp(5, (4, 9, 6, 2))
    graph = graph.with_params({k: v.to(dtype) for k, v in graph.params.items()})
    analysis = analyze(graph, device="cpu")
    new = rescaled_params(analysis)
    assert new and all(v.dtype == dtype for v in new.values())
    info = torch.finfo(dtype)
    for value in new.values():
        magnitude = value.float().abs()
        assert bool(torch.isfinite(magnitude).all()) and float(magnitude.max()) <= info.max
    assert analysis.solution.log_score_after <= analysis.solution.log_score_before
