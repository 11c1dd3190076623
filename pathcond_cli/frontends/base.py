"""What every front end provides: a loaded model with its IR, a writer and a runner.

A front end turns one container format into a :class:`LoadedModel`. Only front ends import ``onnx``
or build framework graphs; the rest of pathcond sees the IR (:class:`pathcond_cli.ir.Graph`) and the
methods below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import hashlib
import threading

import numpy as np
import torch

from ..errors import UsageError
from ..ir import Graph, Sets


@dataclass(frozen=True)
class InputSpec:
    """One model input as the model's own runtime wants it (full shape, batch included)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


UNNAMED = ""  # the key of an --input-shape given without a name: the shape of the model's only input

def name_lone_shape(shapes: Mapping[str, tuple[int, ...]], names: list[str]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with a shape given without a name (:data:`UNNAMED`) put under the model's only input
    name; a usage error when the model has several inputs (which one would it be?)."""
    given = dict(shapes)
    if UNNAMED not in given:
        return given
    shape = given.pop(UNNAMED)
    if len(names) != 1 or given:
        raise UsageError(f"--input-shape {'x'.join(map(str, shape))} has no name, but the model has "
                         f"{len(names)} inputs ({', '.join(names) or 'none'}): give each as NAME=SHAPE")
    return {names[0]: shape}


@dataclass
class LoadOptions:
    """Options every front end understands (unused ones are ignored)."""

    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # NAME (or UNNAMED) -> full shape
    arch: str | None = None  # torch state_dict: "package.module:factory"
    arch_kwargs: Mapping[str, object] = field(default_factory=dict)
    key: str | None = None  # torch checkpoint dict: where the state_dict is
    trust_pickle: bool = False  # torch: allow loading a pickled nn.Module
    # keep ops that are not positively homogeneous as opaque and rescale the homogeneous segments
    # around them (pathcond_cli.segments) instead of refusing the model
    partial: bool = False


class LoadedModel(Protocol):
    """A model read from a file, ready to be analysed, rewritten and run."""

    format: str  # "onnx", "torch-state-dict", "torch-export", "torchscript", "torch-module", "safetensors"
    path: Path
    graph: Graph  # parameters as stored (their own dtype)
    warnings: list[str]  # things the user should know (printed, and kept in the report)
    # optional: floating dtypes the runtime computes in (torch front ends); verification's default
    # tolerance is that of the least precise of these and the stored parameters' dtypes
    runtime_dtypes: set[torch.dtype]
    # optional: True when run() draws no torch random numbers and may run two files at once from two
    # threads, taking ``threads=`` (how many cores each run may use); verification then runs the original
    # and the rewritten file side by side (pathcond_cli.verify.runs_concurrently) if the model is small
    concurrent_runs: bool
    # optional: the bytes the runtime loads (every stored tensor, parameters or not), for that decision
    stored_bytes: int
    # optional: load_runtime() imports the runtime in the calling thread before the second one starts;
    # release_runtime() frees what the calling thread's runs hold

    def save(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        """Write the same container to ``path`` with only these parameters changed (each cast to
        its stored dtype). Side files (ONNX external data) go beside ``path``, named after it."""

    def input_specs(self) -> list[InputSpec]:
        """The inputs to feed when verifying (dynamic batch -> 1)."""

    def run(self, path: Path, inputs: Mapping[str, np.ndarray], *, train: bool = False) -> list[np.ndarray]:
        """Run the model stored at ``path`` (this one or a rewritten copy) with its own runtime.
        ``train=True`` (torch only, models with BatchNorm) runs in training mode."""

    @property
    def has_batchnorm(self) -> bool:
        """Whether verification should also run in training mode (torch front ends)."""


# -- digests of files whose bytes a front end held ---------------------------------------------------

#: sha256 of files a front end read to parse or serialised to write, keyed by the file's identity
#: (resolved path, mtime, size): the report's digests (:func:`pathcond_cli.outputs.sha256`) do not read
#: such a file a second time.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int]:
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def known_digest(path: Path) -> str | None:
    """The sha256 recorded for this version of the file, or None."""
    try:
        return _DIGESTS.get(_identity(path))
    except OSError:
        return None


class DigestInBackground:
    """The sha256 of bytes already in memory, computed in a thread (hashlib releases the GIL on large
    buffers) while the caller parses or writes them; :meth:`record` files it under the file's identity."""

    def __init__(self, data: bytes):
        self._digest = hashlib.sha256()
        self._thread = threading.Thread(target=self._digest.update, args=(memoryview(data),), daemon=True)
        self._thread.start()

    def record(self, path: Path) -> str:
        """Wait for the digest and remember it for ``path`` as it is now (call once its bytes are on disk)."""
        self._thread.join()
        return record_digest(path, self._digest.hexdigest())


def record_digest(path: Path, value: str) -> str:
    """Remember ``value`` as the sha256 of ``path`` as it is now (its bytes were hashed as they were written)."""
    _DIGESTS[_identity(path)] = value
    return value


class SameLayout(Sets):
    """A front end's values (ONNX names, FX nodes) that share one layout: a token-major value makes
    every value of its set token-major (see ``onnx_tokens`` / ``torch_tokens``)."""

    def token_major(self, seeds: set, products: list) -> set:
        """Every value in the sets of ``seeds``, and of the outputs of ``products`` — (input, output)
        pairs of linear layers, whose output is token-major when their input is — until none is added."""
        seeds = set(seeds)
        while True:
            roots = {self.find(v) for v in seeds}
            new = {out for x, out in products if self.find(x) in roots and self.find(out) not in roots}
            if not new:
                break
            seeds |= new
        roots = {self.find(v) for v in seeds}
        return {v for v in list(self.parent) if self.find(v) in roots} | seeds
