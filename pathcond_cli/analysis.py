"""From an IR graph to a solved rescaling: groups, statistics, solver, and the rescaled parameters.

This is the format-free engine the CLI and the Python API call:

    analysis = analyze(graph)                 # groups + path statistics + solver
    new_params = rescaled_params(analysis)    # key -> tensor in its stored dtype (only changed keys)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import NumericalError, UsageError
from .groups import Groups, Role, build_groups
from .ir import WEIGHT_LAYER_OPS, Graph
from .solver import Blocks, ParamBox, Solution, build_blocks, solve
from .stats import PathStats, path_statistics, role_summary
from .timing import timed


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return dev


@dataclass
class Pinned:
    """A pinned group (or set of channels) and why, for reports."""

    node: str
    reason: str
    channels: int


@dataclass
class LayerRow:
    node: str
    op: str
    width: int
    params: int
    log10_g_before: tuple[float | None, float | None, float | None]  # min, median, max
    log10_g_after: tuple[float | None, float | None, float | None]
    mean_log_scale: float  # mean ln λ over the layer's output channels


@dataclass
class Analysis:
    graph: Graph
    groups: Groups
    stats: PathStats
    blocks: Blocks
    solution: Solution
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[LayerRow] = field(default_factory=list)  # per-layer figures before and after

    @property
    def u(self) -> torch.Tensor:
        """ln λ per group on the CPU, index 0 = pinned."""
        return self.solution.u.detach().cpu()

    @property
    def pinned(self) -> list[Pinned]:
        pins = [Pinned(p.node, p.reason, p.channels) for p in self.groups.pins]
        owners = _group_owners(self.groups)
        for j, why in self.solution.degenerate:
            pins.append(Pinned(owners.get(j, f"group {j}"), why, 1))
        return pins

    @property
    def width_ratio(self) -> float:
        widths = [shape[1] for shape in self.graph.inputs.values()]
        widths += [self.graph.shapes[n.output][1] for n in self.graph.nodes if n.op in WEIGHT_LAYER_OPS]
        return max(widths) / min(widths) if widths else 1.0


def _group_owners(groups: Groups) -> dict[int, str]:
    """group index -> name of the layer that creates it (its first role as an output)."""
    owners: dict[int, str] = {}
    for role in groups.roles:
        for j in role.out_idx.tolist():
            owners.setdefault(int(j), role.node.name)
    return owners


def analyze(
    graph: Graph,
    *,
    device: str | torch.device = "auto",
    method: str = "auto",
    tol: float = 1e-3,
    max_sweeps: int = 2000,
    progress: Callable[[str, dict], None] | None = None,
    path_counts: bool = True,
) -> Analysis:
    """Groups, path statistics and the optimal rescaling of ``graph`` (nothing is modified).

    ``path_counts=False`` skips the number of paths and the path-1 norm (``stats.log10_paths`` and
    ``log10_path1_norm`` are None): two forward passes that only feed the report."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    notify = progress or (lambda stage, info: None)
    timings: dict[str, float] = {}

    notify("groups", {})
    with timed(timings, "groups"):
        groups = build_groups(graph)

    notify("statistics", {})
    with timed(timings, "statistics"):
        stats = path_statistics(graph, groups, dev, path_counts=path_counts)

    notify("solve", {"max_sweeps": max_sweeps})
    with timed(timings, "solve"):
        levels = None if groups.levels is None else torch.from_numpy(groups.levels).to(dev)
        blocks = build_blocks(groups.roles, stats.log_g, groups.n_free, levels)
        # the values rescaled_params will scale, in their stored dtypes (BatchNorm: γ and β)
        box = ParamBox(groups.roles, [graph.params[role.key] for role in groups.roles])
        solution = solve(
            blocks, method=method, tol=tol, max_sweeps=max_sweeps, box=box,
            progress=lambda sweep, f, gap: notify("sweep", {"sweep": sweep, "objective": f, "gap": gap}),
        )

    notify("layers", {})
    with timed(timings, "layers"):
        analysis = Analysis(graph, groups, stats, blocks, solution, dev, timings)
        analysis.layers = layer_rows(analysis)
    return analysis


def role_log_factor(role: Role, u: torch.Tensor) -> torch.Tensor:
    """(Bu)_i for every entry of one parameter tensor, broadcastable to its stored shape (float64).

    Per-channel tensors (biases, BatchNorm, affine) may be stored with extra unit axes, e.g. (C, 1, 1);
    conv kernels get trailing unit axes instead of a copy per kernel position."""
    out = u[role.out_idx]
    if role.in_idx is None:
        log_f = out
    elif role.in_idx.dim() == 1:
        log_f = out[:, None] - u[role.in_idx][None, :]
    else:
        log_f = out[:, None] - u[role.in_idx]
    if log_f.numel() == role.numel:
        return log_f.reshape(role.shape)
    return log_f.reshape(log_f.shape + (1,) * (len(role.shape) - log_f.dim()))


def role_factor(role: Role, u: torch.Tensor) -> torch.Tensor:
    """e^{(Bu)_i} for every entry of one parameter tensor (float64, the tensor's stored shape)."""
    return torch.exp(role_log_factor(role, u)).expand(role.shape)


def _moves(role: Role, u: torch.Tensor) -> bool:
    """Whether the rescaling changes this role at all (a check on its groups, not on its entries)."""
    touched = u[role.out_idx]
    if role.in_idx is not None:
        touched = torch.cat([touched, u[role.in_idx].reshape(-1)])
    return bool((touched != 0).any())


#: rows of a parameter rescaled at once: float64 temporaries stay about this many entries, whatever the
#: tensor's size (VGG-16's fc6 alone is 102.8M entries)
CHUNK_ENTRIES = 1 << 20


def _rows_log_factor(role: Role, u: torch.Tensor, rows: slice) -> torch.Tensor:
    """:func:`role_log_factor` for the output channels ``rows`` only (axis 0 of the stored tensor)."""
    out = u[role.out_idx[rows]]
    if role.in_idx is None:
        log_f = out
    elif role.in_idx.dim() == 1:
        log_f = out[:, None] - u[role.in_idx][None, :]
    else:
        log_f = out[:, None] - u[role.in_idx[rows]]
    shape = (log_f.shape[0],) + tuple(role.shape[1:])
    if log_f.numel() == math.prod(shape):
        return log_f.reshape(shape)
    return log_f.reshape(log_f.shape + (1,) * (len(shape) - log_f.dim()))


def rescaled_params(analysis: Analysis) -> dict[str, torch.Tensor]:
    """New values of every parameter the rescaling changes, each in its stored dtype and device.

    BatchNorm roles stand for a and b; their factor is applied to the stored γ and β (MATH §7).
    The solve is bounded so that every value stays finite and normal in its dtype (``ParamBox``); the
    finiteness check below is a safety net for a ``u`` set by other means.

    Each value is computed in float64 and rounded once to its dtype (the same bits as a whole-tensor
    float64 product), a block of output channels at a time: the float64 temporaries stay small, so the
    only full-size tensor made per parameter is its new value.
    """
    u = analysis.u
    new: dict[str, torch.Tensor] = {}
    for role in analysis.groups.roles:
        if not _moves(role, u):
            continue
        stored = analysis.graph.params[role.key]
        value = torch.empty(stored.shape, dtype=stored.dtype)
        source = stored.detach()
        if stored.dim() and stored.shape[0] == role.out_idx.numel():
            step = max(1, CHUNK_ENTRIES // max(1, math.prod(stored.shape[1:])))
            blocks = [slice(i, min(i + step, stored.shape[0])) for i in range(0, stored.shape[0], step)]
        else:  # not laid out by output channel (a scalar): one block
            blocks = [...]
        finite = True
        for rows in blocks:  # type: ignore[assignment]
            log_f = role_log_factor(role, u) if rows is Ellipsis else _rows_log_factor(role, u, rows)
            part = source[rows].to("cpu", torch.float64, copy=True).mul_(torch.exp(log_f))  # never the stored tensor
            value[rows] = part  # rounded once to the stored dtype
            # checked after the cast: float16 overflows long before float64
            finite = finite and bool(torch.isfinite(value[rows]).all())
        if not finite:
            raise NumericalError(
                f"rescaled parameter {role.key!r} is not finite in {stored.dtype}; nothing was written"
            )
        new[role.key] = value.to(stored.device)
    return new


def layer_rows(analysis: Analysis) -> list[LayerRow]:
    """Per-layer statistics before and after the rescaling, one row per node with parameters."""
    u = analysis.u
    by_node: dict[str, list[tuple[Role, torch.Tensor]]] = {}
    for role, log_g in zip(analysis.groups.roles, analysis.stats.log_g):
        by_node.setdefault(role.node.name, []).append((role, log_g.detach().cpu()))
    rows = []
    for name, entries in by_node.items():
        node = entries[0][0].node
        before = torch.cat([lg.reshape(-1) for _, lg in entries])
        after = torch.cat([(lg - 2.0 * role_log_factor(r, u)).reshape(-1) for r, lg in entries])
        out = entries[0][0].out_idx
        rows.append(
            LayerRow(
                node=name,
                op=node.op,
                width=int(analysis.graph.shapes[node.output][1]),
                params=sum(r.numel for r, _ in entries),
                log10_g_before=role_summary(before),
                log10_g_after=role_summary(after),
                mean_log_scale=float(u[out].mean()),
            )
        )
    return rows


__all__ = ["Analysis", "LayerRow", "Pinned", "analyze", "layer_rows", "rescaled_params", "resolve_device"]
