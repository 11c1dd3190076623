"""From an IR graph to a solved rescaling: groups, statistics, solver, and the rescaled parameters.

This is the format-free engine the CLI and the Python API call:

    analysis = analyze(graph)                 # groups + path statistics + solver
    new_params = rescaled_params(analysis)    # key -> tensor in its stored dtype (only changed keys)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .errors import NumericalError, UnsupportedModelError, UsageError
from .groups import Groups, Role, build_groups
from .ir import WEIGHT_LAYER_OPS, Graph
from .segments import cut, has_opaque, relabel_pins
from .solver import Blocks, ParamBox, Solution, build_blocks, solve
from .stats import LOG10, PathStats, path_statistics
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
class RelativeStep:
    """How the rescaling changes a layer's relative SGD steps |Δθ_i|/|θ_i|: by g_after/g_before = 1/s_i²
    per parameter (exact, data-free): the geometric mean over the layer's parameters, and the extremes."""

    geo_mean: float
    min: float
    max: float


@dataclass
class LayerRow:
    node: str
    op: str
    width: int
    params: int
    log10_g_before: tuple[float | None, float | None, float | None]  # min, median, max
    log10_g_after: tuple[float | None, float | None, float | None]
    mean_log_scale: float  # mean ln λ over the layer's output channels
    relative_step: RelativeStep
    median_sample: int  # entries the medians were taken over (= params, less g = 0 entries, up to MEDIAN_SAMPLE)


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
    # partial rescaling: the graph with its opaque nodes (``graph`` is then its cut, see segments.cut)
    source_graph: Graph | None = None

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
        # the model's own inputs: a partial graph's segment inputs (head counts, token counts) are not widths
        widths = [shape[1] for shape in (self.source_graph or self.graph).inputs.values()]
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

    source, graph = _segments_of(graph)
    notify("groups", {})
    with timed(timings, "groups"):
        groups = build_groups(graph)
    if source is not None:
        if not groups.roles and has_opaque(source):
            raise UnsupportedModelError("partial rescaling: no homogeneous segment of this model holds a parameter "
                                        "(every layer is inside an opaque op)")
        relabel_pins(groups, source)

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
        analysis = Analysis(graph, groups, stats, blocks, solution, dev, timings, source_graph=source)
        analysis.layers = layer_rows(analysis)
    return analysis


def _segments_of(graph: Graph) -> tuple[Graph | None, Graph]:
    """(the graph with opaque nodes or None, the homogeneous graph to analyse): see pathcond_cli.segments.
    A graph built for --partial is analysed by segments even with no opaque node (its segments are then
    the connected parts of the whole network, usually one), so that the report always has them."""
    return (graph, cut(graph)) if has_opaque(graph) or graph.partial else (None, graph)


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
            log_f = role_log_factor(role if rows is Ellipsis else _rows(role, rows.start, rows.stop), u)
            part = source[rows].to("cpu", torch.float64, copy=True).mul_(torch.exp(log_f))  # never the stored tensor
            value[rows] = part  # rounded once to the stored dtype
            # checked after the cast: float16 overflows long before float64
            finite = finite and _all_finite(value[rows])
        if not finite:
            raise NumericalError(
                f"rescaled parameter {role.key!r} is not finite in {stored.dtype}; nothing was written"
            )
        new[role.key] = value.to(stored.device)
    return new


def _all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in ``t``: its extremes are finite (NaN propagates into them); one pass, no mask."""
    if t.numel() == 0:
        return True
    if not t.is_floating_point():
        return True
    if t.dtype.itemsize == 1:  # 8-bit floats: torch has no aminmax for them, and their overflow is a NaN
        t = t.float()
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


MEDIAN_SAMPLE = 1 << 16  # entries per layer above which medians (and plot histograms) use a strided sample
_CHUNK = 1 << 22  # entries per chunk when scanning a parameter tensor for its extremes


def layer_rows(analysis: Analysis) -> list[LayerRow]:
    """Per-layer figures before and after the rescaling, one row per node with parameters.

    Cheap on large models: no float64 copy of a whole parameter tensor is made. The relative-step
    factors come from ``u`` alone (closed forms over the groups, :func:`_role_bu_summary`); the extremes
    of log10 g are exact, scanned in chunks of rows; the medians are exact up to :data:`MEDIAN_SAMPLE`
    entries per layer and taken over an evenly strided sample of that many entries beyond
    (``median_sample`` says how many)."""
    u = analysis.u
    return [_layer_row(analysis, entries, u) for entries in layer_entries(analysis).values()]


def layer_entries(analysis: Analysis) -> dict[str, list[tuple[Role, torch.Tensor]]]:
    """node name -> its roles with their ln g, in the order of the roles (the layers' order)."""
    by_node: dict[str, list[tuple[Role, torch.Tensor]]] = {}
    for role, log_g in zip(analysis.groups.roles, analysis.stats.log_g):
        by_node.setdefault(role.node.name, []).append((role, log_g))
    return by_node


def _layer_row(analysis: Analysis, entries: list[tuple[Role, torch.Tensor]], u: torch.Tensor) -> LayerRow:
    node = entries[0][0].node
    sample_b, sample_a = layer_samples(entries, u)
    extremes = [_role_extremes(role, log_g, u) for role, log_g in entries]
    before = _summary([e[0] for e in extremes], sample_b)
    after = _summary([e[1] for e in extremes], sample_a)
    return LayerRow(
        node=node.name,
        op=node.op,
        width=int(analysis.graph.shapes[node.output][1]),
        params=sum(r.numel for r, _ in entries),
        log10_g_before=before,
        log10_g_after=after,
        mean_log_scale=float(u[entries[0][0].out_idx].mean()),
        relative_step=relative_step([r for r, _ in entries], u),
        median_sample=int(sample_b.numel()),
    )


def relative_step(roles: list[Role], u: torch.Tensor) -> RelativeStep:
    """g_after/g_before = e^{-2(Bu)_i} over the roles' parameters: geometric mean and extremes (exact)."""
    total, weighted, lo, hi = 0, 0.0, math.inf, -math.inf
    for role in roles:
        mean, bu_min, bu_max = _role_bu_summary(role, u)
        total += role.numel
        weighted += role.numel * mean
        lo, hi = min(lo, bu_min), max(hi, bu_max)
    if not total:
        return RelativeStep(1.0, 1.0, 1.0)
    return RelativeStep(_exp(-2.0 * weighted / total), _exp(-2.0 * hi), _exp(-2.0 * lo))


def _exp(x: float) -> float:
    """e^x, or inf past float64's range (the report turns it into null)."""
    return math.exp(x) if x < 709.0 else math.inf


def _role_bu_summary(role: Role, u: torch.Tensor) -> tuple[float, float, float]:
    """(mean, min, max) of (Bu)_i over a role's entries, without its (out, in) matrix for a dense role:
    every output channel meets every input channel, so the mean is mean(u_out) - mean(u_in) and the
    extremes pair the extremes. Kernel positions repeat each (out, in) pair equally often."""
    out = u[role.out_idx]
    if role.in_idx is None:
        return float(out.mean()), float(out.min()), float(out.max())
    if role.in_idx.dim() == 1:
        inp = u[role.in_idx]
        return (float(out.mean() - inp.mean()), float(out.min() - inp.max()), float(out.max() - inp.min()))
    pairs = out[:, None] - u[role.in_idx]  # (O, I per group): the size of the kernel without its positions
    return float(pairs.mean()), float(pairs.min()), float(pairs.max())


def _rows(role: Role, start: int, stop: int) -> Role:
    """The role restricted to output channels start:stop (a view of its indices)."""
    in_idx = role.in_idx if role.in_idx is None or role.in_idx.dim() == 1 else role.in_idx[start:stop]
    return replace(role, shape=(stop - start,) + tuple(role.shape[1:]), out_idx=role.out_idx[start:stop],
                   in_idx=in_idx)


def role_chunks(role: Role, log_g: torch.Tensor, u: torch.Tensor):
    """(ln g before, ln g after) of one role, a block of output channels at a time: no float64 copy of
    the whole tensor is made (``log_g`` may be float32 after the solve; each block is promoted alone)."""
    if role.numel == 0:
        return
    u = u.to(log_g.device)
    log_g = log_g.detach().reshape(role.shape)
    step = max(1, _CHUNK // max(1, role.numel // role.shape[0]))
    for start in range(0, role.shape[0], step):
        stop = min(start + step, role.shape[0])
        before = log_g[start:stop]
        yield before, before - 2.0 * role_log_factor(_rows(role, start, stop), u)


def _role_extremes(role: Role, log_g: torch.Tensor, u: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
    """((min, max) of ln g before, (min, max) after) over entries with g > 0, scanned in chunks of rows.

    A kernel's positions share their (out, in) pair's factor, so a convolution is first reduced to the
    extremes over its positions (one (O, I) pair of matrices) unless some g is 0."""
    pairs = _kernel_extremes(role, log_g, u)
    if pairs is not None:
        return pairs
    b_lo = a_lo = math.inf
    b_hi = a_hi = -math.inf
    for before, after in role_chunks(role, log_g, u):
        lo, hi = (float(v) for v in torch.aminmax(before))
        if lo == -math.inf:  # entries with g = 0 (rare): leave them out of both
            keep = before > -math.inf
            if not bool(keep.any()):
                continue
            (lo, hi), (a_lo_c, a_hi_c) = _masked_extremes(before, keep), _masked_extremes(after, keep)
        else:
            a_lo_c, a_hi_c = (float(v) for v in torch.aminmax(after))
        b_lo, b_hi = min(b_lo, lo), max(b_hi, hi)
        a_lo, a_hi = min(a_lo, a_lo_c), max(a_hi, a_hi_c)
    return (b_lo, b_hi), (a_lo, a_hi)


def _kernel_extremes(role: Role, log_g: torch.Tensor, u: torch.Tensor):
    """:func:`_role_extremes` of a role with kernel positions, or None (no kernel, or some g = 0)."""
    if role.in_idx is None or role.numel == 0:
        return None
    rows, width = role.shape[0], role.in_idx.shape[-1]
    positions = role.numel // (rows * width)
    if positions == 1:
        return None
    lo, hi = torch.aminmax(log_g.detach().reshape(rows, width, positions), dim=-1)
    if float(lo.min()) == -math.inf:
        return None
    u = u.to(log_g.device)
    out = u[role.out_idx][:, None]
    factor = 2.0 * (out - (u[role.in_idx][None, :] if role.in_idx.dim() == 1 else u[role.in_idx]))
    before = (float(lo.min()), float(hi.max()))
    return before, (float((lo - factor).min()), float((hi - factor).max()))


def _masked_extremes(values: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    values = values.expand(keep.shape)
    lo = torch.where(keep, values, math.inf).min()
    hi = torch.where(keep, values, -math.inf).max()
    return float(lo), float(hi)


def layer_samples(entries: list[tuple[Role, torch.Tensor]], u: torch.Tensor,
                  size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ln g before and after at up to ``size`` entries of one layer's roles (all of them when they are
    fewer; else evenly strided, each role in proportion to its size), entries with g = 0 left out; CPU
    float64, for medians and histograms."""
    size = MEDIAN_SAMPLE if size is None else size
    total = sum(r.numel for r, _ in entries)
    befores, afters = [], []
    for role, log_g in entries:
        n = role.numel if total <= size else max(1, (role.numel * size) // total)
        if role.numel == 0:
            continue
        idx = (torch.arange(n, dtype=torch.int64) * role.numel) // n
        before = log_g.detach().reshape(-1)[idx.to(log_g.device)].to("cpu", torch.float64)
        after = before - 2.0 * _log_factor_at(role, u, idx)
        keep = before > -math.inf
        befores.append(before[keep])
        afters.append(after[keep])
    if not befores:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(befores), torch.cat(afters)


def _log_factor_at(role: Role, u: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(Bu)_i at flat (row-major) indices of a role's stored shape: axis 0 is the output channel, the
    input channel (if any) comes next, kernel positions last (:func:`role_log_factor` without the matrix)."""
    per_row = role.numel // role.shape[0]
    row, rest = flat // per_row, flat % per_row
    value = u[role.out_idx[row]].to(torch.float64)
    if role.in_idx is None:
        return value
    width = role.in_idx.shape[-1]
    col = rest // (per_row // width)
    idx = role.in_idx[col] if role.in_idx.dim() == 1 else role.in_idx[row, col]
    return value - u[idx]


def _summary(extremes: list[tuple[float, float]], sample: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    """(min, median, max) of log10 g: exact extremes, the lower median of the sample."""
    lo, hi = min(e[0] for e in extremes), max(e[1] for e in extremes)
    if not math.isfinite(lo):
        return None, None, None
    if sample.numel() == 0:  # a strided sample of a mostly-zero layer can miss every g > 0
        return lo / LOG10, None, hi / LOG10
    median = float(torch.kthvalue(sample, (sample.numel() + 1) // 2).values)
    return lo / LOG10, median / LOG10, hi / LOG10


__all__ = ["Analysis", "LayerRow", "Pinned", "RelativeStep", "analyze", "layer_entries", "layer_rows", "layer_samples", "relative_step",
           "rescaled_params", "resolve_device"]
