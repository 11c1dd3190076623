"""The two jobs behind the CLI: ``inspect`` and ``rescale``. Format-free: front ends do the I/O."""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .analysis import Analysis, analyze, rescaled_params
from .errors import UnsupportedModelError, UsageError, VerificationError
from .frontends.base import LoadedModel, LoadOptions
from .frontends.safetensors_io import misnamed as safetensors_misnamed
from .frontends.safetensors_io import sniff as sniff_safetensors
from .outputs import Role, StagedOutput, check_outputs, clear_stale_stages, commit_all, sha256
from .report import build_report
from .timing import timed
from .verify import verify

Notify = Callable[[str, dict], None]


def _silent(stage: str, info: dict) -> None:
    pass


@dataclass
class SolveOptions:
    device: str = "auto"
    method: str = "auto"
    tol: float = 1e-3
    max_sweeps: int = 2000


@dataclass
class RescaleOptions:
    force: bool = False
    report_path: Path | None = None  # default: beside the output
    rtol: float | None = None  # default: by parameter dtype
    verify_inputs: int = 3
    seed: int = 0
    distributions: bool = False  # keep ln g (float32) in JobResult.analysis, for --plot's histograms


@dataclass
class JobResult:
    report: dict[str, Any]
    written: list[Path] = field(default_factory=list)
    analysis: Analysis | None = None  # for what the report does not carry (--plot's distributions; rescale:
    # ln g only with RescaleOptions.distributions)


def detect_format(path: Path) -> str:
    """"onnx" or "torch", from the file's content (safetensors, a zip or a pickle is torch; a protobuf is ONNX)."""
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    if sniff_safetensors(path) is not None:  # a safetensors file or a sharded checkpoint's index
        return "torch"
    if zipfile.is_zipfile(path):
        return "torch"
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":  # a pickle protocol header: legacy torch.save
        return "torch"
    why = safetensors_misnamed(path)  # no format matched: a .safetensors name picks the message
    if why is not None:
        raise UsageError(why)
    return "onnx"


def load_model(path: Path, options: LoadOptions) -> LoadedModel:
    try:
        return _load(path, options)
    except UnsupportedModelError as exc:
        from .segments import with_partial_hint

        raise with_partial_hint(exc) from None


def _load(path: Path, options: LoadOptions) -> LoadedModel:
    if detect_format(path) == "torch":
        from .frontends.torch_frontend import load_torch

        return load_torch(path, options)
    from .frontends.onnx_frontend import load_onnx

    return load_onnx(path, options)


def _input_info(model: LoadedModel) -> dict[str, Any]:
    return {"path": str(model.path), "sha256": sha256(model.path), "format": model.format}


def _load_and_analyze(path: Path, load: LoadOptions, solve: SolveOptions, notify: Notify,
                      timings: dict[str, float], path_counts: bool) -> tuple[LoadedModel, Analysis]:
    info = {"path": str(path)}
    if detect_format(path) == "torch" and "torch._dynamo" not in sys.modules:
        # every torch format goes through torch.export, whose first use imports torch._dynamo
        info["detail"] = "first use of torch.export in this process: importing torch._dynamo takes a few seconds"
    notify("load", info)
    with timed(timings, "load"):
        model = load_model(path, load)
    analysis = analyze(model.graph, device=solve.device, method=solve.method, tol=solve.tol,
                       max_sweeps=solve.max_sweeps, progress=notify, path_counts=path_counts)
    timings.update(analysis.timings)
    return model, analysis


def inspect_model(path: Path, load: LoadOptions, solve: SolveOptions, notify: Notify | None = None) -> JobResult:
    timings: dict[str, float] = {}
    model, analysis = _load_and_analyze(path, load, solve, notify or _silent, timings, path_counts=True)
    report = build_report(analysis, input_info=_input_info(model), timings=timings, warnings=model.warnings)
    return JobResult(report, analysis=analysis)


def default_report_path(output: Path) -> Path:
    return output.with_name(output.name + ".pathcond.json")


def file_roles(source: Path, target: Path, report_path: Path) -> tuple[list[Role], list[Role]]:
    """(every file the run will write, every file the input consists of), each with its role, known
    before loading: ONNX external data files are read from the graph, without the tensors; the shards
    of a sharded safetensors checkpoint from its index."""
    inputs: list[Role] = [("the input", source)]
    outputs: list[Role] = [("the output", target)]
    if detect_format(source) == "onnx":
        from .frontends.onnx_frontend import data_file_for, external_data_files

        data = external_data_files(source)
        inputs += [("the input's external data file", p) for p in data]
        if data:
            outputs.append(("the output's external data file", data_file_for(target)))
    elif sniff_safetensors(source) == "index":
        from .frontends.safetensors_io import shard_roles

        shards_out, shards_in = shard_roles(source, target)
        inputs += shards_in
        outputs += shards_out
    outputs.append(("the report", report_path))
    return outputs, inputs


def _narrow_log_g(analysis: Analysis, keep: bool) -> None:
    """Once the solve and the layers table are done, ln g (usually the largest thing held: VGG-16, 1.1 GB
    of float64) only feeds ``--plot``'s histograms of log10 g and a partial model's segment scores: it
    goes (``stats.log_g`` is None) unless ``keep`` or a partial model, else it is kept in float32, tensor
    by tensor, so each float64 copy goes as its float32 one is made. The write and verify stages start
    without it, or with half of it."""
    if not keep and analysis.source_graph is None:
        analysis.stats.log_g = None  # type: ignore[assignment]
        return
    log_g = analysis.stats.log_g
    for i, value in enumerate(log_g):
        if value.dtype == torch.float64:
            log_g[i] = value.to(torch.float32)
            del value


def rescale_model(
    source: Path, target: Path, load: LoadOptions, solve: SolveOptions, options: RescaleOptions,
    notify: Notify | None = None,
) -> JobResult:
    """Load, solve, write to a staged file, verify, then move into place with the report.

    Nothing is left behind on failure, the input is never written, and no file that was not there at
    the start (or without ``force``, none at all) is replaced.
    """
    notify = notify or _silent
    report_path = options.report_path or default_report_path(target)
    outputs, inputs = file_roles(source, target, report_path)
    check_outputs(outputs, inputs=inputs, force=options.force)
    warnings = [m for path in (target, report_path) for m in clear_stale_stages(path)]
    for message in warnings:
        notify("warning", {"message": message})
    timings: dict[str, float] = {}
    with StagedOutput(target) as stage, StagedOutput(report_path) as report_stage:  # folders writable?
        # the number of paths and the path-1 norm are left to inspect: they cost two forward passes and
        # a rescaling leaves them unchanged (the report's values are null)
        model, analysis = _load_and_analyze(source, load, solve, notify, timings, path_counts=False)
        _narrow_log_g(analysis, keep=options.distributions)
        notify("write", {"path": str(target)})
        with timed(timings, "write"):
            model.save(rescaled_params(analysis), stage.path)
        notify("verify", {"inputs": options.verify_inputs})
        with timed(timings, "verify"):
            result = verify(model, stage.path, n_inputs=options.verify_inputs, rtol=options.rtol, seed=options.seed)
        output_info = {"path": str(target), "sha256": sha256(stage.path)}
        report = build_report(analysis, input_info=_input_info(model), output_info=output_info,
                              verification=result, timings=timings, warnings=model.warnings + warnings)
        if not result.passed:
            raise VerificationError(
                f"the rescaled model differs from the original: max relative error {result.max_rel_error:.3g} "
                f"> rtol {result.rtol:.3g}; nothing was written",
                report,
            )
        report_stage.path.write_text(json.dumps(report, indent=2) + "\n")
        written = commit_all([stage, report_stage], force=options.force)
        notify("committed", {"paths": [str(p) for p in written]})  # from here, an interrupt keeps the files
    return JobResult(report, written, analysis)
