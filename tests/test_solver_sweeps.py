"""The default solver (layer-ordered Gauss–Seidel + coarse correction, issue 11): few sweeps on deep
chains, scipy's minimum on random DAGs with residual adds and concatenations, bounds kept, and no
torch._dynamo import on the default path."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pathcond_cli.analysis import analyze, rescaled_params
from pathcond_cli.groups import build_groups
from pathcond_cli.ir import Graph, evaluate
from pathcond_cli.solver import build_blocks, dtype_log_range, solve
from pathcond_cli.stats import path_statistics
from tests.test_core_paths import Net, mlp
from tests.test_core_solver import PerParamObjective

ROOT = Path(__file__).resolve().parents[1]

# Kaiming (std √2/√fan_in) keeps the squared network's values balanced along the depth: the slow "ramp"
# of coordinate descent is at its worst there. PyTorch's default init (std 1/√(3·fan_in)) shrinks them.
KAIMING, TORCH_DEFAULT = math.sqrt(2.0), 1.0 / math.sqrt(3.0)


def blocks_of(graph: Graph):
    groups = build_groups(graph)
    stats = path_statistics(graph, groups)
    return groups, stats, build_blocks(groups.roles, stats.log_g, groups.n_free, torch.from_numpy(groups.levels))


def random_dag(seed: int) -> Graph:
    """A random MLP-style DAG: plain layers, residual blocks (linear-ReLU-linear + identity, ReLU after the
    add) and two concatenated branches, each layer's weights scaled by e^{N(0, 1)}."""
    rng = np.random.default_rng(seed)
    n = Net(seed, (1, int(rng.integers(3, 7))))
    x = "x"

    def layer(x: str, out: int) -> str:
        return n.linear(x, out, scale=float(np.exp(rng.normal())))

    for _ in range(int(rng.integers(3, 6))):
        kind = rng.choice(["plain", "residual", "concat"])
        if kind == "plain":
            x = n.op("relu", layer(x, int(rng.integers(2, 7))))
        elif kind == "residual":
            y = layer(n.op("relu", layer(x, int(rng.integers(2, 7)))), n.shape(x)[1])
            x = n.op("relu", n.op("add", y, x))
        else:
            a = n.op("relu", layer(x, int(rng.integers(1, 5))))
            b = n.op("relu", layer(x, int(rng.integers(1, 5))))
            x = n.op("concat", a, b)
    return n.graph(layer(x, int(rng.integers(1, 4))))


def vgg_like(seed: int = 0) -> Graph:
    """VGG-16's layer pattern with an eighth of its channels on 32x32, Kaiming init: 16 weight layers."""
    n = Net(seed, (1, 3, 32, 32))
    x = "x"
    for item in [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]:
        if item == "M":
            x = n.pool("maxpool", x, 2, 2)
        else:
            conv = n.conv(x, item, 3, pads=(1, 1, 1, 1))
            n.params[f"{conv}.weight"].mul_(KAIMING)
            x = n.op("relu", conv)
    x = n.op("flatten", x)
    x = n.op("relu", n.linear(x, 128, scale=KAIMING))
    x = n.op("relu", n.linear(x, 128, scale=KAIMING))
    return n.graph(n.linear(x, 10))


def alexnet_like(seed: int = 0) -> Graph:
    """AlexNet's layer pattern (11x11 stride 4, 5x5, three 3x3, overlapping max-pools) with an eighth of
    its channels on 95x95, PyTorch's default init."""
    n = Net(seed, (1, 3, 95, 95))
    x = n.pool("maxpool", n.op("relu", n.conv("x", 8, 11, stride=4, pads=(2, 2, 2, 2))), 3, 2)
    x = n.pool("maxpool", n.op("relu", n.conv(x, 24, 5, pads=(2, 2, 2, 2))), 3, 2)
    for out in (48, 32, 32):
        x = n.op("relu", n.conv(x, out, 3, pads=(1, 1, 1, 1)))
    x = n.op("flatten", n.pool("maxpool", x, 3, 2))
    x = n.op("relu", n.linear(x, 128, scale=TORCH_DEFAULT))
    x = n.op("relu", n.linear(x, 128, scale=TORCH_DEFAULT))
    return n.graph(n.linear(x, 10))


DEEP_CHAINS = {
    "mlp-16x16-kaiming": lambda: mlp(5, (64,) + (16,) * 16 + (4,), scale=KAIMING),
    "mlp-16x16-torch-init": lambda: mlp(6, (64,) + (16,) * 16 + (4,), scale=TORCH_DEFAULT),
    "mlp-40-uneven": lambda: mlp(7, tuple(int(w) for w in np.random.default_rng(7).integers(2, 12, size=41)),
                                 scale=KAIMING),
    "vgg16-like": vgg_like,
    "alexnet-like": alexnet_like,
}


# --------------------------------------------------------------------------------------------------
# Deep chains: ≤ 20 sweeps to --tol 1e-3, no worse than the former default


def check_fast_and_no_worse(blocks) -> None:
    sol = solve(blocks, tol=1e-3)
    assert sol.method == "auto"
    assert sol.converged and sol.max_abs_log_x <= 1e-3
    assert sol.sweeps <= 20, sol.sweeps
    # the former default (BCD + L-BFGS) at the same tolerance, and run far below it (it may stall at F's
    # float64 resolution first): the score reached is as good within 1e-6 of ln(score)
    former = solve(blocks, method="lbfgs", tol=1e-3)
    best = solve(blocks, method="lbfgs", tol=1e-8, max_sweeps=20000)
    assert best.max_abs_log_x < 1e-5
    assert sol.log_score_after <= min(former.log_score_after, best.log_score_after) + 1e-6
    assert sol.log_score_after < sol.log_score_before


@pytest.mark.parametrize("name", DEEP_CHAINS)
def test_deep_chain_converges_in_few_sweeps(name):
    _, _, blocks = blocks_of(DEEP_CHAINS[name]())
    check_fast_and_no_worse(blocks)


def test_deep_chain_reaches_scipy_minimum():
    """The 16-layer Kaiming MLP (the slow case of coordinate descent) against scipy's L-BFGS-B on the
    per-parameter objective: the same minimum, reached in a handful of sweeps."""
    groups, stats, blocks = blocks_of(DEEP_CHAINS["mlp-16x16-kaiming"]())
    obj = PerParamObjective(groups, stats.log_g)
    f_star, u_star = obj.minimise(np.arange(obj.n) > 0)
    sol = solve(blocks, tol=1e-8)
    assert sol.converged and sol.sweeps <= 20
    assert abs(obj.value(sol.u.numpy()) - f_star) <= 1e-7 * abs(f_star)
    assert np.abs(sol.u.numpy() - u_star).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("scale", [KAIMING, TORCH_DEFAULT], ids=["kaiming", "torch-init"])
def test_mlp_3072_256x16_10(scale):
    """The 3072-256x16-10 MLP of issue 11 (1.8M parameters)."""
    net = Net(3, (1, 3072))
    x = "x"
    for _ in range(16):
        x = net.op("relu", net.linear(x, 256, scale=scale))
    _, _, blocks = blocks_of(net.graph(net.linear(x, 10, scale=scale)))
    check_fast_and_no_worse(blocks)


# --------------------------------------------------------------------------------------------------
# Random DAGs with residual adds and concatenations: scipy's minimum, the score never worse


@pytest.mark.parametrize("seed", range(8))
def test_random_dag_reaches_scipy_minimum(seed):
    graph = random_dag(seed)
    ops = {node.op for node in graph.nodes}
    groups, stats, blocks = blocks_of(graph)
    obj = PerParamObjective(groups, stats.log_g)
    free = np.arange(obj.n) > 0
    f_star, _ = obj.minimise(free)
    sol = solve(blocks, tol=1e-9, max_sweeps=5000)
    assert sol.converged or sol.max_abs_log_x < 1e-6  # tol 1e-9 may be below F's float64 resolution
    f = obj.value(sol.u.numpy())
    assert abs(f - f_star) <= 1e-7 * max(1.0, abs(f_star)), (f, f_star, ops)
    assert sol.log_score_after <= sol.log_score_before + 1e-12
    assert obj.log_score(sol.u.numpy()) == pytest.approx(sol.log_score_after, rel=1e-7, abs=1e-10)
    quick = solve(blocks, tol=1e-3)
    assert quick.converged and quick.sweeps <= 20


def test_random_dags_cover_residual_and_concat():
    """The DAGs above do hold both kinds of groups that span several layers."""
    ops = {node.op for seed in range(8) for node in random_dag(seed).nodes}
    assert {"add", "concat"} <= ops


# --------------------------------------------------------------------------------------------------
# Bounds


def test_bounded_deep_chain_keeps_every_value_in_range():
    """A 16-layer float16 chain whose third layer is scaled by 1e-3: the unbounded optimum leaves float16's
    normal range; the bounded solve keeps every written value inside it, lowers the score, and the
    rescaled network computes the same function."""
    graph = mlp(8, (16,) + (8,) * 16 + (4,), scale=KAIMING)
    key = [k for k in graph.params if k.endswith(".weight")][2]
    graph = graph.with_params({key: graph.params[key] * 1e-3})
    half = graph.with_params({k: v.half() for k, v in graph.params.items()})
    analysis = analyze(half, device="cpu")
    sol = analysis.solution
    assert sol.method == "auto" and sol.bounds_active and sol.converged
    assert sol.log_score_after < sol.log_score_before
    low, high = dtype_log_range(torch.float16)
    new = rescaled_params(analysis)
    assert new
    for k, v in new.items():
        old = half.params[k].double().abs()
        mag = v.double().abs()
        assert bool(torch.isfinite(v).all()), k
        assert bool((mag <= max(math.exp(high), float(old.max())) * (1 + 2.0**-8)).all()), k
        held = old >= math.exp(low)
        assert bool((mag[held] >= math.exp(low) * (1 - 2.0**-8)).all()), k
    wide = half.with_params({k: v.double() for k, v in half.params.items()})
    x = {"x": torch.randn((4, 16), generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    y0 = evaluate(wide, x)[graph.outputs[0]]
    y1 = evaluate(wide.with_params({k: v.double() for k, v in new.items()}), x)[graph.outputs[0]]
    assert float((y1 - y0).abs().max()) <= 1e-2 * float(y0.abs().max())


# --------------------------------------------------------------------------------------------------
# Start-up: the default solve does not import torch._dynamo (torch.optim.LBFGS does, ~1 s)

PROBE = """
import sys
import torch
import pathcond_cli.solver as solver
from tests.test_core_paths import mlp
from pathcond_cli.groups import build_groups
from pathcond_cli.stats import path_statistics
graph = mlp(0, (6, 8, 8, 8, 3))
groups = build_groups(graph)
stats = path_statistics(graph, groups)
blocks = solver.build_blocks(groups.roles, stats.log_g, groups.n_free, torch.from_numpy(groups.levels))
sol = solver.solve(blocks, method=sys.argv[1])
assert sol.converged and sol.log_score_after < sol.log_score_before
print("torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("method,imported", [("auto", False), ("lbfgs", True)])
def test_default_solve_does_not_import_dynamo(method, imported):
    """Run in a fresh interpreter; ``lbfgs`` shows that the probe can see the import."""
    done = subprocess.run([sys.executable, "-c", PROBE, method], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(imported)


# --------------------------------------------------------------------------------------------------
# The code paths a large or unusual graph takes


def test_merged_coarse_groups_reach_scipy_minimum(monkeypatch):
    """More batches than COARSE_MAX: neighbouring batches share a coarse group (here 41 layers on 4)."""
    from pathcond_cli import solver

    monkeypatch.setattr(solver._Layered, "COARSE_MAX", 4)
    groups, stats, blocks = blocks_of(DEEP_CHAINS["mlp-40-uneven"]())
    obj = PerParamObjective(groups, stats.log_g)
    f_star, _ = obj.minimise(np.arange(obj.n) > 0)
    sol = solve(blocks, tol=1e-8, max_sweeps=5000)
    assert sol.converged or sol.max_abs_log_x < 1e-6
    assert abs(obj.value(sol.u.numpy()) - f_star) <= 1e-7 * abs(f_star)


@pytest.mark.parametrize("seed", [0, 1])
def test_without_levels_reaches_scipy_minimum(seed):
    """Blocks built without the groups' levels (a caller that has none): batches are colour classes."""
    graph = random_dag(seed)
    groups = build_groups(graph)
    stats = path_statistics(graph, groups)
    blocks = build_blocks(groups.roles, stats.log_g, groups.n_free)
    obj = PerParamObjective(groups, stats.log_g)
    f_star, _ = obj.minimise(np.arange(obj.n) > 0)
    sol = solve(blocks, tol=1e-9, max_sweeps=5000)
    assert abs(obj.value(sol.u.numpy()) - f_star) <= 1e-7 * max(1.0, abs(f_star))


@pytest.mark.parametrize("name", ["residual", "concat", "tied_chain", "grouped_conv", "unet_like", "conv_bn"])
def test_batches_are_independent_and_front_to_back(name):
    """The layered sweep's batches: independent sets (checked against every (out, in) pair, dense weights
    expanded), covering each free group once, taken in non-decreasing DAG level."""
    from pathcond_cli.solver import _Layered, _prepare
    from tests.test_core_paths import DAGS

    groups = build_groups(DAGS[name]())
    stats = path_statistics(DAGS[name](), groups)
    for dense_min in (math.inf, 0):
        blocks = build_blocks(groups.roles, stats.log_g, groups.n_free, torch.from_numpy(groups.levels), dense_min)
        state, _ = _prepare(blocks)
        batches = _Layered(state).batches
        pairs = torch.cat([torch.stack([blocks.out, blocks.inn], 1)]
                          + [torch.cartesian_prod(d.out, d.inn).reshape(-1, 2) for d in blocks.dense])
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        seen = torch.zeros(blocks.n_groups + 1, dtype=torch.long)
        for batch in batches:
            member = torch.zeros(blocks.n_groups + 1, dtype=torch.bool)
            member[batch.groups] = True
            seen += member.long()
            assert not bool((member[pairs[:, 0]] & member[pairs[:, 1]]).any())
        assert torch.equal(seen, (~state.fixed).long())
        levels = [int(blocks.levels[b.groups].min()) for b in batches]
        assert levels == sorted(levels)
        assert all(int(blocks.levels[b.groups].max()) == lv for b, lv in zip(batches, levels))


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_scaled_far_off_converges_in_few_sweeps(layer):
    """One hidden layer, one weight scaled by 1e20 (found by the fuzz driver): the coarse problem starts
    where F is nearly linear along the batch's shift (almost all its mass on one side, a Hessian of
    ~e^-90), so an unlimited Newton step is astronomically long (with one, 40 sweeps here); the solver
    must still reach scipy's minimum fast."""
    graph = mlp(9, (4, 7, 2), scale=KAIMING)
    key = [k for k in graph.params if k.endswith(".weight")][layer]
    scale = 1e20
    graph = graph.with_params({key: graph.params[key] * scale})
    groups, stats, blocks = blocks_of(graph)
    obj = PerParamObjective(groups, stats.log_g)
    f_star, _ = obj.minimise(np.arange(obj.n) > 0)
    sol = solve(blocks, tol=1e-3)
    assert sol.converged and sol.sweeps <= 20, sol.sweeps
    tight = solve(blocks, tol=1e-9)
    assert abs(obj.value(tight.u.numpy()) - f_star) <= 1e-7 * max(1.0, abs(f_star))


def test_float32_activations_keep_their_headroom():
    """A float32 chain with one middle layer scaled by 1e-20 wants the layers before it scaled far up.
    Every rescaled parameter stays under √max, and the rescaled net, run in float32 on inputs 100 times
    larger than verification's, stays finite and equal to the original. With the former bound of max/16
    the first layers' parameters reached 2e37 and these outputs were NaN (fuzz seed 3035)."""
    graph = mlp(8, (3, 4, 6, 4, 14, 6, 9, 5), scale=KAIMING)
    keys = [k for k in graph.params if k.startswith("linear6.")]
    assert len(keys) == 2
    single = graph.with_params({k: (v * 1e-20 if k in keys else v).float() for k, v in graph.params.items()})
    analysis = analyze(single, device="cpu")
    new = rescaled_params(analysis)
    assert analysis.solution.bounds_active and analysis.solution.log_score_after < analysis.solution.log_score_before
    _, high = dtype_log_range(torch.float32)
    assert max(float(v.abs().max()) for v in new.values()) <= math.exp(high) * (1 + 2.0**-20)
    x = {"x": 100 * torch.randn((64, 3), generator=torch.Generator().manual_seed(1))}
    out = graph.outputs[0]
    y0 = evaluate(single, x, dtype=None)[out]
    y1 = evaluate(single.with_params(new), x, dtype=None)[out]
    assert y1.dtype == torch.float32 and bool(torch.isfinite(y1).all())
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4 * float(y0.abs().max()))
