"""The files a run writes: nothing lost, nothing clobbered (issue 9), and the option mistakes users make.

Every file ``rescale`` writes (OUT, its external-data file, the report) is checked against the others and
against the input's files before any work; the commit never replaces a file that appeared meanwhile;
a killed run's staging folder is cleaned by the next run; SIGINT exits 130. Models are checked with
onnxruntime / torch, files by their bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pathcond_cli import jobs, outputs
from pathcond_cli.cli import app
from pathcond_cli.errors import UsageError
from pathcond_cli.frontends.base import LoadOptions
from tests import nets
from tests.test_cli import export_onnx, ort_outputs

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def listing(folder: Path) -> list[str]:
    """Every entry, hidden staging folders included."""
    return sorted(p.name for p in folder.iterdir())


def digests(*paths: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def with_external_data(source: Path, path: Path, location: str) -> Path:
    """``source`` saved to ``path`` with every tensor in the file ``location`` beside it."""
    onnx.save_model(onnx.load(str(source)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    assert (path.parent / location).stat().st_size > 0
    return path


def assert_same_function(a: Path, b: Path, width: int = 8) -> None:
    x = np.random.default_rng(3).standard_normal((5, width)).astype(np.float32)
    ya, yb = ort_outputs(a, x), ort_outputs(b, x)
    assert np.max(np.abs(ya - yb)) <= 1e-4 * np.max(np.abs(ya))


# -- every output against the others and against the input's files -------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_report_cannot_be_the_output(mlp_onnx, tmp_path, force):
    out = tmp_path / "out.onnx"
    result = invoke("rescale", mlp_onnx, out, "--report", out, "--device", "cpu", *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert "the report" in result.stderr and "the output" in result.stderr
    assert listing(tmp_path) == []


def test_report_cannot_be_the_output_data_file(mlp_onnx, tmp_path):
    source = with_external_data(mlp_onnx, tmp_path / "in.onnx", "in.onnx.data")
    before = digests(source, tmp_path / "in.onnx.data")
    result = invoke("rescale", source, tmp_path / "out.onnx", "--report", tmp_path / "out.onnx.data", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "external data file" in result.stderr
    assert listing(tmp_path) == ["in.onnx", "in.onnx.data"]
    assert digests(source, tmp_path / "in.onnx.data") == before


@pytest.mark.parametrize("name", ["in.onnx", "in.onnx.data"])
def test_report_cannot_be_an_input_file(mlp_onnx, tmp_path, name):
    source = with_external_data(mlp_onnx, tmp_path / "in.onnx", "in.onnx.data")
    before = digests(source, tmp_path / "in.onnx.data")
    result = invoke("rescale", source, tmp_path / "out.onnx", "--report", tmp_path / name, "--force", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "the input" in result.stderr
    assert listing(tmp_path) == ["in.onnx", "in.onnx.data"]
    assert digests(source, tmp_path / "in.onnx.data") == before


def test_external_data_output_is_written_beside_out(mlp_onnx, tmp_path):
    source = with_external_data(mlp_onnx, tmp_path / "in.onnx", "in.onnx.data")
    out = tmp_path / "out.onnx"
    result = invoke("rescale", source, out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data", "out.onnx.pathcond.json"]
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    assert_same_function(mlp_onnx, out)


def test_existing_output_data_file_needs_force(mlp_onnx, tmp_path):
    source = with_external_data(mlp_onnx, tmp_path / "in.onnx", "in.onnx.data")
    out, data = tmp_path / "out.onnx", tmp_path / "out.onnx.data"
    data.write_bytes(b"somebody's data")
    result = invoke("rescale", source, out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "--force" in result.stderr and str(data) in " ".join(result.stderr.split())
    assert data.read_bytes() == b"somebody's data"
    assert listing(tmp_path) == ["in.onnx", "in.onnx.data", "out.onnx.data"]
    result = invoke("rescale", source, out, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert data.read_bytes() != b"somebody's data"
    assert_same_function(mlp_onnx, out)


def test_output_data_file_that_is_the_inputs_own_is_refused_even_with_force(mlp_onnx, tmp_path):
    """a.onnx keeps its tensors in b.onnx.data; writing b.onnx would put its data there, changing a.onnx."""
    source = with_external_data(mlp_onnx, tmp_path / "a.onnx", "b.onnx.data")
    before = digests(source, tmp_path / "b.onnx.data")
    result = invoke("rescale", source, tmp_path / "b.onnx", "--device", "cpu", "--force")
    assert result.exit_code == 2, result.output
    assert "the input's external data file" in " ".join(result.stderr.split())
    assert listing(tmp_path) == ["a.onnx", "b.onnx.data"]
    assert digests(source, tmp_path / "b.onnx.data") == before
    assert_same_function(mlp_onnx, source)


# -- the commit never clobbers a file that appeared during the run ---------------------------------------


def _race(monkeypatch, path: Path, content: bytes) -> None:
    """Create ``path`` while the job verifies (after the checks, before the commit)."""
    real = jobs.verify

    def verify_then_create(*args, **kwargs):
        path.write_bytes(content)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "verify", verify_then_create)


def test_output_that_appears_during_the_run_is_left_alone(mlp_onnx, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    _race(monkeypatch, out, b"another run's model")
    result = invoke("rescale", mlp_onnx, out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "appeared" in result.stderr
    assert out.read_bytes() == b"another run's model"
    assert listing(tmp_path) == ["out.onnx"]  # no report, no staging folder


def test_report_that_appears_during_the_run_takes_the_model_back(mlp_onnx, tmp_path, monkeypatch):
    """Model and report appear together or not at all."""
    source = with_external_data(mlp_onnx, tmp_path / "in.onnx", "in.onnx.data")
    report = tmp_path / "out.onnx.pathcond.json"
    _race(monkeypatch, report, b"another run's report")
    result = invoke("rescale", source, tmp_path / "out.onnx", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert report.read_bytes() == b"another run's report"
    assert listing(tmp_path) == ["in.onnx", "in.onnx.data", "out.onnx.pathcond.json"]


def test_with_force_a_file_that_appeared_is_replaced(mlp_onnx, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    _race(monkeypatch, out, b"another run's model")
    result = invoke("rescale", mlp_onnx, out, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert_same_function(mlp_onnx, out)


def test_commit_without_hard_links_copies_into_a_new_file_only(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(outputs.os, "link", no_links)
    target = tmp_path / "t.bin"
    with outputs.StagedOutput(target) as stage:
        stage.path.write_bytes(b"first")
        assert outputs.commit_all([stage], force=False) == [target]
    assert target.read_bytes() == b"first" and listing(tmp_path) == ["t.bin"]
    with outputs.StagedOutput(target) as stage, pytest.raises(outputs.OutputAppeared):
        stage.path.write_bytes(b"second")
        outputs.commit_all([stage], force=False)
    assert target.read_bytes() == b"first" and listing(tmp_path) == ["t.bin"]


# -- folders that cannot be written -------------------------------------------------------------------


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder where creating a file fails. Root ignores permission bits; sysfs refuses new files to
    root too."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if sys.platform != "linux" or not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no folder that root cannot write to")
    return Path("/sys")


@pytest.mark.parametrize("which", ["output", "report"])
def test_unwritable_folder_is_a_usage_error_before_any_work(mlp_onnx, tmp_path, monkeypatch, which):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the folders were checked")

    monkeypatch.setattr(jobs, "_load_and_analyze", no_work)
    folder = _unwritable_folder(tmp_path)
    out = folder / "out.onnx" if which == "output" else tmp_path / "out.onnx"
    report = tmp_path / "r.json" if which == "output" else folder / "r.json"
    result = invoke("rescale", mlp_onnx, out, "--report", report, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "cannot write in folder" in result.stderr and "Traceback" not in result.output
    assert not out.exists() and not report.exists()
    assert [p for p in listing(tmp_path) if p != "read-only"] == []


# -- options ------------------------------------------------------------------------------------------


def test_negative_seed_is_a_usage_error(mlp_onnx, tmp_path):
    result = invoke("rescale", mlp_onnx, tmp_path / "out.onnx", "--seed", "-1", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "--seed" in result.output and "Traceback" not in result.output
    assert listing(tmp_path) == []


@pytest.mark.parametrize("tol", ["0", "-1", "nan", "inf"])
def test_tol_must_be_finite_and_positive(mlp_onnx, tol):
    result = invoke("inspect", mlp_onnx, "--tol", tol, "--device", "cpu", "--max-sweeps", "50")
    assert result.exit_code == 2, result.output
    assert "--tol" in result.output


@pytest.mark.parametrize("rtol", ["-1", "nan", "inf"])
def test_rtol_must_be_finite_and_not_negative(mlp_onnx, tmp_path, rtol):
    result = invoke("rescale", mlp_onnx, tmp_path / "out.onnx", "--rtol", rtol, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "--rtol" in result.output
    assert listing(tmp_path) == []


def test_unnamed_input_shape_for_a_single_input_onnx_model(mlp_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("rescale", mlp_onnx, out, "--input-shape", "1x8", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["passed"]
    assert_same_function(mlp_onnx, out)
    result = invoke("inspect", mlp_onnx, "--input-shape", "1x5")  # the shape is the input's: checked against it
    assert result.exit_code == 2 and "does not fit" in result.stderr


def test_unnamed_input_shape_for_a_state_dict_with_arch(tmp_path):
    model = nets.small_cnn()
    source, out = tmp_path / "cnn.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), source)
    result = invoke("rescale", source, out, "--arch", "tests.arch_factories:small_cnn", "--input-shape", "1x3x16x16",
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["passed"]
    fresh = nets.small_cnn()
    fresh.load_state_dict(torch.load(out, weights_only=True))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x, y):
        return self.c(torch.relu(self.a(x) + self.b(y)))


def two_inputs():
    """``--arch tests.test_files:two_inputs``"""
    return TwoInputs()


def test_unnamed_input_shape_for_a_model_with_several_inputs_is_a_usage_error(tmp_path):
    onnx_path = tmp_path / "two.onnx"
    torch.onnx.export(TwoInputs().eval(), (torch.randn(1, 4), torch.randn(1, 4)), str(onnx_path), dynamo=False,
                      input_names=["x", "y"], output_names=["out"])
    state = tmp_path / "two.pt"
    torch.save(TwoInputs().state_dict(), state)
    script = tmp_path / "two_script.pt"
    torch.jit.save(torch.jit.trace(TwoInputs().eval(), (torch.randn(1, 4), torch.randn(1, 4))), str(script))
    for args in ([onnx_path], [state, "--arch", "tests.test_files:two_inputs"], [script]):
        result = invoke("inspect", *args, "--input-shape", "1x4", "--device", "cpu")
        assert result.exit_code == 2, result.output
        text = " ".join(result.stderr.split())
        assert "has no name" in text and "2 inputs (x, y)" in text and "NAME=SHAPE" in text
        assert invoke("inspect", *args, "--input-shape", "x=1x4", "--input-shape", "y=1x4",
                      "--device", "cpu").exit_code == 0
    result = invoke("inspect", onnx_path, "--input-shape", "1x4", "--input-shape", "y=1x4")
    assert result.exit_code == 2 and "NAME=SHAPE" in result.stderr



# -- interrupted and killed runs ----------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory) -> Path:
    """A model whose rescaling with the sequential reference solver takes minutes: a run is surely still
    working when it is signalled."""
    return export_onnx(nets.mlp(widths=(16, 256, 256, 256, 4)), (1, 16), tmp_path_factory.mktemp("slow") / "slow.onnx")


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, which Python turns into KeyboardInterrupt. A test run
    started in the background by a shell (`pytest &`, CI runners) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_slow_run(source: Path, out: Path) -> subprocess.Popen:
    """A `pathcond rescale` subprocess, returned once its staging folder is in place."""
    proc = subprocess.Popen([sys.executable, "-m", "pathcond_cli", "rescale", str(source), str(out), "--solver",
                             "sequential", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), preexec_fn=_default_sigint)
    deadline = time.monotonic() + 90
    while not list(out.parent.glob(f".{out.name}.pathcond-*/{out.name}.pathcond-owner")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no staging folder appeared; exit {proc.wait()}: {proc.stderr.read()}")
        time.sleep(0.05)
    time.sleep(0.5)  # into the work
    assert proc.poll() is None
    return proc


@pytest.mark.slow  # a subprocess that loads torch, then a signal: seconds each
@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGINT, 130, "interrupted; nothing was written"),
    # `kill` or a CI runner's timeout: the staging folder goes as after Ctrl-C (SIGKILL cannot do that)
    (signal.SIGTERM, 143, "terminated; nothing was written"),
])
def test_sigint_and_sigterm_print_one_line_and_leave_nothing(signum, code, line, slow_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _start_slow_run(slow_onnx, out)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.splitlines() == [line] and stdout == ""
    assert listing(tmp_path) == []


@pytest.mark.slow  # a subprocess that loads torch, then a signal: seconds each
def test_sigkilled_run_leaves_a_staging_folder_that_the_next_run_removes(slow_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _start_slow_run(slow_onnx, out)
    proc.kill()
    proc.communicate(timeout=60)
    stale = [p for p in listing(tmp_path) if p.startswith(".")]
    assert len(stale) == 2  # the model's and the report's
    result = invoke("rescale", slow_onnx, out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    for name in stale:
        assert f"removed the stale staging folder {tmp_path / name}" in text
    report = json.loads(result.stdout)
    assert sum("stale staging folder" in w for w in report["warnings"]) == 2
    assert listing(tmp_path) == ["out.onnx", "out.onnx.pathcond.json"]


def test_interrupt_during_the_commit_takes_back_what_was_moved(mlp_onnx, tmp_path, monkeypatch):
    """All files appear or none: an interrupt between two of them removes the first."""
    source = with_external_data(mlp_onnx, tmp_path / "in.onnx", "in.onnx.data")
    real, calls = os.link, []

    def link_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(outputs.os, "link", link_then_interrupt)
    result = invoke("rescale", source, tmp_path / "out.onnx", "--device", "cpu")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == ["interrupted; nothing was written"]
    assert len(calls) == 2 and listing(tmp_path) == ["in.onnx", "in.onnx.data"]


def _reference_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "pathcond-reference-runs"]


@pytest.mark.parametrize(("failure", "code", "line"), [
    # onnxruntime cannot open the input (it runs in the verification thread): a refusal, as before
    (RuntimeError("[ONNXRuntimeError] cannot load the input"), 3, "onnxruntime cannot run"),
    (KeyboardInterrupt(), 130, "interrupted; nothing was written"),
])
def test_verification_thread_failure_or_interrupt_exits_as_before_and_leaves_nothing(
        failure, code, line, mlp_onnx, tmp_path, monkeypatch):
    """The original runs in a thread beside the rewritten copy: its failure is the job's (exit 3, the same
    message), an interrupt in the caller's thread exits 130, and either way the staging folders go and
    the thread is joined."""
    from pathcond_cli.frontends import onnx_frontend

    source = tmp_path / "in.onnx"
    source.write_bytes(mlp_onnx.read_bytes())
    real = onnx_frontend._session
    fail_on = "in.onnx" if isinstance(failure, RuntimeError) else "out.onnx"

    def session(path, threads=None):
        if Path(path).name == fail_on:
            raise failure
        return real(path, threads)

    monkeypatch.setattr(onnx_frontend, "_session", session)
    result = invoke("rescale", source, tmp_path / "out.onnx", "--device", "cpu")
    assert result.exit_code == code, result.output
    assert line in " ".join(result.stderr.split())
    assert listing(tmp_path) == ["in.onnx"] and not _reference_threads()


def test_interrupt_after_the_commit_says_what_was_written(mlp_onnx, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "JobResult", interrupted)
    out = tmp_path / "out.onnx"
    result = invoke("rescale", mlp_onnx, out, "--device", "cpu")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == [f"interrupted; already written: {out}, {out}.pathcond.json"]
    assert listing(tmp_path) == ["out.onnx", "out.onnx.pathcond.json"]
    assert_same_function(mlp_onnx, out)


def test_staging_folder_of_a_live_run_is_left(tmp_path, monkeypatch):
    from tests.test_jobs import FakeModel, uneven_mlp

    graph = uneven_mlp()
    source, target = tmp_path / "model.fake", tmp_path / "out.fake"
    torch.save(graph.params, source)
    monkeypatch.setattr(jobs, "load_model", lambda path, options: FakeModel(path, graph))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with outputs.StagedOutput(target) as live, outputs.StagedOutput(target) as killed:
        owner = killed.folder / f"{target.name}.pathcond-owner"
        owner.write_text(json.dumps({**json.loads(owner.read_text()), "pid": int(dead.stdout), "start": None}))
        result = jobs.rescale_model(source, target, LoadOptions(), jobs.SolveOptions(device="cpu"),
                                    jobs.RescaleOptions())
        assert live.folder.is_dir() and not killed.folder.exists()
        warnings = result.report["warnings"]
        assert any(f"process {os.getpid()}" in w and "seems to be writing" in w for w in warnings)
        assert any(f"removed the stale staging folder {killed.folder}" in w for w in warnings)
    assert sorted(listing(tmp_path)) == ["model.fake", "out.fake", "out.fake.pathcond.json"]


def test_check_outputs_names_both_roles(tmp_path):
    a = tmp_path / "a"
    with pytest.raises(UsageError, match="the report .* is also the output"):
        outputs.check_outputs([("the output", a), ("the report", tmp_path / "x" / ".." / "a")], inputs=[],
                              force=True)


@pytest.mark.parametrize("external", [False, True])
def test_rescale_parses_the_onnx_input_once(tmp_path, monkeypatch, external):
    """The file checks (which files the input consists of) and the load share one parse of the input,
    with or without external data; the output is still right (verified, and against the input)."""
    from tests.conftest import export_onnx

    source = export_onnx(nets.mlp(), (1, 8), tmp_path / "m.onnx")
    if external:
        model = onnx.load(str(source))
        source = tmp_path / "ext.onnx"
        onnx.save_model(model, str(source), save_as_external_data=True, location="ext.onnx.bin", size_threshold=0)
    calls: list[str] = []
    real, real_bytes = onnx.load, onnx.load_model_from_string
    source_bytes = source.read_bytes()

    def counting(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    def counting_bytes(data, *args, **kwargs):  # the reader parses the bytes it read (and hashed)
        calls.append(str(source) if bytes(data) == source_bytes else "other bytes")
        return real_bytes(data, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", counting)
    monkeypatch.setattr(onnx, "load_model_from_string", counting_bytes)
    result = jobs.rescale_model(source, tmp_path / "o.onnx", LoadOptions(), jobs.SolveOptions(device="cpu"),
                                jobs.RescaleOptions())
    assert calls.count(str(source)) == 1
    assert result.report["verification"]["passed"] and (tmp_path / "o.onnx").exists()
    assert (tmp_path / "o.onnx.data").exists() == external
    # the digests come from the bytes held in memory (read to parse, serialised to write): still the files'
    assert result.report["input"]["sha256"] == hashlib.sha256(source_bytes).hexdigest()
    assert result.report["output"]["sha256"] == hashlib.sha256((tmp_path / "o.onnx").read_bytes()).hexdigest()
