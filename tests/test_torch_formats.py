"""One class per torch file format (issue 10): every format detection can return has its class in the
one lookup table, and a file from each torch writer is loaded by the class the table names for it.

The behavioural reference is torch itself: the module the file was saved from, run on the same input.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathcond_cli.frontends import torch_detect
from pathcond_cli.frontends.base import LoadOptions
from pathcond_cli.frontends.torch_formats import FORMAT_CLASSES, FORMATS, TorchModel
from pathcond_cli.frontends.torch_frontend import load_torch
from tests import nets

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


def _returned_strings(fn) -> set[str]:
    """The string literals ``fn`` returns, read from its source (the format names a detector can give)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {node.value.value for node in ast.walk(tree)
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def test_format_table_covers_every_detected_format():
    """A format the detector can return without a class in FORMAT_CLASSES (or a class nothing detects)
    fails here, not on a user's file."""
    containers = _returned_strings(torch_detect._records_format) | _returned_strings(torch_detect.detect_torch_format)
    assert {"torch-export", "torchscript", "torch-pickle"} <= containers  # the premise: the parse sees them
    detected = (containers - {"torch-pickle"}) | _returned_strings(torch_detect.pickle_format)
    assert not detected - set(FORMAT_CLASSES), f"detected formats without a class: {detected - set(FORMAT_CLASSES)}"
    assert not set(FORMAT_CLASSES) - detected, f"classes no detection leads to: {set(FORMAT_CLASSES) - detected}"
    assert tuple(FORMATS) == tuple(FORMAT_CLASSES)
    for fmt, cls in FORMAT_CLASSES.items():
        assert issubclass(cls, TorchModel) and cls.format == fmt
        for hook in ("_load", "_fresh_module", "_write"):  # each format says how it loads, rebuilds, writes
            assert getattr(cls, hook) is not getattr(TorchModel, hook), f"{cls.__name__} does not define {hook}"


def _write(kind: str, model: nn.Module, path: Path) -> LoadOptions:
    """Save ``model`` the way one torch writer does; the options that file needs."""
    shapes = {"x": (1, 8)}
    arch = LoadOptions(input_shapes=shapes, arch="tests.arch_factories:mlp")
    trust = LoadOptions(input_shapes=shapes, trust_pickle=True)
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "legacy_state_dict":
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    elif kind == "checkpoint":
        torch.save({"model": model.state_dict(), "epoch": 3}, path)
    elif kind == "pickled":
        torch.save(model, path)
        return trust
    elif kind == "pickled_in_dict":
        torch.save({"model": model, "epoch": 3}, path)
        return trust
    elif kind == "script":
        torch.jit.save(torch.jit.script(model), str(path))
        return LoadOptions(input_shapes=shapes)
    elif kind == "export":
        torch.export.save(torch.export.export(model, (torch.randn(1, 8),)), str(path))
        return LoadOptions()
    return arch


KINDS = {"state_dict": "torch-state-dict", "legacy_state_dict": "torch-state-dict", "checkpoint": "torch-state-dict",
         "pickled": "torch-module", "pickled_in_dict": "torch-module", "script": "torchscript",
         "export": "torch-export"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_writer_loads_as_its_class(kind, tmp_path):
    model = nets.mlp().eval()
    path = tmp_path / "model.bin"
    options = _write(kind, model, path)
    loaded = load_torch(path, options)
    assert type(loaded) is FORMAT_CLASSES[KINDS[kind]] and loaded.format == KINDS[kind]
    assert [spec.shape for spec in loaded.input_specs()] == [(1, 8)]
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    (got,) = loaded.run(path, {"x": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["state_dict", "export"])
def test_verification_loads_each_file_once_in_eval_mode(kind, tmp_path, monkeypatch):
    """Verification runs every eval-mode input on one module per file version (as onnxruntime gets one
    session per file); a training-mode run (BatchNorm: its statistics change) gets a module of its own,
    and its outputs still match the saved module's own."""
    from pathcond_cli.verify import verify

    model = nets.small_cnn().eval() if kind == "state_dict" else nets.mlp().eval()
    path = tmp_path / "model.bin"
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
        options = LoadOptions(arch="tests.arch_factories:small_cnn", input_shapes={"x": (1, 3, 16, 16)})
    else:
        options = _write(kind, model, path)
    loaded = load_torch(path, options)
    loads: list[Path] = []
    real = type(loaded)._fresh_module

    def counting(self, p):
        loads.append(Path(p))
        return real(self, p)

    monkeypatch.setattr(type(loaded), "_fresh_module", counting)
    copy = tmp_path / "copy.bin"
    loaded.save({k: v * 1.0 for k, v in loaded.graph.params.items()}, copy)
    result = verify(loaded, copy, n_inputs=3)
    assert result.passed and result.max_abs_error == 0.0
    train = loaded.has_batchnorm
    assert train == (kind == "state_dict")
    assert loads.count(path) == 1 + train and loads.count(copy) == 1 + train
    # a cached module gives what a fresh one gives
    x = np.random.default_rng(0).standard_normal(loaded.input_specs()[0].shape).astype(np.float32)
    (cached,) = loaded.run(path, {loaded.input_specs()[0].name: x})
    with torch.no_grad():
        fresh = loaded._in_mode(real(loaded, path), False)(torch.from_numpy(x))
    np.testing.assert_allclose(cached, fresh.numpy(), rtol=0, atol=0)
