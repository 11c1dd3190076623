"""ReLU networks the fuzz harness drew that pathcond refused: 1-D pooling as the dynamo exporter writes
it (Unsqueeze -> 2-D pool -> Squeeze), adaptive max pooling to 1 (ReduceMax), ceil-mode pooling whose last
window would start in the padding (ONNX shape inference counts one window too many), and the same
modules through torch.export.

Each case exports a small module, runs ``pathcond rescale`` as a user would, and checks against our own
onnxruntime / torch.export run that OUT computes what IN computes while its weights changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pathcond_cli.cli import app
from tests.conftest import slow_params

runner = CliRunner()


def _init(module: nn.Module, seed: int) -> nn.Module:
    """Weights of unequal scales (so the rescaling moves them) and non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (3.0 if i % 3 == 0 else 0.3))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return module.eval()


def _conv1d_maxpool_ceil_adaptive_max() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.MaxPool1d(3, 2, padding=1, ceil_mode=True),
                         nn.Conv1d(6, 5, 2, groups=1), nn.PReLU(5), nn.AdaptiveMaxPool1d(1), nn.Flatten(),
                         nn.Linear(5, 2)), (1, 3, 12)


def _conv1d_depthwise_maxpool_adaptive_avg() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Conv1d(6, 6, 3, groups=6, dilation=2), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Conv1d(6, 4, 1), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(4, 3)), (1, 2, 18)


def _conv1d_avgpool_ceil_flatten() -> tuple[nn.Module, tuple[int, ...]]:
    # length 7 into AvgPool1d(2, 2, padding=1, ceil_mode=True): 4 windows (the 5th would start in the end
    # padding), ONNX's shape inference says 5
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.AvgPool1d(2, 2, padding=1, ceil_mode=True), nn.Flatten(), nn.Linear(16, 3)), (1, 1, 7)


def _conv2d_maxpool_ceil_flatten() -> tuple[nn.Module, tuple[int, ...]]:
    # 7 x 5 into MaxPool2d(2, 2, padding=1, ceil_mode=True): 4 x 3, ONNX's shape inference says 5 x 4
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2, 2, padding=1, ceil_mode=True), nn.Conv2d(3, 4, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48, 2)), (1, 2, 7, 5)


def _conv2d_adaptive_max() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2),
                         nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 2)), (1, 2, 7, 8)


def _conv1d_adaptive_max_to_2() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool1d(2), nn.Flatten(),
                         nn.Linear(8, 2)), (1, 2, 10)


def _export(module: nn.Module, shape: tuple[int, ...], path: Path, exporter: str) -> Path:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if exporter.startswith("pt2"):
        ep = torch.export.export(module, (x,))
        if exporter == "pt2_core":  # the core ATen op set: 1-D pooling becomes 2-D pooling between views
            ep = ep.run_decompositions()
        torch.export.save(ep, str(path))
    elif exporter == "ts":
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"])
    else:
        torch.onnx.export(module, (x,), str(path), dynamo=True, external_data=False,
                          optimize=exporter == "dynamo")
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    if path.suffix == ".pt2":
        with torch.no_grad():
            return torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _weights(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".pt2":
        return {k: v.detach().numpy() for k, v in torch.export.load(str(path)).state_dict.items()}
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _check_rescaled(module: nn.Module, shape: tuple[int, ...], exporter: str, tmp_path: Path) -> None:
    suffix = ".pt2" if exporter.startswith("pt2") else ".onnx"
    source = _export(module, shape, tmp_path / f"in{suffix}", exporter)
    target = tmp_path / f"out{suffix}"
    result = runner.invoke(app, ["rescale", str(source), str(target)])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    before, after = _run(source, x), _run(target, x)
    np.testing.assert_allclose(before, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())  # the export is faithful
    scale = np.abs(before).max()
    assert np.abs(after - before).max() <= 1e-4 * scale
    old, new = _weights(source), _weights(target)
    moved = [k for k in old if k in new and old[k].dtype.kind == "f" and not np.allclose(old[k], new[k])]
    assert moved, "no weight was rescaled"


CASES = {
    "conv1d_maxpool_ceil_adaptive_max": _conv1d_maxpool_ceil_adaptive_max,
    "conv1d_depthwise_maxpool_adaptive_avg": _conv1d_depthwise_maxpool_adaptive_avg,
    "conv1d_avgpool_ceil_flatten": _conv1d_avgpool_ceil_flatten,
    "conv2d_maxpool_ceil_flatten": _conv2d_maxpool_ceil_flatten,
    "conv2d_adaptive_max": _conv2d_adaptive_max,
    "conv1d_adaptive_max_to_2": _conv1d_adaptive_max_to_2,
}


@pytest.mark.parametrize("exporter", slow_params(["dynamo_noopt", "dynamo"], lambda e: e == "dynamo_noopt"))
@pytest.mark.parametrize("case", sorted(CASES))
def test_dynamo_exports_are_rescaled(case, exporter, tmp_path):
    module, shape = CASES[case]()
    _check_rescaled(_init(module, 0), shape, exporter, tmp_path)


#: modules whose core-ATen export (``run_decompositions``) writes 1-D pooling between unsqueeze and
#: squeeze, or PReLU as where(x > 0, x, w * x)
CORE_ATEN_CASES = ["conv1d_maxpool_ceil_adaptive_max", "conv1d_depthwise_maxpool_adaptive_avg",
                   "conv1d_avgpool_ceil_flatten", "conv1d_adaptive_max_to_2"]


@pytest.mark.parametrize("case", CORE_ATEN_CASES)
def test_core_aten_exports_are_rescaled(case, tmp_path):
    module, shape = CASES[case]()
    _check_rescaled(_init(module, 0), shape, "pt2_core", tmp_path)


def test_scalar_prelu_in_core_aten_export_is_rescaled(tmp_path):
    module = nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(), nn.Conv2d(4, 3, 1), nn.PReLU(3),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    _check_rescaled(_init(module, 3), (1, 2, 6, 6), "pt2_core", tmp_path)


class _AMax(nn.Module):
    """relu(conv(x)).amax(dim) -> linear: a hand-written max pool over ``dim`` (ReduceMax in ONNX)."""

    def __init__(self, dim, keepdim: bool, features: int):
        super().__init__()
        self.dim, self.keepdim = dim, keepdim
        self.conv = nn.Conv2d(2, 4, 3)
        self.linear = nn.Linear(features, 2)

    def forward(self, x):
        return self.linear(torch.flatten(torch.amax(torch.relu(self.conv(x)), dim=self.dim, keepdim=self.keepdim), 1))


@pytest.mark.parametrize("exporter", ["dynamo_noopt", "pt2"])
@pytest.mark.parametrize("dim,keepdim,features", [((2, 3), False, 4), ((2, 3), True, 4), ((3,), False, 16),
                                                  ((-2,), True, 20)])
def test_max_over_spatial_axes_is_a_max_pool(dim, keepdim, features, exporter, tmp_path):
    _check_rescaled(_init(_AMax(dim, keepdim, features), 4), (1, 2, 6, 7), exporter, tmp_path)


@pytest.mark.parametrize("exporter", ["dynamo_noopt", "pt2"])
def test_max_over_channels_is_refused_with_its_reason(exporter, tmp_path):
    """A max across channels is not a per-channel pooling: exit 3, saying which axis."""
    suffix = ".pt2" if exporter == "pt2" else ".onnx"
    source = _export(_init(_AMax(1, False, 20), 0), (1, 2, 6, 7), tmp_path / f"in{suffix}", exporter)
    result = runner.invoke(app, ["inspect", str(source)])
    assert result.exit_code == 3, result.output
    assert "channel axis" in " ".join(result.output.split())


def _pools_then_matmul(op: str, spatial: tuple[int, ...], pools) -> tuple[onnx.ModelProto, np.ndarray]:
    """Pools (ceil mode) -> Reshape to the constant (1, features) onnxruntime computes -> MatMul."""
    from onnx import TensorProto, helper

    x = np.random.default_rng(0).standard_normal((1, 2, *spatial)).astype(np.float32)
    names = ["x"] + [f"p{i}" for i in range(len(pools))]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], kernel_shape=list(k), strides=list(st), pads=list(pd),
                              ceil_mode=1) for i, (k, st, pd) in enumerate(pools)]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)
    probe = helper.make_model(helper.make_graph(nodes, "g", [x_info], [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, None)]),
                              opset_imports=[helper.make_opsetid("", 17)])
    features = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].size
    w = np.random.default_rng(1).standard_normal((features, 3)).astype(np.float32)
    nodes += [helper.make_node("Reshape", [names[-1], "shape"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    init = [onnx.numpy_helper.from_array(np.array([1, features], dtype=np.int64), "shape"),
            onnx.numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "g", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x


def _ir_matches_onnxruntime(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path) -> None:
    from pathcond_cli.frontends.onnx_frontend import load_onnx
    from pathcond_cli.ir import evaluate

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    graph = load_onnx(path).graph
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = evaluate(graph, {next(iter(graph.inputs)): torch.from_numpy(x)})[graph.outputs[0]].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


#: (spatial, kernel, stride, pads) where the last ceil-mode window would start in the end padding
POOL_GRID = [((7,), (2,), (2,), (1, 1)), ((5,), (3,), (3,), (1, 1)), ((8,), (2,), (3,), (1, 1)),
             ((7, 5), (2, 2), (2, 2), (1, 1, 1, 1)), ((5, 8), (3, 2), (3, 3), (1, 0, 1, 1)),
             ((4, 6), (2, 1), (3, 1), (1, 0, 1, 0))]


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("spatial,kernel,stride,pads", POOL_GRID)
def test_ceil_mode_pool_sizes_are_those_onnxruntime_computes(op, spatial, kernel, stride, pads, tmp_path):
    """ONNX's shape inference counts a last ceil-mode window that would start in the end padding;
    onnxruntime (and PyTorch) do not. pathcond must read the Reshape after the pool as onnxruntime does."""
    model, x = _pools_then_matmul(op, spatial, [(kernel, stride, pads)])
    _ir_matches_onnxruntime(model, x, tmp_path)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_chained_ceil_mode_pools_are_sized_from_the_corrected_sizes(op, tmp_path):
    """5 -> 3 -> 2 (ONNX's inference: 5 -> 4 -> 3); sizing the second pool from the first one's wrong
    size would give 3."""
    model, x = _pools_then_matmul(op, (5,), [((2,), (2,), (1, 1)), ((2,), (2,), (1, 1))])
    _ir_matches_onnxruntime(model, x, tmp_path)


def test_torchscript_export_onnxruntime_cannot_load_says_why(tmp_path):
    """The TorchScript exporter writes AvgPool(ceil_mode) -> Flatten -> Gemm with PyTorch's sizes;
    onnxruntime's load-time shape inference sizes the pool one window larger and refuses the file (fuzz
    seed 187). pathcond cannot verify against it: exit 3, with the likely cause."""
    module, shape = _conv1d_avgpool_ceil_flatten()
    source = _export(_init(module, 0), shape, tmp_path / "in.onnx", "ts")
    with pytest.raises(Exception, match="ShapeInferenceError"):
        ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    result = runner.invoke(app, ["rescale", str(source), str(tmp_path / "out.onnx")])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "onnxruntime cannot run" in text and "ceil_mode pool" in text
    assert not (tmp_path / "out.onnx").exists()


def _pool_1d_as_2d(via_1d: bool):
    """conv -> relu -> max pool (ceil, pads) -> conv -> relu -> flatten -> linear on (1, C, L, 1) maps, the
    pool either 2-D with a unit axis or 1-D between two channel-preserving reshapes (the layout of the
    dynamo exporter's 1-D pooling, the other way round: the brute-force reference expands 2-D maps)."""
    from pathcond_cli.ir import Graph, Node

    rng = np.random.default_rng(5)
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in {
        "c1.w": (3, 2, 3, 1), "c1.b": (3,), "c2.w": (4, 3, 2, 1), "c2.b": (4,), "fc.w": (2, 16), "fc.b": (2,)}.items()}
    conv = dict(stride=[1, 1], dilation=[1, 1], groups=1)
    nodes = [Node("c1", "conv", ("x",), "a", {"weight": "c1.w", "bias": "c1.b"}, dict(conv, pads=[1, 0, 1, 0])),
             Node("r1", "relu", ("a",), "b")]
    if via_1d:
        nodes += [Node("down", "reshape", ("b",), "b1", attrs={"spatial": [9]}),
                  Node("mp", "maxpool", ("b1",), "c1", attrs=dict(kernel=[3], stride=[2], dilation=[1], pads=[1, 1],
                                                                   ceil_mode=True)),
                  Node("up", "reshape", ("c1",), "c", attrs={"spatial": [5, 1]})]
    else:
        nodes += [Node("mp", "maxpool", ("b",), "c", attrs=dict(kernel=[3, 1], stride=[2, 1], dilation=[1, 1],
                                                                 pads=[1, 0, 1, 0], ceil_mode=True))]
    nodes += [Node("c2", "conv", ("c",), "d", {"weight": "c2.w", "bias": "c2.b"}, dict(conv, pads=[0, 0, 0, 0])),
              Node("r2", "relu", ("d",), "e"), Node("fl", "flatten", ("e",), "f"),
              Node("fc", "linear", ("f",), "y", {"weight": "fc.w", "bias": "fc.b"})]
    return Graph({"x": (1, 2, 9, 1)}, nodes, ["y"], params)


def test_reshape_op_path_statistics_match_brute_force():
    """The IR's channel-preserving reshape: same function, same groups and the same diag(G) as the
    brute-force path enumeration of the equivalent network with a 1-D pool."""
    from pathcond_cli.groups import build_groups
    from pathcond_cli.ir import evaluate
    from pathcond_cli.stats import path_statistics
    from tests.reference import reference

    graph, plain = _pool_1d_as_2d(True), _pool_1d_as_2d(False)
    x = {"x": torch.randn(4, 2, 9, 1, dtype=torch.float64)}
    torch.testing.assert_close(evaluate(graph, x)["y"], evaluate(plain, x)["y"])
    groups = build_groups(graph)
    stats = path_statistics(graph, groups)
    ref = reference(plain)
    assert [r.key for r in groups.roles] == [r.key for r in build_groups(plain).roles]
    for role, log_g in zip(groups.roles, stats.log_g):
        np.testing.assert_allclose(torch.exp(log_g).numpy(), ref.g_of(role.key, role.shape), rtol=1e-9)


def _pool_longer_than_input(op: str, **attrs) -> onnx.ModelProto:
    """Conv1d → Relu → a pool whose window is one longer than its input → Flatten → Gemm, as the TorchScript
    exporter writes an adaptive max pool sized from ONNX's (one-too-many) ceil-mode shape inference."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node(op, ["r"], ["p"], kernel_shape=[6], strides=[6], **attrs),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op, attrs", [("MaxPool", {}), ("AveragePool", {})], ids=["max", "avg"])
def test_pool_window_longer_than_its_input_is_clipped_as_onnxruntime_does(op, attrs, tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_pool_longer_than_input(op, **attrs), source)
    result = runner.invoke(app, ["rescale", str(source), str(target), "--quiet"])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(1).standard_normal((1, 2, 5)).astype(np.float32)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (source, target))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    changed = [n for n in ("w", "fc_w") if not np.array_equal(
        *(onnx.numpy_helper.to_array(next(t for t in onnx.load(p).graph.initializer if t.name == n))
          for p in (source, target)))]
    assert changed


def test_pool_window_longer_than_its_input_counting_padding_is_refused(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(_pool_longer_than_input("AveragePool", count_include_pad=1), source)
    result = runner.invoke(app, ["inspect", str(source), "--quiet"])
    assert result.exit_code == 3 and "counts padding" in " ".join(result.output.split()), result.output
