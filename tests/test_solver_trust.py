"""Issue 9: the solver on models nobody here wrote.

A. Dead units (g = 0 on some parameters): the criterion runs over g > 0 only (MATH §5), so the solver
   can never raise the reported score; its minimum is scipy's on the objective written from brute-force
   path enumeration (tests/reference.py), not from the engine's statistics.
B. Scales beyond the storage dtype: the solve is bounded so that every rescaled parameter stays finite
   and normal in its dtype, and the report says when the bounds were active.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathcond_cli.analysis import analyze
from pathcond_cli.ir import Graph
from tests.reference import reference
from tests.test_core_paths import Net, role_tag
from tests.test_core_solver import PerParamObjective

# --------------------------------------------------------------------------------------------------
# Random small nets with dead units, built directly as IR graphs (float64)


def _kill(graph: Graph, updates: dict[str, torch.Tensor], key: str, index) -> None:
    value = updates.get(key, graph.params[key]).clone()
    value[index] = 0.0
    updates[key] = value


def dead_mlp(seed: int, widest: int = 6) -> Graph:
    """An MLP with random widths in 2..widest and scale, and one to six dead units: a unit whose incoming
    weights and bias are zero (its outgoing weights get g = 0) or whose outgoing weights are zero (its
    incoming weights and bias get g = 0)."""
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(2, widest + 1, size=int(rng.integers(4, 7)))]
    n = Net(seed, (1, widths[0]))
    x, layers = "x", []
    for i, w in enumerate(widths[1:]):
        x = n.linear(x, w, scale=float(rng.choice([0.2, 1.0, 4.0])))
        layers.append(n.nodes[-1])
        if i < len(widths) - 2:
            x = n.op("relu", x)
    graph = n.graph(x)
    updates: dict[str, torch.Tensor] = {}
    for _ in range(int(rng.integers(1, 7))):
        layer = int(rng.integers(0, len(layers) - 1))
        unit = int(rng.integers(0, widths[layer + 1]))
        if rng.random() < 0.5:
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


@pytest.mark.parametrize("seed", range(60))
def test_dead_units_never_raise_the_score(seed):
    """Property: whatever dead units a net has, the solved score is never above the starting score."""
    graph = dead_mlp(seed, widest=12)
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
