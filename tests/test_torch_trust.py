"""Torch checkpoints nobody here wrote (issue 9): formats told apart by their archive's records, models
running in another dtype than they are stored in, architectures that do not fit, and the Python API
verified like the CLI.

References are independent of pathcond: the files are reloaded with torch.load / torch.jit.load /
torch.export.load and run by torch itself.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import pathcond_cli as pc
from pathcond_cli.cli import app
from pathcond_cli.errors import VerificationError
from pathcond_cli.frontends.torch_frontend import detect_torch_format
from tests import nets

runner = CliRunner()


def invoke(*args) -> tuple[int, str, dict | None]:
    """Run the CLI; (exit code, output, the JSON report on stdout when --json was given and it succeeded)."""
    result = runner.invoke(app, [str(a) for a in args] + ["--device", "cpu"])
    report = json.loads(result.stdout) if "--json" in args and result.exit_code == 0 else None
    return result.exit_code, result.output, report


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    return float((got - want).abs().max() / want.abs().max())


# --------------------------------------------------------------------------------------------------
# A module defined in a package folder named `models` (like torchvision's and most research repos')

MODELS_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    """4 -> 24 -> 3 -> 12 -> 2 with biases: uneven widths, so rescaling changes parameters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a, self.b, self.c, self.d = nn.Linear(4, 24), nn.Linear(24, 3), nn.Linear(3, 12), nn.Linear(12, 2)
        with torch.no_grad():
            for i, layer in enumerate((self.a, self.b, self.c, self.d)):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (3.0 ** i))

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))
'''


@pytest.fixture
def models_package(tmp_path, monkeypatch):
    """``models.net.Net``, importable from a temporary folder; the package is forgotten afterwards."""
    root = tmp_path / "src"
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "net.py").write_text(textwrap.dedent(MODELS_SOURCE))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    for name in ("models", "models.net"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("models.net")
    yield module
    for name in ("models", "models.net"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("how", ["script", "trace", "pickle"])
def test_module_of_a_models_package_is_rescaled(how, models_package, tmp_path):
    """TorchScript keeps the model's code under ``code/__torch__/models/``: still TorchScript. (A pickled
    module names its class ``models.net.Net`` inside data.pkl.)"""
    model = models_package.Net().eval()
    path, out = tmp_path / "net.pt", tmp_path / "out.pt"
    options = ["--input-shape", "x=1x4", "--json"]
    if how == "pickle":
        torch.save(model, path)
        options.append("--trust-pickle")
    else:
        x = torch.randn(1, 4)
        torch.jit.save(torch.jit.script(model) if how == "script" else torch.jit.trace(model, x), str(path))
        with zipfile.ZipFile(path) as zf:  # the premise: the model's code sits under a models/ folder
            assert any("/models/" in n for n in zf.namelist())
    code, output, report = invoke("rescale", path, out, *options)
    assert code == 0, output
    assert report["input"]["format"] == ("torch-module" if how == "pickle" else "torchscript")
    assert report["conditioning"]["max_abs_log_scale"] > 0.1
    load = (lambda p: torch.load(p, weights_only=False)) if how == "pickle" else (lambda p: torch.jit.load(str(p)))
    original, rewritten = load(path), load(out)
    xs = torch.randn(16, 4)
    assert rel_err(rewritten(xs), original(xs)) < 1e-5
    assert not torch.equal(rewritten.a.weight, original.a.weight)


@pytest.mark.parametrize("stem", ["models", "code", "constants", "archive_format", "data"])
def test_file_name_does_not_decide_the_format(stem, tmp_path):
    """torch.save names its archive's folder after the file: ``models.pt`` holds ``models/data.pkl``."""
    path, out = tmp_path / f"{stem}.pt", tmp_path / "out.pt"
    model = nets.mlp()
    torch.save(model.state_dict(), path)
    code, output, report = invoke("rescale", path, out, "--input-shape", "x=1x8", "--arch",
                                  "tests.arch_factories:mlp", "--json")
    assert code == 0, output
    assert report["input"]["format"] == "torch-state-dict"
    rebuilt = nets.mlp()
    rebuilt.load_state_dict(torch.load(out, weights_only=True))
    xs = torch.randn(8, 8)
    assert rel_err(rebuilt(xs), model(xs)) < 1e-5


def _write(kind: str, model: nn.Module, path: Path) -> None:
    x = torch.randn(1, 4)
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "checkpoint":
        torch.save({"model": model.state_dict(), "epoch": 3}, path)
    elif kind == "pickled":
        torch.save(model, path)
    elif kind == "legacy_pickle":
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    elif kind == "script":
        torch.jit.save(torch.jit.script(model), str(path))
    elif kind == "trace":
        torch.jit.save(torch.jit.trace(model, x), str(path))
    elif kind == "export":
        torch.export.save(torch.export.export(model, (x,)), str(path))
    elif kind == "export_before_2_6":  # torch.export.save before PyTorch 2.6: its records at the root
        with zipfile.ZipFile(path, "w") as zf:
            for name in ("serialized_exported_program.json", "serialized_state_dict.pt", "serialized_constants.pt",
                         "serialized_example_inputs.pt", "version"):
                zf.writestr(name, b"")


EXPECTED = {"state_dict": "torch-pickle", "checkpoint": "torch-pickle", "pickled": "torch-pickle",
            "legacy_pickle": "torch-pickle", "script": "torchscript", "trace": "torchscript", "export": "torch-export",
            "export_before_2_6": "torch-export"}


@pytest.mark.parametrize("stem", ["model", "models", "code"])
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_writer_is_recognised(kind, stem, models_package, tmp_path):
    """Every torch writer's archive, for a module of a ``models`` package, under file names that are
    also record names of other formats."""
    path = tmp_path / f"{stem}.pt"
    _write(kind, models_package.Net().eval(), path)
    assert detect_torch_format(path) == EXPECTED[kind]


# --------------------------------------------------------------------------------------------------
# Dtypes: inputs in the model's own dtype, tolerance from the dtype the model runs in


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_exported_program_in_its_own_dtype(dtype, tmp_path):
    model = nets.small_cnn().to(dtype)
    x = torch.randn(1, 3, 16, 16, dtype=dtype)
    path, out = tmp_path / "m.pt2", tmp_path / "out.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    code, output, report = invoke("rescale", path, out, "--json")
    assert code == 0, output
    ver = report["verification"]
    assert ver["passed"] and report["conditioning"]["max_abs_log_scale"] > 1e-2
    original, rewritten = torch.export.load(str(path)), torch.export.load(str(out))
    assert {k: v.dtype for k, v in rewritten.state_dict.items()} == {k: v.dtype for k, v in original.state_dict.items()}
    xs = torch.randn(1, 3, 16, 16, dtype=dtype)
    want, got = original.module()(xs), rewritten.module()(xs)
    assert got.dtype == dtype
    # torch's own run of both files agrees within the tolerance the report used, and that tolerance
    # is the model's dtype's (looser than float32's for half precision, tighter for float64)
    assert rel_err(got, want) <= ver["rtol"]
    assert (ver["rtol"] > 1e-4) == (dtype in (torch.float16, torch.bfloat16))
    assert (ver["rtol"] < 1e-4) == (dtype == torch.float64)


@pytest.mark.parametrize("fmt", ["script", "trace", "pickled", "export-dynamic-batch"])
def test_bfloat16_model_in_every_format(fmt, tmp_path):
    """Verification feeds bfloat16 inputs (numpy has no bfloat16: they travel as float32 and are cast to
    the model's input dtype) and reads bfloat16 outputs, in every torch format."""
    model = nets.small_cnn().to(torch.bfloat16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    path, out = tmp_path / "m.bin", tmp_path / "out.bin"
    options = ["--input-shape", "x=1x3x16x16"]
    if fmt == "script":
        torch.jit.save(torch.jit.script(model), str(path))
        load = lambda p: torch.jit.load(str(p))  # noqa: E731
    elif fmt == "trace":
        torch.jit.save(torch.jit.trace(model, x), str(path))
        load = lambda p: torch.jit.load(str(p))  # noqa: E731
    elif fmt == "pickled":
        torch.save(model, path)
        options.append("--trust-pickle")
        load = lambda p: torch.load(p, weights_only=False)  # noqa: E731
    else:
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, str(path))
        options = []
        load = lambda p: torch.export.load(str(p)).module()  # noqa: E731
    code, output, report = invoke("rescale", path, out, *options, "--json")
    assert code == 0, output
    ver = report["verification"]
    assert ver["passed"] and ver["rtol"] > 1e-3 and report["conditioning"]["max_abs_log_scale"] > 1e-2
    assert ver["modes"] == (["eval"] if fmt.startswith("export") else ["eval", "train"])
    original, rewritten = load(path), load(out)
    if not fmt.startswith("export"):  # an exported program's module has no modes
        original.eval(), rewritten.eval()
    with torch.no_grad():
        want, got = original(x), rewritten(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= ver["rtol"]


@pytest.mark.parametrize("stored", [torch.float64, torch.bfloat16])
def test_state_dict_stored_in_another_dtype_than_the_module(stored, tmp_path):
    """The --arch module computes in float32. A float64 file is checked at float32's tolerance (not
    float64's) and keeps its dtype; a bfloat16 file at bfloat16's: the rewritten values are rounded to it
    (the least precise dtype involved decides)."""
    model = nets.small_cnn().to(stored)
    path, out = tmp_path / "sd.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), path)
    code, output, report = invoke("rescale", path, out, "--input-shape", "x=1x3x16x16", "--arch",
                                  "tests.arch_factories:small_cnn", "--json")
    assert code == 0, output
    rtol = report["verification"]["rtol"]
    assert report["conditioning"]["max_abs_log_scale"] > 1e-2
    written = torch.load(out, weights_only=True)
    assert all(v.dtype == stored for v in written.values() if v.is_floating_point())
    rebuilt = nets.small_cnn().to(stored)
    rebuilt.load_state_dict(written)
    xs = torch.randn(4, 3, 16, 16, dtype=stored)
    if stored == torch.float64:
        assert 1e-6 <= rtol <= 1e-3
        assert rel_err(rebuilt(xs), model(xs)) < 1e-10  # in float64, the rescaling itself is exact
    else:
        assert rtol > 1e-3
        as_run = nets.small_cnn()  # torch's own float32 run of both files, within that tolerance
        as_run.load_state_dict(written)
        assert rel_err(as_run(xs.float()), model.float()(xs.float())) <= rtol


# --------------------------------------------------------------------------------------------------
# --arch that does not fit the state_dict


def test_arch_with_other_shapes_is_a_usage_error(tmp_path):
    path, out = tmp_path / "sd.pt", tmp_path / "out.pt"
    torch.save(nets.mlp(widths=(8, 10, 3)).state_dict(), path)
    code, output, _ = invoke("rescale", path, out, "--input-shape", "x=1x8", "--arch", "tests.arch_factories:mlp")
    assert code == 2, output
    flat = " ".join(output.split())
    assert "net.0.weight" in flat and "10x8" in flat and "32x8" in flat, output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd.pt"]


# --------------------------------------------------------------------------------------------------
# Dropout in training mode: both runs draw the same masks


class BNDropoutNet(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> ReLU -> Linear: train mode is random."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.fc1, self.bn, self.drop = nn.Linear(6, 20), nn.BatchNorm1d(20), nn.Dropout(0.5)
        self.fc2, self.fc3 = nn.Linear(20, 5), nn.Linear(5, 3)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2, self.fc3):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            self.fc2.weight.mul_(torch.linspace(0.1, 10.0, 5)[:, None])
            self.bn.running_mean.copy_(torch.randn(20, generator=g))
            self.bn.running_var.copy_(torch.rand(20, generator=g) + 0.5)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        return self.fc3(torch.relu(self.fc2(h)))


def bn_dropout_net() -> nn.Module:
    return BNDropoutNet().eval()


def test_state_dict_with_dropout_verified_in_train_mode(tmp_path):
    path, out = tmp_path / "sd.pt", tmp_path / "out.pt"
    torch.save(bn_dropout_net().state_dict(), path)
    code, output, report = invoke("rescale", path, out, "--input-shape", "x=1x6", "--arch",
                                  "tests.test_torch_trust:bn_dropout_net", "--json")
    assert code == 0, output
    assert report["verification"]["modes"] == ["eval", "train"]


def test_run_cases_gives_the_callers_random_state_back():
    from pathcond_cli.verify import Case, run_cases

    state = torch.get_rng_state()
    draws = run_cases(lambda feeds, train: [torch.rand(3).numpy()], [Case("train", 5, {}), Case("train", 5, {})])
    assert np.array_equal(draws[0][0], draws[1][0])
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------------
# The Python API verifies like the CLI


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


def test_api_report_matches_the_cli_report(tmp_path):
    model = nets.small_cnn()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(path))
    code, output, cli_report = invoke("rescale", path, tmp_path / "out.pt2", "--json", "--verify-inputs", "5")
    assert code == 0, output
    report = pc.rescale_module_(model, (1, 3, 16, 16), device="cpu", verify_inputs=5)
    assert set(report["verification"]) == set(cli_report["verification"])
    assert set(cli_report) <= set(report)
    assert report["verification"]["inputs"] == cli_report["verification"]["inputs"] == 5
    assert report["verification"]["passed"] and report["verification"]["max_abs_error"] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_api_verifies_in_train_mode_and_keeps_running_statistics(dtype):
    model = nets.small_cnn().to(dtype).train()
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16, dtype=dtype))
    before = _buffers(model)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    model.train()
    report = pc.rescale_module_(model, (1, 3, 16, 16), device="cpu")
    ver = report["verification"]
    assert ver["passed"] and ver["modes"] == ["eval", "train"] and ver["inputs"] == 3
    assert (ver["rtol"] > 1e-3) == (dtype == torch.bfloat16)
    assert model.training
    after = _buffers(model)
    unchanged = [k for k in before if k not in report["changed"]]
    assert any("running_mean" in k for k in unchanged) and any("num_batches_tracked" in k for k in unchanged)
    for key in unchanged:
        assert torch.equal(after[key], before[key]), key
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), y0) <= ver["rtol"]


def test_api_with_dropout_verifies_in_train_mode():
    model = bn_dropout_net()
    report = pc.rescale_module_(model, (1, 6), device="cpu")
    assert report["verification"]["passed"] and report["verification"]["modes"] == ["eval", "train"]


def test_api_failure_restores_the_module_and_carries_the_report():
    model = nets.mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VerificationError) as info:
        pc.rescale_module_(model, (1, 8), device="cpu", rtol=1e-15)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ver = info.value.report["verification"]
    assert ver["passed"] is False and ver["max_rel_error"] > 1e-15 and ver["rtol"] == 1e-15



def test_default_tolerance_is_the_least_precise_dtype_involved():
    """Stored and run dtypes, torch's or numpy's names for them, integers ignored."""
    import ml_dtypes

    from pathcond_cli.verify import default_rtol

    assert default_rtol([torch.float64, np.dtype(np.float32)]) == default_rtol([torch.float32]) > default_rtol([torch.float64])
    assert default_rtol([np.dtype(ml_dtypes.bfloat16), torch.float32]) == default_rtol([torch.bfloat16])
    assert default_rtol([torch.bfloat16]) > default_rtol([torch.float16]) > default_rtol([torch.float32])
    assert default_rtol([torch.float64, torch.int64, np.dtype(np.uint8), np.dtype(bool)]) == default_rtol([torch.float64])
    assert default_rtol([torch.float8_e4m3fn]) > default_rtol([torch.bfloat16])
