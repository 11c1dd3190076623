"""The PyTorch front end: nn.Module / ExportedProgram -> IR, and the four torch file formats."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pathcond_cli import ir
from pathcond_cli.errors import UnsupportedModelError, UsageError
from pathcond_cli.frontends.base import LoadOptions
from pathcond_cli.frontends.torch_frontend import (
    exported_to_graph,
    load_torch,
    module_to_graph,
    module_translation,
    stored_layout,
)
from pathcond_cli.verify import verify
from tests import nets
from tests.arch_factories import TwoNamesTied
from tests.conftest import random_inputs, slow_params

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

FORMATS = ["torch-state-dict", "torch-checkpoint", "torch-export", "torchscript", "torch-module"]
FILE_MODELS = ["mlp", "small_cnn", "resnet_like", "concat_net", "tiny_generator"]


# --------------------------------------------------------------------------------------------------
# Helpers


def _rel_err(got, want) -> float:
    got = torch.as_tensor(np.asarray(got), dtype=torch.float64)
    want = torch.as_tensor(np.asarray(want), dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _ir_out(graph: ir.Graph, x: torch.Tensor) -> torch.Tensor:
    (name,) = graph.inputs
    outs = ir.evaluate(graph, {name: x})
    assert len(outs) == 1
    return next(iter(outs.values()))


def _assert_module_matches(module: nn.Module, graph: ir.Graph, shape, batches=(1, 3), seed=0) -> None:
    ref = _double_copy(module)
    gen = torch.Generator().manual_seed(seed)
    for b in batches:
        x = torch.randn((b, *shape[1:]), generator=gen, dtype=torch.float64)
        with torch.no_grad():
            want = ref(x)
        got = _ir_out(graph, x)
        assert _rel_err(got, want) < 1e-6


def _double_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double().eval()


class TiedMLP(nn.Module):
    """One nn.Linear(4, 4) applied twice with a ReLU between."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 5), nn.GELU()
        self.fc2, self.act2 = nn.Linear(5, 5), nn.GELU()
        self.fc3 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class Relu6Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


class MixedBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.fc1(x)))
        return self.fc2(torch.sigmoid(h) * 1.0 + F.silu(h))


class SoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.fc1, self.fc2 = nn.Linear(6, 7), nn.Linear(7, 3)

    def forward(self, x):
        return torch.softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


class Sink1d(nn.Module):
    """1-D conv with dilation, affine-free BatchNorm, padded ceil-mode max-pool, PReLU, LeakyReLU, a scalar
    scale, flatten by view, a matmul-free linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.c1 = nn.Conv1d(3, 6, 3, padding=2, dilation=2)
        self.bn1 = nn.BatchNorm1d(6, affine=False)
        self.p1 = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
        self.prelu = nn.PReLU(6)
        self.a1 = nn.AvgPool1d(2, padding=1, count_include_pad=True)
        self.fc = nn.Linear(6 * 4, 5)
        nets._randomise_bn(self, torch.Generator().manual_seed(1))

    def forward(self, x):  # (N, 3, 12)
        h = F.leaky_relu(self.bn1(self.c1(x)), 0.2)  # (N, 6, 12)
        h = self.prelu(self.p1(h)) * 0.5  # (N, 6, 7)
        h = self.a1(h)  # (N, 6, 4)
        return self.fc(h.view(h.size(0), -1))


class Sink2d(nn.Module):
    """'same' padding, a grouped strided conv, a separate bias parameter, padded ceil-mode average pool
    without pad counting, dropout, a division, a per-channel multiply, flatten by reshape."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.c0 = nn.Conv2d(2, 4, 4, padding="same")
        self.gconv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.extra_bias = nn.Parameter(torch.randn(8))
        self.gain = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 3 * 3, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):  # (N, 2, 7, 7)
        h = torch.relu(self.c0(x))  # (N, 4, 7, 7)
        h = self.gconv(h) + self.extra_bias.view(1, -1, 1, 1)  # (N, 8, 4, 4)
        h = self.pool(torch.relu(h) * self.gain)  # (N, 8, 3, 3)
        h = self.drop(h) / 4.0
        h = h.reshape(h.shape[0], -1)
        return self.fc2(torch.relu(self.fc(h)))


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.mpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.apool = nn.AvgPool2d(2, ceil_mode=True)
        self.ada = nn.AdaptiveAvgPool2d(2)
        self.amax = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(16 + 4 + 4, 3)

    def forward(self, x):  # (N, 2, 14, 14)
        h = torch.relu(self.conv(x))
        h = self.apool(self.mpool(h))  # (N, 4, 7, 7) -> (N, 4, 4, 4)
        a = torch.flatten(self.ada(h), 1)
        g = h.mean(dim=(-2, -1), keepdim=True).flatten(1)
        m = self.amax(h).squeeze(-1).squeeze(-1)
        return self.fc(torch.cat([a, g, m], dim=1))


# --------------------------------------------------------------------------------------------------
# Part A: nn.Module -> IR


@pytest.mark.parametrize("name", sorted(nets.ZOO))
def test_zoo_module_to_graph_matches_module(name):
    factory, shape = nets.ZOO[name]
    model = factory()
    tr = module_translation(model, [shape])
    graph = tr.graph
    assert list(graph.inputs) == ["x"] and graph.inputs["x"] == tuple(shape)
    state = model.state_dict()
    assert set(graph.params) <= set(state)
    assert (name == "tiny_generator") == bool(tr.swapped)  # transposed convolutions: held (O, I/groups, *k)
    for key, value in stored_layout(graph.params, tr.swapped).items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key])
    assert not model.training
    _assert_module_matches(model, graph, shape)


def test_zoo_dict_shapes_and_training_flag_restored():
    model = nets.small_cnn().train()
    graph = module_to_graph(model, {"input": (1, 3, 16, 16)})
    assert model.training, "module_to_graph must restore the module's mode"
    assert list(graph.inputs) == ["x"]
    model.eval()
    _assert_module_matches(model, graph, (1, 3, 16, 16))


def test_node_names_point_at_modules():
    graph = module_to_graph(nets.resnet_like(), [(1, 3, 8, 8)])
    names = {n.name for n in graph.nodes}
    assert {"stem.0", "layer1.0.conv1", "layer1.0.bn1", "layer2.shortcut.0", "layer2.shortcut.1", "fc"} <= names
    conv = next(n for n in graph.nodes if n.name == "layer2.shortcut.0")
    assert conv.op == "conv" and conv.params == {"weight": "layer2.shortcut.0.weight"}
    assert conv.attrs["stride"] == [2, 2] and conv.attrs["pads"] == [0, 0, 0, 0]
    bn = next(n for n in graph.nodes if n.name == "layer1.0.bn1")
    assert bn.op == "batchnorm" and bn.params["running_var"] == "layer1.0.bn1.running_var"
    assert bn.attrs["eps"] == pytest.approx(1e-5)
    adds = [n for n in graph.nodes if n.op == "add"]
    assert len(adds) == 3 and all(n.name.startswith(("layer1.0:", "layer1.1:", "layer2:")) for n in adds)
    assert len(set(n.name for n in graph.nodes)) == len(graph.nodes)


def test_tied_linear_shares_one_key():
    model = TiedMLP().eval()
    graph = module_to_graph(model, [(1, 4)])
    linears = [n for n in graph.nodes if n.op == "linear"]
    assert len(linears) == 2
    assert linears[0].params == linears[1].params == {"weight": "lin.weight", "bias": "lin.bias"}
    assert set(graph.params) == {"lin.weight", "lin.bias"}
    assert linears[0].name != linears[1].name
    _assert_module_matches(model, graph, (1, 4))


def test_tied_under_two_names():
    model = TwoNamesTied().eval()
    graph = module_to_graph(model, [(1, 4)])
    linears = [n for n in graph.nodes if n.op == "linear"]
    assert linears[0].params["weight"] == linears[1].params["weight"]
    _assert_module_matches(model, graph, (1, 4))


def test_1d_ops():
    model = Sink1d().eval()
    graph = module_to_graph(model, [(1, 3, 12)])
    ops = {n.op for n in graph.nodes}
    assert {"conv", "batchnorm", "leaky_relu", "maxpool", "prelu", "scale", "avgpool", "flatten", "linear"} <= ops
    bn = next(n for n in graph.nodes if n.op == "batchnorm")
    assert set(bn.params) == {"running_mean", "running_var"}
    _assert_module_matches(model, graph, (1, 3, 12))


def test_2d_ops():
    model = Sink2d().eval()
    graph = module_to_graph(model, [(1, 2, 7, 7)])
    ops = {n.op for n in graph.nodes}
    assert {"conv", "bias", "affine", "avgpool", "identity", "scale", "flatten", "linear"} <= ops
    c0 = next(n for n in graph.nodes if n.name == "c0")
    assert c0.attrs["pads"] == [1, 1, 2, 2]
    g = next(n for n in graph.nodes if n.name == "gconv")
    assert g.attrs["groups"] == 2 and g.attrs["stride"] == [2, 2]
    _assert_module_matches(model, graph, (1, 2, 7, 7))


def test_channel_moving_reshape_is_unsupported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 3, 1)
            self.c2 = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.c2(self.c(x).unsqueeze(1))

    offenders = _offenders(M(), (1, 2, 5))
    assert len(offenders) == 1 and "unsqueeze" in offenders[0].op


def test_pools_and_mean():
    model = Pools().eval()
    graph = module_to_graph(model, [(1, 2, 14, 14)])
    ops = [n.op for n in graph.nodes]
    assert "maxpool" in ops and "avgpool" in ops and "global_avgpool" in ops and "concat" in ops
    mp = next(n for n in graph.nodes if n.op == "maxpool")
    assert mp.attrs["ceil_mode"] is True and mp.attrs["pads"] == [1, 1, 1, 1] and mp.attrs["stride"] == [2, 2]
    _assert_module_matches(model, graph, (1, 2, 14, 14))


def test_matmul_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.w1 = nn.Parameter(torch.randn(5, 4))
            self.b1 = nn.Parameter(torch.randn(5))
            self.w2 = nn.Parameter(torch.randn(3, 5))
            self.b2 = nn.Parameter(torch.randn(3))

        def forward(self, x):
            h = torch.relu(torch.addmm(self.b1, x, self.w1.t()))
            return h @ self.w2.t() + self.b2

    model = M().eval()
    graph = module_to_graph(model, [(1, 4)])
    assert [n.op for n in graph.nodes] == ["linear", "relu", "linear", "bias"]
    assert graph.nodes[0].params == {"weight": "w1", "bias": "b1"}
    assert graph.nodes[3].params == {"bias": "b2"}
    _assert_module_matches(model, graph, (1, 4))


def test_matmul_with_in_out_weights():
    """x @ W with W stored (in, out): the IR holds W.t(), every format writes W back in its own layout."""
    from tests.arch_factories import in_out_weights

    model = in_out_weights()
    tr = module_translation(model, [(1, 4)])
    assert [n.op for n in tr.graph.nodes] == ["linear", "bias", "relu", "linear", "relu", "linear"]
    assert tr.swapped == {"w1": 1, "w2": 1, "w3": 1}
    assert torch.equal(tr.graph.params["w2"], model.w2.detach().t())
    _assert_module_matches(model, tr.graph, (1, 4))


def _save_in_format(fmt: str, model: nn.Module, path: Path, shape, arch: str) -> LoadOptions:
    """Write ``model`` to ``path`` as ``fmt``; returns the options that read it back (``arch`` names its
    factory in tests.arch_factories, for state_dicts)."""
    shapes = {"x": tuple(shape)}
    if fmt == "torch-state-dict":
        torch.save(model.state_dict(), path)
        return LoadOptions(input_shapes=shapes, arch=f"tests.arch_factories:{arch}")
    if fmt == "torch-module":
        torch.save(model, path)
        return LoadOptions(input_shapes=shapes, trust_pickle=True)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
        return LoadOptions(input_shapes=shapes)
    torch.export.save(torch.export.export(model, (torch.randn(shape),)), str(path))
    return LoadOptions()


@pytest.mark.parametrize("fmt", ["torch-state-dict", "torch-export", "torchscript", "api"])
def test_in_out_weights_rescaled_in_their_layout(fmt, tmp_path):
    from pathcond_cli import rescale_module_
    from pathcond_cli.jobs import RescaleOptions, SolveOptions, rescale_model
    from tests.arch_factories import in_out_weights

    model = in_out_weights()
    x = torch.randn(1, 4)
    with torch.no_grad():
        want = model(x)
    if fmt == "api":
        report = rescale_module_(model, (1, 4), device="cpu")
        rescaled = model
    else:
        path = tmp_path / "model"
        opts = _save_in_format(fmt, model, path, (1, 4), "in_out_weights")
        report = rescale_model(path, tmp_path / "out", opts, SolveOptions(device="cpu"), RescaleOptions()).report
        assert report["verification"]["passed"]
        loaded = load_torch(tmp_path / "out", opts)
        rescaled = loaded._fresh_module(tmp_path / "out")
    assert report["model"]["groups_free"] == 12 and report["conditioning"]["max_abs_log_scale"] > 1e-2
    state = {k: v for k, v in rescaled.state_dict().items() if k.startswith("w")}
    assert all(v.shape == getattr(in_out_weights(), k).shape for k, v in state.items())
    assert not torch.allclose(state["w2"], in_out_weights().w2)
    with torch.no_grad():
        got = rescaled(x)
    assert _rel_err(got, want) < 1e-5


def test_weight_used_as_matrix_and_transpose_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.relu(x @ self.w) @ self.w.t()

    offenders = _offenders(M(), (1, 4))
    assert len(offenders) == 1 and "both as a matrix and as its transpose" in offenders[0].why


def test_decomposed_exported_program():
    model = nets.small_cnn()
    ep = torch.export.export(model, (torch.randn(1, 3, 16, 16),)).run_decompositions({})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten._native_batch_norm_legit_no_training.default" in targets
    graph = exported_to_graph(ep)
    assert sum(n.op == "batchnorm" for n in graph.nodes) == 2
    _assert_module_matches(model, graph, (1, 3, 16, 16))


@pytest.mark.parametrize("name", slow_params(sorted(nets.ZOO), lambda name: name != "resnet_like"))
def test_zoo_core_aten_decomposition(name):
    factory, shape = nets.ZOO[name]
    model = factory()
    ep = torch.export.export(model, (torch.randn(shape),)).run_decompositions()  # core aten: addmm, permute, ...
    graph = exported_to_graph(ep)
    assert set(graph.params) <= set(model.state_dict())
    _assert_module_matches(model, graph, shape)


def test_softmax_head_is_dropped_with_a_warning():
    from pathcond_cli.frontends.torch_frontend import module_translation

    model = SoftmaxHead().eval()
    tr = module_translation(model, [(1, 6)])
    assert tr.graph.nodes[-1].op == "linear"
    assert any("softmax" in w for w in tr.warnings)
    x = torch.randn(3, 6, dtype=torch.float64)
    ref = _double_copy(model)
    with torch.no_grad():
        logits = ref.fc2(torch.relu(ref.fc1(x)))
    assert _rel_err(_ir_out(tr.graph, x), logits) < 1e-6


def _offenders(model, shape):
    with pytest.raises(UnsupportedModelError) as info:
        module_to_graph(model.eval(), [shape])
    return info.value.offenders


def test_gelu_lists_every_offender():
    offenders = _offenders(GeluNet(), (1, 4))
    assert [o.op for o in offenders] == ["aten.gelu.default", "aten.gelu.default"]
    assert [o.node.split(":")[0] for o in offenders] == ["act1", "act2"]
    assert all("homogeneous" in o.why for o in offenders)


def test_relu6_is_unsupported():
    offenders = _offenders(Relu6Net(), (1, 2, 5, 5))
    assert len(offenders) == 1
    assert offenders[0].op == "aten.hardtanh.default" and offenders[0].node.startswith("act")


def test_several_kinds_of_offenders():
    offenders = _offenders(MixedBad(), (1, 4))
    ops = sorted(o.op for o in offenders)
    # root causes only: ops downstream of an offender (the * 1.0, the add) are not listed
    assert ops == sorted(["aten.layer_norm.default", "aten.tanh.default", "aten.sigmoid.default",
                          "aten.silu.default"])
    assert any(o.node.startswith("norm") for o in offenders)


def test_3d_transposed_conv_is_unsupported():
    model = nn.Sequential(nn.Conv3d(2, 3, 3), nn.ReLU(), nn.ConvTranspose3d(3, 2, 3))
    offenders = _offenders(model, (1, 2, 5, 5, 5))
    assert any("3-D transposed" in o.why for o in offenders)


def test_constant_add_is_unsupported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.relu(x + 1.0))

    offenders = _offenders(M(), (1, 3))
    assert len(offenders) == 1 and offenders[0].op.startswith("aten.add")


# --------------------------------------------------------------------------------------------------
# Part B: files


def _write(fmt: str, name: str, folder: Path, model: nn.Module | None = None) -> tuple[Path, LoadOptions]:
    factory, shape = nets.ZOO[name]
    model = model if model is not None else factory()
    path = folder / f"{name}-{fmt}.bin"  # the extension says nothing: formats are told by content
    opts = LoadOptions(input_shapes={"x": tuple(shape)})
    if fmt == "torch-state-dict":
        torch.save(model.state_dict(), path)
        opts = LoadOptions(input_shapes={"input": tuple(shape)}, arch=f"tests.arch_factories:{name}")
    elif fmt == "torch-checkpoint":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = model(torch.randn((2, *shape[1:]))).square().sum()
        loss.backward()
        model.zero_grad()
        torch.save({"epoch": 7, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "meta": {"lr": 0.1, "note": "hello"}}, path)
        opts = LoadOptions(input_shapes=opts.input_shapes, arch=f"tests.arch_factories:{name}")
    elif fmt == "torch-export":
        torch.export.save(torch.export.export(model, (torch.randn(shape),)), str(path))
        opts = LoadOptions()
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    elif fmt == "torch-module":
        torch.save(model, path)
        opts = LoadOptions(input_shapes=opts.input_shapes, trust_pickle=True)
    return path, opts


def _expected_format(fmt: str) -> str:
    return "torch-state-dict" if fmt == "torch-checkpoint" else fmt


def _feeds(model, seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    return random_inputs(model, seed, batch)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", slow_params(FILE_MODELS, lambda name: name not in ("mlp", "resnet_like")))
def test_load_ir_matches_runtime(fmt, name, tmp_path):
    path, opts = _write(fmt, name, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    model = load_torch(path, opts)
    assert model.format == _expected_format(fmt)
    assert model.path == path
    specs = model.input_specs()
    assert len(specs) == 1 and specs[0].shape == nets.ZOO[name][1] and specs[0].dtype == np.float32
    assert model.has_batchnorm == (name in ("small_cnn", "resnet_like", "tiny_generator") and fmt != "torch-export")
    for seed in range(2):
        feeds = _feeds(model, seed)
        (got,) = model.run(path, feeds)
        ir_out = _ir_out(model.graph, torch.from_numpy(feeds[specs[0].name]))
        assert _rel_err(ir_out, got) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "loading or running must not write"


def _rescale_mlp(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hidden unit 5 of the first layer: incoming weights and bias x3, outgoing weights x1/3."""
    w0, b0, w2 = params["net.0.weight"].clone(), params["net.0.bias"].clone(), params["net.2.weight"].clone()
    w0[5] *= 3
    b0[5] *= 3
    w2[:, 5] /= 3
    return {"net.0.weight": w0, "net.0.bias": b0, "net.2.weight": w2}


def _rescale_cnn(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Channel 3 of the first BatchNorm: weight and bias x2; the next conv's input channel 3 x1/2."""
    g, b, w = params["features.1.weight"].clone(), params["features.1.bias"].clone(), params["features.4.weight"].clone()
    g[3] *= 2
    b[3] *= 2
    w[:, 3] /= 2
    return {"features.1.weight": g, "features.1.bias": b, "features.4.weight": w}


RESCALES = {"mlp": _rescale_mlp, "small_cnn": _rescale_cnn}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(RESCALES))
def test_save_function_preserving_rescaling(fmt, name, tmp_path):
    path, opts = _write(fmt, name, tmp_path)
    model = load_torch(path, opts)
    new = RESCALES[name](model.graph.params)
    out = tmp_path / "rescaled.bin"
    model.save(new, out)
    assert out.exists()
    # same function, eval mode (and train mode with BatchNorm, batch 4)
    for seed in range(2):
        feeds = _feeds(model, seed)
        assert _rel_err(model.run(out, feeds)[0], model.run(path, feeds)[0]) < 1e-5
    if model.has_batchnorm:
        feeds = _feeds(model, 9, batch=4)
        a = model.run(path, feeds, train=True)[0]
        b = model.run(out, feeds, train=True)[0]
        assert _rel_err(b, a) < 1e-5
        assert _rel_err(a, model.run(path, feeds)[0]) > 1e-3, "train mode must differ from eval mode"
    # the parameters really changed, everything else did not, dtypes kept
    reloaded = load_torch(out, opts)
    assert reloaded.format == model.format
    for key, value in model.graph.params.items():
        got = reloaded.graph.params[key]
        assert got.dtype == value.dtype
        if key in new:
            assert torch.allclose(got, new[key].to(got.dtype)) and not torch.allclose(got, value)
        else:
            assert torch.equal(got, value)
    # the pathcond verifier agrees; and catches a change that is not function-preserving
    assert verify(model, out).passed
    bad = dict(new)
    key = next(iter(bad))
    bad[key] = bad[key] * 1.5
    model.save(bad, tmp_path / "broken.bin")
    assert not verify(model, tmp_path / "broken.bin").passed


def test_checkpoint_entries_kept(tmp_path):
    path, opts = _write("torch-checkpoint", "mlp", tmp_path)
    model = load_torch(path, opts)
    assert any("optimizer" in w for w in model.warnings)
    out = tmp_path / "out.pt"
    model.save(_rescale_mlp(model.graph.params), out)
    old = torch.load(path, weights_only=True)
    new = torch.load(out, weights_only=True)
    assert list(new) == list(old)
    assert new["epoch"] == 7 and new["meta"] == old["meta"]
    assert list(new["model"]) == list(old["model"])
    for k in old["model"]:
        assert new["model"][k].dtype == old["model"][k].dtype
        changed = not torch.equal(new["model"][k], old["model"][k])
        assert changed == (k in ("net.0.weight", "net.0.bias", "net.2.weight"))
    assert new["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]
    for idx, st in old["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(new["optimizer"]["state"][idx][k], v)


def test_checkpoint_key_option_and_prefix(tmp_path):
    model = nets.mlp()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt"
    torch.save({"ema": {"a": torch.zeros(2)}, "weights": sd}, path)
    opts = LoadOptions(input_shapes={"x": (1, 8)}, arch="tests.arch_factories:mlp", key="weights")
    loaded = load_torch(path, opts)
    assert set(loaded.graph.params) <= set(model.state_dict())
    out = tmp_path / "out"
    loaded.save(_rescale_mlp(loaded.graph.params), out)
    saved = torch.load(out, weights_only=True)
    assert set(saved["weights"]) == set(sd) and torch.equal(saved["ema"]["a"], torch.zeros(2))
    assert not torch.equal(saved["weights"]["module.net.0.weight"], sd["module.net.0.weight"])
    feeds = _feeds(loaded, 0)
    assert _rel_err(loaded.run(out, feeds)[0], loaded.run(path, feeds)[0]) < 1e-5


def test_float64_state_dict_keeps_dtype(tmp_path):
    model = nets.mlp().double()
    path = tmp_path / "sd"
    torch.save(model.state_dict(), path)
    loaded = load_torch(path, LoadOptions(input_shapes={"x": (1, 8)}, arch="tests.arch_factories:mlp"))
    assert loaded.graph.params["net.0.weight"].dtype == torch.float64
    loaded.save(_rescale_mlp(loaded.graph.params), tmp_path / "out")
    assert torch.load(tmp_path / "out", weights_only=True)["net.0.weight"].dtype == torch.float64


def test_pickled_module_refused_without_trust(tmp_path):
    path, opts = _write("torch-module", "mlp", tmp_path)
    with pytest.raises(UsageError, match="--trust-pickle") as info:
        load_torch(path, LoadOptions(input_shapes={"x": (1, 8)}))
    assert "code" in str(info.value)
    model = load_torch(path, opts)
    assert model.format == "torch-module"


def test_checkpoint_dict_holding_a_pickled_module(tmp_path):
    """{"model": nn.Module, "optimizer": ..., "epoch": ...}: refused without --trust-pickle; with it the
    module is found (or named with --key), rescaled, and every other entry written back untouched."""
    model, other = nets.mlp(seed=3), nets.mlp(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    torch.save({"model": model, "optimizer": opt.state_dict(), "epoch": 5}, path)
    shapes = {"x": (1, 8)}
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_torch(path, LoadOptions(input_shapes=shapes))
    loaded = load_torch(path, LoadOptions(input_shapes=shapes, trust_pickle=True))
    assert loaded.format == "torch-module"
    assert any("optimizer state" in w for w in loaded.warnings)
    loaded.save(_rescale_mlp(loaded.graph.params), tmp_path / "out")
    saved = torch.load(tmp_path / "out", weights_only=False)
    assert saved["epoch"] == 5 and set(saved) == {"model", "optimizer", "epoch"}
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert not torch.equal(saved["model"].net[0].weight, model.net[0].weight)
    feeds = _feeds(loaded, 0)
    assert _rel_err(loaded.run(tmp_path / "out", feeds)[0], loaded.run(path, feeds)[0]) < 1e-5

    torch.save({"student": model, "teacher": other}, path)
    with pytest.raises(UsageError, match="several nn.Modules.*--key"):
        load_torch(path, LoadOptions(input_shapes=shapes, trust_pickle=True))
    loaded = load_torch(path, LoadOptions(input_shapes=shapes, trust_pickle=True, key="teacher"))
    assert torch.equal(loaded.graph.params["net.0.weight"], other.net[0].weight.detach())


def test_state_dict_needs_arch_and_shape(tmp_path):
    path, opts = _write("torch-state-dict", "mlp", tmp_path)
    with pytest.raises(UsageError, match="--arch"):
        load_torch(path, LoadOptions(input_shapes={"x": (1, 8)}))
    with pytest.raises(UsageError, match="input-shape"):
        load_torch(path, LoadOptions(arch="tests.arch_factories:mlp"))
    with pytest.raises(UsageError, match="cannot import"):
        load_torch(path, LoadOptions(input_shapes={"x": (1, 8)}, arch="tests.no_such_module:mlp"))


def test_state_dict_mismatch_lists_keys(tmp_path):
    path, _ = _write("torch-state-dict", "mlp", tmp_path)
    sd = torch.load(path, weights_only=True)
    sd["extra.weight"] = torch.zeros(1)
    del sd["net.6.bias"]
    torch.save(sd, path)
    with pytest.raises(UsageError) as info:
        load_torch(path, LoadOptions(input_shapes={"x": (1, 8)}, arch="tests.arch_factories:mlp"))
    assert "net.6.bias" in str(info.value) and "extra.weight" in str(info.value)


def test_arch_kwargs(tmp_path):
    model = nets.mlp(seed=2, widths=(3, 5, 2))
    path = tmp_path / "sd"
    torch.save(model.state_dict(), path)
    opts = LoadOptions(input_shapes={"x": (1, 3)}, arch="tests.nets:mlp", arch_kwargs={"widths": (3, 5, 2)})
    loaded = load_torch(path, opts)
    assert loaded.graph.params["net.0.weight"].shape == (5, 3)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(UsageError):
        load_torch(junk, LoadOptions())
    import zipfile

    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(UsageError):
        load_torch(z, LoadOptions())
    with pytest.raises(UsageError):
        load_torch(tmp_path / "missing.pt", LoadOptions())
    truncated = tmp_path / "trunc.pt"
    good, _ = _write("torch-state-dict", "mlp", tmp_path)
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UsageError):
        load_torch(truncated, LoadOptions(input_shapes={"x": (1, 8)}, arch="tests.arch_factories:mlp"))


def test_tied_two_names_state_dict_save(tmp_path):
    from tests.arch_factories import two_names_tied

    model = two_names_tied()
    path = tmp_path / "tied"
    torch.save(model.state_dict(), path)
    opts = LoadOptions(input_shapes={"x": (1, 4)}, arch="tests.arch_factories:two_names_tied")
    loaded = load_torch(path, opts)
    (key,) = {n.params["weight"] for n in loaded.graph.nodes if n.op == "linear"}
    new = loaded.graph.params[key] * 2
    loaded.save({key: new}, tmp_path / "out")
    saved = torch.load(tmp_path / "out", weights_only=True)
    assert torch.allclose(saved["a.weight"], new) and torch.allclose(saved["b.weight"], new)
    feeds = _feeds(loaded, 0)
    got = loaded.run(tmp_path / "out", feeds)[0]
    assert _rel_err(_ir_out(loaded.graph.with_params({key: new}), torch.from_numpy(feeds["x"])), got) < 1e-5


def test_traced_torchscript(tmp_path):
    model = nets.resnet_like()
    path = tmp_path / "traced"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), str(path))
    loaded = load_torch(path, LoadOptions(input_shapes={"x": (1, 3, 8, 8)}))
    assert loaded.format == "torchscript"
    feeds = _feeds(loaded, 0)
    assert _rel_err(_ir_out(loaded.graph, torch.from_numpy(feeds["x"])), loaded.run(path, feeds)[0]) < 1e-5


def test_export_with_dynamic_batch(tmp_path):
    model = nets.small_cnn()
    ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, str(path))
    loaded = load_torch(path, LoadOptions())
    assert loaded.graph.inputs == {"x": (1, 3, 16, 16)}
    assert loaded.input_specs()[0].shape == (1, 3, 16, 16)
    feeds = _feeds(loaded, 0, batch=3)
    assert _rel_err(_ir_out(loaded.graph, torch.from_numpy(feeds["x"])), loaded.run(path, feeds)[0]) < 1e-5


def test_export_with_dynamic_spatial_sizes(tmp_path):
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=4, max=64), 3: torch.export.Dim("w", min=4, max=64)}
    model = nets.plain_resnet()
    ep = torch.export.export(model, (torch.randn(2, 2, 6, 6),), dynamic_shapes=(dims,))
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, str(path))
    with pytest.raises(UsageError, match="input-shape"):
        load_torch(path, LoadOptions())
    loaded = load_torch(path, LoadOptions(input_shapes={"x": (1, 2, 10, 10)}))
    assert loaded.graph.inputs == {"x": (1, 2, 10, 10)}
    feeds = _feeds(loaded, 0)
    assert _rel_err(_ir_out(loaded.graph, torch.from_numpy(feeds["x"])), loaded.run(path, feeds)[0]) < 1e-5


@pytest.mark.parametrize("fmt", ["torch-state-dict", "torch-module", "torchscript", "torch-export"])
def test_non_persistent_buffer_is_kept_and_its_channels_pinned(fmt, tmp_path):
    """A buffer outside the state_dict cannot be rewritten in a state_dict or a pickled module: its
    channels are pinned with the reason, the rest is rescaled and verified. A torch.export archive
    (constants) and a TorchScript archive (its state_dict) store it, so there it is rescaled like a bias."""
    from pathcond_cli.jobs import RescaleOptions, SolveOptions, rescale_model
    from tests.arch_factories import buffer_shift

    model = buffer_shift()
    path = tmp_path / "model"
    opts = _save_in_format(fmt, model, path, (1, 4), "buffer_shift")
    result = rescale_model(path, tmp_path / "out", opts, SolveOptions(device="cpu"), RescaleOptions())
    report = result.report
    assert report["verification"]["passed"]
    pins = [p for p in report["pinned"] if "non-persistent" in p["reason"]]
    if fmt in ("torch-export", "torchscript"):
        assert not pins and report["model"]["groups_free"] == 6 + 5
    else:
        assert len(pins) == 1 and "'shift'" in pins[0]["reason"] and pins[0]["channels"] == 6
        assert report["model"]["groups_free"] == 5
    assert report["conditioning"]["max_abs_log_scale"] > 1e-3  # the free layer did move
    x = torch.randn(1, 4)  # the exported program has a static batch
    with torch.no_grad():
        want = model(x)
    got = load_torch(tmp_path / "out", opts).run(tmp_path / "out", {"x": x.numpy()})[0]
    assert _rel_err(torch.from_numpy(got), want) < 1e-5


def test_upsampling_forms_and_refused_interpolations():
    class Up(nn.Module):
        def __init__(self, mode: str, **kw):
            super().__init__()
            self.conv, self.mode, self.kw = nn.Conv2d(2, 3, 3, padding=1), mode, kw

        def forward(self, x):
            return F.interpolate(torch.relu(self.conv(x)), mode=self.mode, **self.kw)

    for mode, kw, op in [("nearest", {"scale_factor": 3}, "upsample"),
                         ("nearest-exact", {"size": (10, 15)}, "upsample"),
                         ("nearest", {"scale_factor": (1.0, 2.0)}, "upsample"),
                         ("bilinear", {"scale_factor": 2}, "resize_linear"),
                         ("bilinear", {"size": (7, 3), "align_corners": True}, "resize_linear"),
                         ("bilinear", {"size": (8, 4)}, "resize_linear")]:
        model = Up(mode, **kw).eval()
        graph = module_to_graph(model, [(1, 2, 5, 5)])
        assert [n.op for n in graph.nodes].count(op) == 1, (mode, kw)
        _assert_module_matches(model, graph, (1, 2, 5, 5))
    for mode, kw, why in [("bicubic", {"scale_factor": 2}, "bicubic"),
                          ("bilinear", {"scale_factor": 1.5}, "not exact"),
                          ("nearest", {"scale_factor": 1.5}, "whole numbers"),
                          ("nearest", {"size": (7, 7)}, "whole-number")]:
        offenders = _offenders(Up(mode, **kw).eval(), (1, 2, 5, 5))
        assert len(offenders) == 1 and why in offenders[0].why, (mode, kw, offenders)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_dict_is_rescaled_in_its_dtype(dtype, tmp_path):
    from pathcond_cli.jobs import RescaleOptions, SolveOptions, rescale_model

    path = tmp_path / "half.pt"
    torch.save(nets.small_cnn().to(dtype).state_dict(), path)
    opts = LoadOptions(input_shapes={"x": (1, 3, 16, 16)}, arch="tests.arch_factories:small_cnn")
    report = rescale_model(path, tmp_path / "out.pt", opts, SolveOptions(device="cpu"), RescaleOptions()).report
    assert report["verification"]["passed"] and report["conditioning"]["max_abs_log_scale"] > 1e-2
    before, after = torch.load(path, weights_only=True), torch.load(tmp_path / "out.pt", weights_only=True)
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    assert any(not torch.equal(after[k], before[k]) for k in before)
