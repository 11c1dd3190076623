"""The Python API on nn.Modules, and the same model through ONNX and through torch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import pathcond_cli as pc
from pathcond_cli.cli import app
from tests import nets


def _outputs(model, x):
    with torch.no_grad():
        return model(x).double()


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet_like", "concat_net", "tiny_unet", "tiny_generator", "dense_net"])
def test_rescale_module_in_place_keeps_function(name):
    factory, shape = nets.ZOO[name]
    model = factory()
    x = torch.randn(4, *shape[1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = _outputs(model, x)
    report = pc.rescale_module_(model, shape, device="cpu")
    y1 = _outputs(model, x)
    assert torch.allclose(y0, y1, rtol=0, atol=1e-4 * float(y0.abs().max()))
    assert report["changed"], "nothing was rescaled"
    for key in report["changed"]:
        assert not torch.equal(before[key], model.state_dict()[key])
    cond = report["conditioning"]
    assert cond["score_after"] <= cond["score_before"]
    assert model.training is False  # factories return eval-mode modules; the mode is kept


def test_rescale_module_writes_non_persistent_buffers():
    """A live module takes new values for buffers outside its state_dict (a file could not)."""
    from tests.arch_factories import buffer_shift

    model = buffer_shift()
    shift = model.shift.clone()
    x = torch.randn(5, 4)
    y0 = _outputs(model, x)
    report = pc.rescale_module_(model, (1, 4), device="cpu")
    assert "shift" in report["changed"] and not torch.equal(model.shift, shift)
    assert report["model"]["groups_free"] == 6 + 5
    assert torch.allclose(y0, _outputs(model, x), rtol=0, atol=1e-5 * float(y0.abs().max()))


def test_inspect_module_changes_nothing():
    model = nets.mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = pc.inspect_module(model, (1, 8), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report["model"]["hidden_units"] == 32 + 4 + 16
    assert report["conditioning"]["score_before"] > 1.0


def test_training_mode_is_restored():
    model = nets.small_cnn().train()
    pc.rescale_module_(model, (1, 3, 16, 16), device="cpu")
    assert model.training


def test_same_statistics_through_onnx_and_torch(tmp_path):
    """The same CNN with BatchNorm, exported to ONNX (BN kept) and saved with torch.export, gives the same
    statistics and the same conditioning score."""
    model = nets.small_cnn()
    x = torch.randn(1, 3, 16, 16)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL, input_names=["x"])
    pt2_path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(pt2_path))
    runner = CliRunner()
    reports = []
    for path in (onnx_path, pt2_path):
        result = runner.invoke(app, ["inspect", str(path), "--json", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    a, b = reports
    assert a["input"]["format"] == "onnx" and b["input"]["format"] == "torch-export"
    for key in ("parameters", "hidden_units", "groups_free", "groups_pinned"):
        assert a["model"][key] == b["model"][key], key
    for key in ("log10_paths", "log10_path1_norm", "log10_path2_norm"):
        assert math.isclose(a["model"][key], b["model"][key], rel_tol=1e-6), key
    for key in ("score_before", "score_after"):
        assert math.isclose(a["conditioning"][key], b["conditioning"][key], rel_tol=1e-6), key
