"""Solver benchmark: sweeps, time and final optimality per method on deep chains and on DAGs.

Prints one line per (network, method): sweeps, seconds, whether the optimality rule was met, the largest
|ln x| of an exact coordinate step at the stop, F and the conditioning score before -> after. Run:
``python benchmarks/bench_solver.py [--size 64] [--fc 1024] [--full] [--shapes mlp,vgg16] [--methods auto,lbfgs]``.

The networks are built directly in pathcond's IR with Kaiming-normal weights and small biases, on a
reduced input resolution by default (``--size``); ``--full`` uses 224x224 and 4096-wide fc layers (VGG-16:
138M parameters; needs memory and minutes). Shapes:

* ``mlp``: 3072-256x16-10, the deep chain of issue 11 (Kaiming: the diagonal is nearly balanced along
  the depth, the hardest case for coordinate steps); ``mlp_torch_init``: the same with PyTorch's default
  nn.Linear init (the values shrink along the depth: L-BFGS's hard case);
* ``alexnet``, ``vgg16``: torchvision's layer shapes (no BatchNorm: a chain of conv-ReLU);
* ``resnet50``: torchvision's bottleneck layout [3, 4, 6, 3] with BatchNorm (groups start at each BN);
* ``resnet_nobn``: the same layout with biased convs and no BatchNorm (residual groups span many layers);
* ``densenet``: DenseNet-121's block layout [6, 12, 24, 16], growth 32, post-activation conv-ReLU layers
  without BatchNorm (concatenated groups span every later layer of their block).

``lbfgs`` is the former default (a few colour-class sweeps, then L-BFGS), ``auto`` the layer-ordered
Gauss–Seidel sweep with its coarse correction; ``bcd`` and ``sequential`` can be named too. One "sweep"
of ``lbfgs`` is one evaluation of F and its gradient (one pass over the blocks); one of ``auto`` is one
pass over the batches plus the coarse correction and the stopping test (about four passes): compare the
seconds. The methods run one after the other on each network (interleaved), on one thread.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from pathcond_cli.groups import build_groups
from pathcond_cli.ir import Graph, Node
from pathcond_cli.solver import build_blocks, solve
from pathcond_cli.stats import path_statistics

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
ALEXNET = [("c", 64, 11, 4, 2), "M", ("c", 192, 5, 1, 2), "M", ("c", 384, 3, 1, 1), ("c", 256, 3, 1, 1),
           ("c", 256, 3, 1, 1), "M"]


class Builder:
    """Builds an IR graph with Kaiming-normal float32 weights; tracks the channels of every value."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.nodes: list[Node] = []
        self.params: dict[str, torch.Tensor] = {}
        self.inputs = {"x": shape}
        self.channels = {"x": shape[1]}

    def op(self, op: str, *inputs: str, params: dict | None = None, channels: int | None = None, **attrs) -> str:
        name = f"n{len(self.nodes)}"
        self.nodes.append(Node(name, op, inputs, name, params or {}, attrs))
        self.channels[name] = self.channels[inputs[0]] if channels is None else channels
        return name

    def _param(self, name: str, shape: tuple[int, ...], std: float) -> str:
        self.params[name] = torch.randn(shape, generator=self.gen) * std
        return name

    def conv(self, x: str, out: int, k: int = 3, stride: int = 1, pad: int | None = None, bias: bool = True) -> str:
        n, cin = len(self.nodes), self.channels[x]
        params = {"weight": self._param(f"conv{n}.weight", (out, cin, k, k), math.sqrt(2.0 / (cin * k * k)))}
        if bias:
            params["bias"] = self._param(f"conv{n}.bias", (out,), 0.01)
        pad = k // 2 if pad is None else pad
        return self.op("conv", x, params=params, channels=out, stride=[stride] * 2, pads=[pad] * 4)

    def bn(self, x: str) -> str:
        n, c = len(self.nodes), self.channels[x]
        params = {"weight": self._param(f"bn{n}.weight", (c,), 0.1), "bias": self._param(f"bn{n}.bias", (c,), 0.1),
                  "running_mean": self._param(f"bn{n}.running_mean", (c,), 0.1)}
        self.params[f"bn{n}.weight"] += 1.0
        self.params[f"bn{n}.running_var"] = torch.ones(c)
        params["running_var"] = f"bn{n}.running_var"
        return self.op("batchnorm", x, params=params, eps=1e-5)

    def linear(self, x: str, out: int) -> str:
        n, cin = len(self.nodes), self.channels[x]
        params = {"weight": self._param(f"fc{n}.weight", (out, cin), math.sqrt(2.0 / cin)),
                  "bias": self._param(f"fc{n}.bias", (out,), 0.01)}
        return self.op("linear", x, params=params, channels=out)

    def pool(self, op: str, x: str, k: int, s: int, pad: int = 0) -> str:
        return self.op(op, x, kernel=[k, k], stride=[s, s], pads=[pad] * 4)

    def flatten(self, x: str) -> str:
        shape = self.graph(x).shapes[x]
        return self.op("flatten", x, channels=math.prod(shape[1:]))

    def graph(self, *outputs: str) -> Graph:
        return Graph(dict(self.inputs), list(self.nodes), list(outputs), dict(self.params))


def mlp(size: int, fc: int) -> Graph:
    b = Builder((1, 3072))
    x = "x"
    for _ in range(16):
        x = b.op("relu", b.linear(x, 256))
    return b.graph(b.linear(x, 10))


def mlp_torch_init(size: int, fc: int) -> Graph:
    """The same MLP with PyTorch's default nn.Linear init: weights and biases U(±1/√fan_in)."""
    graph, gen = mlp(size, fc), torch.Generator().manual_seed(1)
    values = {}
    for node in graph.nodes:
        if node.op == "linear":
            fan_in = graph.params[node.params["weight"]].shape[1]
            for role in ("weight", "bias"):
                shape = graph.params[node.params[role]].shape
                values[node.params[role]] = (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    return graph.with_params(values)


def _head(b: Builder, x: str, fc: int) -> Graph:
    x = b.flatten(x)
    x = b.op("relu", b.linear(x, fc))
    x = b.op("relu", b.linear(x, fc))
    return b.graph(b.linear(x, 1000))


def vgg16(size: int, fc: int) -> Graph:
    b, x = Builder((1, 3, size, size)), "x"
    for item in VGG16:
        x = b.pool("maxpool", x, 2, 2) if item == "M" else b.op("relu", b.conv(x, item))
    return _head(b, x, fc)


def alexnet(size: int, fc: int) -> Graph:
    b, x = Builder((1, 3, size, size)), "x"
    for item in ALEXNET:
        x = b.pool("maxpool", x, 3, 2) if item == "M" else b.op("relu", b.conv(x, item[1], item[2], item[3], item[4]))
    return _head(b, x, fc)


def _resnet(size: int, with_bn: bool) -> Graph:
    b = Builder((1, 3, size, size))

    def unit(x: str, out: int, k: int, stride: int = 1, relu: bool = True) -> str:
        y = b.bn(b.conv(x, out, k, stride, bias=False)) if with_bn else b.conv(x, out, k, stride)
        return b.op("relu", y) if relu else y

    x = b.pool("maxpool", unit("x", 64, 7, 2), 3, 2, 1)
    for stage, blocks in enumerate([3, 4, 6, 3]):
        width = 64 * 2**stage
        for j in range(blocks):
            stride = 2 if stage > 0 and j == 0 else 1
            short = x if j > 0 else unit(x, width * 4, 1, stride, relu=False)
            y = unit(unit(unit(x, width, 1), width, 3, stride), width * 4, 1, relu=False)
            x = b.op("relu", b.op("add", y, short))
    return b.graph(b.linear(b.op("global_avgpool", x), 1000))


def resnet50(size: int, fc: int) -> Graph:
    return _resnet(size, with_bn=True)


def resnet_nobn(size: int, fc: int) -> Graph:
    return _resnet(size, with_bn=False)


def densenet(size: int, fc: int, growth: int = 32) -> Graph:
    b = Builder((1, 3, size, size))
    x = b.pool("maxpool", b.op("relu", b.conv("x", 64, 7, 2)), 3, 2, 1)
    for i, layers in enumerate([6, 12, 24, 16]):
        for _ in range(layers):
            y = b.op("relu", b.conv(b.op("relu", b.conv(x, 4 * growth, 1)), growth, 3))
            x = b.op("concat", x, y, channels=b.channels[x] + growth)
        if i < 3:
            x = b.pool("avgpool", b.op("relu", b.conv(x, b.channels[x] // 2, 1)), 2, 2)
    return b.graph(b.linear(b.op("global_avgpool", x), 1000))


SHAPES: dict[str, Callable[[int, int], Graph]] = {
    "mlp": mlp, "mlp_torch_init": mlp_torch_init, "alexnet": alexnet, "vgg16": vgg16, "resnet50": resnet50, "resnet_nobn": resnet_nobn,
    "densenet": densenet,
}
TITLES = {"mlp": "MLP 3072-256x16-10", "mlp_torch_init": "MLP 3072-256x16-10, PyTorch's default init", "alexnet": "AlexNet-shaped", "vgg16": "VGG-16-shaped",
          "resnet50": "ResNet-50-shaped (BN)", "resnet_nobn": "ResNet-50-shaped, no BN",
          "densenet": "DenseNet-121-shaped, no BN"}


def run(name: str, graph: Graph, methods: list[str], max_sweeps: int, tol: float) -> None:
    start = time.perf_counter()
    groups = build_groups(graph)
    stats = path_statistics(graph, groups)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    blocks = build_blocks(groups.roles, stats.log_g, groups.n_free, torch.from_numpy(groups.levels))
    took = time.perf_counter() - start
    print(f"{name}: {groups.n_params:,} parameters, {groups.n_free:,} free groups, {blocks.n_blocks:,} blocks, "
          f"statistics {setup:.2f}s, blocks {took:.2f}s", flush=True)
    for method in methods:
        start = time.perf_counter()
        sol = solve(blocks, method=method, tol=tol, max_sweeps=max_sweeps)
        took = time.perf_counter() - start
        print(f"  {method:>10}: {sol.sweeps:5d} sweeps {took:7.2f}s  converged={sol.converged!s:5}  "
              f"max|ln x|={sol.max_abs_log_x:.1e}  F={sol.objective_after:.10g}  "
              f"score {math.exp(sol.log_score_before):.6g} -> {math.exp(sol.log_score_after):.8g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input resolution (default 64)")
    parser.add_argument("--fc", type=int, default=1024, help="width of the hidden linear layers (default 1024)")
    parser.add_argument("--full", action="store_true", help="torchvision sizes: 224x224 input, 4096-wide fc")
    parser.add_argument("--max-sweeps", type=int, default=3000)
    parser.add_argument("--tol", type=float, default=1e-3, help="optimality tolerance (default 1e-3, the CLI's)")
    parser.add_argument("--methods", default="lbfgs,auto", help="comma-separated solver methods (default lbfgs,auto)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {','.join(SHAPES)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size, fc = (224, 4096) if args.full else (args.size, args.fc)
    for shape in args.shapes.split(","):
        graph = SHAPES[shape](size, fc)
        title = TITLES[shape] if shape.startswith("mlp") else f"{TITLES[shape]} {size}x{size}"
        run(title, graph, args.methods.split(","), args.max_sweeps, args.tol)


if __name__ == "__main__":
    main()
