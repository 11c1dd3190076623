"""Plumbing shared by the tests: one way to export a module to ONNX, one way to draw random inputs, and
session-scoped exported models, so that a model the tests only read is exported once per run.

Files from the session fixtures are shared between tests: read them, write next to ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from pathcond_cli.frontends.base import InputSpec
from pathcond_cli.ir import Graph
from pathcond_cli.verify import random_inputs as _seeded_feeds
from tests import nets

EXPORTERS: dict[str, dict] = {
    # BatchNorm kept (no folding into the convolutions): equal γ/β/statistics shared through Identity
    "torchscript": dict(dynamo=False, do_constant_folding=False),
    "torchscript_preserve": dict(dynamo=False, training=torch.onnx.TrainingMode.PRESERVE),
    "torchscript_inputs": dict(dynamo=False, do_constant_folding=False, keep_initializers_as_inputs=True),
    "dynamo_noopt": dict(dynamo=True, optimize=False, external_data=False),
    # the optimiser folds BatchNorm into the convolutions under the convolutions' names
    "dynamo": dict(dynamo=True, optimize=True, external_data=False),
}
ZOO_EXPORTERS = ["torchscript", "dynamo", "dynamo_noopt"]  # the exporters every tests.nets.ZOO model is tried with


def slow_params(cases: Iterable[Any], is_slow: Callable[[Any], bool]) -> list:
    """``cases`` as parametrize values, those ``is_slow`` picks marked ``slow``: run by `make test-all`
    (and CI), left out of `make test`. A tuple is one case of several arguments; test ids do not change."""
    params = []
    for case in cases:
        if not is_slow(case):
            params.append(case)
        else:
            params.append(pytest.param(*case, marks=pytest.mark.slow) if isinstance(case, tuple)
                          else pytest.param(case, marks=pytest.mark.slow))
    return params


def zoo_cases() -> list:
    """(name, exporter) for every tests.nets.ZOO model and exporter. The dynamo exporters take seconds
    per model: their matrix is slow (`make test` still exports with both in test_onnx_trust)."""
    return slow_params([(name, exporter) for name in sorted(nets.ZOO) for exporter in ZOO_EXPORTERS],
                       lambda case: case[1] != "torchscript")


def export_onnx(module: torch.nn.Module, example: torch.Tensor | Sequence[int], path: Path, exporter: str = "torchscript",
                *, dynamic_batch: bool = False, **kwargs) -> Path:
    """``torch.onnx.export`` of ``module`` as it is (train or eval mode) with one of :data:`EXPORTERS`.

    ``example`` is the input, or its shape (then drawn from ``torch.randn``). ``dynamic_batch`` makes the
    first dimension dynamic; the TorchScript exporter then names the input "input" and the output
    "output". Other keyword arguments go to ``torch.onnx.export`` and win over the exporter's."""
    x = example if isinstance(example, torch.Tensor) else torch.randn(*example)
    options = dict(EXPORTERS[exporter])
    if dynamic_batch and options["dynamo"]:
        options["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic_batch:
        options.update(input_names=["input"], output_names=["output"],
                       dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    options.update(kwargs)
    torch.onnx.export(module, (x,), str(path), **options)
    return Path(path)


def export_zoo(name: str, exporter: str, folder: Path) -> Path:
    """``tests.nets.ZOO[name]`` exported with a dynamic batch and a metadata property (which a rewrite
    must keep), as ``folder/NAME-EXPORTER.onnx``; the test is skipped when the installed exporter cannot."""
    factory, shape = nets.ZOO[name]
    path = folder / f"{name}-{exporter}.onnx"
    try:
        export_onnx(factory(), shape, path, exporter, dynamic_batch=True)
    except Exception as exc:  # pragma: no cover - depends on the installed exporter
        pytest.skip(f"{exporter} export of {name} failed here: {type(exc).__name__}: {exc}")
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"origin": "pathcond-test"})
    onnx.save(proto, str(path))
    return path


def random_inputs(source, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs by name, as numpy arrays: for a loaded model or its :class:`InputSpec` list (each
    input at its shape and dtype), or for an IR :class:`Graph` (float64, at ``graph.inputs``' shapes).
    ``batch`` replaces the first dimension. Floating inputs are standard normal; integer and boolean
    ones are drawn as the verification draws them (:func:`pathcond_cli.verify.random_inputs`)."""
    if isinstance(source, Graph):
        source = [InputSpec(name, tuple(shape), np.dtype(np.float64)) for name, shape in source.inputs.items()]
    return _seeded_feeds(source, seed, batch)


# --------------------------------------------------------------------------------------------------
# Session-scoped models


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory) -> Callable[[str, str], Path]:
    """``zoo_onnx(name, exporter)``: :func:`export_zoo`'s file, exported at the first request only
    (a failed export is skipped again without retrying)."""
    folder = tmp_path_factory.mktemp("zoo-onnx")
    files: dict[tuple[str, str], Path] = {}
    skipped: dict[tuple[str, str], str] = {}

    def get(name: str, exporter: str) -> Path:
        key = (name, exporter)
        if key in skipped:
            pytest.skip(skipped[key])
        if key not in files:
            try:
                files[key] = export_zoo(name, exporter, folder)
            except pytest.skip.Exception as exc:
                skipped[key] = str(exc)
                raise
        return files[key]

    return get


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> Path:
    """An MLP of uneven widths (8-64-4-32-3) exported by TorchScript with a dynamic batch."""
    return export_onnx(nets.mlp(widths=(8, 64, 4, 32, 3)), (1, 8), tmp_path_factory.mktemp("mlp") / "mlp.onnx",
                       dynamic_batch=True)
