"""safetensors checkpoints (issue 13): a state_dict in a ``.safetensors`` file or sharded behind a
``model.safetensors.index.json``, rebuilt with ``--arch`` and written back in the same layout.

The references are independent of pathcond: the files are written and read back with the ``safetensors``
package, the rescaled tensors loaded into a module built here and run by torch next to the original one
on random inputs; files are compared by their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from typer.testing import CliRunner

from pathcond_cli import jobs
from pathcond_cli.cli import app
from pathcond_cli.frontends.base import LoadOptions
from pathcond_cli.frontends.torch_formats import FORMAT_CLASSES, SafetensorsCheckpoint
from pathcond_cli.frontends.torch_frontend import load_torch
from tests import nets

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
MLP = ("tests.arch_factories:mlp", "1x8")
CNN = ("tests.arch_factories:small_cnn", "1x3x16x16")
META = {"format": "pt", "origin": "pathcond tests", "epoch": "7"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rescale(source: Path, target: Path, arch: tuple[str, str], *extra):
    return invoke("rescale", source, target, "--arch", arch[0], "--input-shape", arch[1], "--device", "cpu",
                  "--json", *extra)


def said(result, *phrases: str) -> bool:
    """Whether stderr holds every phrase, however the console wrapped its lines."""
    squashed = "".join(result.stderr.split())
    return all("".join(p.split()) in squashed for p in phrases)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def metadata(path: Path) -> dict | None:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def state(model: nn.Module, prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The module's state_dict as safetensors stores it: contiguous copies, floats in ``dtype``."""
    return {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
            for k, v in model.state_dict().items()}


def assert_same_function(original: nn.Module, rescaled: nn.Module, shape: tuple[int, ...], rtol: float = 1e-4,
                         train: bool = False) -> None:
    """Both modules on the same random batch, with torch (BatchNorm with batch statistics when ``train``)."""
    x = torch.randn(5, *shape[1:], generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want, got = original.train(train)(x), rescaled.train(train)(x)
    original.eval(), rescaled.eval()
    assert torch.max(torch.abs(want - got)) <= rtol * torch.max(torch.abs(want)), (want, got)


def assert_rescaled(source: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and dtypes; some values changed (the run did something)."""
    assert sorted(out) == sorted(source)
    for k in source:
        assert out[k].dtype == source[k].dtype and out[k].shape == source[k].shape, k
    assert any(not torch.equal(out[k].float(), source[k].float()) for k in source)  # float8: no equal


# -- one file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, dtype", [("", None), ("module.", None), ("", torch.float16)],
                         ids=["plain", "prefixed", "float16"])
def test_mlp_file_rescaled_keeps_function_metadata_and_input(tmp_path, prefix, dtype):
    model = nets.mlp(seed=7)  # not the factory's seed: the values must come from the file
    source, out = tmp_path / "mlp.safetensors", tmp_path / "out.safetensors"
    tensors = state(model, prefix, dtype)
    save_file(tensors, source, metadata=META)
    before = digest(source)
    result = rescale(source, out, MLP)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["input"]["format"] == "safetensors" and report["verification"]["passed"]
    assert digest(source) == before
    assert metadata(out) == META
    written = load_file(out)
    assert_rescaled(tensors, written)
    rescaled = nets.mlp()
    rescaled.load_state_dict({k[len(prefix):]: v.float() for k, v in written.items()})
    reference = nets.mlp()
    reference.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items()})
    assert_same_function(reference, rescaled, (1, 8), rtol=1e-2 if dtype == torch.float16 else 1e-4)
    assert listing(tmp_path) == ["mlp.safetensors", "out.safetensors", "out.safetensors.pathcond.json"]


def test_cnn_with_batchnorm_through_python_m(tmp_path):
    """The CLI as users run it; BatchNorm checked in eval and training mode, buffers (int64) kept."""
    model = nets.small_cnn(seed=5)
    source, out = tmp_path / "cnn.safetensors", tmp_path / "cnn.out.safetensors"
    tensors = state(model)
    save_file(tensors, source, metadata=META)
    before = digest(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pathcond_cli", "rescale", str(source), str(out), "--arch", CNN[0],
                           "--input-shape", CNN[1], "--device", "cpu", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input"]["format"] == "safetensors"
    assert digest(source) == before and metadata(out) == META
    written = load_file(out)
    assert_rescaled(tensors, written)
    assert torch.equal(written["features.1.num_batches_tracked"], tensors["features.1.num_batches_tracked"])
    rescaled, reference = nets.small_cnn(), nets.small_cnn()
    rescaled.load_state_dict(written)
    reference.load_state_dict(tensors)
    assert_same_function(reference, rescaled, (1, 3, 16, 16))
    assert_same_function(reference, rescaled, (1, 3, 16, 16), train=True)


def test_file_without_metadata_and_inspect(tmp_path):
    source, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    save_file(state(nets.mlp(seed=2)), source)
    result = invoke("inspect", source, "--arch", MLP[0], "--input-shape", MLP[1], "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["format"] == "safetensors"
    assert rescale(source, out, MLP).exit_code == 0
    assert metadata(out) is None


def test_loads_as_its_class_and_runs_what_the_file_holds(tmp_path):
    model = nets.mlp(seed=4)
    path = tmp_path / "weights.bin"  # detected by content, not by name
    save_file(state(model), path)
    assert jobs.detect_format(path) == "torch"
    loaded = load_torch(path, LoadOptions(input_shapes={"x": (1, 8)}, arch=MLP[0]))
    assert type(loaded) is FORMAT_CLASSES["safetensors"] is SafetensorsCheckpoint and loaded.format == "safetensors"
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).numpy()
    (got,) = loaded.run(path, {"x": x[:1].numpy()})
    assert abs(got - want[:1]).max() <= 1e-5 * abs(want).max()


# -- output and input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_output_that_is_the_input_is_refused(tmp_path, force):
    source = tmp_path / "m.safetensors"
    save_file(state(nets.mlp(seed=1)), source, metadata=META)
    before = digest(source)
    result = rescale(source, source, MLP, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert said(result, "the input is never written")
    assert digest(source) == before and listing(tmp_path) == ["m.safetensors"]


def test_no_arch_is_the_state_dict_message(tmp_path):
    model = nets.mlp()
    sd, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(model.state_dict(), sd)
    save_file(state(model), st)
    messages = []
    for path in (sd, st):
        result = invoke("rescale", path, tmp_path / f"out-{path.suffix[1:]}", "--input-shape", "1x8", "--device", "cpu")
        assert result.exit_code == 2, result.output
        messages.append("".join(result.stderr.split()).replace(str(path), "PATH"))
    assert "--archpackage.module:factory" in messages[0] and messages[0] == messages[1]


def test_wrong_arch_names_the_tensors(tmp_path):
    source = tmp_path / "cnn.safetensors"
    save_file(state(nets.small_cnn()), source)
    result = rescale(source, tmp_path / "out.safetensors", MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "features.0.weight", "net.0.weight")
    assert listing(tmp_path) == ["cnn.safetensors"]


def _corruptions(good: bytes) -> dict[str, bytes]:
    n = int.from_bytes(good[:8], "little")
    return {
        "cut_in_header": good[: 8 + n // 2],
        "cut_in_data": good[: 8 + n + 10],
        "last_byte_missing": good[:-1],
        "header_not_json": good[:8] + b"{" + b"\xff" * (n - 1) + good[8 + n:],
        "header_not_an_object": good[:8] + b"{" + b" " * (n - 2) + b"]" + good[8 + n:],
        "huge_header_length": (2 * 10**8).to_bytes(8, "little") + good[8:],
        "offsets_overlap": good[:8] + good[8: 8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1)
        + good[8 + n:],
    }


@pytest.mark.parametrize("kind", sorted(_corruptions(b"\x10" + b"\0" * 7 + b"{" * 16)))
def test_corrupt_file_is_a_usage_error(tmp_path, kind):
    good = tmp_path / "good.safetensors"
    save_file(state(nets.mlp()), good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_corruptions(good.read_bytes())[kind])
    for command in ("inspect", "rescale"):
        args = [bad] if command == "inspect" else [bad, tmp_path / "out.safetensors"]
        result = invoke(command, *args, "--arch", MLP[0], "--input-shape", MLP[1], "--device", "cpu")
        assert result.exit_code in (2, 3), (kind, result.output)
        assert said(result, str(bad)), (kind, result.stderr)
    assert listing(tmp_path) == ["bad.safetensors", "good.safetensors"]


def test_truncations_never_reach_exit_4(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(state(nets.mlp()), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (1, 8, 9, 100, len(data) // 2, len(data) - 4):
        bad.write_bytes(data[:cut])
        result = invoke("inspect", bad, "--arch", MLP[0], "--input-shape", MLP[1], "--device", "cpu")
        assert result.exit_code in (2, 3), (cut, result.output)
        assert said(result, "safetensors"), (cut, result.stderr)  # a cut at <= 8 bytes too, not "ONNX"
        assert not said(result, "ONNX"), (cut, result.stderr)


@pytest.mark.parametrize("content, why", [
    (b"", "shorter than its 8-byte header length"),
    (b"\x38" + b"\0" * 7, "its header needs 56 bytes"),
    (b"\xff" * 8 + b"{}", "header length 18446744073709551615"),
], ids=["empty", "length-only", "bogus-length"])
def test_unreadable_safetensors_name_says_safetensors(tmp_path, content, why):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    result = invoke("inspect", bad, "--arch", MLP[0], "--input-shape", MLP[1], "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert said(result, f"{bad} is not a readable safetensors file", why), result.stderr
    assert not said(result, "ONNX")


def test_unreadable_index_name_says_safetensors_index(tmp_path):
    bad = tmp_path / "model.safetensors.index.json"
    bad.write_text('{"metadata": {}}')
    result = invoke("inspect", bad, "--arch", MLP[0], "--input-shape", MLP[1], "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert said(result, "is not a readable safetensors index", "weight_map"), result.stderr


def test_detection_stays_by_content_for_a_safetensors_name(tmp_path):
    """An ONNX model named .safetensors is read as what it holds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1", transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "fc2", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("w1", (6, 4)), ("b1", (6,)), ("w2", (2, 6)), ("b2", (2,)))])
    named = tmp_path / "onnx.safetensors"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), named)
    result = invoke("inspect", named, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["format"] == "onnx"


# -- tied parameters -------------------------------------------------------------------------------------


class TiedAlias(nn.Module):
    """8 -> 12 -> 3 MLP whose first layer is registered twice (``alias`` is ``fc1``): the state_dict holds
    fc1.* and alias.*, one tensor each, and rescaling the hidden layer changes them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 3)
        self.alias = self.fc1

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tied_alias():
    """``--arch tests.test_safetensors:tied_alias``"""
    return TiedAlias().eval()


TIED = ("tests.test_safetensors:tied_alias", "1x8")


def _tied_source() -> TiedAlias:
    model = tied_alias()
    with torch.no_grad():  # uneven rows, so that the rescaling moves them; not the factory's values
        model.fc1.weight.mul_(torch.linspace(0.1, 5.0, 12)[:, None])
        model.fc2.weight.add_(0.3)
    return model


def test_tied_names_stored_twice_get_one_value(tmp_path):
    model = _tied_source()
    source, out = tmp_path / "tied.safetensors", tmp_path / "out.safetensors"
    tensors = state(model)  # copies under both names: safetensors refuses shared storage
    assert {"fc1.weight", "alias.weight"} <= set(tensors)
    save_file(tensors, source)
    result = rescale(source, out, TIED)
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert_rescaled(tensors, written)
    assert not torch.equal(written["fc1.weight"], tensors["fc1.weight"])
    assert torch.equal(written["fc1.weight"], written["alias.weight"])
    assert torch.equal(written["fc1.bias"], written["alias.bias"])
    rescaled = tied_alias()
    rescaled.load_state_dict(written)
    assert_same_function(model, rescaled, (1, 8))


def test_tied_names_stored_once_stay_once(tmp_path):
    """``save_model`` keeps one name per tied tensor: the output holds the same names, loadable the same way."""
    model = _tied_source()
    source, out = tmp_path / "tied.safetensors", tmp_path / "out.safetensors"
    save_model(model, str(source), metadata=META)
    tensors = load_file(source)
    assert len(tensors) == 4  # the premise: one name per tied tensor
    result = rescale(source, out, TIED)
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert_rescaled(tensors, written)
    assert metadata(out) == META
    rescaled = tied_alias()
    load_model(rescaled, str(out))
    assert_same_function(model, rescaled, (1, 8))


def test_tied_names_with_different_values_are_refused(tmp_path):
    tensors = state(_tied_source())
    tensors["alias.weight"] = tensors["alias.weight"] + 1.0
    source = tmp_path / "tied.safetensors"
    save_file(tensors, source)
    result = rescale(source, tmp_path / "out.safetensors", TIED)
    assert result.exit_code == 2, result.output
    assert said(result, "hold different values", "alias.weight")
    assert listing(tmp_path) == ["tied.safetensors"]


# -- sharded checkpoints ---------------------------------------------------------------------------------

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_sharded(model: nn.Module, folder: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """``model`` as a sharded checkpoint in ``folder`` the way Hugging Face writes one: the first half of
    the tensors in one shard, the rest in the other, an index with ``metadata.total_size``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = state(model)
    names = list(tensors)
    parts = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    shards = {}
    for shard, keys in parts.items():
        shards[shard] = {k: tensors[k] for k in keys}
        save_file(shards[shard], folder / shard, metadata={"format": "pt", "shard": shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "note": "kept"},
             "weight_map": {k: shard for shard, keys in parts.items() for k in sorted(keys)}}
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path, shards


def test_sharded_checkpoint_keeps_its_sharding(tmp_path):
    model = nets.small_cnn(seed=9)
    index, shards = write_sharded(model, tmp_path / "in")
    before = {p.name: digest(p) for p in (tmp_path / "in").iterdir()}
    out = tmp_path / "out" / "model.safetensors.index.json"
    out.parent.mkdir()
    result = rescale(index, out, CNN)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["format"] == "safetensors"
    assert {p.name: digest(p) for p in (tmp_path / "in").iterdir()} == before
    assert listing(out.parent) == sorted([*SHARDS, out.name, out.name + ".pathcond.json"])
    assert out.read_bytes() == index.read_bytes()  # the same names in the same shards: the index holds as it is
    merged_in, merged_out = {}, {}
    for name, tensors in shards.items():
        written = load_file(out.parent / name)
        assert sorted(written) == sorted(tensors)
        assert metadata(out.parent / name) == {"format": "pt", "shard": name}
        merged_in.update(tensors), merged_out.update(written)
    assert_rescaled(merged_in, merged_out)
    for name in SHARDS:  # each shard is changed: the rescaling reaches both halves of the network
        assert any(not torch.equal(load_file(out.parent / name)[k], shards[name][k]) for k in shards[name])
    rescaled, reference = nets.small_cnn(), nets.small_cnn()
    rescaled.load_state_dict(merged_out)
    reference.load_state_dict(merged_in)
    assert_same_function(reference, rescaled, (1, 3, 16, 16))
    assert_same_function(reference, rescaled, (1, 3, 16, 16), train=True)


@pytest.mark.parametrize("force", [False, True])
def test_sharded_output_in_the_input_folder_is_refused(tmp_path, force):
    index, _ = write_sharded(nets.mlp(), tmp_path)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    result = rescale(index, tmp_path / "rescaled.safetensors.index.json", MLP, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert said(result, "another folder")
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before


def test_sharded_output_named_as_one_file_is_refused(tmp_path):
    index, _ = write_sharded(nets.mlp(), tmp_path / "in")
    (tmp_path / "out").mkdir()
    result = rescale(index, tmp_path / "out" / "model.safetensors", MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "index.json")
    assert listing(tmp_path / "out") == []


def test_sharded_output_shard_that_is_an_input_shard_is_refused(tmp_path):
    """A hard link makes another folder's shard the input's own: refused even with --force."""
    index, _ = write_sharded(nets.mlp(), tmp_path / "in")
    out = tmp_path / "out" / "model.safetensors.index.json"
    out.parent.mkdir()
    os.link(index.parent / SHARDS[1], out.parent / SHARDS[1])
    before = digest(index.parent / SHARDS[1])
    result = rescale(index, out, MLP, "--force")
    assert result.exit_code == 2, result.output
    assert said(result, "the input's shard", "never written")
    assert digest(index.parent / SHARDS[1]) == before and listing(out.parent) == [SHARDS[1]]


def test_existing_output_shard_needs_force(tmp_path):
    index, _ = write_sharded(nets.mlp(seed=3), tmp_path / "in")
    out = tmp_path / "out" / "model.safetensors.index.json"
    out.parent.mkdir()
    (out.parent / SHARDS[0]).write_bytes(b"old")
    result = rescale(index, out, MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "the output's shard", "--force")
    assert listing(out.parent) == [SHARDS[0]] and (out.parent / SHARDS[0]).read_bytes() == b"old"
    result = rescale(index, out, MLP, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(load_file(out.parent / SHARDS[0])) == sorted(load_file(index.parent / SHARDS[0]))


def test_missing_shard_is_named(tmp_path):
    index, _ = write_sharded(nets.mlp(), tmp_path / "in")
    (index.parent / SHARDS[1]).unlink()
    (tmp_path / "out").mkdir()
    result = rescale(index, tmp_path / "out" / index.name, MLP)
    assert result.exit_code == 2, result.output
    assert said(result, SHARDS[1], "missing")
    assert listing(tmp_path / "out") == []


def test_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    index, shards = write_sharded(nets.mlp(), tmp_path / "in")
    moved = next(iter(shards[SHARDS[0]]))
    data = json.loads(index.read_text())
    data["weight_map"][moved] = SHARDS[1]
    index.write_text(json.dumps(data))
    (tmp_path / "out").mkdir()
    result = rescale(index, tmp_path / "out" / index.name, MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "disagree", moved)


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/abs/model.safetensors", ""])
def test_shard_outside_the_index_folder_is_refused(tmp_path, shard):
    index, _ = write_sharded(nets.mlp(), tmp_path / "in")
    data = json.loads(index.read_text())
    data["weight_map"] = {k: shard for k in data["weight_map"]}
    index.write_text(json.dumps(data))
    (tmp_path / "out").mkdir()
    result = rescale(index, tmp_path / "out" / index.name, MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "not a file name")


def test_verification_runs_the_written_shards(tmp_path, monkeypatch):
    """A wrong rescaling must fail verification (exit 1, nothing written): the rewritten checkpoint is run
    from the output's own shards, not the input's."""
    from pathcond_cli import analysis

    def wrong(result):
        params = analysis.rescaled_params(result)
        key = next(k for k in sorted(params) if k.endswith("weight") and params[k].dim() == 2)
        return {**params, key: params[key] * 1.5}

    monkeypatch.setattr(jobs, "rescaled_params", wrong)
    index, _ = write_sharded(nets.mlp(seed=6), tmp_path / "in")
    out = tmp_path / "out" / index.name
    out.parent.mkdir()
    result = rescale(index, out, MLP)
    assert result.exit_code == 1, result.output
    assert listing(out.parent) == []


def test_shard_that_appears_during_the_run_takes_every_file_back(tmp_path, monkeypatch):
    """Index, shards and report are committed together or not at all."""
    index, _ = write_sharded(nets.mlp(seed=8), tmp_path / "in")
    out = tmp_path / "out" / index.name
    out.parent.mkdir()
    appeared = out.parent / SHARDS[1]
    real = jobs.verify

    def verify_then_create(*args, **kwargs):
        appeared.write_bytes(b"another run's shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "verify", verify_then_create)
    result = rescale(index, out, MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "appeared")
    assert listing(out.parent) == [SHARDS[1]] and appeared.read_bytes() == b"another run's shard"


def test_truncated_index_is_a_usage_error(tmp_path):
    index, _ = write_sharded(nets.mlp(), tmp_path / "in")
    index.write_bytes(index.read_bytes()[:-20])
    (tmp_path / "out").mkdir()
    result = rescale(index, tmp_path / "out" / index.name, MLP)
    assert result.exit_code == 2, result.output
    assert said(result, "not a valid safetensors index")
    assert listing(tmp_path / "out") == []


def test_key_is_refused_for_a_flat_file(tmp_path):
    source = tmp_path / "m.safetensors"
    save_file(state(nets.mlp()), source)
    result = rescale(source, tmp_path / "o.safetensors", MLP, "--key", "model")
    assert result.exit_code == 2, result.output
    assert said(result, "leave --key out")


# -- dtypes ----------------------------------------------------------------------------------------------


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path) if path.suffix == ".safetensors" else torch.save(tensors, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_float8_state_dict_is_rescaled_in_float8(tmp_path, suffix, dtype):
    """8-bit floats (no min, max, isfinite or equal in torch) are solved and written in their own dtype,
    verified at the documented 0.125 tolerance."""
    model = nets.mlp(seed=7)
    source, out = tmp_path / f"mlp{suffix}", tmp_path / f"out{suffix}"
    tensors = state(model, dtype=dtype)
    _save(tensors, source)
    result = rescale(source, out, MLP)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["passed"] and report["verification"]["rtol"] == 0.125
    assert report["conditioning"]["score_after"] < report["conditioning"]["score_before"]
    written = _load(out)
    assert_rescaled(tensors, written)
    reference, rescaled = nets.mlp(), nets.mlp()
    reference.load_state_dict({k: v.float() for k, v in tensors.items()})
    rescaled.load_state_dict({k: v.float() for k, v in written.items()})
    assert_same_function(reference, rescaled, (1, 8), rtol=0.125)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_float_parameter_stored_as_integers_is_named(tmp_path, suffix):
    source = tmp_path / f"mlp{suffix}"
    tensors = state(nets.mlp())
    bias = next(k for k in tensors if k.endswith("bias"))
    tensors[bias] = torch.zeros(tensors[bias].shape, dtype=torch.int64)
    _save(tensors, source)
    for command in ("inspect", "rescale"):
        args = [source] if command == "inspect" else [source, tmp_path / f"out{suffix}"]
        result = invoke(command, *args, "--arch", MLP[0], "--input-shape", MLP[1], "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert said(result, f"{bias} is int64 in the file, float32 in the module"), result.stderr
    assert listing(tmp_path) == [source.name]


def test_integer_buffer_stays_fine(tmp_path):
    """BatchNorm's num_batches_tracked is int64 in the file and in the module: no refusal."""
    source, out = tmp_path / "cnn.safetensors", tmp_path / "out.safetensors"
    tensors = state(nets.small_cnn(seed=3))
    assert any(not v.is_floating_point() for v in tensors.values())
    save_file(tensors, source)
    result = rescale(source, out, CNN)
    assert result.exit_code == 0, result.output
    assert all(_load(out)[k].dtype == v.dtype for k, v in tensors.items())
