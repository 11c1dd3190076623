"""Rescaling groups (MATH §4, §7): which channels must share one factor, and which are pinned.

Channels are tracked per value: every value gets one raw id per channel, by the channel behaviour of
the op's row in ``ir.OPS`` (never by its name): a layer (``Channels.NEW``: linear, conv, BatchNorm,
per-channel affine) gives its output channels fresh ids; elementwise homogeneous ops (``SAME``) keep
the ids of their input; a residual add (``UNION``) unites the ids of all its inputs channel by channel;
``CONCAT`` and ``FLATTEN`` rearrange them by index. A union-find over raw ids yields the groups. A group is pinned (factor
1) when it touches a graph input or output, is pinned by its op's row (it feeds a BatchNorm), or holds a parameter shared in
incompatible roles; each pin names the node and the rule.

The result indexes groups as ``0`` = pinned and ``1..n_free`` = free, so that a parameter's factor is
``exp(u_ext[out] - u_ext[in])`` with ``u_ext = [0, u_1, ..., u_H]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np
import torch

from .ir import OPS, Channels, Graph, Node


@dataclass
class Role:
    """One objective parameter tensor and where its entries sit in the groups.

    ``out_idx`` has one entry per output channel (axis 0 of the parameter). ``in_idx`` is ``None`` for
    biases and BatchNorm parameters, shape ``(I,)`` for a dense weight (the same input channels for every
    output), or ``(O, I_per_group)`` for a grouped convolution or a per-channel ``diag`` weight.
    For BatchNorm the roles stand for a = γ/√(var+ε) and b = β − aμ (MATH §7).
    """

    node: Node
    role: str
    key: str
    shape: tuple[int, ...]
    out_idx: torch.Tensor
    in_idx: torch.Tensor | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class PinnedGroup:
    node: str
    reason: str
    value: str
    channels: int  # how many channels of that value the pin covers


@dataclass
class Groups:
    n_free: int
    n_pinned: int  # distinct pinned groups (a pin may cover several channels of one group)
    value_groups: dict[str, np.ndarray]  # value -> per-channel group index (0 = pinned)
    roles: list[Role]
    pins: list[PinnedGroup] = field(default_factory=list)
    layer_outputs: dict[str, int] = field(default_factory=dict)  # layer node name -> hidden output channels
    levels: np.ndarray | None = None  # (n_free+1,) index of the first value holding each group

    @property
    def n_params(self) -> int:
        return sum(r.numel for r in self.roles)

    @property
    def hidden_units(self) -> int:
        return sum(self.layer_outputs.values())


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


class _Builder:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.uf = _UnionFind()
        self.raw: dict[str, np.ndarray] = {}
        self.pin_raw: list[tuple[np.ndarray, str, str, str]] = []  # raw ids, node, reason, value

    def pin(self, ids: np.ndarray, node: str, reason: str, value: str) -> None:
        self.pin_raw.append((ids, node, reason, value))

    def pin_role(self, node: Node, role: str, kind: str, reason: str) -> None:
        """Pin the output channels of one objective role and, for an edge, the input channels it reads."""
        out, inp = self.role_raw(node, role, kind)
        self.pin(out, node.name, reason, node.output)
        if inp is not None:
            self.pin(inp.reshape(-1), node.name, reason, node.inputs[0])

    def channels(self, value: str) -> int:
        return self.graph.shapes[value][1]

    def visit(self, node: Node) -> None:
        """Give the node's output its raw channel ids, by the op's channel behaviour (see ir.Channels)."""
        spec = OPS[node.op]
        first = node.inputs[0]
        if spec.channels is Channels.NEW:
            self.raw[node.output] = self.uf.fresh(self.channels(node.output))
        elif spec.channels is Channels.SAME:
            self.raw[node.output] = self.raw[first]
        elif spec.channels is Channels.UNION:
            ids = self.raw[first]
            for other in node.inputs[1:]:
                if len(self.raw[other]) != len(ids):
                    raise ValueError(f"{node.op} {node.name!r}: inputs have different channel counts")
                self.uf.union(ids, self.raw[other])
            self.raw[node.output] = ids
        elif spec.channels is Channels.CONCAT:
            self.raw[node.output] = np.concatenate([self.raw[v] for v in node.inputs])
        elif spec.channels is Channels.FLATTEN:
            spatial = int(np.prod(self.graph.shapes[first][2:], dtype=np.int64))
            self.raw[node.output] = np.repeat(self.raw[first], spatial)
        else:  # pragma: no cover - Channels is closed
            raise ValueError(f"no channel rule for {spec.channels}")
        if spec.pins_input is not None:
            self.pin(self.raw[first], node.name, spec.pins_input, first)
        if spec.pins_output_without is not None:
            roles, reason = spec.pins_output_without
            if any(node.param(role) is None for role in roles):
                self.pin(self.raw[node.output], node.name, reason, node.output)

    def role_raw(self, node: Node, role: str, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw out ids (per output channel) and raw in ids of one objective role."""
        out = self.raw[node.output]
        if kind in ("bias", "bn_scale", "bn_shift"):
            return out, None
        src = self.raw[node.inputs[0]]
        if kind == "diag":
            return out, src.reshape(-1, 1)
        weight = self.graph.params[node.params[role]]
        groups = int(node.attrs.get("groups", 1))  # only convolutions carry it
        if groups == 1:
            return out, src
        o, i_per = weight.shape[0], weight.shape[1]
        base = (np.arange(o) // (o // groups)) * i_per
        return out, src[base[:, None] + np.arange(i_per)[None, :]]


def _tie_parameters(builder: _Builder, uses: dict[str, list[tuple[Node, str, str]]]) -> None:
    """A parameter used in several places: same op and role -> unite channels; else pin them all."""
    for key, places in uses.items():
        objective = [(node, role, kind) for node, role, kind in places if kind is not None]
        if len(places) < 2 or not objective:
            continue
        raws = [builder.role_raw(node, role, kind) for node, role, kind in objective]
        if len({(node.op, role) for node, role, _ in places}) == 1:
            out0, in0 = raws[0]
            for out, inp in raws[1:]:
                builder.uf.union(out0, out)
                if in0 is not None:
                    builder.uf.union(in0.reshape(-1), inp.reshape(-1))
            continue
        reason = f"parameter {key!r} is shared in different roles ({', '.join(sorted({n.name for n, _, _ in places}))})"
        for node, role, kind in objective:
            builder.pin_role(node, role, kind, reason)


def _pin_frozen(builder: _Builder, uses: dict[str, list[tuple[Node, str, str | None]]]) -> None:
    """A parameter the container cannot store a new value for keeps its value: pin its channels."""
    for key, why in builder.graph.frozen.items():
        for node, role, kind in uses.get(key, []):
            if kind is None:
                continue  # not an objective role: its value never changes anyway
            builder.pin_role(node, role, kind, f"parameter {key!r} cannot be rewritten: {why}")


def build_groups(graph: Graph) -> Groups:
    """Derive the rescaling groups of ``graph`` from its dataflow."""
    b = _Builder(graph)
    for name in graph.inputs:
        b.raw[name] = b.uf.fresh(b.channels(name))
        b.pin(b.raw[name], name, "graph input", name)
    uses: dict[str, list[tuple[Node, str, str | None]]] = {}
    for node in graph.nodes:
        b.visit(node)
        objective = OPS[node.op].objective
        for role, key in node.params.items():
            uses.setdefault(key, []).append((node, role, objective.get(role)))
    for value in graph.outputs:
        producer = graph.producer.get(value)
        b.pin(b.raw[value], producer.name if producer else value, "graph output", value)
    _tie_parameters(b, uses)
    _pin_frozen(b, uses)
    return _resolve(graph, b)


def _resolve(graph: Graph, b: _Builder) -> Groups:
    roots = b.uf.roots()
    pinned_roots: set[int] = set()
    pins: list[PinnedGroup] = []
    for ids, node, reason, value in b.pin_raw:
        pinned_roots.update(roots[ids].tolist())
        pins.append(PinnedGroup(node=node, reason=reason, value=value, channels=len(ids)))
    free_roots = sorted(set(roots.tolist()) - pinned_roots)
    index = np.zeros(len(roots), dtype=np.int64)
    index[free_roots] = np.arange(1, len(free_roots) + 1)
    group_of = index[roots]  # raw id -> group index (0 pinned)

    roles: list[Role] = []
    seen: set[str] = set()
    for node in graph.nodes:
        spec = OPS[node.op]
        for role, kind in spec.objective.items():
            key = node.param(role)
            # a tied tensor is one parameter; derived roles (BatchNorm's) stand for values of one node
            if key is None or (key in seen and not spec.derived_roles):
                continue
            seen.add(key)
            out, inp = b.role_raw(node, role, kind)
            roles.append(
                Role(
                    node=node,
                    role=role,
                    key=key,
                    shape=tuple(graph.params[key].shape),
                    out_idx=torch.from_numpy(group_of[out]),
                    in_idx=None if inp is None else torch.from_numpy(group_of[inp]),
                )
            )
    levels = np.full(len(free_roots) + 1, -1, dtype=np.int64)
    for order, ids in enumerate(b.raw.values()):
        gids = group_of[ids]
        levels[gids[levels[gids] < 0]] = order
    levels[0] = -1
    output_roots = {int(r) for ids, _, reason, _ in b.pin_raw if reason == "graph output" for r in roots[ids]}
    layer_outputs = {
        node.name: int(np.sum(~np.isin(roots[b.raw[node.output]], list(output_roots))))
        for node in graph.nodes
        if OPS[node.op].hidden
    }
    return Groups(
        n_free=len(free_roots),
        n_pinned=len(pinned_roots),
        value_groups={v: group_of[ids] for v, ids in b.raw.items()},
        roles=roles,
        pins=pins,
        layer_outputs=layer_outputs,
        levels=levels,
    )
