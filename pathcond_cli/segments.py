"""Partial rescaling (MATH §8b): networks with ops that are not positively homogeneous.

A front end asked for a partial graph (``--partial``) keeps every node it cannot translate as an
``opaque`` IR node instead of refusing the model: LayerNorm, softmax attention, GELU, Sigmoid gates,
ReLU6, products of two activations, embeddings, ops it does not know. A connected region of such nodes
becomes opaque nodes, one per value the homogeneous part reads from the region (its *frontier*: the
homogeneous values the region reads are its inputs). Parameters inside opaque nodes are not IR
parameters: they are never rescaled.

:func:`cut` turns that graph into an ordinary homogeneous IR graph: every opaque output read by a
homogeneous node becomes a graph **input** (all ones in the path forward, pinned), and every homogeneous
value an opaque node reads becomes a graph **output** (summed into Ψ, pinned). What remains is a
disjoint union of maximal homogeneous *segments* (:func:`segment_nodes`). Because every parameter
belongs to exactly one segment and no path crosses an opaque node, Ψ of the cut graph is the sum of the
segments' own Ψ, and one path forward gives every segment's g exactly as if that segment were a network
on its own: g_i = Σ over the segment's paths through θ_i (from a segment input or a bias to a segment
output) of the product of the other squared weights. The criterion and the score are then taken over
the parameters of all segments together (those with g > 0).

:func:`opaque_graph` is the front ends' shared builder of such graphs from the nodes they refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import Offender, UnsupportedModelError
from .ir import OPS, Graph, Node, Sets, Shape

if TYPE_CHECKING:
    from .analysis import Analysis
    from .groups import Groups

OPAQUE = "opaque"


@dataclass(frozen=True)
class OpaqueSource:
    """A node of the model that the front end keeps as opaque: its name and op in the model, why it is
    not homogeneous (or not known), and the values it reads and writes (IR value names)."""

    name: str
    op: str
    why: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def has_opaque(graph: Graph) -> bool:
    return any(node.op == OPAQUE for node in graph.nodes)


def opaque_op_count(graph: Graph) -> int:
    """How many of the model's ops are kept unchanged as opaque: those in the opaque regions the
    model's outputs depend on (an op whose result nothing reads, such as an RNN's unused final state,
    is in none). The one count of the front ends' warning and of the report's ``partial.opaque_ops``."""
    return len({name for n in graph.nodes if n.op == OPAQUE for name in n.attrs.get("ops", [n.name])})


# --------------------------------------------------------------------------------------------------
# Building a graph with opaque nodes (front ends)


def _toposort(nodes: list[Node], inputs: Sequence[str]) -> list[Node]:
    """Nodes ordered so that every value is defined before it is read (stable where already ordered)."""
    defined, pending, ordered = set(inputs), list(nodes), []
    while pending:
        ready = [n for n in pending if all(v in defined for v in n.inputs)]
        if not ready:  # a cycle through opaque regions, or a value nobody defines: let Graph() say which
            return ordered + pending
        for node in ready:
            defined.add(node.output)
        ordered += ready
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    return ordered


def _absorb_unreadable(nodes: list[Node], sources: list[OpaqueSource], inputs: Mapping[str, Shape],
                       ir_shape: Callable[[str], Shape | None]) -> tuple[list[Node], list[OpaqueSource]]:
    """Homogeneous nodes that read an opaque value with no IR shape (an integer mask, a scalar, a
    rank-1 vector) are opaque too, until none is left."""
    while True:
        from_sources = {v for s in sources for v in s.outputs}
        defined = {n.output for n in nodes} | set(inputs)
        bad = {v for n in nodes for v in n.inputs if v in from_sources and v not in defined and ir_shape(v) is None}
        readers = [n for n in nodes if bad & set(n.inputs)]
        if not readers:
            return nodes, sources
        why = "reads a value of an opaque region that is not a (batch, channels, ...) activation"
        sources = sources + [OpaqueSource(n.name, n.source_op or n.op, why, n.inputs, (n.output,)) for n in readers]
        nodes = [n for n in nodes if not bad & set(n.inputs)]


def _frontier(value: str, producer: Mapping[str, OpaqueSource], defined: set[str]) -> tuple[list[str], list[str]]:
    """(homogeneous values the region behind ``value`` reads, names of the region's source nodes)."""
    seen: set[str] = set()
    frontier: list[str] = []
    stack = [producer[value]]
    names: list[str] = []
    while stack:
        src = stack.pop()
        if src.name in seen:
            continue
        seen.add(src.name)
        names.append(src.name)
        for v in src.inputs:
            if v in defined and v not in frontier:
                frontier.append(v)
            elif v in producer:
                stack.append(producer[v])
    return frontier, names


def opaque_graph(inputs: Mapping[str, Shape], nodes: list[Node], outputs: list[str],
                 params: Mapping[str, torch.Tensor], sources: list[OpaqueSource],
                 ir_shape: Callable[[str], Shape | None], shared: Mapping[str, str] | None = None) -> Graph:
    """The IR graph of a model whose ``sources`` nodes are opaque.

    ``nodes`` are the homogeneous IR nodes the front end emitted (they may read values that sources
    write), ``ir_shape(value)`` the IR shape of a value sources write ((1, C, ...), channel-first; None
    where it is not an activation). One opaque node is made per source value read by a homogeneous node
    or returned as a graph output; it reads the homogeneous values its region reads. ``shared``: IR
    parameter keys whose tensor an opaque op reads too (a tied embedding and output layer), with that
    op's name: they are frozen, since rescaling them would change the opaque op."""
    nodes, sources = _absorb_unreadable(list(nodes), list(sources), inputs, ir_shape)
    producer = {v: s for s in sources for v in s.outputs}
    defined = {n.output for n in nodes} | set(inputs)
    wanted = [v for n in nodes for v in n.inputs if v in producer and v not in defined]
    wanted += [v for v in outputs if v in producer and v not in defined]
    made: list[Node] = []
    for value in dict.fromkeys(wanted):
        frontier, region = _frontier(value, producer, defined)
        src = producer[value]
        shape = ir_shape(value) or (1, 1)  # a graph output nothing homogeneous reads: its shape is not used
        name = src.name if len(src.outputs) == 1 else f"{src.name}:{value}"
        made.append(Node(name, OPAQUE, tuple(frontier), value, {}, {"shape": tuple(shape), "ops": region,
                                                                   "why": src.why}, src.op))
    used = {key for n in nodes for key in n.params.values()}
    read = {v for n in nodes + made for v in n.inputs} | set(outputs)
    ir_inputs = {k: tuple(v) for k, v in inputs.items() if k in read}
    ordered = _toposort(nodes + made, list(ir_inputs))
    graph = Graph(ir_inputs, ordered, list(outputs), {k: v for k, v in params.items() if k in used})
    frozen = {k: f"the opaque op {op} reads the same tensor" for k, op in (shared or {}).items() if k in used}
    return graph.with_frozen(frozen) if frozen else graph


# --------------------------------------------------------------------------------------------------
# Cutting a graph into its homogeneous segments


def cut(graph: Graph) -> Graph:
    """The homogeneous graph of the segments: opaque nodes removed, the opaque outputs homogeneous
    nodes read become inputs, the homogeneous values opaque nodes read become outputs (after the
    graph's own outputs). Values that only pass between opaque nodes, and graph outputs written by an
    opaque node, are no segment's boundary and are left out."""
    kept = [n for n in graph.nodes if n.op != OPAQUE]
    opaque = [n for n in graph.nodes if n.op == OPAQUE]
    produced = {n.output for n in kept}
    opaque_out = {n.output for n in opaque}
    read = {v for n in kept for v in n.inputs}
    outputs = [v for v in graph.outputs if v not in opaque_out]
    for node in opaque:
        outputs += [v for v in node.inputs if v in produced and v not in outputs]
    inputs = {name: shape for name, shape in graph.inputs.items() if name in read or name in outputs}
    inputs.update({n.output: graph.shapes[n.output] for n in opaque if n.output in read})
    return Graph(inputs, kept, outputs, dict(graph.params), dict(graph.frozen))


def segment_nodes(graph: Graph) -> list[list[Node]]:
    """The maximal homogeneous segments: homogeneous nodes joined by the values they pass each other
    (a value from an opaque node or a graph input joins nothing: it is pinned), in graph order."""
    kept = [n for n in graph.nodes if n.op != OPAQUE]
    sets = Sets()
    producer = {n.output: n for n in kept}
    for node in kept:
        for value in node.inputs:
            if value in producer:
                sets.union(producer[value].name, node.name)
    segments: dict[str, list[Node]] = {}
    for node in kept:
        segments.setdefault(sets.find(node.name), []).append(node)
    return list(segments.values())


def free_hidden_units(nodes: Sequence[Node], groups: Groups, pinned: frozenset[int] = frozenset()) -> tuple[int, int]:
    """(hidden units in free groups, hidden units): the output channels of the layers among ``nodes``
    (of a cut graph); ``pinned``: free groups the solver pinned after all (degenerate)."""
    free = total = 0
    for node in nodes:
        if OPS[node.op].hidden:
            ids = groups.value_groups[node.output]
            total += len(ids)
            free += sum(1 for j in ids.tolist() if j != 0 and j not in pinned)
    return free, total


def rescalable_hidden_units(graph: Graph) -> tuple[int, int]:
    """(hidden units partial rescaling would leave free, hidden units of its segments): what
    ``--partial`` would rescale, before any statistics (a unit the solver finds degenerate is counted)."""
    from .groups import build_groups

    segments = cut(graph)
    return free_hidden_units(segments.nodes, build_groups(segments))


def partial_hint(graph: Graph | None) -> str:
    """The sentence a refusal adds: how many hidden units ``--partial`` would rescale."""
    if graph is None:
        return ""
    try:
        free, total = rescalable_hidden_units(graph)
    except Exception:  # noqa: BLE001 - the hint is optional: never let it hide the refusal itself
        return ""
    return (f" With --partial, these ops are kept unchanged as opaque and {free:,} of the model's {total:,} hidden "
            "units in its homogeneous segments would be rescaled.")


def hard_refusal(message: str, offenders: Sequence[Offender]) -> UnsupportedModelError | None:
    """The refusal of a model that holds an offender ``--partial`` cannot keep opaque (a
    :class:`~pathcond_cli.errors.HardRefusal`: its outputs are random), the same with or without
    ``--partial`` and promising nothing of it; None when every offender may be kept opaque.
    ``message``: the front end's refusal, which lists the offenders."""
    hard = [o for o in offenders if not o.opaque_ok]
    if not hard:
        return None
    names = ", ".join(f"{o.node} ({o.op})" for o in hard)
    return UnsupportedModelError(
        f"{message} --partial cannot keep {names} unchanged as opaque: "
        f"{'it makes' if len(hard) == 1 else 'they make'} the model's outputs random (not a function of its "
        "inputs), so no rescaled copy can be verified against it. Export or save the model in eval mode "
        "(model.eval()).", list(offenders))


def with_partial_hint(exc: UnsupportedModelError) -> UnsupportedModelError:
    """A front end's refusal, its message completed by what ``--partial`` would rescale (the front ends
    build the graph; counting its free units is the core's business, so it is done here)."""
    hint = partial_hint(exc.partial_graph)
    if not hint:
        return exc
    return UnsupportedModelError(str(exc) + hint, exc.offenders, exc.partial_graph)


def relabel_pins(groups: Groups, source: Graph) -> None:
    """Say why a boundary of a cut graph is pinned: the opaque op it comes from or goes to, instead of
    "graph input" / "graph output" (which stay for the model's own inputs and outputs)."""
    opaque = {n.output: n for n in source.nodes if n.op == OPAQUE}
    readers: dict[str, list[str]] = {}
    for node in opaque.values():
        for value in node.inputs:
            readers.setdefault(value, []).append(node.name)
    for pin in groups.pins:
        if pin.reason == "graph input" and pin.value in opaque:
            pin.node = opaque[pin.value].name
            pin.reason = f"output of an opaque op ({opaque[pin.value].source_op}): a segment input"
        elif pin.reason == "graph output" and pin.value in readers and pin.value not in source.outputs:
            names = readers[pin.value]
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            pin.reason = f"read by the opaque op {names[0]}{more}: a segment output"


# --------------------------------------------------------------------------------------------------
# Per-segment figures for the report


class _LogScore:
    """ln(AM/GM) of the entries with g > 0 seen so far, from running sums (logsumexp, sum and count of
    ln g), so that a segment's score needs no copy of all its entries at once."""

    def __init__(self) -> None:
        self.lse, self.total, self.count = -math.inf, 0.0, 0

    def add(self, log_g: torch.Tensor) -> None:
        lg = log_g[torch.isfinite(log_g)].double()
        if lg.numel():
            self.lse = float(torch.logaddexp(torch.tensor(self.lse, dtype=torch.float64), torch.logsumexp(lg, 0)))
            self.total += float(lg.sum())
            self.count += lg.numel()

    def value(self) -> float | None:
        """None when every entry has g = 0."""
        return None if not self.count else self.lse - math.log(self.count) - self.total / self.count


def _boundaries(source: Graph, names: set[str]) -> tuple[list[str], list[str]]:
    """(opaque nodes the segment reads from, opaque nodes that read from it), by name."""
    seg = [n for n in source.nodes if n.name in names]
    outputs = {n.output for n in seg}
    reads = {v for n in seg for v in n.inputs}
    before = [n.name for n in source.nodes if n.op == OPAQUE and n.output in reads]
    after = [n.name for n in source.nodes if n.op == OPAQUE and outputs & set(n.inputs)]
    return before, after


def segment_rows(analysis: Analysis, source: Graph) -> list[dict[str, Any]]:
    """One row per segment with parameters: its boundaries, parameters, hidden units and its score
    (AM/GM of its own diag(G) entries with g > 0) before and after the rescaling."""
    from .analysis import layer_entries, role_chunks

    u = analysis.u
    degenerate = frozenset(j for j, _ in analysis.solution.degenerate)
    by_node = layer_entries(analysis)
    rows = []
    for nodes in segment_nodes(source):
        names = {n.name for n in nodes}
        entries = [e for n in nodes for e in by_node.get(n.name, [])]
        if not entries:
            continue  # shape arithmetic between opaque ops: no parameter, nothing to report
        before, after = _LogScore(), _LogScore()
        for role, log_g in entries:
            for b, a in role_chunks(role, log_g, u):
                before.add(b)
                after.add(a.expand(b.shape))
        free, total = free_hidden_units(nodes, analysis.groups, degenerate)
        reads_from, read_by = _boundaries(source, names)
        score_before, score_after = before.value(), after.value()
        rows.append({
            "index": len(rows),
            "first_node": nodes[0].name,
            "last_node": nodes[-1].name,
            "nodes": len(nodes),
            "inputs_from": reads_from,
            "outputs_to": read_by,
            "parameters": sum(role.numel for role, _ in entries),
            "hidden_units": total,
            "hidden_units_free": free,
            "hidden_units_pinned": total - free,
            "log10_score_before": None if score_before is None else score_before / math.log(10.0),
            "log10_score_after": None if score_after is None else score_after / math.log(10.0),
        })
    return rows


def partial_summary(analysis: Analysis, source: Graph) -> dict[str, Any]:
    """The report's ``partial`` block: segments, opaque ops, and the share of hidden units rescaled."""
    degenerate = frozenset(j for j, _ in analysis.solution.degenerate)
    free, total = free_hidden_units(analysis.graph.nodes, analysis.groups, degenerate)
    return {
        "opaque_ops": opaque_op_count(source),
        "hidden_units": total,
        "hidden_units_rescaled": free,
        "share_rescaled": free / total if total else 0.0,
        "segments": segment_rows(analysis, source),
    }


__all__ = ["OPAQUE", "OpaqueSource", "cut", "hard_refusal", "has_opaque", "opaque_graph", "opaque_op_count",
           "partial_hint", "partial_summary", "rescalable_hidden_units", "segment_nodes", "segment_rows",
           "with_partial_hint"]
