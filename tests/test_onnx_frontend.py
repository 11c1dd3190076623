"""The ONNX front end: translation to the IR, the reference forward against onnxruntime, and save."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pathcond_cli import ir
from pathcond_cli.errors import UnsupportedModelError, UsageError
from pathcond_cli.frontends.base import LoadOptions
from pathcond_cli.frontends.onnx_frontend import load_onnx
from tests import nets
from tests.conftest import ZOO_EXPORTERS, export_zoo, random_inputs, zoo_cases

ROOT = Path(__file__).resolve().parent.parent
EXPORTERS = ZOO_EXPORTERS
CHAIN_OPS = {"relu", "maxpool", "avgpool", "global_avgpool", "identity", "flatten", "upsample", "resize_linear"}


# --------------------------------------------------------------------------------------------------
# Helpers


def _export(name: str, exporter: str, folder: Path) -> Path:
    return export_zoo(name, exporter, folder)


def _ort(model, path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return model.run(path, inputs)


def _random_inputs(model, seed: int) -> dict[str, np.ndarray]:
    return random_inputs(model, seed)


def _assert_ir_matches_ort(model, path: Path, seeds=(0, 1, 2)) -> None:
    for seed in seeds:
        feeds = _random_inputs(model, seed)
        expected = _ort(model, path, feeds)
        got = ir.evaluate(model.graph, {k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, want in zip(model.graph.outputs, expected):
            have = got[name].numpy()
            assert have.shape == want.shape
            scale = max(float(np.abs(want).max()), 1e-12)
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-4 * scale)


def _assert_same_function(model, path_a: Path, path_b: Path, exact: bool = False) -> None:
    for seed in (0, 1, 2):
        feeds = _random_inputs(model, seed)
        for a, b in zip(_ort(model, path_a, feeds), _ort(model, path_b, feeds)):
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(float(np.abs(a).max()), 1e-12))


def _layer_pair(graph: ir.Graph) -> tuple[ir.Node, ir.Node]:
    """A linear/conv layer A and the next layer B, joined through a ReLU (and pooling) only.
    Whole layers are rescaled (every channel by the same factor), so a flatten in between is fine."""
    for a in graph.nodes:
        if a.op not in ("linear", "conv", "conv_transpose", "batchnorm") or a.attrs.get("groups", 1) != 1 \
                or "weight" not in a.params:
            continue
        value, seen = a.output, []
        while len(graph.consumers[value]) == 1 and value not in graph.outputs:
            nxt = graph.consumers[value][0]
            if nxt.op not in CHAIN_OPS:
                break
            seen.append(nxt.op)
            value = nxt.output
        consumers = graph.consumers[value]
        if "relu" in seen and len(consumers) == 1 and consumers[0].op in ("linear", "conv", "conv_transpose") \
                and value not in graph.outputs:
            return a, consumers[0]
    raise AssertionError("no layer pair across a ReLU")


def _rescaled_pair(graph: ir.Graph) -> dict[str, torch.Tensor]:
    """Scale layer A by 2 (weight and bias; a BatchNorm's affine parameters) and the next layer's weight by 0.5."""
    a, b = _layer_pair(graph)
    new = {a.params["weight"]: graph.params[a.params["weight"]] * 2,
           b.params["weight"]: graph.params[b.params["weight"]] * 0.5}
    if "bias" in a.params:
        new[a.params["bias"]] = graph.params[a.params["bias"]] * 2
    return new


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _write(proto: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save(proto, str(path))
    return path


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _gemm_model(trans_b: int = 0, alpha: float = 0.5, beta: float = 2.0) -> onnx.ModelProto:
    w1 = _rand(4, 6) if not trans_b else _rand(6, 4)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1", transB=trans_b, alpha=alpha, beta=beta),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "fc2", transB=1),
    ]
    inits = [("w1", w1), ("b1", _rand(6, seed=1)), ("w2", _rand(3, 6, seed=2)), ("b2", _rand(3, seed=3))]
    return _model(nodes, [_vi("x", ["batch", 4])], [_vi("y", ["batch", 3])], inits)


# --------------------------------------------------------------------------------------------------
# Torch-exported models


@pytest.mark.parametrize("name,exporter", zoo_cases())
def test_exported_model_matches_onnxruntime(name, exporter, zoo_onnx):
    path = zoo_onnx(name, exporter)
    model = load_onnx(path, LoadOptions())
    assert model.format == "onnx" and model.has_batchnorm is False
    if exporter in ("torchscript", "dynamo_noopt") and name in ("small_cnn", "resnet_like"):
        assert any(n.op == "batchnorm" for n in model.graph.nodes), "BatchNorm was not kept"
    _assert_ir_matches_ort(model, path)


@pytest.mark.parametrize("name,exporter", zoo_cases())
def test_exported_model_save_round_trip(name, exporter, tmp_path, zoo_onnx):
    path = zoo_onnx(name, exporter)
    model = load_onnx(path, LoadOptions())
    same = tmp_path / "same.onnx"
    model.save(dict(model.graph.params), same)
    _assert_same_function(model, path, same, exact=True)

    new = _rescaled_pair(model.graph)
    out = tmp_path / "rescaled.onnx"
    model.save(new, out)
    _assert_same_function(model, path, out)
    reloaded = load_onnx(out, LoadOptions())
    checked = 0
    for key, value in new.items():
        if model.parameter_source(key)[0] == "initializer" and key in reloaded.graph.params:
            assert torch.allclose(reloaded.graph.params[key].double(), value.double(), rtol=1e-6)
            assert not torch.equal(reloaded.graph.params[key], model.graph.params[key])
            checked += 1
    assert checked >= 2, "the rescaled initializers were not written"
    before, after = onnx.load(str(path)), onnx.load(str(out))
    assert [n.name for n in before.graph.node] == [n.name for n in after.graph.node]
    assert before.opset_import == after.opset_import
    assert {p.key: p.value for p in after.metadata_props} == {"origin": "pathcond-test"}
    assert after.producer_name == before.producer_name
    # IR parameters share memory with the arrays read from the file: nothing above wrote into them
    fresh = load_onnx(path, LoadOptions())
    assert all(torch.equal(fresh.graph.params[k], v) for k, v in model.graph.params.items())


@pytest.mark.parametrize("name", ["mlp_uneven", "small_cnn", "resnet_like"])
def test_sample_models(name):
    path = ROOT / "sample_models" / f"{name}.onnx"
    assert path.stat().st_size < 1_000_000
    model = load_onnx(path, LoadOptions())
    _assert_ir_matches_ort(model, path)
    if name != "mlp_uneven":
        assert sum(n.op == "batchnorm" for n in model.graph.nodes) >= 2


# --------------------------------------------------------------------------------------------------
# Hand-built models


def test_gemm_trans_b_zero_alpha_beta(tmp_path):
    path = _write(_gemm_model(trans_b=0, alpha=0.5, beta=2.0), tmp_path)
    model = load_onnx(path, LoadOptions())
    _assert_ir_matches_ort(model, path)
    fc1 = model.graph.nodes[0]
    assert tuple(model.graph.params[fc1.params["weight"]].shape) == (6, 4)
    new = _rescaled_pair(model.graph)
    out = tmp_path / "out.onnx"
    model.save(new, out)
    _assert_same_function(model, path, out)
    old, saved = _inits(path), _inits(out)
    np.testing.assert_allclose(saved["w1"], 2 * old["w1"], rtol=1e-6)  # stored (I, O), alpha divided out
    np.testing.assert_allclose(saved["b1"], 2 * old["b1"], rtol=1e-6)
    assert saved["w1"].shape == old["w1"].shape


def test_matmul_add_becomes_linear_with_bias(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], "mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], "add1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m2"], "mm2"),
        helper.make_node("Add", ["b2", "m2"], ["y"], "add2"),
    ]
    inits = [("w1", _rand(4, 7)), ("b1", _rand(7)), ("w2", _rand(7, 2)), ("b2", _rand(1, 2))]
    path = _write(_model(nodes, [_vi("x", ["batch", 4])], [_vi("y", ["batch", 2])], inits), tmp_path)
    model = load_onnx(path, LoadOptions())
    assert [n.op for n in model.graph.nodes] == ["linear", "relu", "linear"]
    assert all("bias" in n.params for n in model.graph.nodes if n.op == "linear")
    _assert_ir_matches_ort(model, path)
    out = tmp_path / "out.onnx"
    model.save(_rescaled_pair(model.graph), out)
    _assert_same_function(model, path, out)
    assert _inits(out)["b2"].shape == (1, 2)


def _conv_sub_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sub", ["c1", "shift"], ["s"], "sub"),
        helper.make_node("Relu", ["s"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], "conv2"),
    ]
    inits = [("w1", _rand(4, 2, 3, 3)), ("shift", _rand(1, 4, 1, 1)), ("w2", _rand(3, 4, 1, 1)), ("b2", _rand(3))]
    return _model(nodes, [_vi("x", ["batch", 2, 5, 5])], [_vi("y", ["batch", 3, 5, 5])], inits)


def test_sub_constant_is_a_negated_bias(tmp_path):
    path = _write(_conv_sub_model(), tmp_path)
    model = load_onnx(path, LoadOptions())
    bias = next(n for n in model.graph.nodes if n.op == "bias")
    np.testing.assert_array_equal(model.graph.params[bias.params["bias"]].numpy(), -_inits(path)["shift"].reshape(4))
    _assert_ir_matches_ort(model, path)
    new = {bias.params["bias"]: model.graph.params[bias.params["bias"]] * 3}
    out = tmp_path / "out.onnx"
    model.save(new, out)
    np.testing.assert_allclose(_inits(out)["shift"], 3 * _inits(path)["shift"], rtol=1e-6)


def _shared_bn_model() -> onnx.ModelProto:
    """Exporter-style dedup: 'shared' is bn1's scale and bn2's running_var."""
    nodes = [
        helper.make_node("BatchNormalization", ["x", "shared", "b1", "m1", "v1"], ["h"], "bn1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("BatchNormalization", ["r", "s2", "b2", "m2", "shared"], ["y"], "bn2"),
    ]
    c = 3
    pos = np.array([0.7, 1.3, 0.9], dtype=np.float32)
    inits = [("shared", pos), ("b1", _rand(c)), ("m1", _rand(c, seed=1)), ("v1", pos + 0.5),
             ("s2", pos * 2), ("b2", _rand(c, seed=2)), ("m2", _rand(c, seed=3))]
    return _model(nodes, [_vi("x", ["batch", c, 4, 4])], [_vi("y", ["batch", c, 4, 4])], inits)


def test_shared_initializer_gets_one_key_per_role(tmp_path):
    path = _write(_shared_bn_model(), tmp_path)
    model = load_onnx(path, LoadOptions())
    bn1, bn2 = (n for n in model.graph.nodes if n.op == "batchnorm")
    assert bn1.params["weight"] == "shared@bn1:1" and bn2.params["running_var"] == "shared@bn2:4"
    _assert_ir_matches_ort(model, path)
    old = model.graph.params["shared@bn1:1"].clone()
    out = tmp_path / "out.onnx"
    model.save({"shared@bn1:1": old * 2, "shared@bn2:4": old.clone()}, out)
    saved = onnx.load(str(out))
    bn1_p, bn2_p = saved.graph.node[0], saved.graph.node[2]
    assert bn2_p.input[4] == "shared" and bn1_p.input[1] != "shared"
    values = _inits(out)
    np.testing.assert_array_equal(values["shared"], old.numpy())
    np.testing.assert_allclose(values[bn1_p.input[1]], 2 * old.numpy())
    reloaded = load_onnx(out, LoadOptions())
    rb1, rb2 = (n for n in reloaded.graph.nodes if n.op == "batchnorm")
    assert torch.equal(reloaded.graph.params[rb2.params["running_var"]], old)


def test_constant_node_weights_and_identity_chains(tmp_path):
    w1 = _rand(5, 3)
    nodes = [
        helper.make_node("Constant", [], ["w1"], "const_w1", value=numpy_helper.from_array(w1)),
        helper.make_node("Identity", ["w2_store"], ["w2_a"], "id_a"),
        helper.make_node("Identity", ["w2_a"], ["w2"], "id_b"),
        helper.make_node("Gemm", ["x", "w1"], ["h"], "fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], "fc2", transB=1),
    ]
    proto = _model(nodes, [_vi("x", ["batch", 3])], [_vi("y", ["batch", 2])], [("w2_store", _rand(2, 5))])
    path = _write(proto, tmp_path)
    model = load_onnx(path, LoadOptions())
    assert set(model.graph.params) == {"w1", "w2_store"}
    assert model.parameter_source("w1") == ("constant", "w1")
    _assert_ir_matches_ort(model, path)
    out = tmp_path / "out.onnx"
    model.save(_rescaled_pair(model.graph), out)
    _assert_same_function(model, path, out)
    saved = onnx.load(str(out))
    assert len(saved.graph.node) == len(proto.graph.node) and len(saved.graph.initializer) == 1
    np.testing.assert_allclose(numpy_helper.to_array(saved.graph.node[0].attribute[0].t), 2 * w1, rtol=1e-6)
    np.testing.assert_allclose(_inits(out)["w2_store"], 0.5 * _inits(path)["w2_store"], rtol=1e-6)


def test_external_data_round_trip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    path = src / "model.onnx"
    onnx.save_model(_gemm_model(trans_b=1, alpha=1.0, beta=1.0), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    data_before = (src / "weights.bin").read_bytes()
    model = load_onnx(path, LoadOptions())
    _assert_ir_matches_ort(model, path)
    out = dst / "rescaled.onnx"
    model.save(_rescaled_pair(model.graph), out)
    # every tensor of this model is under 1 KiB: all inline, no data file (test_onnx_trust covers the file)
    assert not (dst / "rescaled.onnx.data").exists()
    assert (src / "weights.bin").read_bytes() == data_before
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations <= {"rescaled.onnx.data"}
    _assert_same_function(model, path, out)


def test_softmax_head_is_ignored_with_a_warning(tmp_path):
    proto = _gemm_model(trans_b=1, alpha=1.0, beta=1.0)
    proto.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], "softmax", axis=1))
    proto.graph.output[0].CopyFrom(_vi("p", ["batch", 3]))
    path = _write(proto, tmp_path)
    model = load_onnx(path, LoadOptions())
    assert model.graph.outputs == ["y"]
    assert any("Softmax" in w and "softmax" in w for w in model.warnings)


def test_non_homogeneous_ops_are_all_listed(tmp_path):
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], "fc1", transB=1),
        helper.make_node("Tanh", ["h"], ["t"], "tanh_mid"),
        helper.make_node("Clip", ["t", "lo", "hi"], ["c"], "relu6"),
        helper.make_node("Gemm", ["c", "w2"], ["y"], "fc2", transB=1),
    ]
    inits = [("w1", _rand(5, 3)), ("w2", _rand(2, 5)), ("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32))]
    path = _write(_model(nodes, [_vi("x", ["batch", 3])], [_vi("y", ["batch", 2])], inits), tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx(path, LoadOptions())
    offenders = {(o.node, o.op) for o in info.value.offenders}
    assert offenders == {("tanh_mid", "Tanh"), ("relu6", "Clip")}
    assert all(o.why for o in info.value.offenders)


def _dynamic_conv_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["y"], "flatten"),
    ]
    inits = [("w", _rand(4, 3, 3, 3)), ("b", _rand(4))]
    return _model(nodes, [_vi("x", ["batch", 3, "h", "w"])], [_vi("y", ["batch", 4])], inits)


def test_dynamic_spatial_dims_need_an_input_shape(tmp_path):
    path = _write(_dynamic_conv_model(), tmp_path)
    with pytest.raises(UsageError, match=r"'x'.*axis 2.*--input-shape x=1x3x"):
        load_onnx(path, LoadOptions())
    with pytest.raises(UsageError, match="nope"):
        load_onnx(path, LoadOptions(input_shapes={"nope": (1, 3, 8, 8)}))
    model = load_onnx(path, LoadOptions(input_shapes={"x": (1, 3, 9, 7)}))
    assert model.input_specs()[0].shape == (1, 3, 9, 7)
    assert model.graph.inputs == {"x": (1, 3, 9, 7)}
    _assert_ir_matches_ort(model, path)


def test_scale_affine_activations_and_pools(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], "conv1d", pads=[1, 1]),
        helper.make_node("Mul", ["c", "gamma"], ["a"], "per_channel_mul"),
        helper.make_node("Div", ["a", "two"], ["d"], "div_scalar"),
        helper.make_node("LeakyRelu", ["d"], ["l"], "leaky", alpha=0.1),
        helper.make_node("MaxPool", ["l"], ["p"], "pool", kernel_shape=[3], strides=[2], auto_pad="SAME_LOWER"),
        helper.make_node("PRelu", ["p", "slope"], ["q"], "prelu"),
        helper.make_node("AveragePool", ["q"], ["v"], "avg", kernel_shape=[2], ceil_mode=1, pads=[1, 0]),
        helper.make_node("ReduceMean", ["v", "axes"], ["m"], "mean", keepdims=0),
        helper.make_node("Mul", ["m", "three"], ["y"], "mul_scalar"),
    ]
    inits = [("w", _rand(4, 2, 3)), ("gamma", _rand(4, 1)), ("two", np.array(2.0, np.float32)),
             ("slope", np.abs(_rand(4, 1))), ("axes", np.array([-1], np.int64)), ("three", np.array([3.0], np.float32))]
    path = _write(_model(nodes, [_vi("x", ["batch", 2, 9])], [_vi("y", ["batch", 4])], inits, opset=18), tmp_path)
    model = load_onnx(path, LoadOptions())
    ops = [n.op for n in model.graph.nodes]
    assert ops == ["conv", "affine", "scale", "leaky_relu", "maxpool", "prelu", "avgpool", "global_avgpool", "scale"]
    _assert_ir_matches_ort(model, path)


def test_channel_reshuffling_reshape_is_refused(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], "relu"), helper.make_node("Reshape", ["r", "shape"], ["y"], "rs")]
    inits = [("shape", np.array([1, 2, 6], np.int64))]
    path = _write(_model(nodes, [_vi("x", [1, 4, 3])], [_vi("y", [1, 2, 6])], inits), tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx(path, LoadOptions())
    assert [(o.node, o.op) for o in info.value.offenders] == [("rs", "Reshape")]


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff\x13", None])
def test_unreadable_file_is_a_usage_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError):
        load_onnx(path, LoadOptions())


# --------------------------------------------------------------------------------------------------
# Input preprocessing


def _nchw_network(first: str) -> tuple[list, list]:
    """Sub/Div normalisation then conv-relu-conv-relu-gap-gemm, reading ``first`` (an NCHW tensor)."""
    nodes = [
        helper.make_node("Sub", [first, "mean"], ["centred"], "sub_mean"),
        helper.make_node("Div", ["centred", "std"], ["normed"], "div_std"),
        helper.make_node("Conv", ["normed", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], "fc", transB=1),
    ]
    widths = np.array([0.3, 1.0, 4.0], np.float32)[:, None, None, None]
    inits = [("mean", _rand(1, 3, 1, 1)), ("std", np.full((1, 3, 1, 1), 0.25, np.float32)),
             ("w1", _rand(6, 3, 3, 3) * widths.reshape(1, 3, 1, 1)), ("b1", _rand(6)),
             ("w2", _rand(10, 6, 3, 3)), ("b2", _rand(10)), ("w3", _rand(4, 10)), ("b3", _rand(4))]
    return nodes, inits


def test_nhwc_input_preprocessing_is_left_out(tmp_path):
    """uint8 NHWC images -> Cast -> Div 255 -> Transpose -> the network: the Transpose (and what it
    depends on) is preprocessing; the analysis equals that of the same network fed NCHW directly, and
    rescale writes a verified model with the preprocessing untouched."""
    from pathcond_cli.analysis import analyze
    from pathcond_cli.jobs import RescaleOptions, SolveOptions, rescale_model

    net, inits = _nchw_network("nchw")
    pre = [
        helper.make_node("Cast", ["image"], ["image_f"], "cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["image_f", "c255"], ["unit"], "div_255"),
        helper.make_node("Transpose", ["unit"], ["nchw"], "to_nchw", perm=[0, 3, 1, 2]),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 6, 6, 3])
    path = _write(_model(pre + net, [image], [_vi("y", ["batch", 4])], inits + [("c255", np.array(255, np.float32))]),
                  tmp_path, "nhwc.onnx")
    twin = _write(_model(net, [_vi("nchw", ["batch", 3, 6, 6])], [_vi("y", ["batch", 4])], inits), tmp_path, "nchw.onnx")

    model, reference = load_onnx(path, LoadOptions()), load_onnx(twin, LoadOptions())
    assert model.graph.inputs == {"nchw": (1, 3, 6, 6)}
    assert any("to_nchw" in w and "div_255" in w and "cast" in w for w in model.warnings)
    assert [n.op for n in model.graph.nodes] == [n.op for n in reference.graph.nodes]
    a, b = analyze(model.graph, device="cpu"), analyze(reference.graph, device="cpu")
    for x, y in zip(a.stats.log_g, b.stats.log_g):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
    assert a.solution.objective_after == pytest.approx(b.solution.objective_after, rel=1e-9)

    from pathcond_cli.verify import random_inputs

    image = random_inputs(model, 0)["image"]  # verification inputs span the uint8 range
    assert image.dtype == np.uint8 and image.shape == (1, 6, 6, 3) and len(np.unique(image)) > 50
    out = tmp_path / "out.onnx"
    report = rescale_model(path, out, LoadOptions(), SolveOptions(device="cpu"), RescaleOptions()).report
    assert report["verification"]["passed"] and report["conditioning"]["max_abs_log_scale"] > 1e-2
    before, after = onnx.load(str(path)), onnx.load(str(out))
    assert [n for n in after.graph.node if n.name in ("cast", "div_255", "to_nchw")] == list(before.graph.node[:3])
    assert _inits(out)["c255"] == 255


def test_non_homogeneous_op_at_the_input_is_still_refused(tmp_path):
    """Only parameter-free layout / normalisation ops count as preprocessing, not a Tanh."""
    net, inits = _nchw_network("t")
    nodes = [helper.make_node("Tanh", ["x"], ["t"], "squash")] + net
    path = _write(_model(nodes, [_vi("x", ["batch", 3, 6, 6])], [_vi("y", ["batch", 4])], inits), tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx(path, LoadOptions())
    assert [(o.node, o.op) for o in info.value.offenders] == [("squash", "Tanh")]


def test_transpose_inside_the_network_is_refused(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], "conv"),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Transpose", ["r"], ["t"], "swap_hw", perm=[0, 1, 3, 2]),
        helper.make_node("Conv", ["t", "w2"], ["y"], "conv2"),
    ]
    inits = [("w", _rand(4, 3, 1, 1)), ("w2", _rand(2, 4, 1, 1))]
    path = _write(_model(nodes, [_vi("x", [1, 3, 5, 5])], [_vi("y", [1, 2, 5, 5])], inits), tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx(path, LoadOptions())
    assert [(o.node, o.op) for o in info.value.offenders] == [("swap_hw", "Transpose")]


def _resize_model(attrs: dict, scales=None, sizes=None) -> onnx.ModelProto:
    inputs = ["r", ""] + (["scales"] if scales is not None else ["", "sizes"])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Resize", inputs, ["u"], "resize", **attrs),
        helper.make_node("Conv", ["u", "w2"], ["y"], "head"),
    ]
    inits = [("w", _rand(3, 2, 3, 3)), ("w2", _rand(2, 3, 1, 1))]
    inits += [("scales", np.array(scales, np.float32))] if scales is not None else [("sizes", np.array(sizes, np.int64))]
    return _model(nodes, [_vi("x", [1, 2, 4, 5])], [_vi("y", [1, 2, None, None])], inits, opset=13)


@pytest.mark.parametrize("attrs,scales,sizes", [
    ({"mode": "linear"}, [1, 1, 2, 2], None),  # half_pixel
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, None, [1, 3, 7, 3]),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [1, 3, 7, 9]),
    ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, [1, 1, 3, 2], None),
    ({"mode": "linear"}, [1, 1, 0.5, 1.0], None),  # downsampling 4 -> 2
])
def test_resize_linear_matches_onnxruntime(tmp_path, attrs, scales, sizes):
    path = _write(_resize_model(attrs, scales, sizes), tmp_path)
    model = load_onnx(path, LoadOptions())
    assert [n.op for n in model.graph.nodes].count("resize_linear") == 1
    _assert_ir_matches_ort(model, path)


@pytest.mark.parametrize("attrs,scales,sizes,scale", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 3], None, [2, 3]),
    ({"mode": "nearest"}, None, [1, 3, 12, 5], [3, 1]),  # defaults: half_pixel + round_prefer_floor
    ({"mode": "nearest", "coordinate_transformation_mode": "pytorch_half_pixel", "nearest_mode": "round_prefer_ceil"},
     [1, 1, 4, 2], None, [4, 2]),
])
def test_resize_nearest_whole_factors(tmp_path, attrs, scales, sizes, scale):
    path = _write(_resize_model(attrs, scales, sizes), tmp_path)
    model = load_onnx(path, LoadOptions())
    (up,) = [n for n in model.graph.nodes if n.op == "upsample"]
    assert up.attrs["scale"] == scale
    _assert_ir_matches_ort(model, path)


@pytest.mark.parametrize("attrs,scales,why", [
    ({"mode": "cubic"}, [1, 1, 2, 2], "mode 'cubic'"),
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, [1, 1, 2, 2], "tf_crop_and_resize"),
    ({"mode": "linear"}, [1, 1, 2.3, 2], "approximately"),  # 4 x 2.3 = 9.2: ONNX keeps 9
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "round_prefer_floor"},
     [1, 1, 2, 2], "does not repeat"),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2.5, 2], "whole"),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 2, 2, 2], "resizes"),
])
def test_resize_refused_with_reason(tmp_path, attrs, scales, why):
    path = _write(_resize_model(attrs, scales), tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx(path, LoadOptions())
    assert [o.node for o in info.value.offenders] == ["resize"] and why in info.value.offenders[0].why


def _deconv_model(attrs: dict, x_shape, w_shape, bias: bool = True) -> onnx.ModelProto:
    d = len(x_shape) - 2
    inputs = ["r", "wt"] + (["bt"] if bias else [])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], "conv", pads=[1] * (2 * d)),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("ConvTranspose", inputs, ["t"], "deconv", **attrs),
        helper.make_node("Relu", ["t"], ["q"], "relu2"),
        helper.make_node("Conv", ["q", "w2"], ["y"], "head"),
    ]
    c_in, o_per = w_shape[0], w_shape[1]
    o = o_per * int(attrs.get("group", 1))
    inits = [("w", _rand(c_in, x_shape[1], *([3] * d))), ("wt", _rand(*w_shape)), ("w2", _rand(2, o, *([1] * d)))]
    inits += [("bt", _rand(o))] if bias else []
    return _model(nodes, [_vi("x", list(x_shape))], [_vi("y", [x_shape[0], 2] + [None] * d)], inits, opset=17)


@pytest.mark.parametrize("attrs,x_shape,w_shape", [
    ({"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}, (1, 2, 3, 4), (4, 3, 3, 3)),
    ({"strides": [2, 1], "auto_pad": "SAME_UPPER", "group": 2}, (1, 2, 3, 3), (4, 2, 3, 2)),
    ({"strides": [2, 2], "auto_pad": "SAME_LOWER", "dilations": [2, 1]}, (1, 2, 3, 3), (4, 3, 3, 3)),
    ({"strides": [3, 2], "output_shape": [8, 5]}, (1, 2, 3, 3), (4, 3, 3, 2)),
    ({"strides": [2], "pads": [0, 2], "auto_pad": "NOTSET"}, (1, 2, 5), (4, 3, 4)),
    ({"auto_pad": "VALID", "strides": [2, 2]}, (1, 2, 2, 3), (4, 1, 2, 2)),
])
def test_conv_transpose_attributes_match_onnxruntime(tmp_path, attrs, x_shape, w_shape):
    """pads (explicit, SAME_UPPER / SAME_LOWER, from output_shape, VALID), output_padding, groups,
    dilations, 1-D: the IR equals onnxruntime, and a function-preserving rescaling is written back
    in the (I, O/group, *k) layout."""
    path = _write(_deconv_model(attrs, x_shape, w_shape, bias="group" not in attrs), tmp_path)
    model = load_onnx(path, LoadOptions())
    (node,) = [n for n in model.graph.nodes if n.op == "conv_transpose"]
    groups = int(attrs.get("group", 1))
    assert model.graph.params[node.params["weight"]].shape == (w_shape[1] * groups, w_shape[0] // groups, *w_shape[2:])
    _assert_ir_matches_ort(model, path)
    out = tmp_path / "out.onnx"
    model.save(_rescaled_pair(model.graph), out)
    _assert_same_function(model, path, out)
    assert _inits(out)["wt"].shape == w_shape and not np.allclose(_inits(out)["wt"], _inits(path)["wt"])


# --------------------------------------------------------------------------------------------------
# Layout of the front end's modules


def test_front_end_parts_import_one_way():
    """read <- translate, read <- write, (read, translate, write) <- upgrade, all <- the facade: no part
    imports a part after it (an import cycle would make the split fragile), nor the facade."""
    import ast

    import pathcond_cli.frontends as frontends

    order = ["onnx_read", "onnx_write", "onnx_translate", "onnx_upgrade", "onnx_frontend"]
    folder = Path(frontends.__file__).parent
    for i, module in enumerate(order):
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert not imported & set(order[i:]), f"{module} imports {sorted(imported & set(order[i:]))}"


def test_verification_makes_one_session_per_model(tmp_path, monkeypatch):
    """Verification runs both files on several inputs; each file gets one onnxruntime session, not one per
    input (a session costs more than a run on large models)."""
    from pathcond_cli import jobs
    from pathcond_cli.frontends import onnx_frontend

    source = tmp_path / "in.onnx"
    torch.onnx.export(nets.mlp(), torch.randn(1, 8), str(source), dynamo=False)
    made = []
    real = onnx_frontend._session
    monkeypatch.setattr(onnx_frontend, "_session", lambda path, *a: made.append(Path(path).name) or real(path, *a))
    result = jobs.rescale_model(source, tmp_path / "out.onnx", LoadOptions(), jobs.SolveOptions(device="cpu"),
                                jobs.RescaleOptions(verify_inputs=4))
    assert result.report["verification"]["passed"] and result.report["verification"]["inputs"] == 4
    assert sorted(made) == ["in.onnx", "out.onnx"], made


# --------------------------------------------------------------------------------------------------
# Verification: the original and the rewritten file side by side


def _rescaled_copy(source: Path, folder: Path):
    """(the loaded model, a rescaled copy of it written in ``folder``)."""
    from pathcond_cli.analysis import analyze, rescaled_params

    model = load_onnx(source)
    out = folder / "out.onnx"
    model.save(rescaled_params(analyze(model.graph, device="cpu")), out)
    return model, out


def _reference_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "pathcond-reference-runs"]


def test_concurrent_verification_runs_the_original_in_a_thread_and_agrees(mlp_onnx, tmp_path, monkeypatch):
    """The original runs in its own thread, the rewritten copy in the caller's, each session on one core;
    the outputs compared are onnxruntime's own (an independent session on each file) and the result is
    the one-after-the-other check's, to the bit."""
    import threading

    import onnxruntime as ort

    from pathcond_cli import verify as verification
    from pathcond_cli.frontends import onnx_frontend

    model, out = _rescaled_copy(mlp_onnx, tmp_path)
    assert verification.runs_concurrently(model)
    seen, real = [], onnx_frontend._session
    monkeypatch.setattr(onnx_frontend, "_session", lambda path, threads=None: seen.append(
        (Path(path).name, threading.current_thread().name, threads)) or real(path, threads))
    captured = {}
    real_compare = verification.compare_cases
    monkeypatch.setattr(verification, "compare_cases", lambda cases, a, b, **kw: captured.update(
        cases=cases, before=a, after=b) or real_compare(cases, a, b, **kw))
    together = verification.verify(model, out, n_inputs=3)
    assert sorted(seen) == [("mlp.onnx", "pathcond-reference-runs", 1), ("out.onnx", "MainThread", 1)]
    assert together.passed and together.inputs == 3 and not _reference_threads()
    options = ort.SessionOptions()  # the file's own graph, node by node, on one core: the same bits
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.disable_prepacking", "1")  # the same kernels as pathcond's
    for case, before, after in zip(captured["cases"], captured["before"], captured["after"], strict=True):
        for file, outputs in ((mlp_onnx, before), (out, after)):
            want = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"]).run(None, case.feeds)
            assert len(outputs) == len(want)
            for got, expected in zip(outputs, want):
                np.testing.assert_array_equal(got, expected)

    monkeypatch.setattr(verification, "CONCURRENT_MAX_STORED_BYTES", 0)  # too large: one after the other
    seen.clear()
    assert not verification.runs_concurrently(model)
    apart = verification.verify(model, out, n_inputs=3)
    assert [(name, thread) for name, thread, _ in seen] == [("mlp.onnx", "MainThread"), ("out.onnx", "MainThread")]
    assert apart == together


def test_concurrent_verification_reraises_the_originals_failure_first(mlp_onnx, tmp_path, monkeypatch):
    """onnxruntime cannot open the original (here: made to fail): the thread's UnsupportedModelError is
    what verify raises, also when the rewritten copy fails too, and no thread is left running."""
    from pathcond_cli import verify as verification
    from pathcond_cli.frontends import onnx_frontend

    model, out = _rescaled_copy(mlp_onnx, tmp_path)
    real = onnx_frontend._session
    failing = {"mlp.onnx"}

    def session(path, threads=None):
        if Path(path).name in failing:
            raise RuntimeError(f"[ONNXRuntimeError] cannot load {Path(path).name}")
        return real(path, threads)

    monkeypatch.setattr(onnx_frontend, "_session", session)
    for failing in ({"mlp.onnx"}, {"mlp.onnx", "out.onnx"}):
        model.release_runtime()
        with pytest.raises(UnsupportedModelError, match="onnxruntime cannot run .*cannot load mlp.onnx"):
            verification.verify(model, out)
        assert not _reference_threads()
    failing = {"out.onnx"}  # the rewritten copy alone: pathcond's own fault, raised as it is
    with pytest.raises(RuntimeError, match="cannot load out.onnx"):
        verification.verify(model, out)
    assert not _reference_threads()


def test_side_by_side_only_up_to_the_stored_bytes_limit(tmp_path, monkeypatch):
    """The limit counts every stored tensor as onnxruntime holds it, parameters or not (here an int64 shape
    tensor held by a Constant node as well as the weights), summed independently from the arrays onnx
    reads back."""
    from pathcond_cli import verify as verification

    rng = np.random.default_rng(0)
    stored = {"w1": rng.standard_normal((8, 4)).astype(np.float32), "b1": rng.standard_normal(8).astype(np.float32),
              "w2": rng.standard_normal((2, 8)).astype(np.float32)}
    shape = np.array([1, 8], np.int64)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], "shape", value=numpy_helper.from_array(shape)),
         helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], "relu"),
         helper.make_node("Reshape", ["r", "shape"], ["f"], "reshape"),
         helper.make_node("Gemm", ["f", "w2"], ["y"], "fc2", transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(v, k) for k, v in stored.items()])
    source = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    arrays = [numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer]
    model = load_onnx(source)
    assert model.stored_bytes == sum(a.nbytes for a in arrays) + shape.nbytes
    assert model.stored_bytes > sum(t.numel() * t.element_size() for t in model.graph.params.values())
    monkeypatch.setattr(verification, "CONCURRENT_MAX_STORED_BYTES", model.stored_bytes)
    assert verification.runs_concurrently(model)
    monkeypatch.setattr(verification, "CONCURRENT_MAX_STORED_BYTES", model.stored_bytes - 1)
    assert not verification.runs_concurrently(model)


def test_interrupted_verification_stops_and_joins_the_reference_thread(mlp_onnx, tmp_path, monkeypatch):
    """Ctrl-C while the rewritten copy runs: verify raises it only once the original's thread has
    finished the run in progress and skipped the cases not started."""
    import threading
    import time

    from pathcond_cli import verify as verification

    model, out = _rescaled_copy(mlp_onnx, tmp_path)
    real_run, started = model.run, threading.Event()
    original_runs = []

    def run(path, feeds, *, train=False, threads=None):
        if Path(path) == model.path:
            original_runs.append(1)
            started.set()
            time.sleep(0.3)  # a slow original: the thread is mid-run when the interrupt comes
            return real_run(path, feeds, train=train, threads=threads)
        started.wait(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "run", run)
    with pytest.raises(KeyboardInterrupt):
        verification.verify(model, out, n_inputs=5)
    assert not _reference_threads() and len(original_runs) == 1


# --------------------------------------------------------------------------------------------------
# Narrow float dtypes onnx reads as ml_dtypes arrays


def _bf16_mlp(path: Path) -> dict[str, np.ndarray]:
    """A bfloat16 Gemm-Relu-Gemm (4 -> 8 -> 2) with uneven rows; returns its weights as float32."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    weights = {"w1": rng.standard_normal((8, 4)) * np.linspace(0.1, 6, 8)[:, None], "b1": rng.standard_normal(8),
               "w2": rng.standard_normal((2, 8)), "b2": rng.standard_normal(2)}
    stored = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], "relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "fc2", transB=1)],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 2])],
        [numpy_helper.from_array(v, k) for k, v in stored.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return {k: v.astype(np.float32) for k, v in stored.items()}


def _bf16_forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ p["w1"].T + p["b1"], 0) @ p["w2"].T + p["b2"]


def test_bfloat16_initializers_are_read_by_their_bits_and_written_back(tmp_path):
    from pathcond_cli.analysis import analyze, rescaled_params

    path = tmp_path / "bf16.onnx"
    stored = _bf16_mlp(path)
    model = load_onnx(path, LoadOptions())
    assert {k: v.dtype for k, v in model.graph.params.items()} == dict.fromkeys(stored, torch.bfloat16)
    for key, value in stored.items():
        np.testing.assert_array_equal(model.graph.params[key].float().numpy(), value)
    new = rescaled_params(analyze(model.graph, device="cpu"))
    assert "w1" in new and all(v.dtype == torch.bfloat16 for v in new.values())
    out = tmp_path / "out.onnx"
    model.save(new, out)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert {str(v.dtype) for v in written.values()} == {"bfloat16"}
    for key, value in new.items():
        np.testing.assert_array_equal(written[key].astype(np.float32), value.float().numpy())
    x = np.random.default_rng(0).standard_normal((16, 4))
    after = {k: v.astype(np.float64) for k, v in written.items()}
    want = _bf16_forward({k: v.astype(np.float64) for k, v in stored.items()}, x)
    assert np.abs(_bf16_forward(after, x) - want).max() <= 5e-2 * np.abs(want).max()


@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
def test_bfloat16_model_inspects_and_rescale_is_a_clear_refusal(tmp_path, partial):
    """onnxruntime has no bfloat16 Gemm on CPU: rescale cannot verify, so it is exit 3 and writes nothing
    (never exit 4); inspect needs no runtime."""
    from typer.testing import CliRunner

    from pathcond_cli.cli import app

    path = tmp_path / "bf16.onnx"
    _bf16_mlp(path)
    extra = ["--partial"] if partial else []
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(path), "--json", *extra])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rescale", str(path), str(tmp_path / "out.onnx"), *extra])
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs = True
    except Exception:  # noqa: BLE001 - the reason is what the CLI must report
        runs = False
    if runs:  # a future onnxruntime with bfloat16 kernels: then it verifies
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 3, result.output
        assert "onnxruntime cannot run" in " ".join(result.stderr.split())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.onnx"]


def test_onnx_runs_hold_one_session_at_a_time(tmp_path):
    """Running another file drops the previous file's session (verification needs one at a time), and
    running it again makes a new one that still gives the same outputs."""
    source = tmp_path / "in.onnx"
    torch.onnx.export(nets.mlp(), torch.randn(1, 8), str(source), dynamo=False)
    other = tmp_path / "copy.onnx"
    other.write_bytes(source.read_bytes())
    model = load_onnx(source)
    feeds = {model.input_specs()[0].name: np.ones((1, 8), np.float32)}
    first = model.run(source, feeds)
    model.run(other, feeds)
    assert len(model._sessions) == 1
    again = model.run(source, feeds)
    assert len(model._sessions) == 1 and np.array_equal(first[0], again[0])


def test_writer_same_is_bitwise_equality_wherever_the_difference_is():
    """The writer's chunked comparison against numpy's whole-array one: a difference in the first,
    a middle or the last byte, NaN equal to itself, -0.0 unlike 0.0."""
    from pathcond_cli.frontends import onnx_write

    rng = np.random.default_rng(0)
    a = rng.standard_normal(3 * onnx_write._SAME_CHUNK // 8 + 5)  # float64: spans several chunks
    a[7] = np.nan
    assert onnx_write._same(a, a.copy())
    for index in (0, a.size // 2, a.size - 1):
        b = a.copy()
        b[index] = np.nextafter(b[index], np.inf) if index != 7 else 1.0
        expected = np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert onnx_write._same(a, b) is expected is False
    z = np.zeros(4, np.float32)
    assert not onnx_write._same(z, -z) and onnx_write._same(z, z.copy())
    assert not onnx_write._same(z, z.astype(np.float64)) and not onnx_write._same(z, z.reshape(2, 2))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "bool"])
def test_writer_set_tensor_matches_numpy_helper(dtype):
    """An initializer given a new value in place reads back as that value, as onnx's from_array writes it."""
    from onnx import numpy_helper

    from pathcond_cli.frontends import onnx_write

    value = (np.random.default_rng(1).standard_normal((3, 4, 2)) * 5).astype(dtype)
    tensor = numpy_helper.from_array(np.ones((7,), np.float32), "w")
    onnx_write._set_tensor(tensor, value)
    assert tensor.name == "w" and list(tensor.dims) == [3, 4, 2]
    back = numpy_helper.to_array(tensor)
    assert back.dtype == value.dtype and np.array_equal(back, value)
    assert tensor.SerializeToString() == numpy_helper.from_array(value, "w").SerializeToString()


# --------------------------------------------------------------------------------------------------
# The weights held once: large initializers' values live in the arrays the IR reads, out of the held
# ModelProto, and are written back from them byte for byte


def _held_once_model(dtype: str, layout: str) -> onnx.ModelProto:
    """x -> Reshape (a stored int64 shape) -> Gemm w1 (96x64: large) -> Relu -> Gemm w2 -> y, and a second
    output x @ ws (64x80: large) that no rescaling touches (both its ends are the model's). ``layout``:
    "raw" (raw_data), "typed" (float_data) or "external" (saved by the test with every tensor external)."""
    rng = np.random.default_rng(5)
    values = {"w1": rng.standard_normal((96, 64)) * np.exp(rng.uniform(-2, 2, (96, 1))), "b1": rng.standard_normal(96),
              "w2": rng.standard_normal((10, 96)), "b2": rng.standard_normal(10), "ws": rng.standard_normal((64, 80))}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = []
    for name, value in values.items():
        value = value.astype(dtype)
        if layout == "typed":
            inits.append(helper.make_tensor(name, elem, value.shape, value.reshape(-1).tolist()))
        else:
            inits.append(numpy_helper.from_array(value, name))
    inits.append(numpy_helper.from_array(np.array([1, 64], np.int64), "shape"))
    inits[0].doc_string = "the first layer"  # fields around raw_data, kept as they are
    inits[4].doc_string = "a linear skip"
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x2"], "reshape"),
             helper.make_node("Gemm", ["x2", "w1", "b1"], ["h"], "fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "fc2", transB=1),
             helper.make_node("MatMul", ["x2", "ws"], ["z"], "skip")]
    info = [helper.make_tensor_value_info(n, elem, s) for n, s in (("x", [1, 64]), ("y", [1, 10]), ("z", [1, 80]))]
    graph = helper.make_graph(nodes, "held", info[:1], info[1:], inits, doc_string="a graph")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    onnx.helper.set_model_props(model, {"author": "pathcond tests"})
    onnx.checker.check_model(model)
    return model


def _stored_data(path: Path) -> dict[str, tuple]:
    """Each initializer as stored: (type, dims, its raw bytes or its typed fields' bytes), external data read."""
    out = {}
    for t in onnx.load(str(path)).graph.initializer:
        typed = b"".join(np.asarray(f, dt).tobytes() for f, dt in (
            (t.float_data, np.float32), (t.int32_data, np.int32), (t.int64_data, np.int64), (t.double_data, np.float64)))
        out[t.name] = (t.data_type, tuple(t.dims), t.raw_data if t.HasField("raw_data") else b"typed:" + typed)
    return out


def _held_once_forward(values: dict[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    v = {k: a.astype(np.float64) for k, a in values.items()}
    return [np.maximum(x @ v["w1"].T + v["b1"], 0) @ v["w2"].T + v["b2"], x @ v["ws"]]


def test_large_initializers_are_held_once(tmp_path):
    """After loading, a large raw_data initializer's values are held once: by the array the IR parameter
    is a view of, not also as bytes inside the kept ModelProto (which keeps its name, type and dims). Small
    tensors and typed fields stay in the model."""
    source = _write(_held_once_model("float32", "raw"), tmp_path)
    model = load_onnx(source)
    held = {t.name: t for t in model._model.graph.initializer}
    assert set(model._data) == {"w1", "ws"}
    for name in ("w1", "ws"):
        assert not held[name].HasField("raw_data") and list(held[name].dims) == list(model._data[name].shape)
    assert all(held[name].HasField("raw_data") for name in ("b1", "w2", "b2", "shape"))
    assert model._model.ByteSize() < source.stat().st_size / 10
    assert np.shares_memory(model.graph.params["w1"].numpy(), model._data["w1"])
    typed = load_onnx(_write(_held_once_model("float32", "typed"), tmp_path, "typed.onnx"))
    assert typed._data == {}  # float_data is not raw bytes: the model keeps it


@pytest.mark.parametrize("dtype,layout", [("float32", "raw"), ("float32", "typed"), ("float16", "raw"),
                                          ("float32", "external")])
def test_unchanged_initializers_are_written_byte_for_byte(tmp_path, dtype, layout):
    """rescale: every initializer whose value is unchanged is stored in the output exactly as in the input
    (raw bytes, or typed fields), large ones held out of the model included; the changed ones hold the
    rescaled values; both files compute the same function (onnxruntime, verified, and numpy in float64);
    the file is protobuf's own serialisation of what it holds, and the report's sha256 is that of its bytes."""
    import hashlib

    from pathcond_cli import jobs

    proto = _held_once_model(dtype, layout)
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    if layout == "external":  # every tensor external, the int64 shape too: onnxruntime cannot open the input
        onnx.save_model(proto, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="in.onnx.data", size_threshold=0)
    else:
        onnx.save(proto, str(source))
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = jobs.rescale_model(source, out, LoadOptions(), jobs.SolveOptions(device="cpu"), jobs.RescaleOptions())
    report = result.report
    assert report["verification"]["passed"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in files_before} == files_before

    before, after = _stored_data(source), _stored_data(out)
    values_before, values_after = _inits(source), _inits(out)
    changed = {k for k in before if not np.array_equal(values_before[k], values_after[k])}
    assert {"w1", "b1", "w2"} <= changed and "ws" not in changed and set(after) == set(before)
    for name in set(before) - changed:
        assert after[name] == before[name], name
    docs = {t.name: t.doc_string for t in onnx.load(str(out)).graph.initializer}
    assert docs["w1"] == "the first layer" and docs["ws"] == "a linear skip"

    x = np.random.default_rng(7).standard_normal((1, 64))
    want = _held_once_forward(values_before, x)
    for have, ref in zip(_held_once_forward(values_after, x), want):
        np.testing.assert_allclose(have, ref, rtol=0, atol=(1e-2 if dtype == "float16" else 1e-5) * np.abs(ref).max())
    feeds = {"x": x.astype(dtype)}
    inline = tmp_path / "inline.onnx"  # the input in one file: onnxruntime opens it whatever its layout
    onnx.save(onnx.load(str(source)), str(inline))
    runs = [_session(inline).run(None, feeds), _session(out).run(None, feeds)]
    for ref, have in zip(*runs):
        tol = 2e-2 if dtype == "float16" else 1e-4
        np.testing.assert_allclose(have.astype(np.float64), ref, rtol=0, atol=tol * float(np.abs(ref).max()))

    written = out.read_bytes()
    assert report["output"]["sha256"] == hashlib.sha256(written).hexdigest()
    assert onnx.load_model_from_string(written).SerializeToString() == written
    if layout == "external":
        saved = onnx.load(str(out), load_external_data=False)
        assert {t.name for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL} == \
            {"w1", "w2", "ws"}  # 1 KiB or more, not integers
        assert any("small tensors stored inline" in w for w in report["warnings"])  # the input was re-laid


def _session(path: Path):
    from pathcond_cli.frontends.onnx_frontend import _session as session

    return session(path)


def _with_unknown_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with an unknown field (number 111) in the model, its graph and its tensor w1: a newer
    onnx's fields, which protobuf keeps and serialises after the known ones."""
    unknown = b"\xfa\x06\x03xyz"
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w1.ParseFromString(w1.SerializeToString() + unknown)
    model.graph.ParseFromString(model.graph.SerializeToString() + unknown)
    return onnx.ModelProto.FromString(model.SerializeToString() + unknown)


@pytest.mark.parametrize("dtype,external", [("float32", False), ("float32", True), ("bfloat16", False),
                                            ("float16", True)])
def test_writer_gives_the_bytes_of_the_whole_model(tmp_path, dtype, external):
    """The writer serialises the model piece by piece, each held-out tensor's bytes from its array: the
    file is byte for byte what protobuf (and onnx.save_model, for the external layout) writes for the
    whole model, fields around the spliced ones and unknown fields included."""
    import ml_dtypes  # noqa: F401 - numpy knows "bfloat16" once it is imported

    from pathcond_cli.frontends import onnx_read, onnx_write

    full = _with_unknown_fields(_held_once_model(dtype, "raw"))
    light, data = onnx_read._detach_data(onnx.ModelProto.FromString(full.SerializeToString()))
    assert set(data) == {"w1", "ws"} and light.ByteSize() < full.ByteSize() / 5
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    onnx_write._save_proto(light, ours / "m.onnx", external=external, data=data)
    if external:  # what the writer did before it held tensors out of the model: onnx marks and writes them
        for tensor in full.graph.initializer:
            if onnx_write._goes_external(tensor):
                onnx.external_data_helper.set_external_data(tensor, "m.onnx.data")
        onnx.save_model(full, str(theirs / "m.onnx"))
    else:
        (theirs / "m.onnx").write_bytes(full.SerializeToString())
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for path in theirs.iterdir():
        assert (ours / path.name).read_bytes() == path.read_bytes(), path.name


# -- malformed or unusual files found by an independent tester: user errors, never exit 4 ---------------


def _two_layer(rng, n_in: int = 64, hidden: int = 100, n_out: int = 50):
    w1 = rng.standard_normal((n_in, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, n_out)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("damage", ["empty", "short", "long", "undefined", "unknown", "short_small", "typed",
                                    "duplicate", "segment"])
def test_malformed_tensors_are_unreadable_files(damage, tmp_path):
    """Raw data shorter or longer than the dims say, or an element type ONNX does not define: exit 2 naming
    the tensor (it was an error deep inside numpy, exit 4), for large tensors and small ones."""
    from tests.test_cli import invoke

    model = _two_layer(np.random.default_rng(0))
    w1 = model.graph.initializer[0]
    if damage == "empty":
        w1.raw_data = b""
    elif damage in ("short", "long"):
        w1.raw_data = w1.raw_data[:-4] if damage == "short" else w1.raw_data + b"\0" * 4
    elif damage in ("undefined", "unknown"):
        w1.data_type = 0 if damage == "undefined" else 999
    elif damage == "duplicate":
        model.graph.initializer.append(model.graph.initializer[1])
    elif damage == "segment":
        w1.segment.begin, w1.segment.end = 0, 10
    elif damage == "short_small":
        model = _two_layer(np.random.default_rng(0), 4, 8, 3)
        model.graph.initializer[1].raw_data = model.graph.initializer[1].raw_data[:-4]
    else:
        model = _two_layer(np.random.default_rng(0), 4, 8, 3)
        values = numpy_helper.to_array(model.graph.initializer[0]).reshape(-1)[:-1]
        model.graph.initializer[0].ClearField("raw_data")
        model.graph.initializer[0].float_data.extend(values.tolist())
    source = tmp_path / "bad.onnx"
    source.write_bytes(model.SerializeToString())
    for args in (("inspect", source), ("rescale", source, tmp_path / "out.onnx")):
        result = invoke(*args, "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert "'W" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_external_data_of_a_subgraph_initializer_is_loaded(tmp_path):
    """An If branch's initializer stored in an external file: loaded like the top graph's (its markers
    were stripped on write without its data: an invalid output, exit 4), the output runs and matches."""
    import onnxruntime as ort
    from onnx.external_data_helper import set_external_data

    from tests.test_cli import invoke

    rng = np.random.default_rng(1)
    w1, w2, wi = (rng.standard_normal((80, 80)).astype(np.float32) for _ in range(3))
    then_g = helper.make_graph([helper.make_node("Identity", ["Wi"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [80, 80])], [numpy_helper.from_array(wi, "Wi")])
    else_g = helper.make_graph([helper.make_node("Transpose", ["W1"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [80, 80])])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("If", ["c"], ["Mi"], "theif", then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["r2", "Mi"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 80]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 80])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inner = next(a for a in model.graph.node[4].attribute if a.name == "then_branch").g.initializer[0]
    (tmp_path / "inner.bin").write_bytes(inner.raw_data)
    set_external_data(inner, "inner.bin", 0, len(inner.raw_data))
    inner.ClearField("raw_data")
    inner.data_location = TensorProto.EXTERNAL
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    source.write_bytes(model.SerializeToString())
    result = invoke("rescale", source, out, "--device", "cpu", "--partial", "--json")
    assert result.exit_code == 0, result.output
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = rng.standard_normal((1, 80)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array([[c]])}
        want, got = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                     for p in (source, out))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_an_input_that_fails_at_run_time_is_refused(tmp_path):
    """onnxruntime loads the input but fails to run it (an index out of range, on the original, in
    verification's thread or not): exit 3 saying why, not onnxruntime's error as exit 4."""
    from tests.test_cli import invoke

    rng = np.random.default_rng(2)
    model = _two_layer(rng)
    w3 = rng.standard_normal((50, 50)).astype(np.float32)
    model.graph.node[-1].output[0] = "h2"
    model.graph.node.extend([helper.make_node("Relu", ["h2"], ["r2"]), helper.make_node("Gather", ["r2", "idx"], ["gt"], axis=1),
                             helper.make_node("MatMul", ["gt", "W3"], ["y"])])
    model.graph.initializer.extend([numpy_helper.from_array(w3, "W3"),
                                    numpy_helper.from_array(np.array([0] * 49 + [500], np.int64), "idx")])
    source = tmp_path / "in.onnx"
    source.write_bytes(model.SerializeToString())
    result = invoke("rescale", source, tmp_path / "out.onnx", "--device", "cpu", "--partial")
    assert result.exit_code == 3, result.output
    assert "onnxruntime cannot run" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_a_scalar_graph_input_is_not_an_internal_error(tmp_path):
    from tests.test_cli import invoke

    rng = np.random.default_rng(3)
    model = _two_layer(rng, 8, 16, 4)
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    model.graph.output.append(helper.make_tensor_value_info("s_out", TensorProto.FLOAT, []))
    model.graph.node.append(helper.make_node("Identity", ["s"], ["s_out"]))
    source = tmp_path / "in.onnx"
    source.write_bytes(model.SerializeToString())
    for extra in ((), ("--partial",)):
        result = invoke("inspect", source, "--device", "cpu", *extra)
        assert result.exit_code in (0, 3), result.output
        assert "internal error" not in result.output


def test_an_output_over_protobufs_limit_is_refused_with_what_to_do(mlp_onnx, tmp_path, monkeypatch):
    """An inline output over protobuf's 2 GiB limit (here a limit made tiny) is exit 3 naming the fix
    (external data), not onnx's ValueError as exit 4; nothing is written."""
    from pathcond_cli.frontends import onnx_write
    from tests.test_cli import invoke

    monkeypatch.setattr(onnx_write, "_MAX_PROTOBUF", 100)
    result = invoke("rescale", mlp_onnx, tmp_path / "out.onnx", "--device", "cpu")
    assert result.exit_code == 3, result.output
    assert "save_as_external_data=True" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


def test_unknown_fields_of_the_model_graph_and_nodes_are_kept(tmp_path):
    """Fields of a newer ONNX schema (unknown to this onnx) on the model, the graph, a node and a large
    weight survive a rescaling that rewrites that weight (the model and graph lost theirs)."""
    from google.protobuf import unknown_fields

    from tests.test_cli import invoke

    model = _two_layer(np.random.default_rng(4))
    extra = b"\xc2\x3e\x05hello"  # field 1000, length-delimited

    def add(message):
        data = message.SerializeToString() + extra
        message.Clear()
        message.ParseFromString(data)

    for message in (model.graph.initializer[0], model.graph.node[0], model.graph, model):
        add(message)
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    source.write_bytes(model.SerializeToString())
    result = invoke("rescale", source, out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["conditioning"]["max_abs_log_scale"] > 0.01, "W1 must be rewritten"
    written = onnx.ModelProto()
    written.ParseFromString(out.read_bytes())
    for message in (written, written.graph, written.graph.node[0], written.graph.initializer[0]):
        assert [f.field_number for f in unknown_fields.UnknownFieldSet(message)] == [1000]



@pytest.mark.parametrize("case", ["string_bias", "vector_input"])
def test_odd_but_valid_models_are_refused_not_crashed(case, tmp_path):
    """A string tensor where a weight goes, a 1-D graph input (no batch or channel axis): exit 3 naming
    the node, not a TypeError / IndexError as exit 4."""
    from tests.test_cli import invoke

    rng = np.random.default_rng(5)
    if case == "string_bias":
        w = rng.standard_normal((4, 3)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
        inits = [numpy_helper.from_array(w, "W"), helper.make_tensor("b", TensorProto.STRING, [3], [b"a", b"b", b"c"])]
        shape = [1, 4]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("MatMul", ["r", "W2"], ["y"])]
        inits = [numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W"),
                 numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "W2")]
        shape = [4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    source = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    result = invoke("rescale", source, tmp_path / "out.onnx", "--device", "cpu")
    assert result.exit_code == 3, result.output
    assert "internal error" not in result.output


def test_inputs_too_large_to_verify_are_a_usage_error():
    """A declared (or --input-shape) dim so large that one verification input would need terabytes:
    exit 2 before allocating, not a MemoryError as exit 4."""
    from pathcond_cli.frontends.base import InputSpec
    from pathcond_cli.verify import random_inputs

    with pytest.raises(UsageError, match="too large to verify"):
        random_inputs([InputSpec("x", (2**40, 4), "float32")], seed=0)
    assert random_inputs([InputSpec("x", (2, 4), "float32")], seed=0)["x"].shape == (2, 4)


def test_identical_non_finite_outputs_pass_and_new_ones_fail():
    """An original whose outputs hold inf or NaN (a NaN weight kept in an opaque layer) is matched where
    the rewritten file gives the same inf or NaN; a new non-finite value, or a changed one, still fails."""
    from pathcond_cli.verify import _compare

    a = np.array([1.0, np.inf, -np.inf, np.nan, 2.0])
    assert _compare([a], [a.copy()], "eval")[0].max_rel_error == 0.0
    assert _compare([a], [a + np.array([1e-9, 0, 0, 0, 0])], "eval")[0].max_rel_error < 1e-8
    for changed in (np.array([1.0, np.nan, -np.inf, np.nan, 2.0]), np.array([1.0, np.inf, -np.inf, 0.0, 2.0])):
        assert _compare([a], [changed], "eval")[0].max_rel_error == np.inf
    assert _compare([np.array([1.0, 2.0])], [np.array([1.0, np.inf])], "eval")[0].max_rel_error == np.inf
