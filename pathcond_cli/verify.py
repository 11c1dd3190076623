"""Check with the model's own runtime that a rewritten checkpoint computes the same function.

Both files are run on the same seeded random inputs; errors are compared in float64, relative to the
scale of each output (its largest magnitude), as Polygraphy does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .frontends.base import LoadedModel

#: default relative tolerance by the least precise floating dtype among the parameters
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def default_rtol(params: dict[str, torch.Tensor]) -> float:
    rtols = [DEFAULT_RTOL.get(t.dtype, 1e-4) for t in params.values() if t.is_floating_point()]
    return max(rtols, default=1e-4)


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


def random_inputs(model: LoadedModel, seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal for floating inputs; for integer ones (e.g. uint8 images ahead of a
    Cast), uniform over the dtype's range clipped to [-128, 255]; for booleans, fair coin flips."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.input_specs():
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


def _compare(reference: list[np.ndarray], candidate: list[np.ndarray], mode: str) -> list[OutputError]:
    if len(reference) != len(candidate):
        raise AssertionError(f"the rewritten model has {len(candidate)} outputs instead of {len(reference)}")
    errors = []
    for i, (a, b) in enumerate(zip(reference, candidate)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        rel = diff / scale if scale > 0 else diff
        if not np.isfinite(diff):
            rel = diff = float("inf")
        errors.append(OutputError(i, mode, diff, rel))
    return errors


def verify(model: LoadedModel, rewritten: Path, *, n_inputs: int = 3, rtol: float | None = None, seed: int = 0) -> Verification:
    """Run the original and ``rewritten`` on ``n_inputs`` seeded inputs (and in train mode when the
    model has BatchNorm and its runtime has one); pass when every relative error is within ``rtol``."""
    rtol = default_rtol(model.graph.params) if rtol is None else rtol
    errors: list[OutputError] = []
    for k in range(n_inputs):
        feeds = random_inputs(model, seed + k)
        errors += _compare(model.run(model.path, feeds), model.run(rewritten, feeds), "eval")
    if model.has_batchnorm:
        feeds = random_inputs(model, seed + n_inputs, batch=4)
        errors += _compare(model.run(model.path, feeds, train=True), model.run(rewritten, feeds, train=True), "train")
    worst_abs = max((e.max_abs_error for e in errors), default=0.0)
    worst_rel = max((e.max_rel_error for e in errors), default=0.0)
    return Verification(worst_rel <= rtol, rtol, n_inputs, worst_abs, worst_rel, errors)
