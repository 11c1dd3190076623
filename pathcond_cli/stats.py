"""Path statistics (MATH §3): diag(G), the number of paths and path norms, without overflow.

Everything comes from one *path forward* with exponent q on an all-ones input of batch 1: every
parameter w becomes |w|^q, every fixed weight c becomes |c|^q, ReLU-like activations become the
identity and max-pool a sum-pool. The sum of the outputs is then

* q = 0: the number of paths,
* q = 1: the path-1 norm ‖Φ‖₁,
* q = 2: Ψ = ‖Φ‖₂², whose gradient with respect to the squared parameters is g = diag(G).

Values are float64 tensors carried with a log-scale (``value = t · e^s``): each node divides its result
by its (detached) maximum and adds the log to ``s``, and sums bring their terms to a common scale, so
neither deep nets nor tiny initialisations overflow or underflow. g is only defined up to one global
factor for the solver; it is returned as natural logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NumericalError
from .groups import Groups, Role
from .ir import Graph, Node, channel_view, conv_apply, window_count, window_sum

LOG10 = math.log(10.0)


@dataclass
class Scaled:
    """A non-negative tensor ``t`` standing for ``t · exp(s)``."""

    t: torch.Tensor
    s: float


def _log_max(x: Scaled) -> float:
    m = float(x.t.detach().max()) if x.t.numel() else 0.0
    return x.s + math.log(m) if m > 0 else -math.inf


def _normalize(x: Scaled) -> Scaled:
    m = float(x.t.detach().max()) if x.t.numel() else 0.0
    if m <= 0 or not math.isfinite(m):
        if not math.isfinite(m):
            raise NumericalError("path statistics overflowed despite log-scaling")
        return Scaled(x.t, 0.0)
    return Scaled(x.t / m, x.s + math.log(m))


def _combine(terms: list[Scaled]) -> Scaled:
    """Sum of scaled terms (broadcasting), brought to a common log-scale."""
    logs = [_log_max(t) for t in terms]
    top = max(logs)
    if top == -math.inf:
        return Scaled(sum(t.t for t in terms), 0.0)
    total = None
    for term, lm in zip(terms, logs):
        if lm == -math.inf:
            continue
        part = term.t * math.exp(term.s - top)
        total = part if total is None else total + part
    shape = torch.broadcast_shapes(*(t.t.shape for t in terms))
    return _normalize(Scaled(total.expand(shape), top))


def bn_affine(graph: Graph, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BatchNorm as y = a·x + b per channel (float64)."""
    f64 = lambda role: None if node.param(role) is None else graph.tensor(node, role).double()  # noqa: E731
    a = 1.0 / torch.sqrt(f64("running_var") + node.attrs["eps"])
    if f64("weight") is not None:
        a = a * f64("weight")
    b = -a * f64("running_mean")
    if f64("bias") is not None:
        b = b + f64("bias")
    return a, b


class PathForward:
    """The path forward of a graph with exponent ``q``; objective parameters become leaves."""

    def __init__(self, graph: Graph, groups: Groups, q: float, device: torch.device, grad: bool = False):
        self.graph, self.q, self.device, self.grad = graph, q, device, grad
        self.objective = {(r.node.name, r.role) for r in groups.roles}
        self.leaves: dict[str, torch.Tensor] = {}

    def _leaf_key(self, node: Node, role: str) -> str:
        return f"{node.name}::{role}" if node.op == "batchnorm" else node.params[role]

    def _power(self, value: torch.Tensor) -> torch.Tensor:
        return value.detach().to(self.device, torch.float64).abs().pow(self.q)

    def param(self, node: Node, role: str, value: torch.Tensor | None = None) -> torch.Tensor | None:
        """|θ|^q for one role of ``node``: a shared leaf when it is an objective parameter."""
        if node.param(role) is None and value is None:
            return None
        value = self.graph.tensor(node, role) if value is None else value
        key = self._leaf_key(node, role)
        if key in self.leaves:
            return self.leaves[key]
        powered = self._power(value)
        if (node.name, role) in self.objective:  # later uses of a tied tensor hit the cache above
            powered.requires_grad_(self.grad)
            self.leaves[key] = powered
        return powered

    def run(self) -> tuple[float, torch.Tensor]:
        """Returns (log of the sum of outputs, the detached-scale loss to differentiate)."""
        values: dict[str, Scaled] = {
            name: Scaled(torch.ones(shape, dtype=torch.float64, device=self.device), 0.0)
            for name, shape in self.graph.inputs.items()
        }
        for node in self.graph.nodes:
            values[node.output] = self.node(node, [values[v] for v in node.inputs])
        outs = [values[v] for v in self.graph.outputs]
        top = max(o.s for o in outs)
        loss = sum(o.t.sum() * math.exp(o.s - top) for o in outs)
        total = float(loss.detach())
        log_total = top + math.log(total) if total > 0 else -math.inf
        return log_total, loss  # loss = e^{-top} · Σ outputs

    def node(self, node: Node, xs: list[Scaled]) -> Scaled:
        rule = _RULES[node.op]
        return rule(self, node, xs)

    # -- per-op rules ---------------------------------------------------------------------------
    def _with_bias(self, node: Node, main: Scaled, bias: torch.Tensor | None) -> Scaled:
        if bias is None:
            return _normalize(main)
        return _combine([main, Scaled(channel_view(bias, main.t), 0.0)])

    def linear(self, node, xs):
        x = xs[0]
        y = torch.nn.functional.linear(x.t, self.param(node, "weight"))
        return self._with_bias(node, Scaled(y, x.s), self.param(node, "bias"))

    def conv(self, node, xs):
        x = xs[0]
        y = conv_apply(node, x.t, self.param(node, "weight"), None)
        return self._with_bias(node, Scaled(y, x.s), self.param(node, "bias"))

    def batchnorm(self, node, xs):
        a, b = bn_affine(self.graph, node)
        x = xs[0]
        y = x.t * channel_view(self.param(node, "weight", a), x.t)
        return self._with_bias(node, Scaled(y, x.s), self.param(node, "bias", b))

    def affine(self, node, xs):
        x = xs[0]
        y = x.t * channel_view(self.param(node, "weight"), x.t)
        return self._with_bias(node, Scaled(y, x.s), self.param(node, "bias"))

    def bias(self, node, xs):
        return self._with_bias(node, xs[0], self.param(node, "bias"))

    def passthrough(self, node, xs):
        return xs[0]

    def scale(self, node, xs):
        c = abs(float(node.attrs["value"]))
        if self.q == 0:
            return xs[0]
        if c == 0:
            return Scaled(torch.zeros_like(xs[0].t), 0.0)
        return Scaled(xs[0].t, xs[0].s + self.q * math.log(c))

    def maxpool(self, node, xs):
        return _normalize(Scaled(window_sum(node, xs[0].t), xs[0].s))

    def avgpool(self, node, xs):
        x = xs[0]
        counts = window_count(node, x.t)
        return _normalize(Scaled(window_sum(node, x.t) / counts.pow(self.q), x.s))

    def global_avgpool(self, node, xs):
        x = xs[0]
        dims = tuple(range(2, x.t.dim()))
        n = math.prod(x.t.shape[2:])
        y = x.t.sum(dim=dims, keepdim=bool(node.attrs.get("keepdim", False)))
        return _normalize(Scaled(y, x.s - self.q * math.log(n)))

    def add(self, node, xs):
        return _combine(list(xs))

    def concat(self, node, xs):
        top = max(_log_max(x) for x in xs)
        if top == -math.inf:
            return Scaled(torch.cat([x.t for x in xs], dim=1), 0.0)
        parts = [x.t * math.exp(x.s - top) if _log_max(x) > -math.inf else x.t for x in xs]
        return _normalize(Scaled(torch.cat(parts, dim=1), top))

    def flatten(self, node, xs):
        return Scaled(xs[0].t.reshape(1, -1), xs[0].s)


_RULES = {
    "linear": PathForward.linear,
    "conv": PathForward.conv,
    "batchnorm": PathForward.batchnorm,
    "affine": PathForward.affine,
    "bias": PathForward.bias,
    "relu": PathForward.passthrough,
    "leaky_relu": PathForward.passthrough,
    "prelu": PathForward.passthrough,
    "identity": PathForward.passthrough,
    "scale": PathForward.scale,
    "maxpool": PathForward.maxpool,
    "avgpool": PathForward.avgpool,
    "global_avgpool": PathForward.global_avgpool,
    "add": PathForward.add,
    "concat": PathForward.concat,
    "flatten": PathForward.flatten,
}


@dataclass
class PathStats:
    """Path statistics of a graph. ``log_g[i]`` is ln g for ``groups.roles[i]`` up to one global constant
    (``log_g_offset`` makes it absolute: ln g_true = log_g + log_g_offset)."""

    log_g: list[torch.Tensor]
    log_g_offset: float
    log10_paths: float
    log10_path1_norm: float
    log10_path2_norm: float


def path_log_sum(graph: Graph, groups: Groups, q: float, device: torch.device | str = "cpu") -> float:
    """ln of the sum of the path forward's outputs with exponent q (ln #paths for q = 0)."""
    log_total, _ = PathForward(graph, groups, q, torch.device(device)).run()
    return log_total


def diag_g(graph: Graph, groups: Groups, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], float, float]:
    """(ln g per objective role, up to a constant; that constant; ln Ψ)."""
    fwd = PathForward(graph, groups, 2.0, torch.device(device), grad=True)
    log_psi, loss = fwd.run()
    leaves = [fwd.leaves[fwd._leaf_key(r.node, r.role)] for r in groups.roles]
    if not leaves:
        return [], 0.0, log_psi
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    offset = log_psi - math.log(float(loss.detach())) if float(loss.detach()) > 0 else 0.0
    log_g = []
    for role, grad, leaf in zip(groups.roles, grads, leaves):
        grad = torch.zeros_like(leaf) if grad is None else grad.detach()
        if not torch.isfinite(grad).all():
            raise NumericalError(f"diag(G) is not finite at {role.node.name} ({role.role})")
        log_g.append(torch.log(grad))
    return log_g, offset, log_psi


def path_statistics(graph: Graph, groups: Groups, device: torch.device | str = "cpu") -> PathStats:
    log_g, offset, log_psi = diag_g(graph, groups, device)
    return PathStats(
        log_g=log_g,
        log_g_offset=offset,
        log10_paths=path_log_sum(graph, groups, 0.0, device) / LOG10,
        log10_path1_norm=path_log_sum(graph, groups, 1.0, device) / LOG10,
        log10_path2_norm=0.5 * log_psi / LOG10,
    )


def role_summary(log_g: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    """(min, median, max) of log10 g over a tensor's entries with g > 0 (None when all are 0)."""
    flat = log_g.reshape(-1)
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return None, None, None
    flat = flat / LOG10
    return float(flat.min()), float(flat.median()), float(flat.max())


__all__ = ["PathForward", "PathStats", "Role", "diag_g", "path_log_sum", "path_statistics", "role_summary"]
