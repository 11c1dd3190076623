"""ONNX models from before opset 11, written the way the classic ONNX model zoo wrote them.

The zoo's VGG, ResNet, SqueezeNet and DenseNet files are opset 7-9, IR version 3: node names are empty,
every weight is also a graph input, Dropout declares a mask output nobody reads, residual adds are
``Sum`` and some weights are computed (ConstantOfShape). No model hub is reachable here, so each is
built in code in that style, then rescaled through the CLI and checked with onnxruntime on both files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pathcond_cli.cli import app
from pathcond_cli.errors import UnsupportedModelError
from pathcond_cli.frontends.onnx_frontend import load_onnx

runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# A zoo-style graph builder


class _Zoo:
    """Builds a graph as the old zoo files are: empty node names, named tensors, IR 3."""

    def __init__(self, opset: int, seed: int = 0):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        outputs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    def tensor(self, prefix: str, value: np.ndarray) -> str:
        name = self._name(prefix)
        self.inits[name] = value
        return name

    def weight(self, prefix: str, shape, scale: float) -> str:
        # uneven scales per output channel: something for the rescaling to fix
        spread = np.exp(self.rng.uniform(-1.5, 1.5, size=(shape[0],) + (1,) * (len(shape) - 1)))
        return self.tensor(prefix, (self.rng.standard_normal(shape) * scale * spread).astype(np.float32))

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, bias: str | bool = True) -> str:
        w = self.weight("conv_w", (cout, cin, k, k), (2.0 / (cin * k * k)) ** 0.5)
        inputs = [x, w]
        if bias is True:
            inputs.append(self.tensor("conv_b", (self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        elif bias:
            inputs.append(bias)
        pad = k // 2
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def maxpool(self, x: str) -> str:
        return self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])

    def gemm(self, x: str, cin: int, cout: int, constant: bool = False) -> str:
        w = self.weight("fc_w", (cout, cin), (2.0 / cin) ** 0.5)
        if constant:  # held by a Constant node instead of an initializer
            w = self.node("Constant", [], value=numpy_helper.from_array(self.inits.pop(w)))
        b = self.tensor("fc_b", (self.rng.standard_normal(cout) * 0.1).astype(np.float32))
        return self.node("Gemm", [x, w, b], transB=1)

    def dropout(self, x: str) -> str:
        """Dropout with its mask output declared and read by nobody (opset < 10 style)."""
        return self.node("Dropout", [x], n_out=2, ratio=0.5)

    def batchnorm(self, x: str, c: int, bias: str | None = None, scale: str | None = None) -> str:
        stats = [scale or self.tensor("bn_scale", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
                 bias or self.tensor("bn_bias", (self.rng.standard_normal(c) * 0.2).astype(np.float32)),
                 self.tensor("bn_mean", (self.rng.standard_normal(c) * 0.3).astype(np.float32)),
                 self.tensor("bn_var", self.rng.uniform(0.5, 1.5, c).astype(np.float32))]
        attrs = {"epsilon": 1e-5}
        if self.opset < 9:
            attrs["spatial"] = 1
        return self.node("BatchNormalization", [x, *stats], **attrs)

    def mul_add_bn(self, x: str, c: int) -> str:
        """BatchNorm folded into a per-channel Mul and Add of (C, 1, 1) constants (DenseNet-121 style)."""
        scale = self.tensor("bn_mul", self.rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32))
        shift = self.tensor("bn_add", (self.rng.standard_normal((c, 1, 1)) * 0.2).astype(np.float32))
        return self.node("Add", [self.node("Mul", [x, scale]), shift])

    def model(self, x_shape, out: str, n_out: int, weights_as_inputs: bool = True, ir_version: int = 3):
        inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, x_shape)]
        if weights_as_inputs:  # IR < 4: an initializer must also be a graph input
            inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                       for k, v in self.inits.items()]
        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [x_shape[0], n_out])]
        graph = helper.make_graph(self.nodes, "zoo", inputs, outputs,
                                  [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir_version,
                                 producer_name="onnx-caffe2")


def vgg_like(opset: int, flatten: bool = False) -> onnx.ModelProto:
    """Conv + Relu + MaxPool chains, a Reshape by a stored shape (or Flatten), fc + Dropout, Softmax; with
    Flatten, the second fc's weight is a Constant node."""
    z = _Zoo(opset, seed=1)
    x = z.relu(z.conv("data_0", 3, 8))
    x = z.maxpool(z.relu(z.conv(x, 8, 8)))
    x = z.maxpool(z.relu(z.conv(x, 8, 16)))
    if flatten:
        x = z.node("Flatten", [x], axis=1)
    else:
        x = z.node("Reshape", [x, z.tensor("OC2_DUMMY", np.array([1, -1], dtype=np.int64))])
    x = z.dropout(z.relu(z.gemm(x, 16 * 4 * 4, 32)))
    x = z.dropout(z.relu(z.gemm(x, 32, 24, constant=flatten)))
    return z.model([1, 3, 16, 16], z.node("Softmax", [z.gemm(x, 24, 10)]), 10)


def resnet_like(opset: int) -> onnx.ModelProto:
    """BatchNorm (``spatial`` before opset 9), ``Sum`` residual adds, a strided block with a projection,
    GlobalAveragePool and a Reshape whose shape is a Constant node. Two BatchNorms of different groups
    share one stored scale (exporters deduplicate equal tensors). At opset 9 the first BatchNorm's shift
    is computed by ConstantOfShape."""
    z = _Zoo(opset, seed=2)
    shift = None
    if opset >= 9:
        size = z.node("Constant", [], value=numpy_helper.from_array(np.array([8], dtype=np.int64)))
        shift = z.node("ConstantOfShape", [size], value=numpy_helper.from_array(np.array([0.05], dtype=np.float32)))
    shared = z.tensor("bn_scale_shared", z.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = z.relu(z.batchnorm(z.conv("data_0", 3, 8), 8, bias=shift, scale=shared))
    y = z.batchnorm(z.conv(z.relu(z.batchnorm(z.conv(x, 8, 8, bias=False), 8, scale=shared)), 8, 8, bias=False), 8)
    x = z.relu(z.node("Sum", [y, x]))
    y = z.batchnorm(z.conv(z.relu(z.batchnorm(z.conv(x, 8, 16, stride=2, bias=False), 16)), 16, 16, bias=False), 16)
    shortcut = z.batchnorm(z.conv(x, 8, 16, k=1, stride=2, bias=False), 16)
    x = z.relu(z.node("Sum", [y, shortcut]))
    shape = z.node("Constant", [], value=numpy_helper.from_array(np.array([1, 16], dtype=np.int64)))
    x = z.node("Reshape", [z.node("GlobalAveragePool", [x]), shape])
    return z.model([1, 3, 16, 16], z.node("Softmax", [z.gemm(x, 16, 10)]), 10)


def squeezenet_like(opset: int) -> onnx.ModelProto:
    """Fire modules: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated on channels; Dropout; a conv
    classifier averaged by GlobalAveragePool, flattened, Softmax."""
    z = _Zoo(opset, seed=3)
    x = z.maxpool(z.relu(z.conv("data_0", 3, 8)))
    for cin, squeeze, expand in ((8, 4, 8), (16, 6, 12)):
        s = z.relu(z.conv(x, cin, squeeze, k=1))
        x = z.node("Concat", [z.relu(z.conv(s, squeeze, expand, k=1)), z.relu(z.conv(s, squeeze, expand))], axis=1)
    x = z.relu(z.conv(z.dropout(x), 24, 10, k=1))
    x = z.node("Flatten", [z.node("GlobalAveragePool", [x])], axis=1)
    return z.model([1, 3, 16, 16], z.node("Softmax", [x]), 10)


def densenet_like(opset: int, weights_as_inputs: bool = True) -> onnx.ModelProto:
    """Pre-activation dense layers whose BatchNorms are Mul/Add by per-channel constants, Concat growth,
    a transition with AveragePool, GlobalAveragePool, Reshape by a stored shape, fc, Softmax."""
    z = _Zoo(opset, seed=4)
    x = z.conv("data_0", 3, 8, bias=False)
    channels = 8
    for _ in range(2):
        new = z.conv(z.relu(z.mul_add_bn(x, channels)), channels, 4, bias=False)
        x = z.node("Concat", [x, new], axis=1)
        channels += 4
    x = z.conv(z.relu(z.mul_add_bn(x, channels)), channels, 8, k=1, bias=False)
    x = z.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = z.node("GlobalAveragePool", [z.relu(z.mul_add_bn(x, 8))])
    x = z.node("Reshape", [x, z.tensor("fc_shape", np.array([1, -1], dtype=np.int64))])
    return z.model([1, 3, 16, 16], z.node("Softmax", [z.gemm(x, 8, 10)]), 10, weights_as_inputs=weights_as_inputs,
                   ir_version=3 if weights_as_inputs else 4)


def fcn_like(opset: int, tail: str = "Relu") -> onnx.ModelProto:
    """A segmentation-style net: conv, nearest Upsample by 2 (scales an attribute before opset 9, an input
    from 9; the converter turns it into Resize and inserts Constant nodes), conv head, Flatten."""
    z = _Zoo(opset, seed=8)
    x = z.maxpool(z.relu(z.conv("data_0", 3, 8)))
    if opset >= 9:
        x = z.node("Upsample", [x, z.tensor("scales", np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    else:
        x = z.node("Upsample", [x], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0])
    x = z.node(tail, [z.conv(x, 8, 8)])
    return z.model([1, 3, 16, 16], z.node("Flatten", [z.conv(x, 8, 2, k=1)], axis=1), 2 * 16 * 16)


def lrn_like(opset: int) -> onnx.ModelProto:
    """AlexNet from Caffe: Conv + Relu + LRN + MaxPool."""
    z = _Zoo(opset, seed=5)
    x = z.maxpool(z.node("LRN", [z.relu(z.conv("data_0", 3, 8))], size=5, alpha=1e-4, beta=0.75, bias=1.0))
    x = z.node("Flatten", [z.relu(z.conv(x, 8, 8))], axis=1)
    return z.model([1, 3, 16, 16], z.node("Softmax", [z.gemm(x, 8 * 8 * 8, 10)]), 10)


ZOO = {
    "vgg-7": lambda: vgg_like(7),
    "vgg-8-flatten": lambda: vgg_like(8, flatten=True),
    "resnet-8": lambda: resnet_like(8),
    "resnet-9-constantofshape": lambda: resnet_like(9),
    "squeezenet-7": lambda: squeezenet_like(7),
    "squeezenet-8": lambda: squeezenet_like(8),
    "densenet-8": lambda: densenet_like(8),
    "densenet-9-ir4": lambda: densenet_like(9, weights_as_inputs=False),
    "fcn-7-upsample": lambda: fcn_like(7),
    "fcn-9-upsample": lambda: fcn_like(9),
}


# --------------------------------------------------------------------------------------------------
# Helpers


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def _invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(path: Path) -> Path:
    """A copy whose graph output is the input of the trailing Softmax, so that comparisons see the
    values the rescaling could disturb (a softmax of large logits hides them)."""
    proto = onnx.load(str(path))
    head = proto.graph.node[-1]
    if head.op_type != "Softmax":
        return path
    del proto.graph.node[-1]
    proto.graph.output[0].name = head.input[0]
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    return _save(proto, path.with_name(path.stem + "-logits.onnx"))


def _assert_same_outputs(original: Path, rescaled: Path) -> None:
    a, b = _session(original), _session(rescaled)
    rng = np.random.default_rng(123)
    for _ in range(3):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        want, have = a.run(None, {"data_0": x})[0], b.run(None, {"data_0": x})[0]
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _opset(proto: onnx.ModelProto) -> int:
    return next(e.version for e in proto.opset_import if e.domain in ("", "ai.onnx"))


# --------------------------------------------------------------------------------------------------
# Zoo-style models through the CLI


@pytest.mark.parametrize("name", sorted(ZOO))
def test_old_opset_model_is_rescaled_into_its_own_graph(name, tmp_path):
    proto = ZOO[name]()
    source = _save(proto, tmp_path / "model.onnx")
    before = source.read_bytes()
    assert _invoke("inspect", source, "--device", "cpu").exit_code == 0

    out = tmp_path / "out.onnx"
    result = _invoke("rescale", source, out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert source.read_bytes() == before
    report = json.loads(result.stdout)
    assert report["verification"]["passed"]
    assert any(f"keeps opset {_opset(proto)}" in w for w in report["warnings"])

    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    assert _opset(written) == _opset(proto) and written.ir_version == proto.ir_version
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in proto.graph.node]
    assert [list(n.output) for n in written.graph.node] == [list(n.output) for n in proto.graph.node]
    old, new = _initializers(proto), _initializers(written)
    changed = [k for k in old if k in new and not np.allclose(old[k], new[k], rtol=1e-3, atol=0)]
    assert changed or set(new) - set(old), "no weight was rescaled"
    for before_node, after_node in zip(proto.graph.node, written.graph.node):
        if before_node.op_type == "Constant" and before_node.attribute[0].t.data_type == TensorProto.FLOAT:
            w_before, w_after = (numpy_helper.to_array(n.attribute[0].t) for n in (before_node, after_node))
            assert w_after.shape == w_before.shape and not np.allclose(w_after, w_before, rtol=1e-3, atol=0)
    _assert_same_outputs(source, out)
    _assert_same_outputs(_logits(source), _logits(out))


def test_computed_weight_gets_its_own_declared_initializer(tmp_path):
    """A BatchNorm shift computed by ConstantOfShape: the rescaled values go to a new initializer read by
    that BatchNorm, declared as a graph input as IR 3 requires; the rest of the graph is kept."""
    proto = resnet_like(9)
    reader = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    computed = reader.input[2]
    source, out = _save(proto, tmp_path / "model.onnx"), tmp_path / "out.onnx"
    assert _invoke("rescale", source, out, "--device", "cpu").exit_code == 0

    written = onnx.load(str(out))
    new_reader = next(n for n in written.graph.node if list(n.output) == list(reader.output))
    name = new_reader.input[2]
    assert name != computed and name in _initializers(written) and name not in _initializers(proto)
    shift = _initializers(written)[name]
    assert shift.shape == (8,) and not np.allclose(shift, 0.05)
    assert name in {v.name for v in written.graph.input}
    assert [list(n.input) for n in written.graph.node if n.op_type != "BatchNormalization"] == \
        [list(n.input) for n in proto.graph.node if n.op_type != "BatchNormalization"]
    _assert_same_outputs(_logits(source), _logits(out))


@pytest.mark.parametrize("command", ["inspect", "rescale"])
def test_lrn_model_stays_refused(command, tmp_path):
    source = _save(lrn_like(7), tmp_path / "alexnet.onnx")
    out = tmp_path / "out.onnx"
    result = _invoke(command, source, *([out] if command == "rescale" else []), "--device", "cpu")
    assert result.exit_code == 3, result.output
    assert "LRN" in result.output and "positively homogeneous" in result.output
    assert not out.exists()


def _spatial_batchnorm(spatial: int) -> onnx.ModelProto:
    """Conv + BatchNorm(spatial) + Relu + Conv at opset 7; spatial=0 normalises per (c, h, w) element."""
    z = _Zoo(7, seed=6)
    shape = (8,) if spatial else (8, 16, 16)
    stats = [z.tensor(k, z.rng.uniform(0.5, 1.5, shape).astype(np.float32)) for k in ("s", "b", "m", "v")]
    x = z.node("BatchNormalization", [z.conv("data_0", 3, 8), *stats], spatial=spatial, epsilon=1e-5)
    x = z.node("Flatten", [z.conv(z.relu(x), 8, 4)], axis=1)
    return z.model([1, 3, 16, 16], x, 4 * 16 * 16)


def test_what_the_version_converter_cannot_upgrade_is_refused(tmp_path):
    proto = _spatial_batchnorm(0)
    source = _save(proto, tmp_path / "model.onnx")
    _session(source).run(None, {"data_0": np.zeros((1, 3, 16, 16), np.float32)})  # a valid model
    out = tmp_path / "out.onnx"
    result = _invoke("rescale", source, out, "--device", "cpu")
    assert result.exit_code == 3, result.output
    assert "version_converter" in result.output and "spatial" in result.output
    assert not out.exists()


def test_upgraded_graph_is_written_when_the_original_cannot_take_the_values(tmp_path, monkeypatch):
    """A converter that rewires a weight (here through an Identity): the values cannot be put back into the
    original graph, so the upgraded graph is written, with a warning, and still verified against the file."""
    real = onnx.version_converter.convert_version

    def rewiring(model, target):
        upgraded = real(model, target)
        conv = next(n for n in upgraded.graph.node if n.op_type == "Conv")
        upgraded.graph.node.insert(0, helper.make_node("Identity", [conv.input[1]], [conv.input[1] + "_up"]))
        conv.input[1] += "_up"
        return upgraded

    monkeypatch.setattr(onnx.version_converter, "convert_version", rewiring)
    proto = vgg_like(8)
    source, out = _save(proto, tmp_path / "model.onnx"), tmp_path / "out.onnx"
    result = _invoke("rescale", source, out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("output is that upgraded graph at opset 11" in w for w in report["warnings"])
    written = onnx.load(str(out))
    assert _opset(written) == 11 and written.graph.node[0].op_type == "Identity"
    assert not np.allclose(_initializers(written)[proto.graph.node[0].input[1]],
                           _initializers(proto)[proto.graph.node[0].input[1]], rtol=1e-3, atol=0)
    _assert_same_outputs(_logits(source), _logits(out))


def _gemm_broadcast(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm's ``broadcast`` attribute, gone since opset 7, left in an opset-7 file."""
    for node in proto.graph.node:
        if node.op_type == "Gemm":
            node.attribute.append(helper.make_attribute("broadcast", 1))
    return proto


@pytest.mark.parametrize("proto,why", [
    (vgg_like(6), "opset 6; onnxruntime runs opset 7 or later"),
    (_gemm_broadcast(vgg_like(7)), "Unrecognized attribute: broadcast"),
], ids=["opset-6", "opset-7-gemm-broadcast"])
def test_model_onnxruntime_cannot_run_is_refused_on_rescale(proto, why, tmp_path):
    """The converter upgrades these, but onnxruntime cannot run the file to verify the output against it:
    no opset-6 kernels; an attribute the op no longer has."""
    source, out = _save(proto, tmp_path / "model.onnx"), tmp_path / "out.onnx"
    assert _invoke("inspect", source, "--device", "cpu").exit_code == 0
    result = _invoke("rescale", source, out, "--device", "cpu")
    assert result.exit_code == 3, result.output
    assert "onnxruntime cannot run" in result.output and why in " ".join(result.output.split())
    assert not out.exists()


@pytest.mark.parametrize("mask_read", [False, True])
def test_dropout_mask_is_refused_only_when_read(mask_read, tmp_path):
    z = _Zoo(12, seed=7)
    x = z.relu(z.gemm(z.node("Flatten", [z.relu(z.conv("data_0", 3, 4))], axis=1), 4 * 16 * 16, 8))
    z.nodes.append(helper.make_node("Dropout", [x], ["dropped", "mask"]))
    proto = z.model([1, 3, 16, 16], z.gemm("dropped", 8, 5), 5, weights_as_inputs=False, ir_version=7)
    if mask_read:
        proto.graph.output.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 8]))
    source, out = _save(proto, tmp_path / "model.onnx"), tmp_path / "out.onnx"
    result = _invoke("rescale", source, out, "--device", "cpu")
    if mask_read:
        assert result.exit_code == 3 and "mask output is used" in result.output, result.output
    else:
        assert result.exit_code == 0, result.output
        _assert_same_outputs(source, out)


def test_offenders_are_named_after_the_original_graph(tmp_path):
    """The converter inserts Constant nodes before the Resize it makes of Upsample: an unnamed node is
    still reported under its op and index in the file the user has."""
    proto = fcn_like(9, tail="Tanh")
    index = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Tanh")
    with pytest.raises(UnsupportedModelError) as caught:
        load_onnx(_save(proto, tmp_path / "model.onnx"))
    assert [o.node for o in caught.value.offenders] == [f"Tanh_{index}"]
