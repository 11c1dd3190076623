"""ONNX files pathcond did not write: what their names mean after rescaling, external data, exporter
quirks (PReLU slopes through Unsqueeze), and constants that make a node meaningless (Mul/Div by 0).

References are independent of pathcond: the PyTorch module the file was exported from (loaded back by
name), and onnxruntime runs of the files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from pathcond_cli import jobs
from pathcond_cli.cli import app
from pathcond_cli.frontends.base import LoadOptions
from tests import nets
from tests.conftest import export_onnx
from tests.torchvision_like import resnet18

runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# Helpers


def _rescale(source: Path, target: Path) -> dict:
    result = jobs.rescale_model(source, target, LoadOptions(), jobs.SolveOptions(device="cpu"),
                                jobs.RescaleOptions())
    assert result.report["verification"]["passed"]
    return result.report


def _named_values(path: Path) -> dict[str, np.ndarray]:
    """Every name of the file holding a parameter: initializers, Constant outputs and Identity outputs
    of those (what a name-based converter resolves)."""
    proto = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    scale = max(float(np.abs(want).max()), 1e-12)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --------------------------------------------------------------------------------------------------
# 1. Names keep their meaning: load the output back into the module by name.


def _export(module: nn.Module, x: torch.Tensor, path: Path, variant: str) -> Path:
    return export_onnx(module, x, path, variant)


def _state_dict_from_onnx(module: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The module's state_dict with every entry the file holds under the same name replaced."""
    values = _named_values(path)
    state = module.state_dict()
    found = {k for k in state if k in values and values[k].shape == tuple(state[k].shape)}
    return {k: torch.from_numpy(values[k].copy()) if k in found else v for k, v in state.items()}, found


def token_twins() -> nn.Module:
    """Linear layers on (batch, tokens, features) with two equal hidden layers: the TorchScript exporter
    shares the second's tensors as ``Identity`` of the first's and reads each through a ``Transpose``."""
    hidden = nn.Linear(8, 8)
    with torch.no_grad():
        hidden.weight.mul_(torch.linspace(0.2, 5.0, 8)[:, None])
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), hidden, nn.ReLU(), copy.deepcopy(hidden), nn.ReLU(),
                         nn.Linear(8, 3))


@pytest.mark.parametrize(("factory", "shape", "variant"), [
    (nets.resnet_like_default_init, (1, 3, 8, 8), "torchscript"),
    (token_twins, (1, 5, 6), "torchscript"),
    (nets.resnet_like_default_init, (1, 3, 8, 8), "torchscript_preserve"),
    (nets.resnet_like_default_init, (1, 3, 8, 8), "torchscript_inputs"),
    (nets.resnet_like_default_init, (1, 3, 8, 8), "dynamo_noopt"),
    (nets.resnet_like_default_init, (1, 3, 8, 8), "dynamo"),
    pytest.param(resnet18, (1, 3, 32, 32), "torchscript_preserve", marks=pytest.mark.slow),
])
def test_every_name_holds_the_value_of_its_role(factory, shape, variant, tmp_path):
    torch.manual_seed(0)
    module = factory().eval()
    x = torch.randn(*shape)
    source = _export(module, x, tmp_path / "in.onnx", variant)
    target = tmp_path / "out.onnx"
    report = _rescale(source, target)
    assert not [w for w in report["warnings"] if "new name" in w], "a role had no name of its own"
    names_before, names_after = _named_values(source), _named_values(target)
    assert set(names_after) == set(names_before), "names were added or lost"

    before, found = _state_dict_from_onnx(module, source)
    after, found_after = _state_dict_from_onnx(module, target)
    assert found_after == found
    weights = {k for k, v in module.state_dict().items() if v.is_floating_point()}
    if variant == "dynamo":
        assert {k for k in weights if "conv" in k or k.startswith(("stem.0", "fc", "layer2.shortcut.0"))} <= found
    else:  # every parameter and statistic has its name in the file
        assert weights <= found, sorted(weights - found)
    changed = [k for k in found if not torch.equal(before[k], after[k])]
    assert changed, "nothing was rescaled: the test could not fail"

    reloaded = copy.deepcopy(module)
    reloaded.load_state_dict(after)
    with torch.no_grad():
        want = module(x).numpy()
        got = reloaded(x).numpy()
        xs = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(1))
        want_batch, got_batch = module(xs).numpy(), reloaded(xs).numpy()
    _assert_close(got, want)
    _assert_close(got_batch, want_batch)
    # and the file computes what the module computes
    _assert_close(_ort(target, {onnx.load(str(target)).graph.input[0].name: x.numpy()})[0], want)


def test_identity_shared_names_become_initializers_of_their_own(tmp_path):
    """Exporter-style sharing: γ of bn2 and the running_var of bn1 are Identity outputs of bn1's γ.
    Each name gets its own value; no new name appears."""
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["bn1.weight"], ["bn1.running_var"], "id_var"),
        helper.make_node("Identity", ["bn1.weight"], ["bn2.weight"], "id_g2"),
        helper.make_node("Identity", ["bn1.bias"], ["bn2.bias"], "id_b2"),
        helper.make_node("BatchNormalization", ["c1", "bn1.weight", "bn1.bias", "bn1.running_mean",
                                                "bn1.running_var"], ["h1"], "bn1"),
        helper.make_node("Relu", ["h1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2.weight", "bn2.bias", "bn1.running_mean",
                                                "bn1.bias"], ["h2"], "bn2"),
        helper.make_node("Relu", ["h2"], ["r2"], "relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], "conv3"),
    ]
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((c, 2, 3, 3)) * np.array([0.1, 1, 5, 20]).reshape(c, 1, 1, 1),
             "w2": rng.standard_normal((c, c, 3, 3)) * np.array([3, 0.2, 1, 9]).reshape(1, c, 1, 1),
             "w3": rng.standard_normal((3, c, 1, 1)),
             "bn1.weight": np.ones(c), "bn1.bias": np.full(c, 0.5), "bn1.running_mean": np.zeros(c)}
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 2, 5, 5])], [_vi("y", [1, 3, 5, 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, str(source))
    report = _rescale(source, target)

    out = onnx.load(str(target))
    before, after = _named_values(source), _named_values(target)
    assert set(before) <= set(after), "names were lost"
    assert {n.name for n in out.graph.node} <= {n.name for n in proto.graph.node}
    readers = {(n.name, i): name for n in out.graph.node for i, name in enumerate(n.input)}
    assert readers[("bn2", 1)] == "bn2.weight" and readers[("bn1", 4)] == "bn1.running_var"
    np.testing.assert_array_equal(after["bn1.running_var"], before["bn1.running_var"])  # a statistic
    np.testing.assert_array_equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not np.array_equal(after["bn1.weight"], before["bn1.weight"])
    assert not np.array_equal(after["bn2.weight"], after["bn1.weight"])
    # bn2's running_var is the name bn1.bias, read directly by two roles (β of bn1, a statistic of
    # bn2): the statistic keeps the name, β gets a new tensor.
    np.testing.assert_array_equal(after["bn1.bias"], before["bn1.bias"])
    assert readers[("bn2", 4)] == "bn1.bias" and readers[("bn1", 2)] != "bn1.bias"
    assert set(after) - set(before) == {readers[("bn1", 2)]}, "the only new name is the one no name had"
    notes = [w for w in report["warnings"] if "new name" in w]
    assert len(notes) == 1 and "bn1 input 2" in notes[0] and readers[("bn1", 2)] in notes[0]
    feeds = {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    _assert_close(_ort(target, feeds)[0], _ort(source, feeds)[0])


# --------------------------------------------------------------------------------------------------
# 2. External data: small tensors stay inline, where onnxruntime's shape inference can read them.


def _pool_reshape_resize_model() -> onnx.ModelProto:
    """Conv, nearest Resize (scales input), conv, ReduceMean (axes input, opset 18), Reshape, Gemm."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], "resize", mode="nearest"),
        helper.make_node("Conv", ["up", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("ReduceMean", ["r2", "axes"], ["m"], "mean", keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], "fc", transB=1),
    ]
    floats = {"w1": rng.standard_normal((4, 2, 3, 3)) * np.array([0.2, 1, 3, 8]).reshape(4, 1, 1, 1),
              "b1": rng.standard_normal(4), "w2": rng.standard_normal((12, 4, 3, 3)),  # 1728 bytes: external
              "b2": rng.standard_normal(12), "w3": rng.standard_normal((3, 12)), "b3": rng.standard_normal(3)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in floats.items()]
    inits += [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
              numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
              numpy_helper.from_array(np.array([1, 12], np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 2, 5, 5])], [_vi("y", [1, 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto)
    return proto


def test_external_data_keeps_small_tensors_inline(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    source = src / "model.onnx"
    proto = _pool_reshape_resize_model()
    # everything external, the small int64 axes/shape tensors too: onnxruntime cannot open this file
    onnx.save(proto, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    target = dst / "out.onnx"
    result = runner.invoke(app, ["rescale", str(source), str(target), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dst.iterdir()) == ["out.onnx", "out.onnx.data", "out.onnx.pathcond.json"]
    # the input was run relaid, in verification's thread for the original: the note reaches the report
    warnings = json.loads(result.stdout)["warnings"]
    assert any("cannot open model.onnx as stored" in w for w in warnings), warnings

    saved = onnx.load(str(target), load_external_data=False)
    external = {t.name for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w2"}, external  # the only tensor of 1 KiB or more
    assert all(t.external_data[0].value == "out.onnx.data" for t in saved.graph.initializer if t.name in external)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    inline = tmp_path / "inline.onnx"  # the input as onnx itself reads it, in one file: the reference
    onnx.save(onnx.load(str(source)), str(inline))
    _assert_close(_ort(target, feeds)[0], _ort(inline, feeds)[0])
    before, after = _named_values(inline), _named_values(target)
    assert not np.array_equal(before["w1"], after["w1"]), "nothing was rescaled"


def test_dynamo_export_with_external_data_round_trip(tmp_path):
    """A dynamo export keeps its ReduceMean axes and Reshape shape inline; so must the output."""
    module = nets.plain_resnet()
    source = tmp_path / "in.onnx"
    torch.onnx.export(module, (torch.randn(1, 2, 6, 6),), str(source), dynamo=True, external_data=True)
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(source), load_external_data=False)
               .graph.initializer) or pytest.skip("this exporter wrote no external data")
    target = tmp_path / "out.onnx"
    result = runner.invoke(app, ["rescale", str(source), str(target), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(2).standard_normal((1, 2, 6, 6)).astype(np.float32)
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    _assert_close(_ort(target, {name: x})[0], _ort(source, {name: x})[0])


# --------------------------------------------------------------------------------------------------
# 3. PReLU exported without constant folding: the slope reaches PRelu through Unsqueeze.


class _PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 4, 3), nn.PReLU(num_parameters=4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_prelu_slope_through_unsqueeze_keeps_its_name(opset, tmp_path):
    torch.manual_seed(0)
    module = _PReLUNet().eval()
    with torch.no_grad():
        module.act.weight.copy_(torch.tensor([0.05, 0.2, 0.5, 0.9]))
        module.conv1.weight.mul_(torch.tensor([0.1, 1.0, 4.0, 10.0]).view(4, 1, 1, 1))
    x = torch.randn(1, 3, 7, 7)
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    torch.onnx.export(module, (x,), str(source), opset_version=opset, do_constant_folding=False, dynamo=False)
    unsqueeze = [n for n in onnx.load(str(source)).graph.node if n.op_type == "Unsqueeze"]
    assert unsqueeze and unsqueeze[0].input[0] == "act.weight"
    assert bool([a for a in unsqueeze[0].attribute if a.name == "axes"]) == (opset < 13)
    result = runner.invoke(app, ["rescale", str(source), str(target), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output

    out = onnx.load(str(target))
    assert [(n.op_type, list(n.input)) for n in out.graph.node] == \
        [(n.op_type, list(n.input)) for n in onnx.load(str(source)).graph.node]
    after, found = _state_dict_from_onnx(module, target)
    assert found == set(module.state_dict())
    np.testing.assert_array_equal(after["act.weight"].numpy(), module.act.weight.detach().numpy())
    assert not torch.equal(after["conv1.weight"], module.conv1.weight), "nothing was rescaled"
    reloaded = copy.deepcopy(module)
    reloaded.load_state_dict(after)
    with torch.no_grad():
        _assert_close(reloaded(x).numpy(), module(x).numpy())


# --------------------------------------------------------------------------------------------------
# 4. Multiplying or dividing by 0 is refused with the node named (exit 3), not a crash (exit 4).


def _scaled_mlp(op: str, factor: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node(op, ["r", "factor"], ["s"], "the_factor"),
        helper.make_node("Gemm", ["s", "w2", "b2"], ["y"], "fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("w1", (6, 4)), ("b1", (6,)), ("w2", (3, 6)), ("b2", (3,))]]
    inits.append(numpy_helper.from_array(factor.astype(np.float32), "factor"))
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 4])], [_vi("y", [1, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("op", "factor", "why"), [
    ("Mul", np.array(0.0), "multiplies by 0"),
    ("Mul", np.zeros((1, 6)), "multiplies by 0"),
    ("Div", np.array(0.0), "divides by 0"),
    ("Div", np.array([[1.0, 2.0, 0.0, 1.0, 1.0, 3.0]]), "divides by 0"),
    ("Mul", np.array(np.inf), "inf or NaN"),
])
@pytest.mark.parametrize("command", ["inspect", "rescale"])
def test_multiplying_or_dividing_by_zero_is_refused(op, factor, why, command, tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(_scaled_mlp(op, factor), str(source))
    args = [command, str(source)] + ([str(tmp_path / "out.onnx")] if command == "rescale" else [])
    result = runner.invoke(app, args + ["--device", "cpu"])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "the_factor" in text and why in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_some_channels_multiplied_by_zero_are_dead_units(tmp_path):
    """Zero factors beside non-zero ones are not refused: those channels are dead units."""
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_scaled_mlp("Mul", np.array([[1.0, 0.0, 2.0, 0.5, 1.0, 0.0]])), str(source))
    result = runner.invoke(app, ["rescale", str(source), str(target), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)
    _assert_close(_ort(target, {"x": x})[0], _ort(source, {"x": x})[0])


@pytest.mark.parametrize("bad", ["w1", "b2"])
def test_a_parameter_holding_nan_or_inf_is_named(bad, tmp_path):
    """A diverged checkpoint: refused with the node and the tensor named, not 'statistics overflowed'."""
    proto = _scaled_mlp("Mul", np.array(2.0))
    for tensor in proto.graph.initializer:
        if tensor.name == bad:
            value = numpy_helper.to_array(tensor).copy()
            value.reshape(-1)[0] = np.nan
            tensor.CopyFrom(numpy_helper.from_array(value, bad))
    source = tmp_path / "in.onnx"
    onnx.save(proto, str(source))
    result = runner.invoke(app, ["rescale", str(source), str(tmp_path / "out.onnx"), "--device", "cpu"])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert {"w1": "fc1", "b2": "fc2"}[bad] in text and f"'{bad}'" in text and "NaN" in text


def test_weights_fed_as_graph_inputs_are_named(tmp_path):
    """torch.onnx.export(export_params=False): the file holds no weights; say so, per node."""
    source = tmp_path / "in.onnx"
    torch.onnx.export(nets.mlp(), (torch.randn(1, 8),), str(source), dynamo=False, export_params=False)
    result = runner.invoke(app, ["inspect", str(source), "--device", "cpu"])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "the file stores no value for it" in text and "net.0.weight" in text


class _HandWrittenLinear(nn.Module):
    """``x @ W.t() + b``: exported without constant folding as MatMul(x, Transpose(W)) and Add."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(6, 4, generator=gen) * torch.tensor([0.1, 1, 3, 9, 0.5, 2]).view(6, 1))
        self.b1 = nn.Parameter(torch.randn(6, generator=gen))
        self.w2 = nn.Parameter(torch.randn(3, 6, generator=gen))

    def forward(self, x):
        return torch.relu(x @ self.w1.t() + self.b1) @ self.w2.t()


def test_weight_read_through_transpose_keeps_its_name(tmp_path):
    module = _HandWrittenLinear().eval()
    x = torch.randn(2, 4)
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    torch.onnx.export(module, (x,), str(source), dynamo=False, do_constant_folding=False)
    assert [n.op_type for n in onnx.load(str(source)).graph.node].count("Transpose") == 2
    report = _rescale(source, target)
    assert not [w for w in report["warnings"] if "new name" in w]
    assert [(n.op_type, list(n.input)) for n in onnx.load(str(target)).graph.node] == \
        [(n.op_type, list(n.input)) for n in onnx.load(str(source)).graph.node]
    after, found = _state_dict_from_onnx(module, target)
    assert found == {"w1", "b1", "w2"}
    assert not torch.equal(after["w1"], module.w1.detach()), "nothing was rescaled"
    reloaded = copy.deepcopy(module)
    reloaded.load_state_dict(after)
    with torch.no_grad():
        _assert_close(reloaded(x).numpy(), module(x).numpy())


class ScalarShift(nn.Module):
    """``relu(h) + 1.5``: the exporter's scalar Constant is split per channel by the rescaling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(32)
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)
        with torch.no_grad():
            self.a.weight.mul_(torch.linspace(0.1, 8.0, 12)[:, None])

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + 1.5)


@pytest.mark.parametrize("variant", ["torchscript", "dynamo"])
def test_a_constant_split_per_channel_leaves_no_unused_value_behind(variant, tmp_path):
    """The role reading the scalar gets a per-channel tensor of its own; the scalar, read by nothing
    any more, is removed with the nodes that only produced it (onnxruntime warns about each unused
    initializer on every load), and the file computes what the module computes."""
    module = ScalarShift().eval()
    x = torch.randn(1, 6)
    source = _export(module, x, tmp_path / "in.onnx", variant)
    target = tmp_path / "out.onnx"
    _rescale(source, target)
    graph = onnx.load(str(target)).graph
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    assert not [o for n in graph.node for o in n.output if o not in read], "a node's output is read by nothing"
    assert not [t.name for t in graph.initializer if t.name not in read], "an initializer is read by nothing"
    feeds = {graph.input[0].name: x.numpy()}
    _assert_close(_ort(target, feeds)[0], module(x).detach().numpy())
    _assert_close(_ort(target, feeds)[0], _ort(source, feeds)[0])
