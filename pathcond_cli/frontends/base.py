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

import numpy as np
import torch

from ..ir import Graph


@dataclass(frozen=True)
class InputSpec:
    """One model input as the model's own runtime wants it (full shape, batch included)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class LoadOptions:
    """Options every front end understands (unused ones are ignored)."""

    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # NAME -> full shape
    arch: str | None = None  # torch state_dict: "package.module:factory"
    arch_kwargs: Mapping[str, object] = field(default_factory=dict)
    key: str | None = None  # torch checkpoint dict: where the state_dict is
    trust_pickle: bool = False  # torch: allow loading a pickled nn.Module


class LoadedModel(Protocol):
    """A model read from a file, ready to be analysed, rewritten and run."""

    format: str  # "onnx", "torch-state-dict", "torch-export", "torchscript", "torch-module"
    path: Path
    graph: Graph  # parameters as stored (their own dtype)
    warnings: list[str]  # things the user should know (printed, and kept in the report)

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
