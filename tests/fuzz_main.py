"""Fuzz pathcond end to end on random ReLU DAGs: ``make fuzz N=500 SEED0=0``.

For every seed: draw a net (``tests/fuzz_nets.py``), export it with the seed's exporter (TorchScript ONNX,
dynamo ONNX, ``torch.export``), run ``pathcond rescale IN OUT --json`` and ``pathcond inspect IN --json`` as a
user would (Typer's runner, in-process), and check, independently of pathcond's own verification:

- exit codes are 0 (the nets are supported ReLU networks: a refusal or an internal error is a finding);
- IN and OUT compute the same function under our own onnxruntime / torch run on fresh inputs, within a
  tolerance of 1e-4 of the output's scale, or of 50x the float32 noise of the exported model itself
  against a float64 run of the module (deep chains lose digits before any rescaling);
- the conditioning score does not increase; the report is strict JSON with the documented keys; the report
  file equals the JSON printed; the sha256 it gives are those of the files; inspect and rescale agree;
- the input file is byte-identical afterwards.

A case whose export fails, or whose exported model already disagrees with the module, is an exporter
problem, not pathcond's: it is counted as skipped and printed with the reason.

Usage: ``python -m tests.fuzz_main --n 500 --seed0 0 --workers 2``; prints one line per failure (seed,
exporter, features, check, message) and a summary; exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.fuzz_nets import random_net

TOP_KEYS = {"schema_version", "pathcond_version", "input", "model", "conditioning", "verdict", "pinned", "layers",
            "verification", "output", "timings", "device", "warnings"}
NESTED_KEYS = {
    "input": {"path", "sha256", "format"},
    "model": {"parameters", "hidden_units", "groups_free", "groups_pinned", "log10_paths", "log10_path1_norm",
              "log10_path2_norm", "width_ratio"},
    "conditioning": {"objective_before", "objective_after", "score_before", "score_after", "log10_score_before",
                     "log10_score_after", "sweeps", "converged", "max_abs_log_x", "method", "max_abs_log_scale"},
    "verification": {"passed", "max_abs_error", "max_rel_error", "rtol", "inputs", "modes"},
    "output": {"path", "sha256"},
}
PINNED_KEYS = {"node", "reason", "channels"}
RTOL = 1e-4          # of the output's scale, as pathcond's own float32 default
NOISE_FACTOR = 50.0  # allowed multiple of the exported model's own float32 error against float64
EXPORT_FAITHFUL = 1e-3


class CheckFailed(Exception):
    """One check of a case failed: ``check`` names it."""

    def __init__(self, check: str, message: str):
        super().__init__(f"{check}: {message}")
        self.check, self.message = check, message


class ExportSkipped(Exception):
    """The exporter failed or wrote a model that differs from the module: not pathcond's problem."""


@dataclass
class CaseResult:
    seed: int
    exporter: str
    features: dict[str, Any]
    status: str = "ok"                 # ok | fail | skip
    check: str = ""
    message: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        f = self.features
        tags = ",".join(f.get("tags", []))
        return (f"seed={self.seed} exporter={self.exporter} family={f.get('family')} shape={f.get('shape')} "
                f"tags=[{tags}] {self.status.upper()} check={self.check}: {self.message}")


# --------------------------------------------------------------------------------------------------
# Export


def export(model: torch.nn.Module, shape: tuple[int, ...], exporter: str, path: Path, seed: int) -> dict[str, Any]:
    """Write ``model`` with ``exporter``; the export options are drawn from the seed too. Returns them."""
    rng = np.random.default_rng(seed + 99991)
    dynamic = bool(rng.random() < 0.5)
    batch = 2 if dynamic else 1  # torch.export specialises a dynamic dimension traced at size 1
    x = torch.randn((batch,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(seed))
    opts: dict[str, Any] = {"dynamic_batch": dynamic}
    with _quiet():
        if exporter == "onnx-ts":
            opts["opset"] = int(rng.choice([11, 13, 17]))
            opts["constant_folding"] = bool(rng.random() < 0.5)
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opts["opset"],
                              do_constant_folding=opts["constant_folding"], input_names=["input"],
                              output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None)
        elif exporter == "onnx-dynamo":
            opts["optimize"] = bool(rng.random() < 0.5)
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, optimize=opts["optimize"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
        elif exporter == "pt2":
            ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
            torch.export.save(ep, str(path))
        else:
            raise ValueError(exporter)
    return opts


@contextlib.contextmanager
def _quiet():
    """Exporters print diagnostics and warnings: keep the fuzz output to findings."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


# --------------------------------------------------------------------------------------------------
# Our own runs of the files


class Runner:
    """Runs a file with its own runtime on numpy inputs, independently of pathcond."""

    def __init__(self, exporter: str, path: Path):
        self.exporter = exporter
        if exporter == "pt2":
            with _quiet():
                self.module = torch.export.load(str(path)).module()
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.exporter == "pt2":
            with torch.no_grad():
                out = self.module(torch.from_numpy(x))
            return (out[0] if isinstance(out, (tuple, list)) else out).numpy()
        return self.session.run(None, {self.session.get_inputs()[0].name: x})[0]


def _inputs(seed: int, shape: tuple[int, ...], batch: int) -> list[np.ndarray]:
    """Fresh inputs, not pathcond's verification inputs: normal, large and all-positive ones."""
    rng = np.random.default_rng(seed + 31337)
    full = (batch,) + tuple(shape[1:])
    normal = rng.standard_normal(full)
    return [a.astype(np.float32) for a in (normal, rng.standard_normal(full) * 100.0, np.abs(rng.standard_normal(full)))]


@dataclass
class Baseline:
    """IN's outputs under our own run on fresh inputs, and how far they are from a float64 run of the module."""

    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    scales: list[float]
    noise: list[float]     # max |IN - module in float64| per input
    faithful: bool         # the exporter wrote what the module computes (within EXPORT_FAITHFUL)


def baseline(model: torch.nn.Module, shape, exporter: str, src: Path, seed: int, batch: int) -> Baseline:
    """Raises ExportSkipped when our own runtime cannot even run IN (the exporter wrote a broken file)."""
    reference = copy.deepcopy(model).double()
    try:
        run_in = Runner(exporter, src)
        xs = _inputs(seed, shape, batch)
        outs = [run_in(x) for x in xs]
    except Exception as exc:  # noqa: BLE001 - a broken export
        raise ExportSkipped(f"our own runtime cannot run IN: {type(exc).__name__}: {str(exc)[:300]}") from None
    scales, noise, faithful = [], [], True
    for x, a in zip(xs, outs):
        with torch.no_grad():
            want = reference(torch.from_numpy(x).double()).numpy()
        scale = max(float(np.abs(want).max()), 1e-30)
        if a.shape != want.shape or not np.isfinite(a).all():
            faithful, err = False, math.inf
        else:
            err = float(np.abs(a - want).max())
            faithful = faithful and err <= EXPORT_FAITHFUL * scale
        scales.append(scale if faithful else max(float(np.abs(a).max()), 1e-30))
        noise.append(err)
    return Baseline(xs, outs, scales, noise, faithful)


def check_equivalent(base: Baseline, exporter: str, out: Path) -> dict[str, float]:
    """OUT against IN on the baseline's inputs: within RTOL of the output's scale, or NOISE_FACTOR times IN's
    own float32 error (when the export is faithful, so that the error is meaningful)."""
    worst = 0.0
    try:
        run_out = Runner(exporter, out)
        outs = [run_out(x) for x in base.inputs]
    except Exception as exc:  # noqa: BLE001 - pathcond wrote a file its runtime cannot run
        raise CheckFailed("equivalence", f"our own runtime cannot run OUT: {type(exc).__name__}: {exc}"[:600]) from None
    for x, a, b, scale, noise in zip(base.inputs, base.outputs, outs, base.scales, base.noise):
        if b.shape != a.shape:
            raise CheckFailed("equivalence", f"output shape {b.shape} != {a.shape}")
        if not np.isfinite(b).all() and np.isfinite(a).all():
            raise CheckFailed("equivalence", "rescaled model gives non-finite outputs")
        err = float(np.abs(b - a).max())
        tol = max(RTOL * scale, NOISE_FACTOR * noise if base.faithful else 0.0)
        worst = max(worst, err / scale)
        if err > tol:
            raise CheckFailed("equivalence", f"max|OUT-IN| = {err:.3e} > tol {tol:.3e} (output scale {scale:.3e}, "
                                             f"IN's own float32 error {noise:.3e}); input scale {np.abs(x).max():.3g}")
    return {"max_rel_diff": worst}


# --------------------------------------------------------------------------------------------------
# The CLI, as a user runs it


def invoke(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from pathcond_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    stderr = result.stderr if hasattr(result, "stderr") else ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stdout, stderr


def _strict_json(text: str, what: str) -> dict[str, Any]:
    def bad_constant(name: str):
        raise CheckFailed("report-json", f"{what} contains {name}, which is not JSON")

    try:
        return json.loads(text, parse_constant=bad_constant)
    except json.JSONDecodeError as exc:
        raise CheckFailed("report-json", f"{what} is not JSON ({exc}): {text[:300]!r}") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_text(stdout: str, stderr: str) -> str:
    try:
        err = json.loads(stdout).get("error", {})
        msg = f"{err.get('type')}: {err.get('message')}"
        if err.get("offenders"):
            msg += f" offenders={[(o.get('op'), o.get('why')) for o in err['offenders']][:4]}"
        return msg
    except (json.JSONDecodeError, AttributeError):
        tail = [line for line in (stderr or stdout).strip().splitlines() if line.strip()]
        return " | ".join(tail[-3:])[:600]


def check_keys(report: dict[str, Any], command: str) -> None:
    missing = TOP_KEYS - set(report)
    if missing:
        raise CheckFailed("report-keys", f"{command}: missing {sorted(missing)}")
    for key, wanted in NESTED_KEYS.items():
        value = report[key]
        if value is None and command == "inspect" and key in ("verification", "output"):
            continue
        if not isinstance(value, dict) or wanted - set(value):
            have = set(value) if isinstance(value, dict) else value
            raise CheckFailed("report-keys", f"{command}: {key} lacks {sorted(wanted - set(have or ()))}")
    if command == "inspect" and (report["verification"] is not None or report["output"] is not None):
        raise CheckFailed("report-keys", "inspect: verification/output should be null")
    for item in report["pinned"]:
        if PINNED_KEYS - set(item):
            raise CheckFailed("report-keys", f"{command}: pinned entry lacks {sorted(PINNED_KEYS - set(item))}")


def _json_report(command: str, src: Path, before: bytes, *paths: Path) -> dict[str, Any]:
    """Run ``pathcond COMMAND SRC [PATHS] --json`` and check what every command owes: the input unchanged,
    exit 0 (``exit-N`` for rescale, ``inspect-exit-N``), strict JSON with every documented key, a score
    that did not rise."""
    code, stdout, stderr = invoke(command, src, *paths, "--json", "--device", "cpu")
    if src.read_bytes() != before:
        raise CheckFailed("input-unchanged", f"{command} modified its input file")
    if code != 0:
        raise CheckFailed(f"exit-{code}" if command == "rescale" else f"{command}-exit-{code}", _error_text(stdout, stderr))
    report = _strict_json(stdout, f"{command} --json stdout")
    check_keys(report, command)
    check_score(report["conditioning"], command)
    return report


def check_score(cond: dict[str, Any], command: str) -> None:
    before, after = cond["log10_score_before"], cond["log10_score_after"]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
        raise CheckFailed("score", f"{command}: log10 scores not finite: {before} -> {after}")
    if after > before + math.log10(1 + 1e-9):
        raise CheckFailed("score", f"{command}: conditioning score increased: log10 {before!r} -> {after!r}")
    for key in ("score_before", "score_after"):
        value = cond[key]
        if value is None and cond["log10_" + key] < 300:
            raise CheckFailed("report-keys", f"{command}: {key} is null with log10 {cond['log10_' + key]}")
    if cond["score_before"] is not None and cond["score_after"] is not None:
        if cond["score_after"] > cond["score_before"] * (1 + 1e-9):
            raise CheckFailed("score", f"{command}: score {cond['score_before']!r} -> {cond['score_after']!r}")


def expected_hidden_units(model: torch.nn.Module) -> int:
    """README: the output channels of every linear/conv layer except those feeding graph outputs (in these
    nets, only the last layer)."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    widths = [m.weight.shape[0] for m in layers]
    return sum(widths) - widths[-1]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def run_case(seed: int, folder: Path) -> CaseResult:
    """Everything for one seed; never raises (a crash of the harness itself is reported as a failure)."""
    t0 = time.perf_counter()
    model, shape, features = random_net(seed)
    exporter = features["exporter"]
    result = CaseResult(seed, exporter, features)
    try:
        result.extra = _run_checks(model, shape, exporter, seed, folder)
    except ExportSkipped as exc:
        result.status, result.check, result.message = "skip", "export", str(exc)
    except CheckFailed as exc:
        result.status, result.check, result.message = "fail", exc.check, exc.message
    except Exception as exc:  # noqa: BLE001 - a harness error or an exception from our own runs
        result.status, result.check = "fail", "harness"
        result.message = f"{type(exc).__name__}: {exc}"[:600]
    result.seconds = time.perf_counter() - t0
    return result


def _run_checks(model, shape, exporter: str, seed: int, folder: Path) -> dict[str, Any]:
    suffix = ".pt2" if exporter == "pt2" else ".onnx"
    src, out = folder / f"in{suffix}", folder / f"out{suffix}"
    try:
        opts = export(model, shape, exporter, src, seed)
    except Exception as exc:  # noqa: BLE001 - depends on the exporter
        raise ExportSkipped(f"export failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    features_opts = {"export": opts}
    before = src.read_bytes()
    batch = 2 if opts["dynamic_batch"] else 1
    try:
        base = baseline(model, shape, exporter, src, seed, batch)
    except ExportSkipped:
        # a file its own runtime cannot run: pathcond may refuse it, but not as an internal error
        code, stdout, stderr = invoke("rescale", src, out, "--json", "--device", "cpu")
        if code == 4:
            raise CheckFailed("exit-4-broken-input", _error_text(stdout, stderr)) from None
        raise
    features_opts["export_faithful"] = base.faithful

    report = _json_report("rescale", src, before, out)
    report_file = Path(str(out) + ".pathcond.json")
    if not report_file.exists() or _strict_json(report_file.read_text(), "report file") != report:
        raise CheckFailed("report-file", "OUT.pathcond.json missing or different from the JSON printed")
    if report["input"]["sha256"] != hashlib.sha256(before).hexdigest():
        raise CheckFailed("report-keys", "input.sha256 is not the input's")
    if not out.exists() or report["output"]["sha256"] != _sha256(out):
        raise CheckFailed("report-keys", "output.sha256 is not the output's")
    if not report["verification"]["passed"]:
        raise CheckFailed("verification", "exit 0 but verification.passed is false")
    if not report["conditioning"]["converged"]:
        cond = report["conditioning"]
        raise CheckFailed("converged", f"solver did not converge: {cond['sweeps']} sweeps, max |ln x| "
                                       f"{cond['max_abs_log_x']!r} ({cond['method']})")
    hidden = expected_hidden_units(model)
    if report["model"]["hidden_units"] != hidden:
        raise CheckFailed("report-values", f"hidden_units {report['model']['hidden_units']} != {hidden} (output "
                                           "channels of every linear/conv layer but the head)")

    info = check_equivalent(base, exporter, out)

    inspected = _json_report("inspect", src, before)
    for key in ("log10_score_before", "log10_score_after"):
        a, b = inspected["conditioning"][key], report["conditioning"][key]
        if _rel(10 ** min(a, 300), 10 ** min(b, 300)) > 1e-6:
            raise CheckFailed("inspect-agrees", f"{key}: inspect {a!r} vs rescale {b!r}")
    info.update(features_opts)
    info["log10_score"] = (report["conditioning"]["log10_score_before"], report["conditioning"]["log10_score_after"])
    return info


# --------------------------------------------------------------------------------------------------
# Driver


def _worker(seed: int) -> CaseResult:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=f"fuzz{seed}-") as tmp:
        return run_case(seed, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=int(os.environ.get("N", 100)))
    parser.add_argument("--seed0", type=int, default=int(os.environ.get("SEED0", 0)))
    parser.add_argument("--workers", type=int, default=1, help="processes (at most 2)")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print passing and skipped cases")
    args = parser.parse_args(argv)
    seeds = range(args.seed0, args.seed0 + args.n)
    workers = max(1, min(args.workers, 2))
    t0 = time.perf_counter()
    results: list[CaseResult] = []
    if workers == 1:
        iterator = map(_worker, seeds)
        pool = None
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=50)
        iterator = pool.imap(_worker, seeds)
    try:
        for r in iterator:
            results.append(r)
            if r.status == "fail" or (args.verbose or r.status == "skip"):
                print(r.line() + (f" ({r.seconds:.1f}s)" if args.verbose else ""), flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    failed = [r for r in results if r.status == "fail"]
    skipped = [r for r in results if r.status == "skip"]
    by_check: dict[str, list[int]] = {}
    for r in failed:
        by_check.setdefault(r.check, []).append(r.seed)
    print(f"fuzz: {len(results)} seeds {args.seed0}..{args.seed0 + args.n - 1}: {len(results) - len(failed) - len(skipped)} ok, "
          f"{len(failed)} failed, {len(skipped)} skipped (exporter), {time.perf_counter() - t0:.0f}s")
    for check, s in sorted(by_check.items()):
        print(f"  {check}: {len(s)} seeds: {' '.join(map(str, s))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
