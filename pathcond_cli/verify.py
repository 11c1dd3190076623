"""Check with the model's own runtime that a rewritten model computes the same function.

One comparison serves files and live modules: two *runners* (callables from feeds to the list of output
arrays, with a training-mode flag) are run on the same seeded random inputs, with the same random draws
(dropout in training mode), and their outputs compared. Errors are compared in float64, relative to the
scale of each output (its largest magnitude), as Polygraphy does.

For a file the runners are the model's runtime on the original and on the rewritten file
(:func:`verify`); for a live ``nn.Module`` (:mod:`pathcond_cli.api`) they are the module before and after
the new values are copied in, so the reference outputs are computed first (:func:`run_cases`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .frontends.base import InputSpec, LoadedModel

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


def verify_runners(reference: Runner, candidate: Runner, specs: Sequence[InputSpec], *, n_inputs: int = 3,
                   rtol: float | None = None, seed: int = 0, train: bool = False, dtypes: Iterable[Any] = (),
                   cuda_devices: Sequence[int] = ()) -> Verification:
    """Run both runners on the same cases (every reference run first) and compare them."""
    cases = verification_cases(specs, n_inputs=n_inputs, seed=seed, train=train)
    before = run_cases(reference, cases, cuda_devices)
    after = run_cases(candidate, cases, cuda_devices)
    return compare_cases(cases, before, after, n_inputs=n_inputs, rtol=rtol, dtypes=dtypes)


def verify(model: LoadedModel, rewritten: Path, *, n_inputs: int = 3, rtol: float | None = None, seed: int = 0) -> Verification:
    """Run the original and ``rewritten`` on ``n_inputs`` seeded inputs (and in train mode when the
    model has BatchNorm and its runtime has one); pass when every relative error is within ``rtol``.

    The default tolerance is that of the least precise dtype among the stored parameters (the new values
    are rounded to them) and the dtypes the runtime computes in (``model.runtime_dtypes`` where the front
    end knows them, and the outputs' dtypes)."""
    dtypes = [t.dtype for t in model.graph.params.values()] + list(getattr(model, "runtime_dtypes", ()))
    return verify_runners(
        lambda feeds, train: model.run(model.path, feeds, train=train),
        lambda feeds, train: model.run(rewritten, feeds, train=train),
        model.input_specs(), n_inputs=n_inputs, rtol=rtol, seed=seed, train=model.has_batchnorm, dtypes=dtypes,
    )
