"""The report: one structure, serialised to JSON (with a schema version) and rendered with Rich."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from .analysis import Analysis
from .verify import Verification

SCHEMA_VERSION = 1
LN10 = math.log(10.0)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _score(log_score: float) -> float | None:
    return _finite(math.exp(log_score)) if log_score < 700 else None


def verdict(analysis: Analysis) -> str:
    """One line on whether rescaling is likely to matter for this model (MATH §8)."""
    sol = analysis.solution
    if analysis.groups.n_free - len(sol.degenerate) == 0:
        return "Nothing to rescale: every group is pinned."
    line = _gain_line(sol.log_score_before, sol.log_score_after, sol.max_abs_log_scale)
    if sol.bounds_active:
        line += (
            f" Bounds were active: the best rescaling would take parameters outside their storage dtype's range, so "
            f"{sol.bounded_groups} group(s) stop at a bound that keeps every rescaled parameter finite and normal; "
            "the score is the best reachable within these bounds."
        )
    return line


def _gain_line(log_before: float, log_after: float, biggest: float) -> str:
    gain = (log_before - log_after) / LN10
    if gain >= 0.1 or biggest >= math.log(2.0):
        scale = f"{math.exp(biggest):.3g}x" if biggest < 700 else f"e^{biggest:.4g}"
        return (
            f"PathCond is likely to matter: the conditioning score drops {_times(gain)} and some units are "
            f"rescaled by up to {scale}."
        )
    if gain < 0.01 and biggest < 0.1:
        return "PathCond is unlikely to matter: the diagonal of the path kernel is already nearly constant."
    return f"PathCond may matter a little: the conditioning score drops {_times(gain)}."


def _times(log10_factor: float) -> str:
    """10^x as "123x", or "10^456x" where the float would overflow."""
    return f"{10 ** log10_factor:.3g}x" if log10_factor < 300 else f"10^{log10_factor:.4g}x"


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
        "pinned": [asdict(p) for p in analysis.pinned],
        "layers": [asdict(row) for row in analysis.layers],
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
        ("log10 number of paths", _fmt(model["log10_paths"])),
        ("log10 path-1 norm / path-2 norm", f"{_fmt(model['log10_path1_norm'])} / {_fmt(model['log10_path2_norm'])}"),
        ("width ratio (max/min)", _fmt(model["width_ratio"])),
        ("conditioning score (AM/GM of diag G)", f"{_fmt(cond['score_before'])} → {_fmt(cond['score_after'])}"),
        ("largest |ln λ|", _fmt(cond["max_abs_log_scale"])),
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


def _layers_table(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="layers: log10 diag(G) as min median max")
    table.add_column("node", overflow="fold")
    table.add_column("op")
    for col in ("width", "params", "before", "after", "mean ln λ"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in layers:
        triple = lambda t: " ".join("-" if v is None else f"{v:.2f}" for v in t)  # noqa: E731
        table.add_row(
            row["node"], row["op"], str(row["width"]), f"{row['params']:,}",
            triple(row["log10_g_before"]), triple(row["log10_g_after"]), f"{row['mean_log_scale']:.3g}",
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
            f"{_fmt(seg['log10_score_before'], 3)} → {_fmt(seg['log10_score_after'], 3)}",
        )
    return table
