"""The PathCond solver (MATH §5–6) on the block-aggregated problem.

With λ_j = e^{u_j} per free group and ``u_ext = [0, u]`` (index 0 = pinned), parameter i is rescaled by
e^{(Bu)_i}, (Bu)_i = u[out(i)] − u[in(i)]. All parameters with the same (out, in) pair share that
factor, so the objective only needs one number per *block*: ln Σ g over the block and the block's size.

    F(u) = G · ln Σ_b g_b e^{−2(Bu)_b} + 2 Σ_j k_j u_j,     k_j = n_in(j) − n_out(j)

where G, n_in and n_out count only parameters with g > 0 (MATH §5): then F = G·ln(AM/GM) + const
exactly, so minimising F never raises the reported score.

Four methods reach the same minimum:

* ``"auto"`` (default): layer-ordered Gauss–Seidel (``_Layered``). Groups are taken in batches of one
  level of the DAG, front to back; a batch shares no block, so its groups take their exact steps at
  λ = G/S at once, from the blocks incident to the batch only, and S is refreshed before the next
  batch. After each sweep a coarse correction shifts every batch as a whole by the exact minimiser of F
  over such shifts (a small problem of the same form, solved by Newton's method): it removes the slow
  "ramp" across layers of deep chains. Two or three sweeps to ``tol`` 1e-3 on chains and DAGs alike;
  no L-BFGS, so torch._dynamo is not imported (the bounded solve below still uses L-BFGS).
* ``"bcd"``: exact block coordinate descent. λ = G/S is optimal for the current u; then groups that
  share no block (a colour class) are independent and each solves λ·C·x² + k·x − λ·A = 0 in closed
  form; u_j += ½ ln x.
* ``"lbfgs"`` (the default before issue 11): a few BCD sweeps, then L-BFGS on the smooth convex F, then
  BCD again if needed. Constructing ``torch.optim.LBFGS`` imports torch._dynamo (~1 s).
* ``"sequential"``: the per-group exact update of MATH §6, one group at a time (the reference; slow).

With a ``ParamBox`` (the stored tensors), the rescaled parameters must stay finite and normal in their
storage dtypes: lo ≤ u_out − u_in ≤ hi per block. When the unbounded optimum breaks a bound, the solve
is redone with exact coordinate steps clipped to each group's interval, and the solution says so.

Every method stops on optimality: the largest |ln x| over free groups, x being the exact coordinate
minimiser of F along u_j at the current point ((G+k)·C·x² + k·R·x + (k−G)·A = 0), must fall below
``tol``. Groups with no incoming or no outgoing mass (A = 0 or C = 0) have no finite optimum: they are
pinned and reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import UnsupportedModelError
from .groups import Role

LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# Blocks


@dataclass
class DenseBlocks:
    """The blocks of one dense weight whose output and input groups are distinct, kept as a matrix.

    Row j, column i holds Σ g over the parameters linking in group ``inn[i]`` to out group ``out[j]``.
    The incoming mass of every out group and the outgoing mass of every in group are then two
    matrix-vector products instead of a gather and a scatter over every (out, in) pair. Rows and
    columns with no mass are dropped from the matrices (``rows``/``cols`` index the kept ones); each
    matrix is stored twice, normalised by its row maxima and by its column maxima, so that a sum
    underflows only when the log-scales of one layer's groups spread over more than ~350.
    """

    out: torch.Tensor  # (o,) int64 group of each row
    inn: torch.Tensor  # (i,) int64 group of each column
    count_out: torch.Tensor  # (o,) float64 parameters per row
    count_in: torch.Tensor  # (i,) float64 parameters per column
    pos_out: torch.Tensor  # (o,) float64 parameters with g > 0 per row
    pos_in: torch.Tensor  # (i,) float64
    rows: torch.Tensor  # (r,) int64 kept rows (positions in ``out``)
    cols: torch.Tensor  # (c,) int64 kept columns (positions in ``inn``)
    log_row_max: torch.Tensor  # (r,) ln of each kept row's largest entry
    by_row: torch.Tensor  # (r, c) entries / row maximum
    log_col_max: torch.Tensor  # (c,)
    by_col: torch.Tensor  # (r, c) entries / column maximum

    @property
    def n_blocks(self) -> int:
        return len(self.out) * len(self.inn)


@dataclass
class Blocks:
    """The aggregated problem. Index 0 of the group space is the pinned group (u = 0).

    Blocks are held as a list of (out, in) pairs, plus dense matrices for large dense weights (see
    ``DenseBlocks``); every quantity of the solver sums over both."""

    out: torch.Tensor  # (nb,) int64
    inn: torch.Tensor  # (nb,) int64
    log_g: torch.Tensor  # (nb,) float64, ln Σ g over the block (-inf when all g are 0)
    count: torch.Tensor  # (nb,) float64, parameters in the block
    count_pos: torch.Tensor  # (nb,) float64, parameters with g > 0
    sum_log_g_pos: float  # Σ ln g over parameters with g > 0
    n_groups: int  # H (free groups before degeneracy checks)
    levels: torch.Tensor | None = None  # (H+1,) a coarse colouring hint (see build_blocks)
    dense: list[DenseBlocks] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return len(self.log_g) + sum(d.n_blocks for d in self.dense)

    @property
    def n_params(self) -> int:
        return int(self.count.sum()) + sum(int(d.count_out.sum()) for d in self.dense)

    @property
    def n_params_pos(self) -> int:
        return int(self.count_pos.sum()) + sum(int(d.pos_out.sum()) for d in self.dense)

    @property
    def device(self) -> torch.device:
        return self.log_g.device


def scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """ln Σ exp(values) per index (−inf for empty slots)."""
    top = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(n, dtype=values.dtype, device=values.device)
    total = total.scatter_add(0, index, torch.exp(values - safe[index]))
    return safe + torch.log(total)


DENSE_MIN_BLOCKS = 4096  # dense weights with at least this many blocks are kept as matrices


def _dense(outs: torch.Tensor, ins: torch.Tensor, mats: list[torch.Tensor], top: float) -> DenseBlocks:
    value, count, pos = mats
    rows = torch.nonzero(value.amax(1) > 0).reshape(-1)
    cols = torch.nonzero(value.amax(0) > 0).reshape(-1)
    sub = value[rows][:, cols]
    row_max, col_max = sub.amax(1), sub.amax(0)
    return DenseBlocks(
        outs, ins, count.sum(1), count.sum(0), pos.sum(1), pos.sum(0), rows, cols,
        torch.log(row_max) + top, sub / row_max[:, None], torch.log(col_max) + top, sub / col_max[None, :],
    )


_ROWS_CHUNK = 1 << 22  # entries per block of output rows when summing e^{ln g - top} (no full-size temporary)


def _row_sums(log_g: torch.Tensor, o: int, n_in: int, top: float, in_groups: tuple[torch.Tensor, int] | None = None,
              positive: bool = False) -> torch.Tensor:
    """(o, n_in) sums over kernel positions of g / e^top (of [g > 0] with ``positive``), then over the
    input entries of each input group when ``in_groups`` = (group of each entry, number of groups) is
    given. A block of output rows at a time: VGG-16's fc6 would otherwise need an 0.8 GB float64 copy."""
    if log_g.numel() == 0:
        return torch.zeros((o, n_in if in_groups is None else in_groups[1]), dtype=torch.float64, device=log_g.device)
    rows = log_g.reshape(o, n_in, -1)
    step = max(1, _ROWS_CHUNK // max(1, rows[0].numel()))
    sums = []
    for start in range(0, o, step):
        block = rows[start:start + step]
        value = torch.isfinite(block).to(torch.float64) if positive else torch.sub(block, top).exp_()
        value = value.sum(-1)
        if in_groups is not None:
            inv_in, n_groups = in_groups
            value = torch.zeros((value.shape[0], n_groups), dtype=value.dtype, device=value.device).index_add_(1, inv_in, value)
        sums.append(value)
    return torch.cat(sums)


def _role_blocks(role: Role, log_g: torch.Tensor, dense_min: float) -> tuple[tuple | DenseBlocks, float]:
    """The blocks of one parameter tensor and Σ ln g over its entries with g > 0.

    The blocks are (out, in, Σ g / e^top, count, count of g > 0, top), or the same blocks as a
    ``DenseBlocks`` matrix. Boolean masks over the whole tensor are avoided where no g is 0: on
    full-size networks they cost more than everything else here; and the sums run a block of output
    rows at a time (:func:`_row_sums`)."""
    device = log_g.device
    # both extremes in one pass over the tensor (max gives the scale, min = -inf says some g is 0)
    lo, hi = (float(v) for v in torch.aminmax(log_g)) if log_g.numel() else (math.inf, -math.inf)
    top, has_zero = hi, lo == -math.inf
    if top == -math.inf:
        top = 0.0
    sum_log = float(torch.where(torch.isfinite(log_g), log_g, 0.0).sum()) if has_zero else float(log_g.sum())
    out_idx = role.out_idx.to(device)
    o = len(out_idx)  # per-channel tensors may carry unit axes: count channels, not shape[0]
    n_in = 1 if role.in_idx is None else role.in_idx.shape[-1] if role.in_idx.dim() == 2 else role.in_idx.shape[0]
    per_entry = log_g.numel() // max(o * n_in, 1)  # parameters per (out channel, in entry): kernel size

    if role.in_idx is None or role.in_idx.dim() == 2:  # bias, BN, diag, grouped conv: per (o, i') entry
        in_idx = torch.zeros((o, 1), dtype=torch.int64, device=device) if role.in_idx is None else role.in_idx.to(device)
        count = torch.full((o * n_in,), float(per_entry), dtype=torch.float64, device=device)
        pos = count if not has_zero else _row_sums(log_g, o, n_in, top, positive=True).reshape(-1)
        outs = out_idx[:, None].expand_as(in_idx).reshape(-1)
        return (outs, in_idx.reshape(-1), _row_sums(log_g, o, n_in, top).reshape(-1), count, pos, top), sum_log
    in_idx = role.in_idx.to(device)  # dense weight: collapse input channels, then output channels
    uniq_in, inv_in = torch.unique(in_idx, return_inverse=True)
    uniq_out, inv_out = torch.unique(out_idx, return_inverse=True)

    def collapse(positive: bool) -> torch.Tensor:
        m = _row_sums(log_g, o, n_in, top, (inv_in, len(uniq_in)), positive)
        return torch.zeros((len(uniq_out), len(uniq_in)), dtype=m.dtype, device=device).index_add_(0, inv_out, m)

    count = torch.outer(  # (channels of out group) × (entries of in group) × kernel size
        torch.bincount(inv_out, minlength=len(uniq_out)).to(torch.float64),
        torch.bincount(inv_in, minlength=len(uniq_in)).to(torch.float64) * per_entry,
    )
    reduced = [collapse(False), count, count if not has_zero else collapse(True)]
    disjoint = not bool(torch.isin(uniq_out, uniq_in).any())
    if disjoint and len(uniq_out) * len(uniq_in) >= dense_min and bool(reduced[0].gt(0).any()):
        return _dense(uniq_out, uniq_in, reduced, top), sum_log
    outs = uniq_out[:, None].expand(len(uniq_out), len(uniq_in)).reshape(-1)
    ins = uniq_in[None, :].expand(len(uniq_out), len(uniq_in)).reshape(-1)
    return (outs, ins, *(m.reshape(-1) for m in reduced), top), sum_log


def build_blocks(
    roles: Sequence[Role],
    log_g: Sequence[torch.Tensor],
    n_groups: int,
    levels: torch.Tensor | None = None,
    dense_min: float = DENSE_MIN_BLOCKS,
) -> Blocks:
    """Aggregate per-parameter ln g into blocks of equal (out group, in group).

    Dense weights whose output and input groups are distinct and that make at least ``dense_min``
    blocks are kept as matrices (``math.inf``: never; 0: always)."""
    results = [_role_blocks(r, lg.to(torch.float64), dense_min) for r, lg in zip(roles, log_g)]
    sum_log = sum(r[1] for r in results)
    dense = [p for p, _ in results if isinstance(p, DenseBlocks)]
    parts = [p for p, _ in results if not isinstance(p, DenseBlocks)]
    device = log_g[0].device if log_g else torch.device("cpu")
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return Blocks(empty.long(), empty.long(), empty, empty, empty, sum_log, n_groups, levels, dense)
    out = torch.cat([p[0] for p in parts])
    inn = torch.cat([p[1] for p in parts])
    log_vals = torch.cat([torch.log(p[2]) + p[5] for p in parts])
    key = out * (n_groups + 1) + inn
    uniq, inv = torch.unique(key, return_inverse=True)
    nb = len(uniq)
    merged = scatter_logsumexp(log_vals, inv, nb)
    count = torch.zeros(nb, dtype=torch.float64, device=device).scatter_add(0, inv, torch.cat([p[3] for p in parts]))
    pos = torch.zeros(nb, dtype=torch.float64, device=device).scatter_add(0, inv, torch.cat([p[4] for p in parts]))
    return Blocks(uniq // (n_groups + 1), uniq % (n_groups + 1), merged, count, pos, sum_log, n_groups, levels, dense)


# --------------------------------------------------------------------------------------------------
# The objective and the closed-form coordinate minimisers


def _positive_root_log(log_a: torch.Tensor, b: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """ln x for the positive root of a·x² + b·x − c = 0 (a, c > 0), stable in log space."""
    log_abs_b = torch.log(b.abs())
    log_q = LOG2 + 0.5 * (log_a + log_c)  # q = 2√(ac)
    top = torch.maximum(log_abs_b, log_q)
    p, q = torch.exp(log_abs_b - top), torch.exp(log_q - top)
    log_l = top + torch.log(p + torch.hypot(p, q))  # ln(|b| + √(b² + 4ac))
    return torch.where(b >= 0, LOG2 + log_c - log_l, log_l - LOG2 - log_a)


Part = slice | torch.Tensor | None  # some rows (columns) of a dense matrix: a slice or positions; None: all
TINY = 1e-300  # floor of a dense row/column sum before its log (reached only on a > ~350 log-scale spread)


@dataclass
class _State:
    """Precomputed per-problem tensors.

    ``k`` and ``G`` count only parameters with g > 0 (MATH §5): a parameter with g = 0 adds −∞ to
    ln det whatever u is, so counting it would optimise another function than the reported score."""

    blocks: Blocks
    fixed: torch.Tensor  # (H+1,) bool: pinned (index 0) or degenerate
    k: torch.Tensor  # (H+1,) float64, n_in − n_out over parameters with g > 0
    G: float  # parameters with g > 0
    pos_mask: torch.Tensor  # blocks with g > 0
    cross: torch.Tensor  # blocks with out != in
    a_index: torch.Tensor = field(init=False)  # group of every incoming-mass term (cross blocks, dense rows)
    c_index: torch.Tensor = field(init=False)  # group of every outgoing-mass term (cross blocks, dense columns)

    cross_out: torch.Tensor = field(init=False)  # out group of every cross pair block
    cross_in: torch.Tensor = field(init=False)
    cross_log_g: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        b = self.blocks
        self.cross_out, self.cross_in, self.cross_log_g = b.out[self.cross], b.inn[self.cross], b.log_g[self.cross]
        self.a_index = torch.cat([self.cross_out] + [d.out[d.rows] for d in b.dense])
        self.c_index = torch.cat([self.cross_in] + [d.inn[d.cols] for d in b.dense])

    def block_logs(self, u: torch.Tensor) -> torch.Tensor:
        b = self.blocks
        return b.log_g - 2.0 * (u[b.out] - u[b.inn])

    @staticmethod
    def dense_rows(d: DenseBlocks, u: torch.Tensor, part: Part = None) -> torch.Tensor:
        """ln of each kept row's rescaled mass: the incoming mass A of its out group from this weight
        (only the kept rows ``part`` when given)."""
        rows = d.rows if part is None else d.rows[part]
        by_row, log_max = (d.by_row, d.log_row_max) if part is None else (d.by_row[part], d.log_row_max[part])
        u_out, u_in = u[d.out[rows]], u[d.inn[d.cols]]
        shift = u_in.detach().max()
        total = by_row @ torch.exp(2.0 * (u_in - shift))
        return log_max + torch.log(total.clamp_min(TINY)) + 2.0 * (shift - u_out)

    @staticmethod
    def dense_cols(d: DenseBlocks, u: torch.Tensor, part: Part = None) -> torch.Tensor:
        """ln of each kept column's rescaled mass: the outgoing mass C of its in group into this weight
        (only the kept columns ``part`` when given)."""
        cols = d.cols if part is None else d.cols[part]
        by_col, log_max = (d.by_col, d.log_col_max) if part is None else (d.by_col[:, part], d.log_col_max[part])
        u_out, u_in = u[d.out[d.rows]], u[d.inn[cols]]
        shift = u_out.detach().min()
        total = torch.exp(-2.0 * (u_out - shift)) @ by_col
        return log_max + torch.log(total.clamp_min(TINY)) + 2.0 * (u_in - shift)

    def log_total(self, u: torch.Tensor) -> torch.Tensor:
        """ln S, S = Σ g̃ over every parameter (differentiable in u)."""
        terms = [self.block_logs(u)[self.pos_mask]] + [self.dense_rows(d, u) for d in self.blocks.dense]
        return torch.logsumexp(torch.cat(terms), 0)

    def f(self, u: torch.Tensor) -> torch.Tensor:
        """F(u) = G₊·ln S + 2 Σ_j k_j u_j = G₊·ln(AM/GM of the positive g̃) + const (MATH §5)."""
        linear = 2.0 * (self.k * u).sum()
        return linear if self.G == 0 else self.G * self.log_total(u) + linear

    def objective(self, u: torch.Tensor) -> float:
        return float(self.f(u))

    def log_score(self, u: torch.Tensor) -> float:
        """ln(AM/GM) of the rescaled diagonal over parameters with g > 0."""
        b = self.blocks
        gp = self.G
        if gp == 0:
            return 0.0
        log_s = float(self.log_total(u))
        mean_log = (b.sum_log_g_pos - 2.0 * float((self.k * u).sum())) / gp
        return max(0.0, log_s - math.log(gp) - mean_log)

    def group_sums(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ln A, ln C, ln S): incoming and outgoing mass per group, total mass."""
        b, n = self.blocks, self.blocks.n_groups + 1
        lv = self.block_logs(u)
        lv_cross = lv[self.cross]
        rows = [self.dense_rows(d, u) for d in b.dense]
        cols = [self.dense_cols(d, u) for d in b.dense]
        log_a = scatter_logsumexp(torch.cat([lv_cross] + rows), self.a_index, n)
        log_c = scatter_logsumexp(torch.cat([lv_cross] + cols), self.c_index, n)
        return log_a, log_c, torch.logsumexp(torch.cat([lv] + rows), 0)

    def coordinate_log_x(self, u: torch.Tensor) -> torch.Tensor:
        """ln x of the exact coordinate minimiser of every group at ``u`` (MATH §6); 0 on fixed groups."""
        return self.coordinates(u)[0]

    def coordinates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``coordinate_log_x(u)``, ln S at ``u``): the stopping rule and F from one pass over the blocks."""
        log_a, log_c, log_s = self.group_sums(u)
        # R = S − A − C (the mass that does not move with u_j), ≥ 0 up to rounding
        rel = torch.exp(log_a - log_s) + torch.exp(log_c - log_s)
        log_r = log_s + torch.log1p(-torch.clamp(rel, max=1.0))
        G, k = self.G, self.k
        b = k * torch.exp(log_r)
        log_x = _positive_root_log(torch.log(G + k) + log_c, b, torch.log(G - k) + log_a)
        return torch.where(self.fixed, torch.zeros_like(log_x), log_x), log_s

    def f_from_log_total(self, u: torch.Tensor, log_s: torch.Tensor | float) -> float:
        """F(u) given ln S at u (see ``f``)."""
        linear = 2.0 * float((self.k * u).sum())
        return linear if self.G == 0 else self.G * float(log_s) + linear

    def bcd_step(self, u: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        """One exact block update of the groups in ``colour`` (mutually independent)."""
        log_a, log_c, log_s = self.group_sums(u)
        log_lam = math.log(self.G) - log_s
        log_x = _positive_root_log(log_lam + log_c, self.k, log_lam + log_a)
        step = torch.where(colour, 0.5 * log_x, torch.zeros_like(log_x))
        return u + step


def _prepare(blocks: Blocks) -> tuple[_State, list[tuple[int, str]]]:
    """Counts per group, and the groups with no incoming or outgoing mass (pinned as degenerate)."""
    n = blocks.n_groups + 1
    dev = blocks.device
    zeros = torch.zeros(n, dtype=torch.float64, device=dev)
    k = zeros.scatter_add(0, blocks.out, blocks.count_pos).scatter_add(0, blocks.inn, -blocks.count_pos)
    for d in blocks.dense:
        k = k.scatter_add(0, d.out, d.pos_out).scatter_add(0, d.inn, -d.pos_in)
    cross = blocks.out != blocks.inn
    pos = torch.isfinite(blocks.log_g)
    state = _State(blocks, torch.zeros(n, dtype=torch.bool, device=dev), k, float(blocks.n_params_pos), pos, cross)
    log_a, log_c, _ = state.group_sums(torch.zeros(n, dtype=torch.float64, device=dev))
    no_in, no_out = ~torch.isfinite(log_a), ~torch.isfinite(log_c)
    fixed = no_in | no_out
    fixed[0] = True
    degenerate = [
        (j, "dead unit: g = 0 on all its incoming parameters (its outgoing weights are all zero)"
         if bool(no_in[j]) else "dead unit: g = 0 on all its outgoing weights (nothing reaches it)")
        for j in (torch.nonzero(fixed[1:]).reshape(-1) + 1).tolist()
    ]
    state.fixed = fixed
    return state, degenerate


# --------------------------------------------------------------------------------------------------
# Colouring: groups that share a block may not move together


def colour_classes(blocks: Blocks, fixed: torch.Tensor) -> list[torch.Tensor]:
    """Boolean masks of independent sets covering the free groups.

    Groups are first coloured by level (``blocks.levels``: groups of one level never share a block
    unless the level conflicts with itself), which keeps the Python work proportional to the number of
    levels; a level that conflicts with itself is coloured group by group.
    """
    n = blocks.n_groups + 1
    free = ~fixed
    levels = blocks.levels.cpu() if blocks.levels is not None else torch.arange(n)
    pairs = torch.cat([torch.stack([blocks.out, blocks.inn], 1).cpu()] + [_dense_pairs(d, free.cpu(), levels) for d in blocks.dense])
    a, b = pairs[:, 0].to(free.device), pairs[:, 1].to(free.device)
    pairs = pairs[((a != b) & free[a] & free[b]).cpu()]
    level_pairs = torch.unique(levels[pairs], dim=0) if len(pairs) else torch.zeros((0, 2), dtype=torch.int64)
    self_conflict = {int(a) for a, b in level_pairs.tolist() if a == b}
    level_colour = _greedy({(a, b) for a, b in level_pairs.tolist() if a != b}, sorted(set(levels[free.cpu()].tolist())))
    fine = torch.zeros(n, dtype=torch.int64)
    if self_conflict:
        inner = [(a, b) for a, b in pairs.tolist() if int(levels[a]) == int(levels[b]) and int(levels[a]) in self_conflict]
        members = [j for j in range(n) if bool(free[j]) and int(levels[j]) in self_conflict]
        for j, c in _greedy(set(inner), members).items():
            fine[j] = c
    width = int(fine.max()) + 1
    colour = torch.tensor([level_colour.get(int(levels[j]), 0) for j in range(n)]) * width + fine
    colour = colour.to(fixed.device)
    return [free & (colour == c) for c in torch.unique(colour[free]).tolist()]


def _dense_pairs(d: DenseBlocks, free: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(out, in) pairs of a dense weight that decide the colouring: every pair when some level is on
    both sides (it conflicts with itself), else one representative group per level on each side."""
    outs, ins = d.out.cpu(), d.inn.cpu()
    outs, ins = outs[free[outs]], ins[free[ins]]
    if bool(torch.isin(levels[outs], levels[ins]).any()):
        return torch.cartesian_prod(outs, ins).reshape(-1, 2)

    def representatives(groups: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(levels[groups], return_inverse=True)
        return torch.zeros(len(uniq), dtype=groups.dtype).scatter_(0, inverse, groups)

    return torch.cartesian_prod(representatives(outs), representatives(ins)).reshape(-1, 2)


def _greedy(edges: set[tuple[int, int]], vertices: list[int]) -> dict[int, int]:
    neighbours: dict[int, set[int]] = {v: set() for v in vertices}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    colour: dict[int, int] = {}
    for v in vertices:
        taken = {colour[w] for w in neighbours[v] if w in colour}
        colour[v] = next(c for c in range(len(taken) + 1) if c not in taken)
    return colour


# --------------------------------------------------------------------------------------------------
# Bounds: every rescaled parameter stays finite and normal in its stored dtype

#: how far above the smallest normal value the lower bound stays: 2 (enough for the rounding of exp and the
#: cast); the upper bound is √max (:func:`dtype_log_range`)
BOTTOM_MARGIN = LOG2


def dtype_log_range(dtype: torch.dtype) -> tuple[float, float]:
    """[ln L, ln U] for rescaled parameters of a floating dtype: L = 2·tiny (normal numbers), U = √max.

    The top leaves as much room again for the activations: a hidden unit's activations are multiplied by
    its λ like its bias, and sums over a layer's inputs add to them. A parameter bound of max/16 let a
    float32 net whose last layers were scaled by 1e-20 get first-layer weights of 2e37, and activations
    of 1e38 that overflowed to inf on inputs a few times larger than verification's (float32: U = 1.8e19;
    float16: 256; float64: 1.3e154)."""
    info = torch.finfo(dtype)
    return math.log(info.tiny) + BOTTOM_MARGIN, 0.5 * math.log(info.max)


@dataclass
class DiffBounds:
    """Constraints lo ≤ u[out] − u[in] ≤ hi, one per (out group, in group) block of a parameter tensor
    with a nonzero entry; lo ≤ 0 ≤ hi, so u = 0 satisfies all of them."""

    out: torch.Tensor  # (m,) int64
    inn: torch.Tensor  # (m,) int64
    lo: torch.Tensor  # (m,) float64
    hi: torch.Tensor  # (m,) float64

    def violation(self, u: torch.Tensor) -> float:
        """The largest amount by which u breaks a constraint (0 when it keeps all of them)."""
        if not len(self.out):
            return 0.0
        d = u[self.out] - u[self.inn]
        return float(torch.maximum(self.lo - d, d - self.hi).clamp_min(0.0).max())

    def shrink(self, u: torch.Tensor) -> torch.Tensor:
        """t·u with the largest t ∈ [0, 1] that keeps every constraint. F is convex and u = 0 is
        feasible, so F(t·u) ≤ max(F(0), F(u)): starting there never raises the score."""
        if not bool(torch.isfinite(u).all()):
            return torch.zeros_like(u)
        d = u[self.out] - u[self.inn]
        one = torch.ones_like(d)
        ratio = torch.where(d > self.hi, self.hi / d, torch.where(d < self.lo, self.lo / d, one))
        t = float(ratio.min()) if len(d) else 1.0
        return u if t >= 1.0 else u * (t * (1.0 - 1e-9))  # a hair inside: rounding must not cross a bound

    def intervals(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) per group: where u_j may go with every other coordinate held."""
        n = len(u)
        u_out, u_in = u[self.out], u[self.inn]
        low = torch.full((n,), -math.inf, dtype=u.dtype, device=u.device)
        low = low.scatter_reduce(0, self.out, self.lo + u_in, "amax").scatter_reduce(0, self.inn, u_out - self.hi, "amax")
        high = torch.full((n,), math.inf, dtype=u.dtype, device=u.device)
        high = high.scatter_reduce(0, self.out, self.hi + u_in, "amin").scatter_reduce(0, self.inn, u_out - self.lo, "amin")
        return low, high

    def clip(self, u: torch.Tensor, target: torch.Tensor, move: torch.Tensor) -> torch.Tensor:
        """``target`` on the groups in ``move`` (mutually independent), each clipped to its interval."""
        low, high = self.intervals(u)
        return torch.where(move, torch.minimum(torch.maximum(target, low), high), u)


def _magnitude(value: torch.Tensor) -> torch.Tensor:
    """|value|, a new tensor; 8-bit floats as float32 (exact: torch has no min, max or inf for them)."""
    value = value.detach()
    return value.float().abs() if value.dtype.itemsize == 1 else value.abs()


@dataclass
class ParamBox:
    """The stored parameter tensors behind the roles, for the bounds of the rescaling.

    Parameter i of a tensor stored in dtype D becomes θ_i·e^{(Bu)_i}; it must stay within D's normal
    range [L, U] (``dtype_log_range``): ln|θ_i| + (Bu)_i ∈ [L, U]. A value above U may not grow (u = 0
    stays feasible). A value already below L (subnormal, or within the margin of it) is not held at the
    low end: it is below the dtype's normal numbers already, and holding it would freeze most float16
    checkpoints (a random float16 initialisation holds weights below 16·tiny ≈ 1e-3 in most layers).
    Only the tensor-wide extremes are computed up front; the per-block constraints are built only when
    a solution breaks them."""

    roles: Sequence[Role]
    values: Sequence[torch.Tensor]
    log_min: list[float] = field(init=False)  # ln of the smallest |θ| ≥ e^L per role (inf: none)
    log_max: list[float] = field(init=False)  # ln of the largest |θ| (−inf: all zero)
    ranges: list[tuple[float, float]] = field(init=False)  # the dtype's [L, U] per role

    def __post_init__(self) -> None:
        self.log_min, self.log_max, self.ranges = [], [], []
        for role, value in zip(self.roles, self.values):
            if not value.dtype.is_floating_point:  # a front end lets no such tensor through: never a math error
                dtype = str(value.dtype).removeprefix("torch.")
                raise UnsupportedModelError(f"parameter {role.key!r} is stored as {dtype}, not as a floating-point "
                                            "tensor: pathcond cannot rescale it")
            lo_hi = dtype_log_range(value.dtype)
            floor = math.exp(lo_hi[0])
            magnitude = _magnitude(value)
            bottom, top = (float(x) for x in torch.aminmax(magnitude)) if magnitude.numel() else (0.0, 0.0)
            if bottom < floor:  # zeros stay zero and values below L are not held: the smallest held value
                bottom = float(magnitude.masked_fill_(magnitude < floor, math.inf).min()) if top >= floor else math.inf
            self.log_min.append(math.log(bottom) if bottom < math.inf else math.inf)
            self.log_max.append(math.log(top) if top > 0 else -math.inf)
            self.ranges.append(lo_hi)

    def _limits(self, r: int) -> tuple[float, float]:
        """(lo, hi) on (Bu) for role r from its extremes: lo ≤ 0 ≤ hi."""
        low, high = self.ranges[r]
        return low - self.log_min[r], max(high - self.log_max[r], 0.0)

    def surely_inside(self, u: torch.Tensor) -> bool:
        """A sufficient check per tensor: its extremes moved by the extremes of its (Bu) stay inside."""
        for r, role in enumerate(self.roles):
            if self.log_max[r] == -math.inf:
                continue
            u_out = u[role.out_idx.to(u.device)]
            u_in = u[role.in_idx.to(u.device)] if role.in_idx is not None else torch.zeros(1, dtype=u.dtype, device=u.device)
            lo, hi = self._limits(r)
            if float(u_out.max() - u_in.min()) > hi or float(u_out.min() - u_in.max()) < lo:
                return False
        return True

    def constraints(self, device: torch.device) -> DiffBounds:
        """One constraint per (out group, in group) block with a nonzero entry (exact: every entry of a
        block shares its factor, so the block's smallest and largest |θ| decide)."""
        parts = [self._role_constraints(r, role, device) for r, role in enumerate(self.roles)
                 if self.log_max[r] > -math.inf]
        if not parts:
            empty = torch.zeros(0, dtype=torch.float64, device=device)
            return DiffBounds(empty.long(), empty.long(), empty, empty)
        out, inn, lo, hi = (torch.cat(x) for x in zip(*parts))
        keep = out != inn
        return DiffBounds(out[keep], inn[keep], lo[keep], hi[keep])

    def _role_constraints(self, r: int, role: Role, device: torch.device) -> tuple[torch.Tensor, ...]:
        magnitude = _magnitude(self.values[r].detach().to(device))
        out_idx = role.out_idx.to(device)
        o = len(out_idx)
        n_in = 1 if role.in_idx is None else role.in_idx.shape[-1]
        low, high = self.ranges[r]
        top = magnitude.reshape(o, n_in, -1).amax(-1).double()
        bottom = magnitude.masked_fill_(magnitude < math.exp(low), math.inf).reshape(o, n_in, -1).amin(-1).double()
        if role.in_idx is None or role.in_idx.dim() == 2:  # bias, BN, diag, grouped conv: per (o, i') entry
            ins = torch.zeros((o, 1), dtype=torch.int64, device=device) if role.in_idx is None else role.in_idx.to(device)
            outs = out_idx[:, None].expand_as(ins)
        else:  # dense weight: reduce over the channels of each (out group, in group) block
            uniq_in, inv_in = torch.unique(role.in_idx.to(device), return_inverse=True)
            uniq_out, inv_out = torch.unique(out_idx, return_inverse=True)

            def reduce(m: torch.Tensor, how: str, fill: float) -> torch.Tensor:
                cols = torch.full((o, len(uniq_in)), fill, dtype=m.dtype, device=device)
                m = cols.scatter_reduce(1, inv_in[None, :].expand_as(m), m, how)
                rows = torch.full((len(uniq_out), len(uniq_in)), fill, dtype=m.dtype, device=device)
                return rows.scatter_reduce(0, inv_out[:, None].expand_as(m), m, how)

            top, bottom = reduce(top, "amax", 0.0), reduce(bottom, "amin", math.inf)
            outs = uniq_out[:, None].expand(len(uniq_out), len(uniq_in))
            ins = uniq_in[None, :].expand(len(uniq_out), len(uniq_in))
        lo = torch.clamp(low - torch.log(bottom), max=0.0)  # −inf where no value is held at the low end
        hi = torch.clamp(high - torch.log(top), min=0.0)
        nonzero = top.reshape(-1) > 0
        return outs.reshape(-1)[nonzero], ins.reshape(-1)[nonzero], lo.reshape(-1)[nonzero], hi.reshape(-1)[nonzero]


def level_order(blocks: Blocks, classes: list[torch.Tensor]) -> list[torch.Tensor]:
    """The colour classes split by level and sorted front to back: a Gauss–Seidel sweep in topological
    order carries a layer-wide "ramp" through the whole depth in one pass (MATH §6)."""
    if blocks.levels is None:
        return classes
    levels = blocks.levels.to(classes[0].device) if classes else blocks.levels
    parts = []
    for colour in classes:
        for level in torch.unique(levels[colour]).tolist():
            parts.append((level, colour & (levels == level)))
    parts.sort(key=lambda p: p[0])
    return [mask for _, mask in parts]


# --------------------------------------------------------------------------------------------------
# The layered sweep: Gauss–Seidel over layers, front to back, and a coarse correction per sweep

@dataclass
class _Batch:
    """Mutually independent groups moved at once by the layered sweep, with the blocks incident to them.

    ``a_*`` are the blocks whose out group is in the batch (its incoming mass A), ``c_*`` those whose in
    group is (its outgoing mass C), each with its group's position in ``groups`` (``*_local``). No block
    joins two groups of one batch."""

    groups: torch.Tensor  # (m,) int64
    k: torch.Tensor  # (m,) float64
    a_pairs: torch.Tensor  # positions among the cross pair blocks
    a_local: torch.Tensor
    c_pairs: torch.Tensor
    c_local: torch.Tensor
    a_dense: list[tuple[int, Part, torch.Tensor]] = field(default_factory=list)  # (matrix, its rows here, local)
    c_dense: list[tuple[int, Part, torch.Tensor]] = field(default_factory=list)  # (matrix, its columns here, local)


def _part(positions: torch.Tensor, total: int) -> Part:
    """Sorted ``positions`` among ``total``: None when they are all of them, a slice when contiguous."""
    if len(positions) == total:
        return None
    first, last = int(positions[0]), int(positions[-1])
    return slice(first, last + 1) if last - first + 1 == len(positions) else positions


class _Layered:
    """The default method: layer-ordered Gauss–Seidel sweeps, each followed by a coarse correction.

    *Batches* are the colour classes split by level (a group's first value in the DAG: residual and
    concat groups sit where they start), taken front to back: all groups of one layer at once, then the
    next layer. A batch's groups share no block, so their exact steps at λ = G/S are independent; they
    need A and C over the blocks incident to the batch only, and S is carried from batch to batch (the
    mass a batch does not touch does not move). A sweep costs about two passes over the blocks whatever
    the depth, plus one for the coarse correction.

    Coordinate steps, in any order, shrink the smooth modes across layers (every group of a layer
    shifted by one amount, varying slowly along the depth: the "ramp" of deep chains) by only
    ~1 − π²/L² per sweep on L layers when the diagonal is nearly balanced (Kaiming initialisation):
    hundreds of sweeps on a 16-layer MLP. So after each sweep the *coarse correction* moves every batch
    as a whole by the exact minimiser of F over those shifts (``_newton_small`` on the same criterion
    with one group per batch, ``coarse_masses``). Both only ever lower F."""

    COARSE_MAX = 512  # more batches than this: neighbours share a coarse group (its Newton system is dense)
    RECOMPUTE_BELOW = math.log(1e-6)  # a step that leaves less than this share of S: S from every block

    def __init__(self, state: _State):
        self.state = state
        b, dev = state.blocks, state.blocks.device
        n = b.n_groups + 1
        masks = level_order(b, colour_classes(b, state.fixed))
        batch_of = torch.full((n,), -1, dtype=torch.int64, device=dev)
        local = torch.zeros(n, dtype=torch.int64, device=dev)
        for i, mask in enumerate(masks):
            batch_of[mask] = i
            local[mask] = torch.arange(int(mask.sum()), device=dev)
        # coarse group: 0 for fixed groups, else 1 + the batch, neighbouring batches merged beyond COARSE_MAX
        merged = batch_of if len(masks) <= self.COARSE_MAX else torch.div(batch_of * self.COARSE_MAX, len(masks),
                                                                         rounding_mode="floor")
        self.coarse_of = torch.where(batch_of < 0, 0, merged + 1)
        self.n_coarse = min(len(masks), self.COARSE_MAX) + 1
        a_pairs = self._split(batch_of[state.cross_out], len(masks))
        c_pairs = self._split(batch_of[state.cross_in], len(masks))
        self.batches = [
            _Batch(groups, state.k[groups], a_pairs[i], local[state.cross_out[a_pairs[i]]], c_pairs[i],
                   local[state.cross_in[c_pairs[i]]])
            for i, groups in enumerate(torch.nonzero(m).reshape(-1) for m in masks)
        ]
        for j, d in enumerate(b.dense):
            for groups, side in ((d.out[d.rows], "a_dense"), (d.inn[d.cols], "c_dense")):
                batch = batch_of[groups]
                order = torch.argsort(batch, stable=True)
                present, counts = torch.unique_consecutive(batch[order], return_counts=True)
                for i, p in zip(present.tolist(), torch.split(order, counts.tolist())):
                    if i >= 0:
                        getattr(self.batches[i], side).append((j, _part(p, len(groups)), local[groups[p]]))

    @staticmethod
    def _split(batch: torch.Tensor, n_batches: int) -> list[torch.Tensor]:
        """Positions of ``batch`` grouped by value 0..n_batches−1, each sorted (−1: in no batch)."""
        order = torch.argsort(batch, stable=True)
        counts = torch.bincount(batch[order] + 1, minlength=n_batches + 1).tolist()
        return list(torch.split(order, counts))[1:]

    def sweep(self, u: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        """One pass over the batches front to back from ``u`` (ln S = ``log_s`` there), then the coarse
        correction."""
        u = u.clone()
        for batch in self.batches:
            log_s = self.step(u, batch, log_s)
        return self.coarse(u)

    def step(self, u: torch.Tensor, batch: _Batch, log_s: torch.Tensor) -> torch.Tensor:
        """The exact block step of the batch's groups at λ = G/S (``u`` updated in place; MATH §6, the
        vectorised form); returns ln S after it: the mass R the batch does not touch plus its blocks' new
        mass, A_j/x_j and C_j·x_j per group. (Solving for the λ at which the batch's minimum is reached
        instead changes no sweep count measured: the coarse correction takes care of λ as well.)"""
        log_a, log_c = self.masses(u, batch)
        log_lam = math.log(self.state.G) - log_s
        log_x = _positive_root_log(log_lam + log_c, batch.k, log_lam + log_a)
        u[batch.groups] += 0.5 * log_x
        touched = torch.logsumexp(torch.cat([log_a, log_c]), 0)
        log_r = log_s + torch.log1p(-torch.exp(touched - log_s).clamp(max=1.0))  # ≥ 0 up to rounding
        new = torch.logaddexp(log_r, torch.logsumexp(torch.cat([log_a - log_x, log_c + log_x]), 0))
        if float(new - log_s) < self.RECOMPUTE_BELOW:  # R by difference lost its digits: sum every block
            return self.state.log_total(u)
        return new

    def masses(self, u: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ln A, ln C) of the batch's groups at ``u``, from the blocks incident to the batch."""
        state, dense, m = self.state, self.state.blocks.dense, len(batch.groups)

        def pair_logs(pairs: torch.Tensor) -> torch.Tensor:
            return state.cross_log_g[pairs] - 2.0 * (u[state.cross_out[pairs]] - u[state.cross_in[pairs]])

        a_terms, a_index = [pair_logs(batch.a_pairs)], [batch.a_local]
        c_terms, c_index = [pair_logs(batch.c_pairs)], [batch.c_local]
        for j, part, where in batch.a_dense:
            a_terms.append(_State.dense_rows(dense[j], u, part))
            a_index.append(where)
        for j, part, where in batch.c_dense:
            c_terms.append(_State.dense_cols(dense[j], u, part))
            c_index.append(where)
        log_a = scatter_logsumexp(torch.cat(a_terms), torch.cat(a_index), m)
        log_c = scatter_logsumexp(torch.cat(c_terms), torch.cat(c_index), m)
        return log_a, log_c

    def coarse(self, u: torch.Tensor) -> torch.Tensor:
        """``u`` with every batch shifted as a whole by the exact minimiser of F over such shifts."""
        out, inn, log_m = self.coarse_masses(u)
        k = torch.zeros(self.n_coarse, dtype=u.dtype, device=u.device).scatter_add(0, self.coarse_of, self.state.k)
        shift = _newton_small(out, inn, log_m, k, self.state.G)
        return u + shift[self.coarse_of]

    def coarse_masses(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The coarse problem's blocks at ``u``: (out batch, in batch, ln of their mass), coarse indices
        (0: the fixed groups). A dense matrix is summed per column batch with one product."""
        state, b, n = self.state, self.state.blocks, self.n_coarse
        c = self.coarse_of
        terms, keys = [state.block_logs(u)], [c[b.out] * n + c[b.inn]]
        for d in b.dense:
            rows, cols = c[d.out[d.rows]], c[d.inn[d.cols]]
            u_out, u_in = u[d.out[d.rows]], u[d.inn[d.cols]]
            shift = u_in.max()
            kinds, which = torch.unique(cols, return_inverse=True)
            spread = torch.zeros((len(cols), len(kinds)), dtype=u.dtype, device=u.device)
            spread[torch.arange(len(cols), device=u.device), which] = torch.exp(2.0 * (u_in - shift))
            per = torch.log((d.by_row @ spread).clamp_min(TINY))  # (rows, column batches)
            terms.append((d.log_row_max[:, None] + per + 2.0 * (shift - u_out)[:, None]).reshape(-1))
            keys.append((rows[:, None] * n + kinds[None, :]).reshape(-1))
        keys_all = torch.cat(keys)
        uniq, inverse = torch.unique(keys_all, return_inverse=True)
        log_m = scatter_logsumexp(torch.cat(terms), inverse, len(uniq))
        return uniq // n, uniq % n, log_m


NEWTON_MAX_STEP = 4.0  # the longest step of ``_newton_small`` in ln λ (masses change by at most e^±8)


def _newton_small(out: torch.Tensor, inn: torch.Tensor, log_m: torch.Tensor, k: torch.Tensor, G: float,
                  iterations: int = 100) -> torch.Tensor:
    """argmin over s (s[0] = 0) of G·ln Σ_b m_b e^{−2(s[out_b] − s[inn_b])} + 2 Σ_p k_p s_p: the PathCond
    criterion of a small problem given by its blocks, by Newton's method with a backtracking line search
    (the Hessian is G times 4·Cov_w(e_out − e_in), w the blocks' shares of the total: dense, n × n)."""
    n = len(k)
    s = torch.zeros(n, dtype=log_m.dtype, device=log_m.device)

    def value(s: torch.Tensor) -> tuple[float, torch.Tensor]:
        logs = log_m - 2.0 * (s[out] - s[inn])
        log_total = torch.logsumexp(logs, 0)
        return float(G * log_total + 2.0 * (k * s).sum()), torch.exp(logs - log_total)

    f, w = value(s)
    eye = torch.eye(n - 1, dtype=s.dtype, device=s.device)
    for _ in range(iterations):
        w_mat = torch.zeros((n, n), dtype=s.dtype, device=s.device).index_put_((out, inn), w, accumulate=True)
        r, c = w_mat.sum(1), w_mat.sum(0)
        v = r - c
        grad = (2.0 * k - 2.0 * G * v)[1:]
        hess = (4.0 * G * (torch.diag(r + c) - w_mat - w_mat.T - torch.outer(v, v)))[1:, 1:]
        ridge = 1e-12 * float(hess.diagonal().abs().max()) + 1e-300
        step = torch.zeros_like(s)
        try:
            step[1:] = -torch.linalg.solve(hess + ridge * eye, grad)
        except torch.linalg.LinAlgError:  # only with non-finite entries: keep the sweep's point
            break
        decrement = float(-(grad * step[1:]).sum())
        if not decrement > 1e-12 * max(G, 1.0):
            break
        # far from the minimum F is nearly linear along a batch whose mass is mostly on one side: the
        # Hessian is tiny there and the Newton step huge, so no step moves more than MAX_STEP
        longest = float(step.abs().max())
        if longest > NEWTON_MAX_STEP:
            step *= NEWTON_MAX_STEP / longest
            decrement = float(-(grad * step[1:]).sum())
        t = 1.0
        while True:
            f_new, w_new = value(s + t * step)
            if f_new <= f - 0.25 * t * decrement:
                s, f, w = s + t * step, f_new, w_new
                break
            t *= 0.5
            if t < 1e-10:
                return s
    return s


# --------------------------------------------------------------------------------------------------
# Solving


@dataclass
class Solution:
    u: torch.Tensor  # (H+1,) ln of the factor per group; u[0] = 0
    objective_before: float
    objective_after: float
    log_score_before: float
    log_score_after: float
    sweeps: int
    converged: bool
    max_abs_log_x: float
    method: str
    history: list[float] = field(default_factory=list)
    degenerate: list[tuple[int, str]] = field(default_factory=list)  # (group, why) pinned by the solver
    bounds_active: bool = False  # the unbounded optimum left a dtype's range: the solve was bounded
    bounded_groups: int = 0  # groups whose exact coordinate step a bound cuts at the solution

    @property
    def max_abs_log_scale(self) -> float:
        return float(self.u.abs().max()) if self.u.numel() else 0.0


Progress = Callable[[int, float, float], None]  # (sweep, F, max |ln x|)

METHODS = ("auto", "bcd", "sequential", "lbfgs")


def solve(
    blocks: Blocks,
    *,
    method: str = "auto",
    tol: float = 1e-3,
    max_sweeps: int = 2000,
    progress: Progress | None = None,
    box: ParamBox | None = None,
) -> Solution:
    """Minimise F over the free groups; stop when every coordinate is optimal within ``tol``.

    With ``box``, the rescaled parameters must stay finite and normal in their stored dtypes. The
    unbounded solve runs first (the common case, at full speed); only when its optimum leaves the box
    is the solve redone from its largest feasible shrink t·u with exact coordinate steps clipped to
    each group's interval (a bounded optimum: every clipped step is within ``tol``)."""
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}")
    state, degenerate = _prepare(blocks)
    n = blocks.n_groups + 1
    u = torch.zeros(n, dtype=torch.float64, device=blocks.device)
    f0, s0 = state.objective(u), state.log_score(u)
    run = _Run(state, tol, max_sweeps, progress)
    if bool((~state.fixed).any()):
        if method == "sequential":
            u = run.sequential(u)
        elif method == "auto":
            u = run.layered(u)
        else:
            u = run.bcd(u, warmup=(method == "lbfgs"))
            if method == "lbfgs" and not run.converged:
                u = run.quasi_newton(u)
    limits = None
    if box is not None and bool((~state.fixed).any()) and not box.surely_inside(u):
        limits = box.constraints(blocks.device)
        if limits.violation(u) > 0:
            u = run.bounded(limits.shrink(u), limits)
        else:
            limits = None
    return Solution(
        u=u,
        objective_before=f0,
        objective_after=state.objective(u),
        log_score_before=s0,
        log_score_after=state.log_score(u),
        sweeps=run.sweeps,
        converged=run.converged or not bool((~state.fixed).any()),
        max_abs_log_x=run.last_gap,
        method=method,
        history=run.history,
        degenerate=degenerate,
        bounds_active=limits is not None,
        bounded_groups=0 if limits is None else run.bounded_groups(u),
    )


class _Run:
    """Bookkeeping shared by the methods: sweeps, F history, stopping rule."""

    WARMUP_SWEEPS = 5
    STALL = 1e-15  # relative decrease of F below which a method has stalled
    PLATEAU, PLATEAU_STEPS = 0.9, 3  # L-BFGS hands over to BCD after 3 steps without a 10% better gap

    def __init__(self, state: _State, tol: float, max_sweeps: int, progress: Progress | None):
        self.state, self.tol, self.max_sweeps, self.progress = state, tol, max_sweeps, progress
        self.sweeps, self.history, self.converged, self.last_gap = 0, [], False, math.inf
        self.stopped = False  # the last record() said stop
        self.last_f: float | None = None  # F at the last record() of the current phase
        self.limits: DiffBounds | None = None  # set for the bounded solve: gaps are clipped steps
        self.log_s = torch.tensor(0.0)  # ln S at the last record()

    def steps(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact coordinate ln x, the same step clipped to each group's interval) at ``u``."""
        log_x = self.state.coordinate_log_x(u)
        return log_x, self.clip_steps(u, log_x)

    def clip_steps(self, u: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
        """The exact coordinate steps ``log_x`` at ``u``, each clipped to its group's interval."""
        if self.limits is None:
            return log_x
        return 2.0 * (self.limits.clip(u, u + 0.5 * log_x, ~self.state.fixed) - u)

    def bounded_groups(self, u: torch.Tensor) -> int:
        raw, clipped = self.steps(u)
        return int(((raw - clipped).abs() > self.tol).sum())

    def record(self, u: torch.Tensor, passes: int = 1) -> bool:
        """Count ``passes`` sweeps' worth of work; True when the method should stop (optimal, stalled,
        or out of sweeps)."""
        log_x, log_s = self.state.coordinates(u)
        f = self.state.f_from_log_total(u, log_s)
        self.log_s = log_s
        gap = float(self.clip_steps(u, log_x).abs().max())
        stalled = self.last_f is not None and self.last_f - f <= self.STALL * max(1.0, abs(f))
        self.last_f = f
        self.sweeps += passes
        self.history.append(f)
        self.last_gap = gap
        self.converged = gap <= self.tol
        if self.progress:
            self.progress(self.sweeps, f, gap)
        self.stopped = self.converged or stalled or self.sweeps >= self.max_sweeps
        return self.stopped

    def layered(self, u: torch.Tensor) -> torch.Tensor:
        """Layer-ordered Gauss–Seidel sweeps (``_Layered``) until the stopping rule holds."""
        sweeper = _Layered(self.state)
        log_s = self.state.log_total(u)
        while True:
            u = sweeper.sweep(u, log_s)
            if self.record(u):
                return u
            log_s = self.log_s  # exact at the start of every sweep

    def bcd(self, u: torch.Tensor, warmup: bool) -> torch.Tensor:
        colours = colour_classes(self.state.blocks, self.state.fixed)
        limit = self.WARMUP_SWEEPS if warmup else self.max_sweeps
        for _ in range(limit):
            for colour in colours:
                u = self.state.bcd_step(u, colour)
            if self.record(u):
                break
        return u

    PENALTIES = (1e2, 1e4, 1e6, 1e8)  # weights of the squared constraint violations, in turn

    def bounded(self, u: torch.Tensor, limits: DiffBounds) -> torch.Tensor:
        """The minimum of F under ``limits`` from a feasible ``u``.

        Clipped coordinate steps alone can stop short: two groups held by a bound between them may only
        improve F by moving together, which no single coordinate step does. So after clipped BCD, L-BFGS
        minimises F plus growing penalties on the violations (its path may leave the box), the result is
        shrunk back into the box, and clipped BCD finishes from there; the better feasible point wins.
        Both runs only ever lower F, so the score never rises."""
        self.limits = limits
        self.max_sweeps = self.sweeps + self.max_sweeps  # a budget of its own
        first = self.clipped_bcd(u, limits)
        second = self.clipped_bcd(limits.shrink(self.penalised(first, limits)), limits)
        best = first if self.state.objective(first) <= self.state.objective(second) else second
        self.last_f = None
        self.record(best, passes=0)  # the figures of the point returned
        return best

    def clipped_bcd(self, u: torch.Tensor, limits: DiffBounds) -> torch.Tensor:
        """Exact block coordinate descent with every step clipped to its group's interval, from a
        feasible ``u``; colour classes in topological order, alternately forwards and backwards. F is
        convex in each u_j, so the clipped closed-form step is the exact constrained coordinate step."""
        self.converged, self.last_f = False, None  # the stall test compares within this run only
        classes = level_order(self.state.blocks, colour_classes(self.state.blocks, self.state.fixed))
        while True:
            for colour in classes:
                u = limits.clip(u, self.state.bcd_step(u, colour), colour)
            classes.reverse()
            if self.record(u):
                return u

    def penalised(self, u: torch.Tensor, limits: DiffBounds) -> torch.Tensor:
        """L-BFGS on F/G + ρ·Σ (violation)² for each ρ in ``PENALTIES`` (the result may sit just outside)."""
        state, free = self.state, ~self.state.fixed
        x = u[free].clone().requires_grad_(True)

        def full(xv: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(u).masked_scatter(free, xv)

        for rho in self.PENALTIES:
            opt = torch.optim.LBFGS([x], lr=1.0, max_iter=200, history_size=30, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-15)
            evaluations = [0]

            def closure():
                evaluations[0] += 1
                opt.zero_grad()
                uu = full(x)
                d = uu[limits.out] - uu[limits.inn]
                excess = torch.relu(d - limits.hi) + torch.relu(limits.lo - d)
                f = state.f(uu) / state.G + rho * (excess * excess).sum()
                f.backward()
                return f

            opt.step(closure)
            self.sweeps += evaluations[0]
        return full(x.detach())

    def sequential(self, u: torch.Tensor) -> torch.Tensor:
        free = [int(j) for j in torch.nonzero(~self.state.fixed).reshape(-1)]
        while True:
            for j in free:
                log_x = self.state.coordinate_log_x(u)[j]
                u = u.clone()
                u[j] += 0.5 * log_x
            if self.record(u):
                return u

    def quasi_newton(self, u: torch.Tensor) -> torch.Tensor:
        """L-BFGS, handing over to a few exact BCD sweeps whenever its optimality gap stops falling,
        then BCD to the end (at least one sweep).

        L-BFGS removes the slow "ramp" of deep chains, but it crawls on a coordinate whose mass is tiny
        against S (its gradient is tiny while its ln x is not): a few exact coordinate steps fix that."""
        while True:
            u, plateau = self.lbfgs(u)
            if not plateau:
                break
            u = self.bcd(u, warmup=True)
            if self.stopped:
                break
        return self.bcd(u, warmup=False)  # at least one exact sweep to finish, as before

    def lbfgs(self, u: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Quasi-Newton steps on the smooth convex F over the free groups, until the stopping rule
        holds or ``PLATEAU_STEPS`` L-BFGS steps in a row leave the optimality gap above ``PLATEAU`` times
        its best value so far (then True). The gap is not monotone under L-BFGS: one bad step is not a
        plateau."""
        state = self.state
        free = ~state.fixed
        x = u[free].clone().requires_grad_(True)

        def full(xv: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(u).masked_scatter(free, xv)

        evaluations = [0]

        def closure():
            evaluations[0] += 1
            opt.zero_grad()
            uu = full(x)
            f = state.f(uu) / state.G  # O(1) scale for the line search tolerances
            f.backward()
            return f

        opt = torch.optim.LBFGS(
            [x], lr=1.0, max_iter=20, history_size=30, line_search_fn="strong_wolfe",
            tolerance_grad=0.0, tolerance_change=0.0,
        )
        best, since_best = self.last_gap, 0
        while True:
            evaluations[0] = 0
            opt.step(closure)
            uu = full(x.detach())
            if self.record(uu, passes=evaluations[0]):
                return uu, False
            if self.last_gap < self.PLATEAU * best:
                best, since_best = self.last_gap, 0
            else:
                since_best += 1
                if since_best >= self.PLATEAU_STEPS:
                    return uu, True


__all__ = [
    "Blocks", "DenseBlocks", "DiffBounds", "ParamBox", "Solution", "build_blocks", "colour_classes",
    "dtype_log_range", "scatter_logsumexp", "solve",
]
