"""``--plot FILE.png``: the PNG a user gets (opened and measured), its checks before any work, and the
message without matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from pathcond_cli.plot import write_plot  # noqa: E402
from tests.test_cli import invoke  # noqa: E402
from tests.test_core_paths import rescaled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["residual", "conv_bn"])
def test_one_panel_per_layer_and_the_size(name, tmp_path):
    analysis, _, _ = rescaled(name)
    info = write_plot(analysis, tmp_path / "plot.png", "title")
    layers = {role.node.name for role in analysis.groups.roles}
    assert info.layer_panels == len(layers) == len(analysis.layers)
    image = imread(tmp_path / "plot.png")
    assert image.shape[:2] == (info.size[1], info.size[0])
    assert image.shape[1] >= 600 and image.shape[0] >= 300
    assert float(image[..., :3].std()) > 0.05  # something was drawn
    assert sorted(os.listdir(tmp_path)) == ["plot.png"]  # no temporary file left behind


def test_inspect_and_rescale_write_the_png(mlp_onnx, tmp_path):
    png = tmp_path / "inspect.png"
    result = invoke("inspect", mlp_onnx, "--json", "--device", "cpu", "--plot", png)
    assert result.exit_code == 0, result.output
    n_layers = len(json.loads(result.stdout)["layers"])
    assert n_layers >= 3 and imread(png).ndim == 3
    before = png.stat().st_mtime_ns
    assert invoke("inspect", mlp_onnx, "-q", "--device", "cpu", "--plot", png).exit_code == 0  # inspect replaces it
    assert png.stat().st_mtime_ns >= before
    out, png2 = tmp_path / "out.onnx", tmp_path / "rescale.png"
    result = invoke("rescale", mlp_onnx, out, "-q", "--device", "cpu", "--plot", png2)
    assert result.exit_code == 0, result.output
    assert out.exists() and imread(png2).shape[1] > 0


def test_plot_path_checked_before_any_work(mlp_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "out.onnx.pathcond.json"
    existing = tmp_path / "old.png"
    existing.write_bytes(b"old")
    cases = [
        ("inspect", mlp_onnx, "--plot", tmp_path / "plot.jpg"),            # not a .png name
        ("inspect", mlp_onnx, "--plot", tmp_path / "missing" / "p.png"),   # no such folder
        ("rescale", mlp_onnx, out, "--plot", tmp_path / "p.txt"),
        ("rescale", mlp_onnx, out, "--plot", existing),                    # exists, no --force
        ("rescale", mlp_onnx, out, "--plot", report),                      # the report's path (not .png)
    ]
    for args in cases:
        result = invoke(*args, "--device", "cpu")
        assert result.exit_code == 2, (args, result.output)
    png_model = tmp_path / "model.png"  # a model whose name ends in .png: never overwritten
    png_model.write_bytes(mlp_onnx.read_bytes())
    result = invoke("inspect", png_model, "--plot", png_model)
    assert result.exit_code == 2 and "is the input" in result.output
    result = invoke("rescale", png_model, tmp_path / "o2.png", "--plot", tmp_path / "o2.png")
    assert result.exit_code == 2 and "the output" in result.output
    assert png_model.read_bytes() == mlp_onnx.read_bytes() and existing.read_bytes() == b"old"
    assert not out.exists() and not report.exists() and not (tmp_path / "o2.png").exists()
    result = invoke("rescale", mlp_onnx, out, "-q", "--device", "cpu", "--plot", existing, "--force")
    assert result.exit_code == 0 and existing.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", ["inspect", "rescale"])
def test_without_matplotlib_exit_2_with_the_hint(command, mlp_onnx, tmp_path):
    """matplotlib made unimportable in a fresh interpreter: exit 2, the install hint, nothing written."""
    out, png = tmp_path / "out.onnx", tmp_path / "p.png"
    args = ["inspect", str(mlp_onnx)] if command == "inspect" else ["rescale", str(mlp_onnx), str(out)]
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['pathcond'] + sys.argv[1:]; "
            "from pathcond_cli.cli import main; main()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args, "--plot", str(png)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "pathcond[plot]"' in " ".join(proc.stderr.split())
    assert sorted(os.listdir(tmp_path)) == []
