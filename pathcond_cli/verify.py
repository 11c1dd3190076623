"""Check with the model's own runtime that a rewritten model computes the same function.

One comparison serves files and live modules: two *runners* (callables from feeds to the list of output
arrays, with a training-mode flag) are run on the same seeded random inputs, with the same random draws
(dropout in training mode), and their outputs compared. Errors are compared in float64, relative to the
scale of each output (its largest magnitude), as Polygraphy does.

For a file the runners are the model's runtime on the original and on the rewritten file
(:func:`verify`); for a live ``nn.Module`` (:mod:`pathcond_cli.api`) they are the module before and after
the new values are copied in, so the reference outputs are computed first (:func:`run_cases`).

Two files can run at once: where the front end allows it (ONNX: onnxruntime draws no torch random numbers
and releases the GIL while it runs) and the model is small enough to be held twice
(:data:`CONCURRENT_MAX_STORED_BYTES`), the original runs in a thread while the rewritten copy runs in
the caller's, each on one core (:class:`ReferenceRuns`). Batch-1 runs of a convolutional net use two
cores poorly (the intra-op threads wait on each other at every op, and much longer when another process
takes a core); two runs side by side use both (ResNet-50 on 2 cores: the verify stage 0.6 s -> 0.5 s
unloaded, more under load).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UsageError
from .frontends.base import InputSpec, LoadedModel

#: one verification input above this size is a shape no run should allocate (a symbolic or mistyped dim)
MAX_INPUT_BYTES = 4 * 2**30

#: a model run: (feeds by input name, training mode) -> its outputs, flattened
Runner = Callable[[Mapping[str, np.ndarray], bool], Sequence[np.ndarray]]

#: default relative tolerance by floating dtype name (the loosest one among those involved is used)
RTOL_BY_DTYPE = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
#: default relative tolerance for the floating dtypes narrower than 16 bits (float8, float6, float4)
RTOL_NARROW_FLOAT = 1.25e-1


def _float_name(dtype: Any) -> str | None:
    """The name of a floating dtype (torch, numpy or ml_dtypes), None for any other dtype."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.") if dtype.is_floating_point else None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    if dt.name in RTOL_BY_DTYPE or np.issubdtype(dt, np.floating):
        return dt.name
    return dt.name if dt.name.startswith(("float8", "float6", "float4")) else None


def default_rtol(dtypes: Iterable[Any]) -> float:
    """The tolerance of the least precise floating dtype among ``dtypes`` (torch or numpy dtypes); 1e-4
    when there is none.

    Callers pass every dtype the check depends on: the dtypes the rewritten values are stored in (they
    are rounded to those) *and* the ones the runtime computes in (its parameters as loaded, its inputs and
    outputs). A float64 state_dict loaded into a float32 module is checked at float32's tolerance; a
    bfloat16 one, at bfloat16's."""
    names = {name for name in map(_float_name, dtypes) if name is not None}
    return max((_rtol_of(name) for name in names), default=1e-4)


def _rtol_of(name: str) -> float:
    if name in RTOL_BY_DTYPE:
        return RTOL_BY_DTYPE[name]
    return RTOL_NARROW_FLOAT if name.startswith(("float8", "float6", "float4")) else RTOL_BY_DTYPE["float32"]


@dataclass
class OutputError:
    output: int
    mode: str  # "eval" or "train"
    max_abs_error: float
    max_rel_error: float


@dataclass
class Verification:
    passed: bool
    rtol: float
    inputs: int
    max_abs_error: float
    max_rel_error: float
    outputs: list[OutputError] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One verification run: its mode, the seed of its inputs and random draws, and its feeds."""

    mode: str  # "eval" or "train"
    seed: int
    feeds: dict[str, np.ndarray]


def random_inputs(source: LoadedModel | Sequence[InputSpec], seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for a model (or its input specs): standard normal for floating inputs; for integer
    ones (e.g. uint8 images ahead of a Cast), uniform over the dtype's range clipped to [-128, 255]; for
    booleans, fair coin flips."""
    specs = source.input_specs() if hasattr(source, "input_specs") else list(source)
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.shape if batch is None else (batch, *spec.shape[1:])
        dtype = np.dtype(spec.dtype)
        if math.prod(shape) * dtype.itemsize > MAX_INPUT_BYTES:
            raise UsageError(f"input {spec.name!r} of shape {'x'.join(map(str, shape))} is too large to verify "
                             f"({math.prod(shape) * dtype.itemsize / 2**30:.3g} GiB per run); give a smaller "
                             "shape with --input-shape")
        if dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            feeds[spec.name] = rng.integers(max(int(info.min), -128), min(int(info.max), 255) + 1, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def verification_cases(specs: Sequence[InputSpec], *, n_inputs: int, seed: int, train: bool) -> list[Case]:
    """``n_inputs`` eval-mode runs at the specs' shapes, plus one training-mode run at batch 4 (batch
    statistics need more than one sample) when ``train``."""
    cases = [Case("eval", seed + k, random_inputs(specs, seed + k)) for k in range(n_inputs)]
    if train:
        cases.append(Case("train", seed + n_inputs, random_inputs(specs, seed + n_inputs, batch=4)))
    return cases


@contextmanager
def _same_random_draws(seed: int, cuda_devices: Sequence[int]) -> Iterator[None]:
    """Seed torch's generators (CPU and the given CUDA devices) for one run and give the caller's
    state back afterwards: both models then draw the same dropout masks in training mode."""
    with torch.random.fork_rng(devices=list(cuda_devices)):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def run_cases(runner: Runner, cases: Sequence[Case], cuda_devices: Sequence[int] = ()) -> list[list[np.ndarray]]:
    """The runner's outputs on every case, each run with the same random draws for the same case."""
    outputs = []
    for case in cases:
        with _same_random_draws(case.seed, cuda_devices):
            outputs.append([np.asarray(o) for o in runner(case.feeds, case.mode == "train")])
    return outputs


def _compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], mode: str) -> list[OutputError]:
    if len(reference) != len(candidate):
        raise AssertionError(f"the rewritten model has {len(candidate)} outputs instead of {len(reference)}")
    errors = []
    for i, (a, b) in enumerate(zip(reference, candidate)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise AssertionError(f"output {i} of the rewritten model has shape {b.shape} instead of {a.shape}")
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # the same inf or NaN where the original has one
        finite = np.isfinite(a)
        if not bool(np.all(same | finite)):
            errors.append(OutputError(i, mode, float("inf"), float("inf")))
            continue
        a, b = a[finite], b[finite]
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        rel = diff / scale if scale > 0 else diff
        if not np.isfinite(diff):
            rel = diff = float("inf")
        errors.append(OutputError(i, mode, diff, rel))
    return errors


def compare_cases(cases: Sequence[Case], reference: Sequence[Sequence[np.ndarray]],
                  candidate: Sequence[Sequence[np.ndarray]], *, n_inputs: int, rtol: float | None = None,
                  dtypes: Iterable[Any] = ()) -> Verification:
    """Pass when every relative error is within ``rtol`` (default: :func:`default_rtol` of ``dtypes``
    and of the reference outputs' dtypes)."""
    errors: list[OutputError] = []
    for case, a, b in zip(cases, reference, candidate, strict=True):
        errors += _compare(a, b, case.mode)
    if rtol is None:
        rtol = default_rtol([*dtypes, *(np.asarray(o).dtype for outs in reference for o in outs)])
    worst_abs = max((e.max_abs_error for e in errors), default=0.0)
    worst_rel = max((e.max_rel_error for e in errors), default=0.0)
    return Verification(worst_rel <= rtol, rtol, n_inputs, worst_abs, worst_rel, errors)


#: the original and the rewritten file run at once only when the model's stored tensors take at most this
#: many bytes (:func:`_stored_bytes`); above, one after the other, one runtime held at a time. The second
#: runtime costs about twice those bytes (VGG-16, 553 MB: the verify stage's peak 3.4 GB -> 4.4 GB, above
#: every other stage's, for 1 s saved); ResNet-50 (98 MiB) runs at once, its peak up by at most 50 MB of 1.1 GB
CONCURRENT_MAX_STORED_BYTES = 128 * 2**20


class ReferenceRuns:
    """A runner's outputs on every case, computed in a thread started at construction while the caller
    runs something else (the runtime must release the GIL while it runs, as onnxruntime does).

    The runs are not wrapped in :func:`_same_random_draws`, whose fork of torch's generators is
    process-wide: only for runners that draw no torch random numbers. :meth:`outputs` waits and re-raises
    what the runs raised; :meth:`close` (also on leaving a ``with`` block, however it is left) skips the
    cases not started and joins the thread, so that none outlives its caller. ``after`` is called in the
    thread once the runs are done (to free what the runner holds there)."""

    def __init__(self, runner: Runner, cases: Sequence[Case], after: Callable[[], None] | None = None):
        self._runner, self._cases, self._after = runner, cases, after
        self._outputs: list[list[np.ndarray]] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pathcond-reference-runs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for case in self._cases:
                if self._stop.is_set():
                    return
                self._outputs.append([np.asarray(o) for o in self._runner(case.feeds, case.mode == "train")])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by outputs()
            self._error = exc
        finally:
            if self._after is not None:
                self._after()

    def outputs(self) -> list[list[np.ndarray]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._outputs

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReferenceRuns:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stored_bytes(model: LoadedModel) -> int:
    """What the runtime loads: ``model.stored_bytes`` where the front end counts it (every stored tensor,
    parameters or not: opaque layers' weights with ``--partial``), else the parameters' bytes."""
    stored = getattr(model, "stored_bytes", None)
    return stored if stored is not None else sum(t.numel() * t.element_size() for t in model.graph.params.values())


def runs_concurrently(model: LoadedModel) -> bool:
    """Whether :func:`verify` runs the original and the rewritten file at once (see the module docstring)."""
    return bool(getattr(model, "concurrent_runs", False)) and _stored_bytes(model) <= CONCURRENT_MAX_STORED_BYTES


def _run_both(model: LoadedModel, rewritten: Path, cases: Sequence[Case]) -> tuple[list, list]:
    """(the original's outputs, the rewritten file's) on every case."""
    if not runs_concurrently(model):  # every reference run first (the front end then frees its runtime)
        before = run_cases(lambda feeds, train: model.run(model.path, feeds, train=train), cases)
        return before, run_cases(lambda feeds, train: model.run(rewritten, feeds, train=train), cases)
    load_runtime = getattr(model, "load_runtime", None)
    if load_runtime is not None:  # imported here, not by both threads at once (a Ctrl-C in one of them
        load_runtime()  # would leave the other a half-imported module to blame on the input)
    with ReferenceRuns(lambda feeds, train: model.run(model.path, feeds, train=train, threads=1), cases,
                       after=getattr(model, "release_runtime", None)) as reference:
        try:
            after = [[np.asarray(o) for o in model.run(rewritten, c.feeds, train=c.mode == "train", threads=1)]
                     for c in cases]
        except Exception:
            reference.outputs()  # the original's failure first: why the input cannot be verified against
            raise
        return reference.outputs(), after


def verify(model: LoadedModel, rewritten: Path, *, n_inputs: int = 3, rtol: float | None = None, seed: int = 0) -> Verification:
    """Run the original and ``rewritten`` on ``n_inputs`` seeded inputs (and in train mode when the
    model has BatchNorm and its runtime has one); pass when every relative error is within ``rtol``.

    The default tolerance is that of the least precise dtype among the stored parameters (the new values
    are rounded to them) and the dtypes the runtime computes in (``model.runtime_dtypes`` where the front
    end knows them, and the outputs' dtypes). The two files may run at once (:func:`runs_concurrently`);
    when the original cannot be run its error is raised, whatever the rewritten file did."""
    dtypes = [t.dtype for t in model.graph.params.values()] + list(getattr(model, "runtime_dtypes", ()))
    cases = verification_cases(model.input_specs(), n_inputs=n_inputs, seed=seed, train=model.has_batchnorm)
    before, after = _run_both(model, rewritten, cases)
    return compare_cases(cases, before, after, n_inputs=n_inputs, rtol=rtol, dtypes=dtypes)
