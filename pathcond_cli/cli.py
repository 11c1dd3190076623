"""The ``pathcond`` command line: thin wrappers around :mod:`pathcond_cli.jobs`.

Heavy modules (torch, onnx) are imported inside the commands so that ``pathcond --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, PathcondError, Terminated,
                     UnsupportedModelError, UsageError, VerificationError)

if TYPE_CHECKING:  # imported inside the commands: torch comes with them
    from .frontends.base import LoadOptions
    from .jobs import SolveOptions

EXIT_CODES = """Exit codes: 0 ok · 1 verification failed (nothing written) · 2 usage error or unreadable input ·
3 unsupported model (not a ReLU network, or an op pathcond does not know; --partial rescales around such
ops) · 4 internal error (a bug in pathcond; nothing written) · 130 interrupted (Ctrl-C / SIGINT; nothing
written) · 143 terminated (SIGTERM; nothing written)."""

INTERRUPTED = "interrupted; nothing was written"
TERMINATED = "terminated; nothing was written"

app = typer.Typer(
    name="pathcond",
    help="Rescale ReLU networks (ONNX, PyTorch) to condition their path kernel, without changing what they "
    "compute (PathCond, Lebeurrier, Vayer & Gribonval 2026).",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# -- reusable options ------------------------------------------------------------------------------
class SolverMethod(str, Enum):
    """--solver: an enum, so that the help lists the choices and the parser refuses others (exit 2)."""

    auto = "auto"
    bcd = "bcd"
    sequential = "sequential"
    lbfgs = "lbfgs"


DEVICE_CHOICES = "<auto|cpu|cuda|cuda:N>"


def parse_device(value: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (N a GPU index), checked by the parser (a usage error, exit 2)
    so that no torch device string reaches the job malformed. Whether that GPU exists is the job's check
    (:func:`pathcond_cli.analysis.resolve_device`): it needs torch, which --help must not import."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0).")


InputShape = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", metavar="[NAME=]1x3x224x224",
                 help="Full shape of an input: NAME=SHAPE, repeatable, or just SHAPE for a model with one input. "
                      "Needed for dynamic dimensions other than the batch, and for PyTorch state_dicts / "
                      "TorchScript."),
]
Arch = Annotated[Optional[str], typer.Option(metavar="PACKAGE.MODULE:FACTORY",
                                             help="PyTorch state_dict or safetensors: an importable callable that builds the nn.Module.")]
ArchKwargs = Annotated[Optional[str], typer.Option(metavar="JSON", help="Keyword arguments for --arch, as a JSON object.")]
Key = Annotated[Optional[str], typer.Option(help="PyTorch checkpoint dict: the entry holding the state_dict "
                                                 "(or, with --trust-pickle, the pickled nn.Module).")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle",
                                           help="Allow loading a pickled nn.Module, alone or inside a checkpoint dict "
                                                "(runs code from the file).")]
Device = Annotated[str, typer.Option(metavar=DEVICE_CHOICES, parser=parse_device,
                                     help="Where to compute the statistics and solve: auto (CUDA when available), "
                                          "cpu, cuda, or cuda:N for GPU N.")]
MaxSweeps = Annotated[int, typer.Option(min=1, help="Cap on solver sweeps.")]
Tol = Annotated[float, typer.Option(help="Optimality tolerance: largest |ln x| of a coordinate step (finite, > 0).")]
Solver = Annotated[SolverMethod, typer.Option(help="auto (layer-ordered sweeps + coarse correction), bcd, "
                                                       "sequential (the slow reference), or lbfgs (BCD + L-BFGS).")]
Layers = Annotated[bool, typer.Option("--layers", help="Also print the per-layer table.")]
Plot = Annotated[Optional[Path], typer.Option("--plot", metavar="FILE.png",
                                              help="Also draw, per layer, the distribution of log10 diag(G) before "
                                                   "and after and the relative SGD step factors, into this PNG "
                                                   "(needs matplotlib: pip install \"pathcond\\[plot]\").")]
Json = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout, nothing else.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display and no tables.")]
Partial = Annotated[bool, typer.Option("--partial", help="Keep ops that are not positively homogeneous (LayerNorm, "
                                       "attention, GELU, Sigmoid, ReLU6, unknown ops) unchanged as opaque, and "
                                       "rescale the ReLU segments between them.")]


@dataclass(frozen=True)
class ModelOptions:
    """How to load the model and solve: the options both commands share, each declared once here (its
    field's type is its command-line option, its default the option's) and handed over as one object."""

    input_shape: InputShape = None
    arch: Arch = None
    arch_kwargs: ArchKwargs = None
    key: Key = None
    trust_pickle: TrustPickle = False
    device: Device = "auto"
    max_sweeps: MaxSweeps = 2000
    tol: Tol = 1e-3
    solver: Solver = SolverMethod.auto
    partial: Partial = False

    def checked(self) -> tuple[LoadOptions, SolveOptions]:
        """The job's load and solve options; what the parser cannot check (tolerance, JSON, shapes) is a
        :class:`UsageError` here."""
        from .frontends.base import LoadOptions
        from .jobs import SolveOptions

        check_tolerances(self.tol)
        try:
            kwargs = json.loads(self.arch_kwargs) if self.arch_kwargs else {}
        except json.JSONDecodeError as exc:
            raise UsageError(f"--arch-kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"width\": 64}'")
        load = LoadOptions(input_shapes=parse_input_shapes(self.input_shape), arch=self.arch, arch_kwargs=kwargs,
                           key=self.key, trust_pickle=self.trust_pickle, partial=self.partial)
        solve = SolveOptions(device=self.device, method=SolverMethod(self.solver).value, tol=self.tol,
                             max_sweeps=self.max_sweeps)
        return load, solve


@dataclass(frozen=True)
class DisplayOptions:
    """What the commands print: the tables, JSON, or nothing."""

    layers: Layers = False
    plot: Plot = None
    as_json: Json = False
    quiet: Quiet = False


OPTION_GROUPS = (ModelOptions, DisplayOptions)


def option_groups(command: Callable[..., None]) -> Callable[..., None]:
    """Let a command take an option group (:data:`OPTION_GROUPS`) as one parameter.

    Typer reads the options off the function's signature, so the wrapper shows Typer each group's fields
    in the group's place (their annotated types and defaults), and calls the command with the group built
    from them."""
    hints = typing.get_type_hints(command, include_extras=True)
    params: list[Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for param in signature(command).parameters.values():
        kind = hints[param.name]
        if kind in OPTION_GROUPS:
            field_hints = typing.get_type_hints(kind, include_extras=True)
            fields = dataclasses.fields(kind)
            groups[param.name] = (kind, [f.name for f in fields])
            params += [Parameter(f.name, Parameter.KEYWORD_ONLY, default=f.default, annotation=field_hints[f.name])
                       for f in fields]
        else:
            params.append(param.replace(kind=Parameter.KEYWORD_ONLY, annotation=kind))
    names = [p.name for p in params]
    assert len(names) == len(set(names)), f"an option group repeats a parameter of {command.__name__}: {names}"

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        for name, (kind, fields) in groups.items():
            kwargs[name] = kind(**{f: kwargs.pop(f) for f in fields})
        command(**kwargs)

    wrapper.__signature__ = Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


class Output:
    """Where messages go: tables and progress on stderr/stdout for people, one JSON document for scripts."""

    def __init__(self, *, as_json: bool, quiet: bool):
        self.as_json, self.quiet = as_json, quiet
        self.out = Console()
        if not self.out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
            self.out = Console(width=140)
        self.out.on_broken_pipe = _silence_stdout  # rich's own handler exits 1: "verification failed"
        self.err = Console(stderr=True)
        self.written: list[str] = []  # files the job has moved into place (what an interrupt keeps)

    def warn(self, message: str) -> None:
        """A warning the user should see now (it is in the report too); stderr, so --json stays clean."""
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)  # whole paths

    @contextmanager
    def progress(self):
        """A status line on stderr that follows the job's stages (silent for --json / --quiet), and the
        job's early warnings."""
        if self.as_json or self.quiet or not self.err.is_terminal:
            def quiet_notify(stage: str, info: dict) -> None:
                if stage == "warning":
                    self.warn(info["message"])
                elif stage == "committed":
                    self.written = info["paths"]
            yield quiet_notify
            return
        labels = {"load": "loading model", "groups": "finding rescaling groups", "statistics": "path statistics",
                  "solve": "solving", "layers": "per-layer figures", "write": "writing output",
                  "verify": "verifying with the model's runtime"}
        with self.err.status("starting") as status:
            def notify(stage: str, info: dict) -> None:
                if stage == "warning":
                    self.warn(info["message"])
                elif stage == "committed":
                    self.written = info["paths"]
                elif stage == "sweep":
                    status.update(f"solving: sweep {info['sweep']}, largest |ln x| {info['gap']:.2e}")
                else:
                    detail = f" ({info['detail']})" if info.get("detail") else ""
                    status.update(labels.get(stage, stage) + detail)
            yield notify

    def report(self, report: dict[str, Any], *, layers: bool) -> None:
        with _stdout_may_close():
            if self.as_json:
                print(json.dumps(report, indent=2))
            elif not self.quiet:
                from .report import render

                render(report, self.out, layers=layers)

    def internal_error(self, exc: Exception, trace: str) -> None:
        self.err.print(trace, markup=False, highlight=False, end="")
        self.err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        self.err.print("This is a bug in pathcond, not in your model or options; nothing was written. Please "
                       "report it with the traceback above.")
        if self.as_json:
            with _stdout_may_close():
                print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc),
                                            "exit_code": EXIT_INTERNAL}}, indent=2))

    def error(self, exc: PathcondError) -> None:
        self.err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # paths stay whole
        if isinstance(exc, UnsupportedModelError) and exc.offenders:
            table = Table(title="nodes that keep this model from being a ReLU network")
            for col in ("node", "op", "why"):
                table.add_column(col)
            for o in exc.offenders:
                table.add_row(o.node, o.op, o.why)
            self.err.print(table)
        if self.as_json:
            payload: dict[str, Any] = {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}}
            if isinstance(exc, UnsupportedModelError):
                payload["error"]["offenders"] = [vars(o) for o in exc.offenders]
            if isinstance(exc, VerificationError) and exc.report is not None:
                payload["report"] = exc.report
            with _stdout_may_close():
                print(json.dumps(payload, indent=2))


def _run(output: Output, job: Callable[[], Any]) -> Any:
    """The one place where user errors become messages and exit codes.

    Library warnings (torch.export and exporter internals) are not actionable for users and are hidden;
    what pathcond itself wants to say goes into the report's ``warnings``."""
    disabled = logging.root.manager.disable
    try:
        with warnings.catch_warnings():
            for category in (UserWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            # torch logs from inside export and archive loading (file-name checks, fake-tensor traces of
            # failures that pathcond reports itself); they are not addressed to pathcond's users, and
            # torch's child loggers carry their own levels, so logging is switched off for the job
            logging.disable(logging.CRITICAL)
            return job()
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - sorted below
        _exit_for(output, exc)
    finally:
        logging.disable(disabled)


def _exit_for(output: Output, exc: BaseException) -> None:
    """Say what ``exc`` means to the user and exit with its code. An error raised *by* an interrupt (Ctrl-C
    landing in an extension module's import turns into ImportError, which a front end may wrap in turn)
    is the interrupt."""
    cause: BaseException | None = exc
    seen = set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, KeyboardInterrupt):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        exc = cause
    if isinstance(exc, PathcondError):
        output.error(exc)
        raise typer.Exit(exc.exit_code) from None
    if isinstance(exc, KeyboardInterrupt):  # staged files were removed on the way out, committed ones taken back
        terminated = isinstance(exc, Terminated)
        message = ((TERMINATED if terminated else INTERRUPTED) if not output.written else
                   f"{'terminated' if terminated else 'interrupted'}; already written: {', '.join(output.written)}")
        output.err.print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
    # a bug: say so, keep the traceback, and exit with its own code
    output.internal_error(exc, "".join(traceback.format_exception(exc)))
    raise typer.Exit(EXIT_INTERNAL) from None


def parse_input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """NAME=SHAPE items by name; a lone SHAPE (for a model with one input, whose name a user of a
    state_dict cannot know) under :data:`UNNAMED`, which the front ends give to the model's only input."""
    from .frontends.base import UNNAMED

    shapes: dict[str, tuple[int, ...]] = {}
    for item in values or []:
        name, sep, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if (sep and not name) or not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape {item!r}: expected NAME=1x3x224x224 or 1x3x224x224 (positive integers "
                             "joined by 'x')")
        shapes[name if sep else UNNAMED] = shape
    if UNNAMED in shapes and len(values or []) > 1:
        raise UsageError("--input-shape without a name is for a model with one input: with several shapes, "
                         "give each as NAME=SHAPE")
    return shapes


def check_tolerances(tol: float, rtol: float | None = None) -> None:
    """Tolerances the solver and the verification can use: a NaN or infinite one would pass anything,
    and a zero optimality tolerance would never be met."""
    if not (math.isfinite(tol) and tol > 0):
        raise UsageError(f"--tol {tol}: give a finite number > 0 (e.g. 1e-3)")
    if rtol is not None and not (math.isfinite(rtol) and rtol >= 0):
        raise UsageError(f"--rtol {rtol}: give a finite number >= 0 (e.g. 1e-4)")


@app.command(epilog=EXIT_CODES)
@option_groups
def inspect(
    model: Annotated[Path, typer.Argument(help="An ONNX model, a PyTorch checkpoint, or a safetensors file (or sharded index).", show_default=False)],
    *,
    options: ModelOptions,
    display: DisplayOptions,
) -> None:
    """Path and width diagnostics: groups, paths, path norms, diag(G) spread, and the conditioning score
    before and after the optimal rescaling. Writes nothing."""
    output = Output(as_json=display.as_json, quiet=display.quiet)

    def job():
        if display.plot:
            _check_plot(display.plot, model)
        from .jobs import inspect_model

        load, solve = options.checked()
        with output.progress() as notify:
            result = inspect_model(model, load, solve, notify)
        if display.plot:
            _write_plot(result, display.plot)
        return result

    result = _run(output, job)
    output.report(result.report, layers=display.layers)


@app.command(epilog=EXIT_CODES)
@option_groups
def rescale(
    source: Annotated[Path, typer.Argument(metavar="IN", help="An ONNX model, a PyTorch checkpoint, or a safetensors file (or sharded index).", show_default=False)],
    target: Annotated[Path, typer.Argument(metavar="OUT", help="Where to write the rescaled model (same format).", show_default=False)],
    *,
    options: ModelOptions,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT, its external-data file and its report if they exist.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Where to write the JSON report (default: OUT.pathcond.json beside OUT).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Verification tolerance, relative to each output's scale (default: that of the least precise dtype stored or computed in: 1e-9 float64, 1e-4 float32, 2e-2 float16, 5e-2 bfloat16).")] = None,
    verify_inputs: Annotated[int, typer.Option(min=1, help="How many seeded random inputs to verify on.")] = 3,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the verification inputs (>= 0).")] = 0,
    display: DisplayOptions,
) -> None:
    """Write a function-equivalent copy of IN with the PathCond rescaling applied, verified with the model's
    own runtime (onnxruntime / torch) before it is moved into place, and a JSON report beside it."""
    output = Output(as_json=display.as_json, quiet=display.quiet)

    def job():
        if display.plot:
            _check_plot(display.plot, source, target=target, report=report, force=force)
        from .jobs import RescaleOptions, rescale_model

        load, solve = options.checked()
        check_tolerances(options.tol, rtol)
        how = RescaleOptions(force=force, report_path=report, rtol=rtol, verify_inputs=verify_inputs, seed=seed,
                             distributions=bool(display.plot))
        with output.progress() as notify:
            result = rescale_model(source, target, load, solve, how, notify)
        if display.plot:
            _write_plot(result, display.plot, written=True)
        return result

    result = _run(output, job)
    output.report(result.report, layers=display.layers)


def _check_plot(plot: Path, source: Path, *, target: Path | None = None, report: Path | None = None,
                force: bool = True) -> None:
    """--plot, before any work: matplotlib importable, a .png name, no clash with the input's files (nor,
    for rescale, with its outputs; an existing PNG is replaced only with --force there, while inspect,
    which writes nothing else, replaces it)."""
    from .outputs import check_outputs
    from .plot import check_plot_path, require_matplotlib

    require_matplotlib()
    check_plot_path(plot)
    from .jobs import default_report_path, file_roles

    if target is None:  # inspect: only the input's files matter (file_roles' outputs are not used)
        _, inputs = file_roles(source, plot, plot)
        check_outputs([("the plot", plot)], inputs=inputs, force=True)
        return
    outputs, inputs = file_roles(source, target, report or default_report_path(target))
    check_outputs(outputs + [("the plot", plot)], inputs=inputs, force=force)


def _write_plot(result: Any, plot: Path, *, written: bool = False) -> None:
    from .plot import write_plot

    cond = result.report["conditioning"]
    title = (f"pathcond — {result.report['input']['path']}: conditioning score {cond['score_before']:.3g} → "
             f"{cond['score_after']:.3g}" if cond["score_before"] is not None and cond["score_after"] is not None
             else f"pathcond — {result.report['input']['path']}")
    try:
        write_plot(result.analysis, plot, title)
    except OSError as exc:
        done = "the rescaled model and its report were written, but " if written else ""
        raise UsageError(f"{done}the plot {plot} could not be written: {exc}") from None


def _version(value: bool) -> None:
    if value:
        print(f"pathcond {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """The ``pathcond`` program. It ends with :func:`_leave`: by then every file is closed and committed
    or removed, and the interpreter's teardown (freeing every tensor, torch's own exit hooks) would only
    add a quarter of a second or more to every run."""
    signal.signal(signal.SIGTERM, _terminate)  # cleaned up like Ctrl-C, exit 143
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    except Terminated:
        _say(TERMINATED)
        code = EXIT_TERMINATED
    except KeyboardInterrupt:  # outside a job (typer exits 130 silently inside its own parsing)
        _say(INTERRUPTED)
        code = EXIT_INTERRUPTED
    _leave(code)


def _leave(code: int | str | None) -> None:
    """Exit with ``code`` as ``sys.exit`` would (None is 0, a message goes to stderr and is 1), after
    flushing the standard streams and logging, but without the interpreter's teardown."""
    if not isinstance(code, int):
        if code is not None:
            _say(str(code))
        code = 0 if code is None else 1
    try:
        logging.shutdown()
    except Exception:  # noqa: BLE001 - a handler on a closed stream: nothing left to say there
        pass
    for stream in (sys.stdout, sys.stderr):  # None when the program was started with it closed
        try:
            if stream is not None:
                stream.flush()
        except (BrokenPipeError, ValueError):  # the reader left: the exit status still says how it went
            pass
        except OSError as exc:  # a full disk: what was asked for is lost
            if code == 0:
                _say(f"error: could not write the output: {exc}")
                code = EXIT_USAGE
    os._exit(code)


def _say(line: str) -> None:
    try:
        if sys.stderr is not None:
            print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """The reader of stdout left: what is still to be written (and the final flush) goes to /dev/null."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


@contextmanager
def _stdout_may_close() -> Iterator[None]:
    """A reader that leaves early (``pathcond inspect --json | head``) silences the rest of the output
    instead of turning a finished job into exit 1; any other failure to write it is exit 2, said on stderr."""
    try:
        yield
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        _say(f"error: could not write the output: {exc}")
        raise typer.Exit(EXIT_USAGE) from None


if __name__ == "__main__":  # pragma: no cover
    main()
