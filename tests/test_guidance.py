"""What the tool tells users about training: per-layer relative-step factors, the per-layer figures on
large layers (chunked extremes, sampled medians), the verdict and the report keys.

The factors are checked against brute-force path enumeration (tests/reference.py): rescaling θ_i by s_i
changes its relative SGD step |Δθ_i|/|θ_i| by g_after/g_before = 1/s_i², the ratio of the enumerated
diag(G) of the rescaled and the original network."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pathcond_cli import analysis as an
from pathcond_cli.analysis import analyze, layer_entries, layer_rows, layer_samples, role_log_factor
from pathcond_cli.ir import Graph, Node
from pathcond_cli.report import build_report, verdict
from tests.test_core_paths import DAGS, case, reference, rescaled, role_tag
from tests.test_cli import invoke

NAMES = ["mlp", "conv_pools", "residual", "concat", "conv_bn", "grouped_conv", "tied_chain", "decoder"]


@pytest.mark.parametrize("name", NAMES)
def test_relative_step_matches_enumeration(name):
    """geo mean, min and max of g_after/g_before per layer, from u alone, against the enumerated g of the
    rescaled and the original network (entries with g > 0)."""
    _, groups, _, ref = case(name)
    analysis, _, graph2 = rescaled(name)
    ref2 = reference(graph2)
    rows = {row.node: row for row in layer_rows(analysis)}
    moved = 0
    for node_name, row in rows.items():
        roles = [r for r in groups.roles if r.node.name == node_name]
        g1 = np.concatenate([ref.g_of(role_tag(r), r.shape).reshape(-1) for r in roles])
        g2 = np.concatenate([ref2.g_of(role_tag(r), r.shape).reshape(-1) for r in roles])
        assert np.all(g1 > 0), "every entry of these nets lies on a path with nonzero weights"
        ratio = g2 / g1
        want = (math.exp(np.mean(np.log(ratio))), ratio.min(), ratio.max())
        got = (row.relative_step.geo_mean, row.relative_step.min, row.relative_step.max)
        np.testing.assert_allclose(got, want, rtol=1e-8, err_msg=node_name)
        moved += abs(math.log(row.relative_step.geo_mean)) > 1e-3
    assert moved, "the test needs a net whose rescaling moves some layer"


@pytest.mark.parametrize("name", list(DAGS))
def test_log_factor_at_every_index(name):
    """(Bu)_i by index arithmetic (for samples) equals role_log_factor broadcast to the stored shape."""
    analysis, _, _ = rescaled(name)
    u = analysis.u
    for role in analysis.groups.roles:
        want = role_log_factor(role, u).expand(role.shape).reshape(-1)
        got = an._log_factor_at(role, u, torch.arange(role.numel))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["conv_pools", "grouped_conv", "conv_bn", "decoder"])
def test_large_layer_figures(name, monkeypatch):
    """With a tiny sample and tiny chunks (as on a large model): extremes stay exact (against
    enumeration), medians are taken over an evenly strided subset of the true values."""
    monkeypatch.setattr(an, "MEDIAN_SAMPLE", 5)
    monkeypatch.setattr(an, "_CHUNK", 7)
    _, groups, _, ref = case(name)
    analysis, _, graph2 = rescaled(name)
    ref2 = reference(graph2)
    entries = layer_entries(analysis)
    sampled = 0
    for row in layer_rows(analysis):
        roles = [r for r in groups.roles if r.node.name == row.node]
        for figures, enum in ((row.log10_g_before, ref), (row.log10_g_after, ref2)):
            values = np.log10(np.concatenate([enum.g_of(role_tag(r), r.shape).reshape(-1) for r in roles]))
            np.testing.assert_allclose([figures[0], figures[2]], [values.min(), values.max()], rtol=1e-9, atol=1e-12)
            assert np.any(np.isclose(values, figures[1], rtol=1e-9, atol=1e-12)), "a median is one of the values"
        before, after = layer_samples(entries[row.node], analysis.u, size=5)
        assert row.median_sample == before.numel() <= max(5, len(roles))
        sampled += row.median_sample < row.params
        all_b = np.log(np.concatenate([ref.g_of(role_tag(r), r.shape).reshape(-1) for r in roles]))
        all_a = np.log(np.concatenate([ref2.g_of(role_tag(r), r.shape).reshape(-1) for r in roles]))
        for got, full in ((before, all_b), (after, all_a)):
            assert all(np.any(np.isclose(full, v, rtol=1e-9, atol=1e-12)) for v in got.numpy())
    assert sampled, "some layer must be larger than the sample"


def balanced_graph() -> Graph:
    """3 -> 3 -> 3, every weight 1, no bias: every g is 3, the rescaling is the identity."""
    ones = torch.ones(3, 3, dtype=torch.float64)
    nodes = [Node("fc1", "linear", ("x",), "h", {"weight": "fc1.weight"}, {}),
             Node("relu", "relu", ("h",), "r", {}, {}),
             Node("fc2", "linear", ("r",), "y", {"weight": "fc2.weight"}, {})]
    return Graph({"x": (1, 3)}, nodes, ["y"], {"fc1.weight": ones, "fc2.weight": ones.clone()})


def test_verdict_names_the_extreme_layers_and_promises_no_speed():
    analysis, _, _ = rescaled("residual")
    text = verdict(analysis)
    rows = analysis.layers
    low = min(rows, key=lambda r: r.relative_step.geo_mean)
    high = max(rows, key=lambda r: r.relative_step.geo_mean)
    assert f"×{low.relative_step.geo_mean:.2g} ({low.node})" in text
    assert f"×{high.relative_step.geo_mean:.2g} ({high.node})" in text
    assert "re-tune the learning rate" in text and "likely to matter" not in text
    assert f"{math.exp(analysis.solution.log_score_before):.3g}" in text  # what the score is, before and after
    assert "faster" not in text.replace("may get faster or slower", "")


def test_verdict_on_a_balanced_net():
    analysis = analyze(balanced_graph(), device="cpu")
    assert analysis.solution.max_abs_log_scale < 1e-6
    text = verdict(analysis)
    assert "Already nearly balanced" in text and "re-tune" not in text
    assert all(row.relative_step.geo_mean == pytest.approx(1.0) for row in analysis.layers)


def test_report_keys():
    analysis, _, _ = rescaled("conv_bn")
    report = json.loads(json.dumps(build_report(analysis, input_info={}), allow_nan=False))
    geo = {row["node"]: row["relative_step"]["geo_mean"] for row in report["layers"]}
    assert all(set(row["relative_step"]) == {"geo_mean", "min", "max"} for row in report["layers"])
    assert all(row["relative_step"]["min"] <= row["relative_step"]["geo_mean"] <= row["relative_step"]["max"]
               for row in report["layers"])
    summary = report["relative_step"]
    assert summary["lowest"] == {"layer": min(geo, key=geo.get), "geo_mean": min(geo.values())}
    assert summary["highest"] == {"layer": max(geo, key=geo.get), "geo_mean": max(geo.values())}
    assert summary["min"] == min(r["relative_step"]["min"] for r in report["layers"])
    assert summary["max"] == max(r["relative_step"]["max"] for r in report["layers"])


def test_inspect_json_carries_the_factors(mlp_onnx):
    result = invoke("inspect", mlp_onnx, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    low = report["relative_step"]["lowest"]
    assert f"×{low['geo_mean']:.2g} ({low['layer']})" in report["verdict"]
    assert all(r["median_sample"] == r["params"] for r in report["layers"])  # small layers: exact medians


@pytest.mark.parametrize("name", ["mlp", "conv_pools", "grouped_conv"])
def test_zero_g_entries_are_left_out(monkeypatch, name):
    """Entries with g = 0 (ln g = -inf) count in no figure: min / lower median / max over the others, with
    the masked path taken in small chunks (a convolution's kernel reduction steps aside for it)."""
    monkeypatch.setattr(an, "_CHUNK", 7)
    analysis, _, _ = rescaled(name)
    log_g = [t.clone() for t in analysis.stats.log_g]
    first = analysis.groups.roles[0]
    assert first.numel > first.shape[0] * (1 if first.in_idx is None else first.in_idx.shape[-1]) or name == "mlp"
    log_g[0].reshape(-1)[::3] = -math.inf
    fake = SimpleNamespace(u=analysis.u, groups=analysis.groups, stats=SimpleNamespace(log_g=log_g),
                           graph=analysis.graph)
    row = next(r for r in layer_rows(fake) if r.node == first.node.name)
    pairs = [(role, lg) for role, lg in zip(analysis.groups.roles, log_g) if role.node.name == first.node.name]
    before = np.concatenate([lg.numpy().reshape(-1) for _, lg in pairs])
    after = np.concatenate([(lg - 2 * role_log_factor(r, analysis.u)).numpy().reshape(-1) for r, lg in pairs])
    keep = before > -np.inf
    assert 0 < keep.sum() < keep.size and row.median_sample == keep.sum()
    for got, values in ((row.log10_g_before, before[keep]), (row.log10_g_after, after[keep])):
        values = np.sort(values) / math.log(10.0)
        np.testing.assert_allclose(got, values[[0, (len(values) - 1) // 2, -1]], rtol=1e-12)
