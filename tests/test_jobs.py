"""The rescale job's guarantees, independent of any file format: staged writes, verification, refusals.

A fake front end stores the IR's parameters with ``torch.save`` and runs them with ``ir.evaluate``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pathcond_cli import jobs
from pathcond_cli.errors import UsageError, VerificationError
from pathcond_cli.frontends.base import InputSpec, LoadOptions
from pathcond_cli.ir import Graph, Node, evaluate


def uneven_mlp(widths=(6, 40, 3, 20, 2), seed=0) -> Graph:
    gen = torch.Generator().manual_seed(seed)
    nodes, params, prev = [], {}, "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        params[f"w{i}"] = torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a)
        params[f"b{i}"] = torch.randn(b, generator=gen, dtype=torch.float64) * 0.1
        nodes.append(Node(f"fc{i}", "linear", (prev,), f"h{i}", {"weight": f"w{i}", "bias": f"b{i}"}))
        prev = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(Node(f"relu{i}", "relu", (prev,), f"r{i}"))
            prev = f"r{i}"
    return Graph({"x": (1, widths[0])}, nodes, [prev], params)


class FakeModel:
    """A LoadedModel whose container is a torch.save'd dict of the IR parameters."""

    format = "fake"
    has_batchnorm = False

    def __init__(self, path: Path, graph: Graph, corrupt: bool = False):
        self.path, self.graph, self.warnings, self.corrupt = path, graph, [], corrupt

    def save(self, new_params, path: Path) -> None:
        params = {**self.graph.params, **new_params}
        if self.corrupt:  # a broken writer: perturb one value
            key = next(iter(new_params))
            params[key] = params[key] * 1.5
        torch.save(params, path)

    def input_specs(self):
        return [InputSpec("x", self.graph.inputs["x"], np.dtype(np.float64))]

    def run(self, path: Path, inputs, *, train: bool = False):
        params = torch.load(path, weights_only=True)
        out = evaluate(self.graph, {"x": torch.from_numpy(inputs["x"])}, params)
        return [t.detach().numpy() for t in out.values()]


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    graph = uneven_mlp()
    source = tmp_path / "model.fake"
    torch.save(graph.params, source)
    state = {"corrupt": False}
    monkeypatch.setattr(jobs, "load_model", lambda path, options: FakeModel(path, graph, state["corrupt"]))
    return source, state


def _rescale(source: Path, target: Path, **options):
    return jobs.rescale_model(source, target, LoadOptions(), jobs.SolveOptions(device="cpu"),
                              jobs.RescaleOptions(**options))


def test_rescale_writes_verified_output_and_report(fake_source, tmp_path):
    source, _ = fake_source
    before = source.read_bytes()
    result = _rescale(source, tmp_path / "out.fake")
    assert source.read_bytes() == before
    assert (tmp_path / "out.fake").exists()
    report = json.loads((tmp_path / "out.fake.pathcond.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["max_rel_error"] < 1e-9
    assert report["conditioning"]["score_after"] < report["conditioning"]["score_before"]
    assert report["output"]["path"] == str(tmp_path / "out.fake")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fake", "out.fake", "out.fake.pathcond.json"]
    assert result.written == [tmp_path / "out.fake", tmp_path / "out.fake.pathcond.json"]
    rescaled = torch.load(tmp_path / "out.fake", weights_only=True)
    assert any(not torch.equal(rescaled[k], v) for k, v in torch.load(source, weights_only=True).items())


def test_failed_verification_leaves_nothing(fake_source, tmp_path):
    source, state = fake_source
    state["corrupt"] = True
    with pytest.raises(VerificationError) as info:
        _rescale(source, tmp_path / "out.fake")
    assert info.value.exit_code == 1
    assert info.value.report["verification"]["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fake"]


def test_refuses_to_overwrite_input_or_existing_output(fake_source, tmp_path):
    source, _ = fake_source
    with pytest.raises(UsageError, match="input"):
        _rescale(source, source)
    existing = tmp_path / "out.fake"
    existing.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="--force"):
        _rescale(source, existing)
    assert existing.read_bytes() == b"keep me"
    _rescale(source, existing, force=True)
    assert existing.read_bytes() != b"keep me"


def test_missing_output_folder_is_a_usage_error(fake_source, tmp_path):
    source, _ = fake_source
    with pytest.raises(UsageError, match="does not exist"):
        _rescale(source, tmp_path / "nowhere" / "out.fake")


def test_report_path_option(fake_source, tmp_path):
    source, _ = fake_source
    custom = tmp_path / "r.json"
    _rescale(source, tmp_path / "out.fake", report_path=custom)
    assert json.loads(custom.read_text())["schema_version"] == 1
    assert not (tmp_path / "out.fake.pathcond.json").exists()


def test_inspect_reports_without_writing(fake_source, tmp_path):
    source, _ = fake_source
    result = jobs.inspect_model(source, LoadOptions(), jobs.SolveOptions(device="cpu"))
    report = result.report
    assert report["output"] is None and report["verification"] is None
    assert report["model"]["hidden_units"] == 40 + 3 + 20
    assert report["model"]["groups_free"] == 63 and report["model"]["width_ratio"] == 40 / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fake"]


def test_detect_format(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        jobs.detect_format(tmp_path / "missing.onnx")
    torch.save({"a": torch.zeros(1)}, tmp_path / "ckpt.bin")
    assert jobs.detect_format(tmp_path / "ckpt.bin") == "torch"
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    assert jobs.detect_format(tmp_path / "m.onnx") == "onnx"


def test_timed_records_a_stage_also_when_it_raises():
    from pathcond_cli.timing import timed

    timings: dict[str, float] = {}
    with timed(timings, "ok"):
        pass
    with pytest.raises(KeyError), timed(timings, "failed"):
        raise KeyError("x")
    assert list(timings) == ["ok", "failed"] and all(t >= 0 for t in timings.values())


def test_cuda_index_beyond_the_machine_is_a_usage_error(monkeypatch):
    """`--device cuda:7` on a one-GPU machine is well-formed: the parser takes it, and the first transfer
    would raise inside torch (an internal error). It is a usage error naming how many devices there are."""
    from pathcond_cli.analysis import resolve_device
    from pathcond_cli.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="1 CUDA device"):
        resolve_device("cuda:7")


def test_rescale_lets_ln_g_go_before_the_write_unless_asked(fake_source, tmp_path, monkeypatch):
    """Without --plot nothing reads ln g after the layers table: it is gone by the time the model is
    written, and the run (written, verified, reported) is the one that keeps it for the plot."""
    source, _ = fake_source
    stats, at_write = [], []
    real_analyze, real_save = jobs.analyze, FakeModel.save

    def analyze(*args, **kwargs):
        analysis = real_analyze(*args, **kwargs)
        stats.append(analysis.stats)
        return analysis

    def save(self, new_params, path):
        at_write.append(stats[-1].log_g)
        real_save(self, new_params, path)

    monkeypatch.setattr(jobs, "analyze", analyze)
    monkeypatch.setattr(FakeModel, "save", save)
    lean = _rescale(source, tmp_path / "lean.fake")
    kept = _rescale(source, tmp_path / "kept.fake", distributions=True)
    assert at_write[0] is None and lean.analysis.stats.log_g is None
    assert all(lg.dtype == torch.float32 for lg in at_write[1]) and kept.analysis.stats.log_g is at_write[1]
    for key in ("model", "conditioning", "verdict", "relative_step", "layers", "verification"):
        assert lean.report[key] == kept.report[key], key


def test_rescale_keeps_ln_g_in_float32_after_the_layers_table(fake_source, tmp_path):
    """Asked for the distributions (--plot), rescale keeps ln g in float32 after the solve and the layers
    table: the values are the float64 ones rounded, the layers table is inspect's, and the plot's samples
    agree."""
    from pathcond_cli.analysis import layer_entries, layer_samples

    source, _ = fake_source
    result = _rescale(source, tmp_path / "out.fake", distributions=True)
    reference = jobs.inspect_model(source, LoadOptions(), jobs.SolveOptions(device="cpu")).analysis
    assert all(lg.dtype == torch.float32 for lg in result.analysis.stats.log_g)
    for narrow, wide in zip(result.analysis.stats.log_g, reference.stats.log_g, strict=True):
        assert wide.dtype == torch.float64 and torch.equal(narrow, wide.to(torch.float32))
    layers = jobs.build_report(reference, input_info={}, timings={})["layers"]
    assert json.loads(json.dumps(result.report["layers"])) == json.loads(json.dumps(layers))
    u = result.analysis.u
    for name, entries in layer_entries(result.analysis).items():
        got = layer_samples(entries, u)
        want = layer_samples(layer_entries(reference)[name], reference.u)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-5)
