"""The CLI end to end: Typer's runner and a real subprocess, every exit code, the report keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from pathcond_cli.cli import app
from tests import conftest, nets

runner = CliRunner()

REPORT_KEYS = {
    "schema_version", "pathcond_version", "input", "model", "conditioning", "pinned", "layers",
    "verification", "output", "timings", "device",
}
MODEL_KEYS = {"parameters", "hidden_units", "groups_free", "groups_pinned", "log10_paths", "log10_path1_norm",
              "log10_path2_norm", "width_ratio"}
CONDITIONING_KEYS = {"objective_before", "objective_after", "score_before", "score_after", "sweeps",
                     "max_abs_log_scale", "bounds_active", "bounded_groups"}


def export_onnx(module: torch.nn.Module, shape, path: Path) -> Path:
    return conftest.export_onnx(module.eval(), shape, path, dynamic_batch=True)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_help_documents_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Exit codes" in result.output and "unsupported model" in result.output
    for command in ("inspect", "rescale"):
        assert invoke(command, "--help").exit_code == 0


def test_version():
    from pathcond_cli import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_inspect_json_has_every_key(mlp_onnx):
    result = invoke("inspect", mlp_onnx, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert REPORT_KEYS <= set(report)
    assert MODEL_KEYS <= set(report["model"]) and CONDITIONING_KEYS <= set(report["conditioning"])
    assert report["output"] is None and report["verification"] is None
    assert report["input"]["format"] == "onnx" and len(report["input"]["sha256"]) == 64
    assert report["model"]["hidden_units"] == 64 + 4 + 32
    assert report["model"]["width_ratio"] == 64 / 3
    assert list(report["timings"]) == ["load", "groups", "statistics", "solve", "layers"]


def test_inspect_tables_and_layers(mlp_onnx):
    result = invoke("inspect", mlp_onnx, "--layers", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "conditioning score" in result.output and "log10 diag(G)" in result.output
    assert "relative SGD steps change by" in result.output and "re-tune the learning rate" in result.output
    assert "rel. step" in result.output and "●" in result.output  # the per-layer bars and factors


def test_rescale_is_equivalent_and_better_conditioned(mlp_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    before = mlp_onnx.read_bytes()
    result = invoke("rescale", mlp_onnx, out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert mlp_onnx.read_bytes() == before
    assert json.loads((tmp_path / "out.onnx.pathcond.json").read_text()) == report
    assert report["verification"]["passed"] and report["output"]["path"] == str(out)
    assert list(report["timings"]) == ["load", "groups", "statistics", "solve", "layers", "write", "verify"]
    cond = report["conditioning"]
    assert cond["score_after"] < cond["score_before"] and cond["converged"]
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    a, b = ort_outputs(mlp_onnx, x), ort_outputs(out, x)
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a))
    assert out.read_bytes() != before


def test_exit_2_usage_errors(mlp_onnx, tmp_path):
    assert invoke("inspect", tmp_path / "missing.onnx").exit_code == 2
    assert invoke("inspect", mlp_onnx, "--input-shape", "input=1xA").exit_code == 2
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model at all")
    result = invoke("inspect", garbage)
    assert result.exit_code == 2 and "Traceback" not in result.output
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"x")
    assert invoke("rescale", mlp_onnx, existing).exit_code == 2
    assert existing.read_bytes() == b"x"
    assert invoke("rescale", mlp_onnx, mlp_onnx, "--force").exit_code == 2


def test_exit_3_unsupported_lists_nodes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.GELU(),
                                torch.nn.Linear(8, 2))
    path = export_onnx(model, (1, 4), tmp_path / "tanh.onnx")
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 3
    payload = json.loads(result.stdout)
    ops = {o["op"] for o in payload["error"]["offenders"]}
    assert "Tanh" in ops and len(payload["error"]["offenders"]) >= 2


def test_exit_1_verification_failure_writes_nothing(mlp_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("rescale", mlp_onnx, out, "--rtol", "0", "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_exit_4_internal_error_keeps_traceback_and_writes_nothing(mlp_onnx, tmp_path, monkeypatch):
    """A bug (any exception that is not a PathcondError) is exit 4, never 1 (= verification failed)."""
    import pathcond_cli.jobs

    def broken(analysis):
        raise RuntimeError("boom [not markup]")

    monkeypatch.setattr(pathcond_cli.jobs, "rescaled_params", broken)
    result = invoke("rescale", mlp_onnx, tmp_path / "out.onnx", "--device", "cpu")
    assert result.exit_code == 4
    assert "Traceback" in result.stderr and "boom [not markup]" in result.stderr and "bug in pathcond" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = invoke("rescale", mlp_onnx, tmp_path / "out.onnx", "--device", "cpu", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["error"] == {"type": "RuntimeError", "message": "boom [not markup]",
                                                   "exit_code": 4}
    assert list(tmp_path.iterdir()) == []


def test_subprocess_json_stdout_only(mlp_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "pathcond_cli", "rescale", str(mlp_onnx), str(out), "--json",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verification"]["passed"]
    proc = subprocess.run([sys.executable, "-m", "pathcond_cli", "inspect", str(tmp_path / "nope.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr



@pytest.mark.parametrize(("code", "status", "stderr"), [(None, 0, ""), (3, 3, ""), ("bad usage", 1, "bad usage\n")])
def test_leave_maps_exit_codes_like_sys_exit(monkeypatch, capsys, code, status, stderr):
    """The program ends with os._exit (no interpreter teardown): the status must be what sys.exit gives."""
    from pathcond_cli import cli

    left = []
    monkeypatch.setattr(cli.os, "_exit", left.append)
    cli._leave(code)
    assert left == [status] and capsys.readouterr().err == stderr


def test_closed_stdout_or_a_reader_that_leaves_keeps_the_exit_status(mlp_onnx, tmp_path):
    """A program started with stdout closed (``>&-``) or whose reader leaves before it writes (``| head``)
    still exits 0 once its job is done, with its files in place: exit 1 means verification failed."""
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "pathcond_cli", "rescale", str(mlp_onnx), str(out), "--device", "cpu"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "Traceback" not in proc.stderr
    reader = subprocess.Popen([sys.executable, "-m", "pathcond_cli", "inspect", str(mlp_onnx), "--json", "--layers"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdout.close()  # gone before the first byte
    _, stderr = reader.communicate(timeout=300)
    assert reader.returncode == 0, stderr
    assert "Traceback" not in stderr
    # tables for people (rich's own broken-pipe handler exited 1)
    human = subprocess.Popen([sys.executable, "-m", "pathcond_cli", "rescale", str(mlp_onnx), str(tmp_path / "h.onnx"),
                              "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    human.stdout.close()
    _, stderr = human.communicate(timeout=300)
    assert human.returncode == 0, stderr
    assert (tmp_path / "h.onnx").exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_error_raised_by_an_interrupt_is_the_interrupt(wrapped):
    """Ctrl-C inside an extension module's import comes out as ImportError (then maybe a refusal made from
    it): exit 130 with the interrupted line, not 3 or 4."""
    import typer

    from pathcond_cli import cli
    from pathcond_cli.errors import UnsupportedModelError

    try:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as stop:
                raise ImportError("initialization failed") from stop
        except ImportError as exc:
            if not wrapped:
                raise
            raise UnsupportedModelError("onnxruntime cannot run it") from exc
    except Exception as exc:  # noqa: BLE001
        error = exc
    output = cli.Output(as_json=False, quiet=False)
    with pytest.raises(typer.Exit) as stop:
        cli._exit_for(output, error)
    assert stop.value.exit_code == 130

# -- PyTorch checkpoints through the CLI ---------------------------------------------------------------


def _rescale_json(*args):
    result = invoke("rescale", *args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rescale_state_dict_checkpoint_keeps_other_entries(tmp_path):
    model = nets.small_cnn()
    source = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, source)
    out = tmp_path / "out.pt"
    report = _rescale_json(source, out, "--arch", "tests.arch_factories:small_cnn", "--input-shape", "x=1x3x16x16")
    assert report["input"]["format"] == "torch-state-dict"
    assert report["verification"]["modes"] == ["eval", "train"]  # BatchNorm: train mode is checked too
    assert any("optimizer" in w for w in report["warnings"])
    saved, original = torch.load(out, weights_only=True), torch.load(source, weights_only=True)
    assert saved["epoch"] == 3 and saved["optimizer"] == original["optimizer"]
    assert saved["model"].keys() == original["model"].keys()
    changed = [k for k in saved["model"] if not torch.equal(saved["model"][k], original["model"][k])]
    assert changed and all(saved["model"][k].dtype == original["model"][k].dtype for k in changed)
    fresh = nets.small_cnn()
    fresh.load_state_dict(saved["model"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), rtol=1e-4, atol=1e-5)


def test_state_dict_without_arch_is_a_usage_error(tmp_path):
    source = tmp_path / "sd.pt"
    torch.save(nets.mlp().state_dict(), source)
    result = invoke("inspect", source, "--input-shape", "x=1x8")
    assert result.exit_code == 2 and "--arch" in result.output


def test_rescale_exported_program(tmp_path):
    model = nets.resnet_like()
    source = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(source))
    report = _rescale_json(source, tmp_path / "o.pt2")
    assert report["input"]["format"] == "torch-export" and report["verification"]["passed"]
    loaded = torch.export.load(str(tmp_path / "o.pt2")).module()
    x = torch.randn(1, 3, 8, 8)  # exported with a static batch of 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_pickled_module_needs_trust(tmp_path):
    source = tmp_path / "m.pt"
    torch.save(nets.mlp(), source)
    result = invoke("inspect", source, "--input-shape", "x=1x8")
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    result = invoke("inspect", source, "--input-shape", "x=1x8", "--trust-pickle", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["input"]["format"] == "torch-module"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_cuda_without_gpu_is_a_usage_error(mlp_onnx):
    result = invoke("inspect", mlp_onnx, "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_bad_solver_option_is_a_usage_error(mlp_onnx):
    result = invoke("inspect", mlp_onnx, "--solver", "magic")
    assert result.exit_code == 2 and "--solver" in result.output


def _record_jobs(monkeypatch) -> list[tuple]:
    """Both jobs replaced by a recorder of what the CLI hands them (nothing is loaded or written)."""
    from pathcond_cli import jobs

    calls: list[tuple] = []

    def inspect_model(path, load, solve, notify=None):
        calls.append(("inspect", load, solve, None))
        return jobs.JobResult({"recorded": True})

    def rescale_model(source, target, load, solve, options, notify=None):
        calls.append(("rescale", load, solve, options))
        return jobs.JobResult({"recorded": True})

    monkeypatch.setattr(jobs, "inspect_model", inspect_model)
    monkeypatch.setattr(jobs, "rescale_model", rescale_model)
    return calls


def test_shared_options_reach_the_jobs(monkeypatch, tmp_path):
    """Each shared option lands in the job's load / solve options, with the same defaults, in both commands."""
    from pathcond_cli.frontends.base import LoadOptions
    from pathcond_cli.jobs import RescaleOptions, SolveOptions

    calls = _record_jobs(monkeypatch)
    paths = {"inspect": ["m.onnx"], "rescale": ["m.onnx", "o.onnx"]}
    given = ["--input-shape", "x=1x8", "--arch", "pkg.mod:build", "--arch-kwargs", '{"width": 2}', "--key", "model",
             "--trust-pickle", "--device", "cuda:1", "--max-sweeps", "7", "--tol", "0.01", "--solver", "bcd"]
    for command in ("inspect", "rescale"):
        for args in ([], given):
            result = invoke(command, *paths[command], *args, "--json")
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout) == {"recorded": True}
    want_load = LoadOptions(input_shapes={"x": (1, 8)}, arch="pkg.mod:build", arch_kwargs={"width": 2}, key="model",
                            trust_pickle=True)
    want_solve = SolveOptions(device="cuda:1", method="bcd", tol=0.01, max_sweeps=7)
    assert calls == [("inspect", LoadOptions(), SolveOptions(), None), ("inspect", want_load, want_solve, None),
                     ("rescale", LoadOptions(), SolveOptions(), RescaleOptions()),
                     ("rescale", want_load, want_solve, RescaleOptions())]
    assert all(type(solve.method) is str and type(solve.device) is str for _, _, solve, _ in calls)

    calls.clear()
    result = invoke("rescale", "m.onnx", "o.onnx", "--force", "--report", tmp_path / "r.json", "--rtol", "0.001",
                    "--verify-inputs", "2", "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    assert calls == [("rescale", LoadOptions(), SolveOptions(),
                      RescaleOptions(force=True, report_path=tmp_path / "r.json", rtol=0.001, verify_inputs=2, seed=5))]


@pytest.mark.parametrize("option,value", [("--device", "gpu"), ("--device", "CPU"), ("--device", "cuda:"),
                                          ("--device", "cuda:x"), ("--device", "cuda:0:1"), ("--solver", "magic"),
                                          ("--solver", "BCD")])
def test_bad_choices_are_refused_by_the_parser(monkeypatch, option, value):
    """--device and --solver are checked once, when the command line is read: exit 2, and no job starts."""
    calls = _record_jobs(monkeypatch)
    for command, paths in (("inspect", ["m.onnx"]), ("rescale", ["m.onnx", "o.onnx"])):
        result = invoke(command, *paths, option, value)
        assert result.exit_code == 2, result.output
        assert option in result.output and "Traceback" not in result.output
    assert calls == []


def test_help_lists_the_choices():
    for command in ("inspect", "rescale"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0
        assert "auto|bcd|sequential" in result.output and "auto|cpu|cuda|cuda:N" in result.output


def test_command_help_shows_defaults_and_exit_codes():
    result = runner.invoke(app, ["rescale", "--help"], env={"COLUMNS": "250"})  # no wrapping inside cells
    text = " ".join(result.output.split())
    assert "OUT.pathcond.json" in text and "1e-4 float32" in text and "least precise dtype" in text
    assert "Exit codes" in text


def test_wrong_input_shape_for_a_state_dict_is_a_usage_error(tmp_path):
    source = tmp_path / "cnn.pt"
    torch.save(nets.small_cnn().state_dict(), source)
    result = invoke("inspect", source, "--arch", "tests.arch_factories:small_cnn", "--input-shape", "x=1x5x16x16")
    assert result.exit_code == 2
    assert "does not run on inputs of shape x=1x5x16x16" in result.stderr and "--input-shape" in result.stderr


def test_torch_library_logs_are_not_printed(tmp_path):
    """A torch.export archive without the .pt2 extension makes torch log a warning on every load; the
    CLI's stderr carries pathcond's messages only."""
    model = nets.mlp()
    source = tmp_path / "model.bin"
    torch.export.save(torch.export.export(model, (torch.randn(1, 8),)), str(source))
    proc = subprocess.run([sys.executable, "-m", "pathcond_cli", "rescale", str(source), str(tmp_path / "out.bin"),
                           "--quiet", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


def test_error_messages_keep_long_paths_whole(mlp_onnx, tmp_path):
    """An error naming a file prints it on one line: a path broken by the console's wrapping cannot be
    copied back into a command."""
    folder = tmp_path / ("a_rather_long_folder_name_" * 4) / ("and_another_one_" * 4)
    folder.mkdir(parents=True)
    out = folder / "out.onnx"
    out.write_bytes(b"somebody's model")
    result = invoke("rescale", mlp_onnx, out)
    assert result.exit_code == 2, result.output
    assert str(out) in result.stderr.splitlines()[0], result.stderr


def test_path_counts_are_inspects_and_match_enumeration(tmp_path):
    """inspect reports the number of paths and the path-1 norm, equal to brute-force enumeration of the
    paths; rescale leaves both null (two forward passes, and a rescaling does not change them) and keeps
    the path-2 norm, which comes with diag(G)."""
    from pathcond_cli.frontends.onnx_frontend import load_onnx
    from tests.reference import reference

    source = export_onnx(nets.mlp(widths=(3, 5, 4, 2)), (1, 3), tmp_path / "small.onnx")
    ref = reference(load_onnx(source).graph)
    inspected = json.loads(invoke("inspect", source, "--json", "--device", "cpu").stdout)["model"]
    assert 10 ** inspected["log10_paths"] == pytest.approx(ref.n_paths, rel=1e-9)
    assert 10 ** inspected["log10_path1_norm"] == pytest.approx(np.abs(ref.phi).sum(), rel=1e-9)
    assert 10 ** inspected["log10_path2_norm"] == pytest.approx(np.sqrt(np.square(ref.phi).sum()), rel=1e-9)
    rescaled = _rescale_json(source, tmp_path / "out.onnx")["model"]
    assert MODEL_KEYS <= set(rescaled)
    assert rescaled["log10_paths"] is None and rescaled["log10_path1_norm"] is None
    assert rescaled["log10_path2_norm"] == pytest.approx(inspected["log10_path2_norm"], rel=1e-12)
    again = json.loads(invoke("inspect", tmp_path / "out.onnx", "--json", "--device", "cpu").stdout)["model"]
    assert again["log10_paths"] == pytest.approx(inspected["log10_paths"], rel=1e-12)
    assert again["log10_path1_norm"] == pytest.approx(inspected["log10_path1_norm"], abs=1e-6)


def test_first_torch_load_says_it_imports_dynamo(tmp_path, mlp_onnx):
    """The load event of a torch file says that torch._dynamo is being imported when it is not yet (a
    fresh process), so the progress line explains the wait; an ONNX file's never does."""
    source = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(nets.mlp(), (torch.randn(1, 8),)), str(source))
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from pathcond_cli import jobs\n"
            "from pathcond_cli.frontends.base import LoadOptions\n"
            "for path in sys.argv[1:]:\n"
            "    events = []\n"
            "    jobs.inspect_model(Path(path), LoadOptions(), jobs.SolveOptions(device='cpu'),\n"
            "                       lambda stage, info: events.append((stage, info)))\n"
            "    print(Path(path).suffix, [info.get('detail') for stage, info in events if stage == 'load'])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(source), str(mlp_onnx)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, second, onnx_line = proc.stdout.splitlines()
    assert onnx_line == ".onnx [None]"
    assert first.startswith(".pt2 ['first use of torch.export") and "torch._dynamo" in first
    assert second == ".pt2 [None]"  # imported by then
