"""The report: one structure, serialised to JSON (with a schema version) and rendered with Rich."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__
from .analysis import Analysis, LayerRow
from .verify import Verification

SCHEMA_VERSION = 1
LN10 = math.log(10.0)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _score(log_score: float) -> float | None:
    return _finite(math.exp(log_score)) if log_score < 700 else None


def verdict(analysis: Analysis) -> str:
    """What the score is, what the rescaling changed, and what to do about training (MATH §8).

    Never a promise of speed: the rescaled network computes the same function, and what changes is how
    SGD's steps are spread over the parameters (a parameter scaled by s gets a relative step 1/s² as large).
    Measured on small networks (benchmarks/bench_training.py, README "Does it help training?") that
    helps or hurts depending on the net and the learning rate: the best learning rate moved up on two of
    four nets and down on a CNN with BatchNorm, so the advice is to re-tune it."""
    sol = analysis.solution
    if analysis.groups.n_free - len(sol.degenerate) == 0:
        return "Nothing to rescale: every group is pinned."
    line = _score_line(sol.log_score_before, sol.log_score_after, sol.max_abs_log_scale, analysis.layers)
    if sol.bounds_active:
        line += (
            f" Bounds were active: the best rescaling would take parameters outside their storage dtype's range, so "
            f"{sol.bounded_groups} group(s) stop at a bound that keeps every rescaled parameter finite and normal; "
            "the score is the best reachable within these bounds."
        )
    return line


def _score_line(log_before: float, log_after: float, biggest: float, layers: list[LayerRow]) -> str:
    gain = (log_before - log_after) / LN10
    score = (f"The conditioning score (AM/GM of diag(G), 1 = every parameter weighs the same in the path kernel) "
             f"goes from {_exp_text(log_before)} to {_exp_text(log_after)}.")
    low, high = step_range(layers)
    if gain < 0.01 and biggest < 0.1:
        return (f"{score} Already nearly balanced: rescaling changes no output and barely changes training "
                f"(relative SGD steps change by at most ×{_factor(max(high[1], 1 / low[1]))}).")
    if high[1] / low[1] < 1.1:
        return (f"{score} The rescaling changes no output, and relative SGD steps change by ×{_factor(low[1])} to "
                f"×{_factor(high[1])} per layer: training should behave as before.")
    return (f"{score} The rescaling changes no output but, after rescaling, relative SGD steps change by "
            f"×{_factor(low[1])} ({low[0]}) to ×{_factor(high[1])} ({high[0]}) (per-layer geometric means): "
            "re-tune the learning rate, preferably with a sweep; rescaled networks often tolerate larger ones. "
            "At an unchanged learning rate, training may get faster or slower, depending on the network.")


def step_range(layers: list[LayerRow]) -> tuple[tuple[str, float], tuple[str, float]]:
    """The layers with the lowest and the highest geometric-mean relative-step factor."""
    if not layers:
        return ("-", 1.0), ("-", 1.0)
    low = min(layers, key=lambda r: r.relative_step.geo_mean)
    high = max(layers, key=lambda r: r.relative_step.geo_mean)
    return (low.node, low.relative_step.geo_mean), (high.node, high.relative_step.geo_mean)


def _factor(x: float) -> str:
    return f"{x:.2g}" if math.isfinite(x) and x != 0 else ("∞" if x > 0 else "0")


def _exp_text(log_x: float) -> str:
    """e^x as "1.92", or "10^456" where the float would overflow."""
    return f"{math.exp(log_x):.3g}" if log_x < 700 else f"10^{log_x / LN10:.4g}"


def _relative_step_summary(layers: list[LayerRow]) -> dict[str, Any] | None:
    """The report's top-level ``relative_step``: the layers whose relative SGD steps change the least and
    the most (geometric means), and the extremes over every parameter."""
    if not layers:
        return None
    (low_node, low), (high_node, high) = step_range(layers)
    return {
        "lowest": {"layer": low_node, "geo_mean": _finite(low)},
        "highest": {"layer": high_node, "geo_mean": _finite(high)},
        "min": _finite(min(r.relative_step.min for r in layers)),
        "max": _finite(max(r.relative_step.max for r in layers)),
    }


def _layer_dict(row: LayerRow) -> dict[str, Any]:
    out = asdict(row)
    out["relative_step"] = {k: _finite(v) for k, v in out["relative_step"].items()}
    return out


def build_report(
    analysis: Analysis,
    *,
    input_info: dict[str, Any],
    output_info: dict[str, Any] | None = None,
    verification: Verification | None = None,
    timings: dict[str, float] | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    sol, stats, groups = analysis.solution, analysis.stats, analysis.groups
    degenerate = len(sol.degenerate)
    partial = _partial(analysis)
    return {
        "schema_version": SCHEMA_VERSION,
        "pathcond_version": __version__,
        "input": input_info,
        "model": {
            "parameters": groups.n_params,
            "hidden_units": groups.hidden_units,
            "groups_free": groups.n_free - degenerate,
            "groups_pinned": groups.n_pinned + degenerate,
            "log10_paths": _finite(stats.log10_paths),
            "log10_path1_norm": _finite(stats.log10_path1_norm),
            "log10_path2_norm": _finite(stats.log10_path2_norm),
            "width_ratio": analysis.width_ratio,
        },
        "conditioning": {
            "objective_before": sol.objective_before,
            "objective_after": sol.objective_after,
            "score_before": _score(sol.log_score_before),
            "score_after": _score(sol.log_score_after),
            "log10_score_before": sol.log_score_before / LN10,
            "log10_score_after": sol.log_score_after / LN10,
            "sweeps": sol.sweeps,
            "converged": sol.converged,
            "max_abs_log_x": _finite(sol.max_abs_log_x),
            "method": sol.method,
            "max_abs_log_scale": sol.max_abs_log_scale,
            "bounds_active": sol.bounds_active,
            "bounded_groups": sol.bounded_groups,
        },
        "verdict": verdict(analysis) + ("" if partial is None else " " + partial_line(partial)),
        "relative_step": _relative_step_summary(analysis.layers),
        "pinned": [asdict(p) for p in analysis.pinned],
        "layers": [_layer_dict(row) for row in analysis.layers],
        "verification": None if verification is None else {
            "passed": verification.passed,
            "max_abs_error": _finite(verification.max_abs_error),
            "max_rel_error": _finite(verification.max_rel_error),
            "rtol": verification.rtol,
            "inputs": verification.inputs,
            "modes": sorted({e.mode for e in verification.outputs}),
        },
        "output": output_info,
        "timings": {k: round(v, 4) for k, v in (timings or {}).items()},
        "device": str(analysis.device),
        "warnings": list(warnings or []),
        **({} if partial is None else {"partial": {k: v for k, v in partial.items() if k != "segments"},
                                       "segments": partial["segments"]}),
    }


def _partial(analysis: Analysis) -> dict[str, Any] | None:
    """The partial-rescaling figures (pathcond_cli.segments), or None for a model analysed whole."""
    if analysis.source_graph is None:
        return None
    from .segments import partial_summary

    return partial_summary(analysis, analysis.source_graph)


def partial_line(partial: dict[str, Any]) -> str:
    """The verdict's sentence on partial rescaling: what share of the hidden units is rescaled."""
    n = len(partial["segments"])
    return (f"Partial rescaling: {partial['hidden_units_rescaled']:,} of {partial['hidden_units']:,} hidden units "
            f"({100 * partial['share_rescaled']:.0f}%) in {n:,} homogeneous segment{'s' if n != 1 else ''} are "
            f"free to rescale; {partial['opaque_ops']:,} opaque op(s) and their parameters are left unchanged.")


def _inspect_only(value: float | None) -> str:
    """What a missing path count / path-1 norm means: rescale does not compute them (inspect does)."""
    return " (computed by inspect)" if value is None else ""


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render(report: dict[str, Any], console: Console, *, layers: bool = False) -> None:
    """Human-readable tables of a report."""
    model, cond = report["model"], report["conditioning"]
    table = Table(title=f"pathcond — {report['input']['path']} ({report['input']['format']})", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    rows = [
        ("parameters (in the objective)", f"{model['parameters']:,}"),
        ("hidden units", f"{model['hidden_units']:,}"),
        ("rescaling groups", f"{model['groups_free']:,} free, {model['groups_pinned']:,} pinned"),
        ("log10 number of paths", _fmt(model["log10_paths"]) + _inspect_only(model["log10_paths"])),
        ("log10 path-1 norm / path-2 norm", f"{_fmt(model['log10_path1_norm'])} / {_fmt(model['log10_path2_norm'])}"
                                            + _inspect_only(model["log10_path1_norm"])),
        ("width ratio (max/min)", _fmt(model["width_ratio"])),
        ("conditioning score (AM/GM of diag G)", f"{_fmt(cond['score_before'])} → {_fmt(cond['score_after'])}"),
        ("largest |ln λ|", _fmt(cond["max_abs_log_scale"])),
        ("relative SGD step after/before", _step_text(report.get("relative_step"))),
        ("solver", f"{cond['method']}, {cond['sweeps']} sweeps, " + ("converged" if cond["converged"] else "NOT converged")),
    ]
    if report.get("partial"):
        part = report["partial"]
        rows.append(("partial rescaling", f"{part['hidden_units_rescaled']:,} of {part['hidden_units']:,} hidden units "
                     f"free in {len(report['segments']):,} segments; {part['opaque_ops']:,} opaque ops unchanged"))
    if cond.get("bounds_active"):
        rows.append(("bounds (storage dtype range)", f"active: {cond['bounded_groups']:,} group(s) at a bound"))
    ver = report.get("verification")
    if ver is not None:
        status = "[green]passed[/]" if ver["passed"] else "[red]FAILED[/]"
        rows.append(("verification", f"{status}: max rel error {_fmt(ver['max_rel_error'], 3)} (rtol {_fmt(ver['rtol'], 3)}, {ver['inputs']} inputs, {'+'.join(ver['modes'])})"))
    if report.get("output"):
        rows.append(("output", report["output"]["path"]))
    rows.append(("time", ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items())))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if report["pinned"]:
        console.print(_pinned_table(report["pinned"]))
    if layers:
        console.print(_layers_table(report["layers"]))
    if layers and report.get("segments"):
        console.print(_segments_table(report["segments"]))
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"[bold]{report['verdict']}[/]")


def _pinned_table(pinned: list[dict[str, Any]]) -> Table:
    table = Table(title="pinned groups (left unscaled)")
    for col in ("node", "channels", "reason"):
        table.add_column(col)
    for p in pinned:
        table.add_row(p["node"], str(p["channels"]), p["reason"])
    return table


def _step_text(summary: dict[str, Any] | None) -> str:
    """"×0.07 (fc3) … ×3.1 (conv1)": the per-layer geometric means at both ends."""
    if not summary:
        return "-"
    low, high = summary["lowest"], summary["highest"]
    return (f"×{_fmt(low['geo_mean'], 2)} ({escape(low['layer'])}) … ×{_fmt(high['geo_mean'], 2)} "
            f"({escape(high['layer'])}), per-layer geometric means")


BAR_WIDTH = 24


def _layers_table(layers: list[dict[str, Any]]) -> Table:
    """One row per layer: log10 diag(G) before and after (min median max), a bar of that spread on one
    axis shared by every layer (red: before, green: after; ● the median), and the relative-step factors."""
    table = Table(title="layers: log10 diag(G) as min median max; bar: its spread before (red) → after (green), "
                        "● median; relative SGD step after/before: geometric mean [min, max]")
    table.add_column("node", overflow="fold")
    table.add_column("op")
    for col in ("width", "params", "before", "after"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("spread", no_wrap=True)
    table.add_column("rel. step", justify="right", no_wrap=True)
    axis = _axis(layers)
    for row in layers:
        triple = lambda t: " ".join("-" if v is None else f"{v:.2f}" for v in t)  # noqa: E731
        bar = Text()
        bar.append_text(_bar(row["log10_g_before"], axis, "red"))
        bar.append("\n")
        bar.append_text(_bar(row["log10_g_after"], axis, "green"))
        step = row["relative_step"]
        table.add_row(
            row["node"], row["op"], str(row["width"]), f"{row['params']:,}",
            triple(row["log10_g_before"]), triple(row["log10_g_after"]), bar,
            f"×{_fmt(step['geo_mean'], 2)} [{_fmt(step['min'], 2)}, {_fmt(step['max'], 2)}]",
        )
    return table


def _segments_table(segments: list[dict[str, Any]]) -> Table:
    table = Table(title="homogeneous segments (partial rescaling): log10 score before → after")
    for col in ("#", "from", "to", "params", "hidden free/all", "score"):
        table.add_column(col, overflow="fold")
    for seg in segments:
        table.add_row(
            str(seg["index"]), seg["first_node"], seg["last_node"], f"{seg['parameters']:,}",
            f"{seg['hidden_units_free']:,}/{seg['hidden_units']:,}",
            f"{_log_score_text(seg['log10_score_before'])} → {_log_score_text(seg['log10_score_after'])}",
        )
    return table


#: below this, a log10 score (≥ 0: AM ≥ GM) is rounding noise of a segment whose entries are all equal
_LOG_SCORE_NOISE = 1e-9


def _log_score_text(x: float | None) -> str:
    """A segment's log10 score for the table: rounding noise shown as 0 (the JSON keeps the value)."""
    return "0" if x is not None and abs(x) < _LOG_SCORE_NOISE else _fmt(x, 3)


def _axis(layers: list[dict[str, Any]]) -> tuple[float, float]:
    """The log10 range every bar is drawn on: all layers, before and after."""
    values = [v for row in layers for key in ("log10_g_before", "log10_g_after")
              for v in row[key] if v is not None and math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _bar(triple, axis: tuple[float, float], style: str) -> Text:
    """A ━ segment from min to max with ● at the median, on ``BAR_WIDTH`` cells spanning ``axis``."""
    lo, med, hi = triple
    cells = [" "] * BAR_WIDTH
    if lo is None or hi is None:
        return Text("".join(cells))
    pos = lambda v: min(BAR_WIDTH - 1, max(0, round((v - axis[0]) / (axis[1] - axis[0]) * (BAR_WIDTH - 1))))  # noqa: E731
    for i in range(pos(lo), pos(hi) + 1):
        cells[i] = "━"
    if med is not None:
        cells[pos(med)] = "●"
    return Text("".join(cells), style=style)
