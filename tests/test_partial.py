"""Partial rescaling (``--partial``, MATH §8b): models with ops that are not positively homogeneous.

Every model is built in code, exported, rescaled with ``--partial`` through the CLI, and checked against
independent references: the rescaled file computes what the original computes under its own runtime
(onnxruntime / torch, run here, not by pathcond's verification), every FFN hidden unit is free, the
parameters of opaque ops (LayerNorm, attention, gates) are unchanged byte for byte, no segment's score
gets worse, and a segment's g equals its closed form as a standalone network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from pathcond_cli.analysis import analyze
from pathcond_cli.cli import app
from pathcond_cli.frontends.base import LoadOptions
from pathcond_cli.frontends.onnx_frontend import load_onnx
from pathcond_cli.frontends.torch_frontend import load_torch
from pathcond_cli.ir import OPS
from pathcond_cli.segments import cut, segment_nodes
from tests.conftest import export_onnx

runner = CliRunner()
D, FF, HEADS, TOKENS, LAYERS = 16, 32, 4, 5, 2


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------------------
# Models


def encoder(d: int = D, ff: int = FF, layers: int = LAYERS, norm_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, HEADS, ff, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class DecoderBlock(nn.Module):
    """Token-major decoder block as language-model code writes it: Gather embedding, RMSNorm written out,
    causal attention with a mask built from shape arithmetic, and an FFN on (batch·tokens, features)."""

    def __init__(self, vocab: int = 256, d: int = D, ff: int = FF):
        super().__init__()
        torch.manual_seed(1)
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, d)
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids.remainder(self.vocab))
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        x = x + self.proj(torch.softmax(scores, dim=-1) @ v)
        h = self.norm2(x).reshape(b * t, d)
        x = x + self.down(torch.relu(self.up(h))).reshape(b, t, d)
        return self.head(x)


class SEBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        return torch.relu(x + y * s[:, :, None, None])


class SEResNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(SEBlock(c), SEBlock(c))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def gelu_head_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(12 * 4 * 4, 24), nn.GELU(), nn.Linear(24, 4)).eval()


def mobilenet_like() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(),
                         nn.Conv2d(8, 16, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4)).eval()


# --------------------------------------------------------------------------------------------------
# Checks


def _rescale(source: Path, tmp_path: Path, *extra) -> tuple[Path, dict]:
    out = tmp_path / f"out{source.suffix}"
    result = invoke("rescale", source, out, "--partial", "--json", *extra)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["passed"]
    return out, report


def _assert_segments_not_worse(report: dict) -> None:
    assert report["segments"]
    for seg in report["segments"]:
        before, after = seg["log10_score_before"], seg["log10_score_after"]
        if before is not None:
            assert after <= before + 1e-9, seg


def _onnx_outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_same_function_onnx(a: Path, b: Path, feeds: dict, rtol: float = 1e-4) -> None:
    for x, y in zip(_onnx_outputs(a, feeds), _onnx_outputs(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * float(np.abs(x).max()))


def _stored_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def _changed_onnx(a: Path, b: Path) -> set[str]:
    """Names of the stored tensors whose bytes differ. A name the exporter shared as ``Identity`` of a
    stored tensor may become a stored tensor of its own (when its role now needs another value), and a
    name read by roles that now need different values gets a new one: either is compared with, and
    reported as, the tensor it comes from."""
    source = onnx.load(str(a))
    before, after = _stored_tensors(source), _stored_tensors(onnx.load(str(b)))
    shared = {n.output[0]: n.input[0] for n in source.graph.node if n.op_type == "Identity"}

    def origin(name: str) -> str:
        # a role that now needs another value than the other readers of its name gets a new name
        # (NAME.pathcond.SLOT, with a warning): the dynamo exporter merges the equal tensors of
        # deep-copied layers into one name
        name = name.split(".pathcond.")[0]
        while name in shared:
            name = shared[name]
        return name

    assert before.keys() <= after.keys() and all(origin(k) in before for k in after.keys() - before.keys())
    return {origin(k) for k in after if before[origin(k)].tobytes() != after[k].tobytes()}


def _free_hidden(graph, width: int) -> tuple[int, int]:
    """(free, all) hidden units of the layers ``width`` channels wide (the FFN's hidden layers)."""
    analysis = analyze(graph, device="cpu")
    free = total = 0
    for node in analysis.graph.nodes:
        if OPS[node.op].hidden and analysis.graph.shapes[node.output][1] == width:
            ids = analysis.groups.value_groups[node.output]
            free, total = free + int((ids != 0).sum()), total + len(ids)
    return free, total


def _segment_keys(graph, width: int) -> set[str]:
    """IR keys of the parameters in the segments holding a layer ``width`` channels wide."""
    keys = set()
    for nodes in segment_nodes(graph):
        if any(OPS[n.op].hidden and graph.shapes[n.output][1] == width for n in nodes):
            keys |= {k for n in nodes for k in n.params.values()}
    return keys


# --------------------------------------------------------------------------------------------------
# nn.TransformerEncoder


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_encoder_onnx_ffn_units_are_rescaled_and_the_rest_is_unchanged(exporter, tmp_path):
    source = export_onnx(encoder(), (1, TOKENS, D), tmp_path / "enc.onnx", exporter)
    out, report = _rescale(source, tmp_path)
    feeds = {onnx.load(str(source)).graph.input[0].name: np.random.default_rng(0).standard_normal(
        (1, TOKENS, D)).astype(np.float32)}
    _assert_same_function_onnx(source, out, feeds)
    _assert_segments_not_worse(report)
    assert report["partial"]["hidden_units_rescaled"] == LAYERS * FF
    # every FFN hidden unit is free, and nothing else moved: only the FFN segments' tensors changed
    model = load_onnx(source, LoadOptions(partial=True))
    assert _free_hidden(model.graph, FF) == (LAYERS * FF, LAYERS * FF)
    changed = _changed_onnx(source, out)
    ffn = {model.parameter_source(k)[1] for k in _segment_keys(model.graph, FF)}
    assert changed and changed <= ffn, (changed, ffn)
    assert not any("norm" in k or "attn" in k for k in changed)


def test_encoder_without_partial_is_refused_and_says_what_partial_would_do(tmp_path):
    source = export_onnx(encoder(), (1, TOKENS, D), tmp_path / "enc.onnx")
    for command in (("inspect", source), ("rescale", source, tmp_path / "out.onnx")):
        result = invoke(*command, "--json")
        assert result.exit_code == 3
        error = json.loads(result.stdout)["error"]
        assert error["offenders"] and any(o["op"] == "LayerNormalization" for o in error["offenders"])
        assert f"With --partial" in error["message"] and f"{LAYERS * FF} of the model's" in error["message"]
    assert not (tmp_path / "out.onnx").exists()


def test_encoder_through_torch_export(tmp_path):
    model = encoder(norm_first=True)
    x = torch.randn(1, TOKENS, D)
    path = tmp_path / "enc.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    out, report = _rescale(path, tmp_path)
    _assert_segments_not_worse(report)
    before, after = torch.export.load(str(path)), torch.export.load(str(out))
    feeds = torch.randn(3, TOKENS, D)[:1]
    torch.testing.assert_close(after.module()(feeds), before.module()(feeds), rtol=1e-4, atol=1e-5)
    changed = {k for k, v in before.state_dict.items() if not torch.equal(v, after.state_dict[k])}
    assert changed and all("linear1" in k or "linear2" in k for k in changed), changed
    graph = load_torch(path, LoadOptions(partial=True)).graph
    assert _free_hidden(graph, FF) == (LAYERS * FF, LAYERS * FF)


def test_a_segment_g_is_that_of_the_segment_as_a_network(tmp_path):
    """The FFN segment of an encoder layer, whose inputs come from LayerNorm and whose output goes into
    the next LayerNorm, has the g of Linear-ReLU-Linear on T all-ones tokens, in closed form:
    g(W1[o, i]) = T Σ_k W2[k, o]², g(b1[o]) = T Σ_k W2[k, o]², g(W2[k, o]) = T (Σ_i W1[o, i]² + b1[o]²),
    g(b2[k]) = T (MATH §3 on the standalone segment)."""
    model = encoder(d=8, ff=12, layers=1)
    path = tmp_path / "enc.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8),)), str(path))
    analysis = analyze(load_torch(path, LoadOptions(partial=True)).graph, device="cpu")
    g = {role.key: torch.exp(lg) for role, lg in zip(analysis.groups.roles, analysis.stats.log_g)}
    layer = model.layers[0]
    w1, b1 = layer.linear1.weight.double(), layer.linear1.bias.double()
    w2 = layer.linear2.weight.double()
    t = 3
    col = (w2 ** 2).sum(0)  # Σ_k W2[k, o]²
    expect = {
        "layers.0.linear1.weight": t * col[:, None].expand_as(w1),
        "layers.0.linear1.bias": t * col,
        "layers.0.linear2.weight": t * ((w1 ** 2).sum(1) + b1 ** 2)[None, :].expand_as(w2),
        "layers.0.linear2.bias": torch.full((8,), float(t), dtype=torch.float64),
    }
    for key, want in expect.items():
        torch.testing.assert_close(g[key], want, rtol=1e-9, atol=0)
    # and the segments are what the model's structure says: the FFN is one segment with both its layers
    ffn = [s for s in segment_nodes(analysis.source_graph) if any("linear1" in n.name for n in s)]
    assert len(ffn) == 1 and any("linear2" in n.name for n in ffn[0])


# --------------------------------------------------------------------------------------------------
# Other models with non-homogeneous parts


def test_decoder_block_with_rmsnorm_and_flattened_ffn(tmp_path):
    source = export_onnx(DecoderBlock().eval(), torch.randint(0, 256, (1, TOKENS)), tmp_path / "dec.onnx")
    out, report = _rescale(source, tmp_path)
    feeds = {onnx.load(str(source)).graph.input[0].name: np.random.default_rng(1).integers(0, 256, (1, TOKENS))}
    _assert_same_function_onnx(source, out, feeds)
    _assert_segments_not_worse(report)
    graph = load_onnx(source, LoadOptions(partial=True)).graph
    ups = [n for n in graph.nodes if n.op == "token_linear" and graph.shapes[n.output][1] == FF]
    assert len(ups) == 1 and graph.shapes[ups[0].output] == (1, FF, TOKENS)  # (B·T, F) held as T positions
    analysis = analyze(graph, device="cpu")
    assert (analysis.groups.value_groups[ups[0].output] != 0).all()
    # RMSNorm's γ is a product of its own, homogeneous: with the qkv projection after it, it is a segment
    # whose units are free too; the embedding, the attention output and the head stay as they are
    changed = _changed_onnx(source, out)
    assert {"up.weight", "down.weight", "norm1.weight", "qkv.weight"} <= changed
    assert not changed & {"emb.weight", "proj.weight", "head.weight", "head.bias"}


def _token_model_through_pt2(model: nn.Module, tmp_path: Path) -> tuple[dict, Any, Any]:
    """Export a model of token ids to .pt2, rescale it with --partial, check that every FFN unit is free
    and that the rescaled program computes what the original computes (torch, run here)."""
    ids = torch.randint(0, 256, (1, TOKENS))
    path = tmp_path / "in.pt2"
    torch.export.save(torch.export.export(model, (ids,)), str(path))
    out, report = _rescale(path, tmp_path)
    assert report["partial"]["hidden_units_rescaled"] == FF
    before, after = torch.export.load(str(path)), torch.export.load(str(out))
    torch.testing.assert_close(after.module()(ids), before.module()(ids), rtol=1e-4, atol=1e-5)
    return report, before, after


def test_decoder_block_through_torch_export(tmp_path):
    _, before, after = _token_model_through_pt2(DecoderBlock().eval(), tmp_path)
    changed = {k for k, v in before.state_dict.items() if not torch.equal(v, after.state_dict[k])}
    assert {"up.weight", "down.weight", "norm1.weight", "qkv.weight"} <= changed
    assert not changed & {"emb.weight", "proj.weight", "head.weight", "head.bias"}


def test_se_resnet_keeps_its_sigmoid_gates(tmp_path):
    source = export_onnx(SEResNet().eval(), (1, 3, 8, 8), tmp_path / "se.onnx")
    out, report = _rescale(source, tmp_path)
    feeds = {onnx.load(str(source)).graph.input[0].name: np.random.default_rng(2).standard_normal(
        (1, 3, 8, 8)).astype(np.float32)}
    _assert_same_function_onnx(source, out, feeds)
    _assert_segments_not_worse(report)
    assert report["partial"]["hidden_units_rescaled"] > 0
    graph = load_onnx(source, LoadOptions(partial=True)).graph
    # the SE bottleneck (fc1 -> ReLU -> fc2 -> Sigmoid) is a segment of its own whose hidden units are free
    assert _free_hidden(graph, 4) == (2 * 4, 2 * 4)


def test_gelu_head_cnn(tmp_path):
    source = export_onnx(gelu_head_cnn(), (1, 3, 8, 8), tmp_path / "gelu.onnx")
    out, report = _rescale(source, tmp_path)
    feeds = {onnx.load(str(source)).graph.input[0].name: np.random.default_rng(3).standard_normal(
        (1, 3, 8, 8)).astype(np.float32)}
    _assert_same_function_onnx(source, out, feeds)
    _assert_segments_not_worse(report)
    # the conv trunk and the first linear layer are free (their outputs feed ReLUs, then the GELU pins the 24)
    assert report["partial"]["hidden_units_rescaled"] == 8 + 12
    assert len(report["segments"]) == 2


def test_mobilenet_like_relu6_has_nothing_to_rescale(tmp_path):
    """ReLU6 is opaque: every conv is a segment of its own, pinned on both sides. Decision: with --partial
    this is exit 0, "nothing to rescale", and the file is written unchanged in value; without it, exit 3."""
    source = export_onnx(mobilenet_like(), (1, 3, 9, 9), tmp_path / "mb.onnx")
    out, report = _rescale(source, tmp_path)
    assert report["partial"]["hidden_units_rescaled"] == 0
    assert report["verdict"].startswith("Nothing to rescale")
    assert not _changed_onnx(source, out)
    assert invoke("inspect", source).exit_code == 3


def test_cut_makes_opaque_outputs_inputs_and_their_inputs_outputs(tmp_path):
    source = export_onnx(gelu_head_cnn(), (1, 3, 8, 8), tmp_path / "gelu.onnx")
    graph = load_onnx(source, LoadOptions(partial=True)).graph
    segments = cut(graph)
    opaque = [n for n in graph.nodes if n.op == "opaque"]
    assert opaque and not any(n.op == "opaque" for n in segments.nodes)
    for node in opaque:
        assert node.output in segments.inputs
        assert all(v in segments.outputs for v in node.inputs if v in graph.producer)


def test_python_api_rescales_an_encoder_in_place_with_partial():
    import pathcond_cli as pc
    from pathcond_cli.errors import UnsupportedModelError

    model = encoder(norm_first=True)
    x = torch.randn(2, TOKENS, D)
    want = model(x)
    norms = {k: v.clone() for k, v in model.state_dict().items() if "norm" in k or "attn" in k}
    with pytest.raises(UnsupportedModelError, match="With --partial"):
        pc.inspect_module(model, (1, TOKENS, D), device="cpu")
    report = pc.rescale_module_(model, (1, TOKENS, D), device="cpu", partial=True)
    assert report["partial"]["hidden_units_rescaled"] == LAYERS * FF
    assert report["changed"] and all("linear" in k for k in report["changed"])
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in norms.items())


def _assert_encoder_ffn_rescaled(before: dict, after: dict) -> None:
    """Only FFN tensors of the encoder's state_dict changed, and it still computes what it computed."""
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("linear1" in k or "linear2" in k for k in changed)
    model = encoder()
    model.load_state_dict(after)
    x = torch.randn(1, TOKENS, D)
    torch.testing.assert_close(model(x), encoder()(x), rtol=1e-4, atol=1e-5)


def test_state_dict_with_arch_and_inspect_report_segments(tmp_path):
    path = tmp_path / "enc.pt"
    torch.save(encoder().state_dict(), path)
    common = ("--arch", "tests.test_partial:encoder", "--input-shape", f"1x{TOKENS}x{D}", "--partial", "--json")
    inspected = invoke("inspect", path, *common)
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)
    assert report["partial"]["hidden_units_rescaled"] == LAYERS * FF
    ffn = [s for s in report["segments"] if s["hidden_units_free"]]
    assert len(ffn) == LAYERS and all(s["inputs_from"] and s["outputs_to"] for s in ffn)
    out = tmp_path / "out.pt"
    result = invoke("rescale", path, out, *common)
    assert result.exit_code == 0, result.output
    before, after = torch.load(path), torch.load(out)
    _assert_encoder_ffn_rescaled(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("container", ["torchscript", "dynamo", "pt2"])
def test_six_layer_encoder_d256(container, tmp_path):
    """The issue's case: a 6-layer nn.TransformerEncoder, d = 256, ReLU FFN of 1024 (layers made unequal)."""
    model = encoder(d=256, ff=1024, layers=6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(1, 32, 256)
    if container == "pt2":
        source = tmp_path / "enc.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(source))
    else:
        source = export_onnx(model, x, tmp_path / "enc.onnx", container)
    _, report = _rescale(source, tmp_path)
    assert report["partial"]["hidden_units_rescaled"] == 6 * 1024
    _assert_segments_not_worse(report)


class MaskedEncoder(nn.Module):
    """An encoder fed a boolean padding mask as a second input: Cast, Where and mask arithmetic are opaque."""

    def __init__(self):
        super().__init__()
        self.enc = encoder()

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


@pytest.mark.parametrize("container", ["onnx", "pt2"])
def test_encoder_with_a_padding_mask_input(container, tmp_path):
    model = MaskedEncoder().eval()
    x, pad = torch.randn(1, TOKENS, D), torch.zeros(1, TOKENS, dtype=torch.bool)
    if container == "pt2":
        source = tmp_path / "enc.pt2"
        torch.export.save(torch.export.export(model, (x, pad)), str(source))
    else:
        source = tmp_path / "enc.onnx"
        torch.onnx.export(model, (x, pad), str(source), dynamo=False)
    _, report = _rescale(source, tmp_path)
    assert report["partial"]["hidden_units_rescaled"] == LAYERS * FF
    _assert_segments_not_worse(report)


class TiedHead(nn.Module):
    """A language-model head tied to the embedding (GPT-style), with a ReLU FFN between them."""

    def __init__(self, vocab: int = 256, d: int = D):
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(vocab, d)
        self.up, self.down = nn.Linear(d, FF), nn.Linear(FF, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids.remainder(256))
        return self.head(self.down(torch.relu(self.up(x))))


def test_a_weight_an_opaque_op_reads_too_is_left_as_it_is(tmp_path):
    """torch: the head shares its tensor with the embedding (opaque); rescaling it would change the
    embedding, so it is frozen, while the FFN before it is rescaled."""
    report, before, after = _token_model_through_pt2(TiedHead().eval(), tmp_path)
    assert any("reads the same tensor" in p["reason"] for p in report["pinned"])
    assert torch.equal(before.state_dict["emb.weight"], after.state_dict["emb.weight"])


def test_partial_on_a_relu_network_changes_nothing(tmp_path):
    """No opaque op: --partial is the whole-network analysis, value for value."""
    torch.manual_seed(6)
    source = export_onnx(nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3), nn.ReLU(), nn.Linear(3, 2)),
                         (1, 6), tmp_path / "mlp.onnx")
    plain = json.loads(invoke("inspect", source, "--json").stdout)
    partial = json.loads(invoke("inspect", source, "--json", "--partial").stdout)
    assert partial["conditioning"] == plain["conditioning"] and partial["layers"] == plain["layers"]
    assert "segments" not in plain and "partial" not in plain
    # --partial always reports its keys: no opaque op, and the whole network as its one segment
    assert partial["partial"] == {"opaque_ops": 0, "hidden_units": 24 + 3 + 2, "hidden_units_rescaled": 27,
                                  "share_rescaled": 27 / 29}
    [segment] = partial["segments"]
    assert segment["nodes"] == 5 and segment["parameters"] == plain["model"]["parameters"]
    assert segment["inputs_from"] == segment["outputs_to"] == []
    for when in ("before", "after"):
        assert math.isclose(segment[f"log10_score_{when}"], plain["conditioning"][f"log10_score_{when}"], rel_tol=1e-9)


def test_partial_keys_through_torch_export_without_opaque_ops(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 2)).eval()
    source = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 5),)), source)
    out, report = _rescale(source, tmp_path)
    assert report["partial"]["opaque_ops"] == 0 and report["partial"]["hidden_units_rescaled"] == 12
    assert len(report["segments"]) == 1 and report["segments"][0]["hidden_units_free"] == 12


def test_safetensors_state_dict_with_arch_and_partial(tmp_path):
    """The issue's third container: a `.safetensors` state_dict of the encoder, rebuilt with --arch."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in encoder().state_dict().items()}, str(path), metadata={"who": "test"})
    out = tmp_path / "out.safetensors"
    result = invoke("rescale", path, out, "--arch", "tests.test_partial:encoder", "--input-shape",
                    f"1x{TOKENS}x{D}", "--partial", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["input"]["format"] == "safetensors"
    assert report["partial"]["hidden_units_rescaled"] == LAYERS * FF
    before, after = load_file(str(path)), load_file(str(out))
    _assert_encoder_ffn_rescaled(before, after)


# --------------------------------------------------------------------------------------------------
# Random ops: --partial cannot keep them opaque


def _dropout_block(path: Path, ratio: float, training: bool = True) -> Path:
    """x (1, 8) -> Gemm -> LayerNorm -> Gemm -> Relu -> Dropout(ratio, training_mode) -> Gemm -> y."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(16, 8), "b1": f32(16), "g": np.ones(16, np.float32), "beta": np.zeros(16, np.float32),
             "w2": f32(32, 16), "b2": f32(32), "w3": f32(3, 32), "b3": f32(3),
             "ratio": np.array(ratio, np.float32), "train": np.array(training)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], "fc1", transB=1),
             helper.make_node("LayerNormalization", ["h1", "g", "beta"], ["n"], "ln", axis=-1),
             helper.make_node("Gemm", ["n", "w2", "b2"], ["h2"], "fc2", transB=1),
             helper.make_node("Relu", ["h2"], ["r"], "relu"),
             helper.make_node("Dropout", ["r", "ratio", "train"], ["d"], "drop"),
             helper.make_node("Gemm", ["d", "w3", "b3"], ["y"], "fc3", transB=1)]
    graph = helper.make_graph(nodes, "drop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_dropout_in_training_mode_is_refused_with_and_without_partial(tmp_path):
    """onnxruntime draws a new mask on every run: the model has no function to keep, so --partial refuses
    it too (it used to say "nothing to rescale", then fail verification), and the refusal promises
    nothing of --partial."""
    source = _dropout_block(tmp_path / "drop.onnx", 0.5)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)}
    runs = [_onnx_outputs(source, feeds)[0] for _ in range(4)]
    assert any(not np.array_equal(runs[0], r) for r in runs[1:])  # the reference: it is random
    for extra in ([], ["--partial"]):
        for command in ("inspect", "rescale"):
            args = [source] if command == "inspect" else [source, tmp_path / "out.onnx"]
            result = invoke(command, *args, *extra)
            assert result.exit_code == 3, (command, extra, result.output)
            said = " ".join(result.stderr.split())
            assert "drop (Dropout): it runs in training mode" in said
            assert "--partial cannot keep drop (Dropout) unchanged as opaque" in said
            assert "With --partial" not in said and "ln (LayerNormalization)" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drop.onnx"]


def test_dropout_in_training_mode_that_drops_nothing_is_an_identity(tmp_path):
    source = _dropout_block(tmp_path / "drop.onnx", 0.0)
    out, report = _rescale(source, tmp_path)
    assert report["partial"]["opaque_ops"] == 1 and report["partial"]["hidden_units_rescaled"] == 32
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)[:1]}
    _assert_same_function_onnx(source, out, feeds)
    assert _changed_onnx(source, out) >= {"w2", "w3"}


class RNNHead(nn.Module):
    """A GRU / LSTM whose final state is unused, then a ReLU MLP on its last output."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(2)
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(6, 12, batch_first=True)
        self.f1, self.f2 = nn.Linear(12, 24), nn.Linear(24, 3)

    def forward(self, x):
        o, _ = self.rnn(x)
        return self.f2(torch.relu(self.f1(o[:, -1])))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_opaque_op_count_is_one_count(kind, tmp_path):
    """The warning and partial.opaque_ops count the same ops: those the outputs depend on (the unused
    final state's getitem is in no opaque region, and was counted by the warning only)."""
    import re
    import warnings as py_warnings

    source = tmp_path / f"{kind}.pt2"
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(RNNHead(kind).eval(), (torch.randn(1, 5, 6),)), source)
    result = invoke("inspect", source, "--partial", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    [warning] = [w for w in report["warnings"] if "kept unchanged as opaque" in w]
    counted = int(re.search(r"(\d+) operation\(s\) kept unchanged", warning).group(1))
    model = load_torch(source, LoadOptions(partial=True))
    regions = {name for n in model.graph.nodes if n.op == "opaque" for name in n.attrs["ops"]}
    assert counted == report["partial"]["opaque_ops"] == len(regions)
    assert not any(name.endswith("getitem_1") for name in regions)  # the unused final state
    assert report["partial"]["hidden_units_rescaled"] == 24


def test_segments_table_shows_rounding_noise_as_zero():
    """A segment whose g entries are all equal has log10 score 0, computed as ±1e-16: shown as 0."""
    from rich.console import Console

    from pathcond_cli.report import _segments_table

    rows = [{"index": i, "first_node": f"a{i}", "last_node": f"b{i}", "parameters": 10, "hidden_units_free": 1,
             "hidden_units": 2, "log10_score_before": before, "log10_score_after": after}
            for i, (before, after) in enumerate([(-1.93e-16, -1.93e-16), (0.25, 2.2e-17), (None, None)])]
    console = Console(record=True, width=200)
    console.print(_segments_table(rows))
    text = console.export_text()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    assert "0 → 0" in lines["0"] and "0.25 → 0" in lines["1"] and "- → -" in lines["2"]
    assert "e-1" not in text
