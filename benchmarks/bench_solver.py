"""Solver benchmark: sweeps, time and final optimality on deep chains (AlexNet- and VGG-16-shaped).

Prints one line per (network, method). Run: ``python benchmarks/bench_solver.py [--size 64] [--full]``.
The networks are built directly in pathcond's IR with Kaiming-normal weights and small biases, on a
reduced input resolution by default (``--size``); ``--full`` uses 224x224 (VGG-16: 138M parameters;
needs memory and minutes).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pathcond_cli.groups import build_groups
from pathcond_cli.ir import Graph, Node
from pathcond_cli.solver import build_blocks, solve
from pathcond_cli.stats import path_statistics

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
ALEXNET = [("c", 64, 11, 4, 2), "M", ("c", 192, 5, 1, 2), "M", ("c", 384, 3, 1, 1), ("c", 256, 3, 1, 1),
           ("c", 256, 3, 1, 1), "M"]


class ChainBuilder:
    def __init__(self, in_ch: int, size: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.nodes: list[Node] = []
        self.params: dict[str, torch.Tensor] = {}
        self.value, self.ch, self.inputs = "x", in_ch, {"x": (1, in_ch, size, size)}

    def _add(self, op: str, params: dict | None = None, **attrs) -> None:
        name = f"n{len(self.nodes)}"
        self.nodes.append(Node(name, op, (self.value,), name, params or {}, attrs))
        self.value = name

    def _param(self, name: str, shape: tuple[int, ...], std: float) -> str:
        self.params[name] = torch.randn(shape, generator=self.gen) * std
        return name

    def conv(self, out: int, k: int = 3, stride: int = 1, pad: int = 1) -> None:
        n = len(self.nodes)
        w = self._param(f"conv{n}.weight", (out, self.ch, k, k), math.sqrt(2.0 / (self.ch * k * k)))
        b = self._param(f"conv{n}.bias", (out,), 0.01)
        self._add("conv", {"weight": w, "bias": b}, stride=[stride] * 2, pads=[pad] * 4)
        self._add("relu")
        self.ch = out

    def maxpool(self, k: int = 2, s: int = 2) -> None:
        self._add("maxpool", kernel=[k, k], stride=[s, s])

    def linear(self, out: int, relu: bool = True) -> None:
        n = len(self.nodes)
        w = self._param(f"fc{n}.weight", (out, self.ch), math.sqrt(2.0 / self.ch))
        b = self._param(f"fc{n}.bias", (out,), 0.01)
        self._add("linear", {"weight": w, "bias": b})
        if relu:
            self._add("relu")
        self.ch = out

    def flatten(self, spatial: int) -> None:
        self._add("flatten")
        self.ch *= spatial

    def graph(self) -> Graph:
        return Graph(self.inputs, self.nodes, [self.value], self.params)


def vgg16(size: int, fc: int) -> Graph:
    b = ChainBuilder(3, size)
    for item in VGG16:
        b.maxpool() if item == "M" else b.conv(item)
    b.flatten((size // 32) ** 2)
    b.linear(fc)
    b.linear(fc)
    b.linear(1000, relu=False)
    return b.graph()


def alexnet(size: int, fc: int) -> Graph:
    b = ChainBuilder(3, size)
    for item in ALEXNET:
        b.maxpool(3, 2) if item == "M" else b.conv(item[1], item[2], item[3], item[4])
    shape = Graph(b.inputs, b.nodes, [b.value], b.params).shapes[b.value]
    b.flatten(shape[2] * shape[3])
    b.linear(fc)
    b.linear(fc)
    b.linear(1000, relu=False)
    return b.graph()


def run(name: str, graph: Graph, methods: list[str], max_sweeps: int) -> None:
    start = time.perf_counter()
    groups = build_groups(graph)
    stats = path_statistics(graph, groups)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    blocks = build_blocks(groups.roles, stats.log_g, groups.n_free, torch.from_numpy(groups.levels))
    took = time.perf_counter() - start
    print(f"{name}: {groups.n_params:,} parameters, {groups.n_free:,} free groups, {blocks.n_blocks:,} blocks "
          f"({groups.n_params / max(blocks.n_blocks, 1):.1f} parameters per block), "
          f"statistics {setup:.2f}s, blocks {took:.2f}s")
    for method in methods:
        start = time.perf_counter()
        sol = solve(blocks, method=method, tol=1e-3, max_sweeps=max_sweeps)
        took = time.perf_counter() - start
        print(f"  {method:>5}: {sol.sweeps:5d} sweeps {took:7.2f}s  converged={sol.converged!s:5}  "
              f"max|ln x|={sol.max_abs_log_x:.1e}  F={sol.objective_after:.6f}  "
              f"score {math.exp(sol.log_score_before):.4g} -> {math.exp(sol.log_score_after):.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input resolution (default 64)")
    parser.add_argument("--fc", type=int, default=1024, help="width of the hidden linear layers (default 1024)")
    parser.add_argument("--full", action="store_true", help="torchvision sizes: 224x224 input, 4096-wide fc")
    parser.add_argument("--max-sweeps", type=int, default=3000)
    parser.add_argument("--methods", default="auto,bcd", help="comma-separated solver methods (default auto,bcd)")
    args = parser.parse_args()
    size, fc = (224, 4096) if args.full else (args.size, args.fc)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name, build in (("AlexNet-shaped", alexnet), ("VGG-16-shaped", vgg16)):
        run(f"{name} {size}x{size}, fc {fc}", build(size, fc), args.methods.split(","), args.max_sweeps)


if __name__ == "__main__":
    main()
