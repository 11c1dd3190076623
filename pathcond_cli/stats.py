"""Path statistics (MATH §3): diag(G), the number of paths and path norms, without overflow.

Everything comes from one *path forward* with exponent q on an all-ones input of batch 1: every
parameter w becomes |w|^q, every fixed weight c becomes |c|^q, ReLU-like activations become the
identity and max-pool a sum-pool. The sum of the outputs is then

* q = 0: the number of paths,
* q = 1: the path-1 norm ‖Φ‖₁,
* q = 2: Ψ = ‖Φ‖₂², whose gradient with respect to the squared parameters is g = diag(G).

Values are float64 tensors carried with a log-scale (``value = t · e^s``): each node divides its result
by its (detached) maximum and adds the log to ``s``, and sums bring their terms to a common scale, so
neither deep nets nor tiny initialisations overflow or underflow. The reverse pass for g runs node by
node and keeps a log-scale on every adjoint too, so ln g is exact even where g itself is far outside
float64's range.

Each op's image in the path forward is the ``path`` rule of its row in ``ir.OPS`` (written in the
log-scaled algebra of ``ir.Scaled``); :class:`PathForward` supplies |θ|^q for its parameters, keeps them
as leaves and runs the reverse pass, and knows no op by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NumericalError
from .groups import Groups, Role
from .ir import OPS, Graph, Node, Scaled, bn_affine, log_max, normalize

LOG10 = math.log(10.0)


def _sum_scaled(terms: list[Scaled]) -> Scaled:
    """Plain sum of scaled tensors (no gradient needed): common scale, then renormalise."""
    if len(terms) == 1:
        return terms[0]
    top = max(log_max(t) for t in terms)
    if top == -math.inf:
        return terms[0]
    total = sum(t.t * math.exp(t.s - top) for t in terms if log_max(t) > -math.inf)
    return normalize(Scaled(total, top))


def _log_sum(logs: list[float]) -> float:
    if not logs:
        return -math.inf
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs))


class PathForward:
    """The path forward of a graph with exponent ``q``; objective parameters become leaves.

    With ``grad=True`` every node runs on detached copies of its inputs, so that :meth:`log_diag`
    can walk the nodes backwards one at a time and keep a log-scale on every adjoint as well.
    """

    def __init__(self, graph: Graph, groups: Groups, q: float, device: torch.device, grad: bool = False):
        self.graph, self.q, self.device, self.grad = graph, q, device, grad
        self.objective = {(r.node.name, r.role) for r in groups.roles}
        self.leaves: dict[str, torch.Tensor] = {}
        self.node_leaves: dict[str, list[str]] = {}  # node name -> keys of the leaves it read
        self.tape: list[tuple[Node, list[Scaled], Scaled]] = []
        self.outputs: list[Scaled] = []

    def _leaf_key(self, node: Node, role: str) -> str:
        # a derived role (BatchNorm's a, b) is a parameter of its node; any other is its tensor's
        return f"{node.name}::{role}" if OPS[node.op].derived_roles else node.params[role]

    def _power(self, value: torch.Tensor) -> torch.Tensor:
        if self.q == 0.0:  # 0^0 = 1: every connection counts as a path
            return torch.ones(value.shape, dtype=torch.float64, device=self.device)
        # one new float64 tensor, powered in place: these are full-size weights
        value = value.detach().to(self.device, torch.float64, copy=True)
        if self.q == 2.0:
            return value.square_()
        return value.abs_() if self.q == 1.0 else value.abs_().pow_(self.q)

    def param(self, node: Node, role: str, value: torch.Tensor | None = None) -> torch.Tensor | None:
        """|θ|^q for one role of ``node``: a shared leaf when it is an objective parameter."""
        if node.param(role) is None and value is None:
            return None
        value = self.graph.tensor(node, role) if value is None else value
        key = self._leaf_key(node, role)
        if key not in self.leaves:
            powered = self._power(value)
            if (node.name, role) not in self.objective:  # a fixed weight (non-affine BN, ...)
                return powered
            powered.requires_grad_(self.grad)  # later uses of a tied tensor share this leaf
            self.leaves[key] = powered
        self.node_leaves.setdefault(node.name, []).append(key)
        return self.leaves[key]

    def run(self) -> float:
        """ln of the sum of the outputs (ln #paths for q = 0, ln Ψ for q = 2)."""
        values: dict[str, Scaled] = {
            name: Scaled(torch.ones(shape, dtype=torch.float64, device=self.device), 0.0)
            for name, shape in self.graph.inputs.items()
        }
        for node in self.graph.nodes:
            xs = [values[v] for v in node.inputs]
            if self.grad:
                xs = [Scaled(x.t.detach().requires_grad_(True), x.s) for x in xs]
            out = self.node(node, xs)
            values[node.output] = out
            if self.grad:
                self.tape.append((node, xs, out))
        self.outputs = [values[v] for v in self.graph.outputs]
        parts = [(float(o.t.detach().sum()), o.s) for o in self.outputs]
        return _log_sum([(math.log(t) + s) for t, s in parts if t > 0])

    def log_diag(self) -> dict[str, torch.Tensor]:
        """ln g for every leaf (absolute, not up to a constant) after :meth:`run` with ``grad=True``.

        Reverse pass node by node: the adjoint of each value w.r.t. its normalised tensor is kept as
        ``â · e^r`` and renormalised after every node, so g is right even far outside float64's range.

        The tape is consumed as it goes (each node's activations and autograd graph are freed once its
        step is done), a leaf's gradient becomes its logarithm in place, and a leaf is dropped after its
        last reader: the pass never holds |θ|², ∂Ψ/∂θ² and ln g of the whole model at once."""
        adjoints: dict[str, list[Scaled]] = {}
        for name, out in zip(self.graph.outputs, self.outputs):
            adjoints.setdefault(name, []).append(Scaled(torch.ones_like(out.t), out.s))
        self.outputs = []
        readers: dict[str, int] = {}
        for node, _, _ in self.tape:
            for key in dict.fromkeys(self.node_leaves.get(node.name, [])):
                readers[key] = readers.get(key, 0) + 1
        parts: dict[str, list[torch.Tensor]] = {}
        result: dict[str, torch.Tensor] = {}
        while self.tape:
            node, xs, out = self.tape.pop()
            pending = adjoints.pop(node.output, None)
            keys = list(dict.fromkeys(self.node_leaves.get(node.name, [])))
            if pending:
                adj = _sum_scaled(pending)
                targets = [x.t for x in xs] + [self.leaves[k] for k in keys]
                # the vector-Jacobian product as the gradient of the scalar Σ out·adj (exact: its gradient
                # with respect to out is adj·1); autograd.grad with grad_outputs imports sympy on first use
                grads = torch.autograd.grad(torch.sum(out.t * adj.t), targets, allow_unused=True)
                del out, targets
                for value, grad in zip(node.inputs, grads[: len(xs)]):
                    if grad is not None and value not in self.graph.inputs:
                        adjoints.setdefault(value, []).append(normalize(Scaled(grad, adj.s)))
                shared = {g.data_ptr() for g in grads[: len(xs)] if g is not None} | {adj.t.data_ptr()}
                for key, grad in zip(keys, grads[len(xs):]):
                    if grad is not None:  # in place unless autograd handed the same tensor elsewhere
                        log = torch.log(grad) if grad.data_ptr() in shared else grad.log_()
                        shared.add(log.data_ptr())
                        parts.setdefault(key, []).append(log.add_(adj.s))
                del grads, adj
            for key in keys:  # nothing upstream reads this leaf again: g is complete
                readers[key] -= 1
                if readers[key] == 0:
                    result[key] = self._finish(key, parts.pop(key, []))
        for key in list(self.leaves):  # leaves no node on the tape read
            result[key] = self._finish(key, parts.pop(key, []))
        return result

    def _finish(self, key: str, logs: list[torch.Tensor]) -> torch.Tensor:
        """ln g of one leaf from its terms' logs (−inf when no path reaches an output); drops the leaf."""
        leaf = self.leaves.pop(key)
        if not logs:
            return torch.full_like(leaf, -math.inf).detach()
        if len(logs) == 1:
            return logs[0]
        return torch.logsumexp(torch.stack(logs), 0)

    def node(self, node: Node, xs: list[Scaled]) -> Scaled:
        """The node's image in the path forward: the ``path`` rule of its op's row (ir.OPS)."""
        return OPS[node.op].path(self, node, xs)


@dataclass
class PathStats:
    """Path statistics of a graph. ``log_g[i]`` is ln g (absolute) for ``groups.roles[i]``, in the
    parameter's stored shape; −inf where g = 0.

    ``log10_paths`` and ``log10_path1_norm`` are None when they were not asked for: each costs a full
    forward pass of its own, and neither changes under a rescaling (Φ is invariant), so ``rescale``
    leaves them to ``inspect``. The path-2 norm comes with g for free (Ψ = ‖Φ‖₂²)."""

    log_g: list[torch.Tensor]
    log10_paths: float | None
    log10_path1_norm: float | None
    log10_path2_norm: float


def path_log_sum(graph: Graph, groups: Groups, q: float, device: torch.device | str = "cpu") -> float:
    """ln of the sum of the path forward's outputs with exponent q (ln #paths for q = 0)."""
    return PathForward(graph, groups, q, torch.device(device)).run()


def diag_g(graph: Graph, groups: Groups, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], float]:
    """(ln g per objective role, ln Ψ). g is absolute: ln g = ln ∂Ψ/∂(θ²)."""
    fwd = PathForward(graph, groups, 2.0, torch.device(device), grad=True)
    log_psi = fwd.run()
    log_g = fwd.log_diag()
    out = []
    for role in groups.roles:
        lg = log_g[fwd._leaf_key(role.node, role.role)].detach()
        top = float(lg.max()) if lg.numel() else 0.0  # max propagates NaN: one pass checks both
        if math.isnan(top) or top == math.inf:
            raise NumericalError(f"diag(G) is not finite at {role.node.name} ({role.role})")
        out.append(lg)
    return out, log_psi


def path_statistics(graph: Graph, groups: Groups, device: torch.device | str = "cpu", *,
                    path_counts: bool = True) -> PathStats:
    """diag(G) and the path-2 norm; with ``path_counts`` also the number of paths and the path-1 norm
    (two more forward passes: about a fifth of the stage on ResNet-50)."""
    log_g, log_psi = diag_g(graph, groups, device)
    paths = path1 = None
    if path_counts:
        paths = path_log_sum(graph, groups, 0.0, device) / LOG10
        path1 = path_log_sum(graph, groups, 1.0, device) / LOG10
    return PathStats(log_g=log_g, log10_paths=paths, log10_path1_norm=path1, log10_path2_norm=0.5 * log_psi / LOG10)


__all__ = ["PathForward", "PathStats", "Role", "Scaled", "bn_affine", "diag_g", "path_log_sum", "path_statistics"]
