"""Does PathCond help training? Baseline vs rescaled, same init, same batches, plain SGD (issue 12).

Offline: scikit-learn's bundled digits (8x8 images, 1,797 samples) and a synthetic teacher-student task.
For every (task, net) and seed, one network is built, a copy is rescaled in place with
:func:`pathcond_cli.api.rescale_module_` (the function it computes is unchanged), and both arms are trained
from those weights with plain SGD (batch 128, no momentum, no weight decay), on the same batch order,
over a learning-rate grid. Reported per arm:

* ``best lr``: the grid value with the fewest mean steps to the loss target (then the lowest final loss);
* ``fixed lr``: one learning rate for both arms (``--fixed-lr``), the usual way a rescaling is tried;
* steps to the loss target (full training-set cross-entropy, checked every ``--eval-every`` steps;
  the target is ``--target`` times the initial loss), how many seeds reached it, the final training
  loss and the final test accuracy, mean ± std over seeds; ``speed`` = baseline steps / rescaled steps
  (> 1: the rescaled net got there first). Diverged runs (non-finite loss) count as never reaching it.

Prints the table and writes a PNG of the training-loss curves (mean ± std over seeds).
Needs the bench extra: ``pip install -e ".[bench]"`` (scikit-learn, matplotlib).

    python benchmarks/bench_training.py                 # the default run (`make bench-training`)
    python benchmarks/bench_training.py --quick         # a smoke run in well under a minute

The default run takes about 280 s of CPU time on one thread (8 min wall measured on a 2-core machine
shared with other jobs, 57 % of a core).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pathcond_cli.api import rescale_module_


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image: bool  # (N, 1, 8, 8) inputs can feed the CNN


def digits_task(images: bool = False) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    mean, std = x[:1437].mean(0), x[:1437].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return Task("digits", x[:1437], y[:1437], x[1437:], y[1437:], images)


def teacher_task(n_train: int = 2000, n_test: int = 1000, dim: int = 64, classes: int = 10) -> Task:
    """Labels are the argmax of a random ReLU teacher 64-128-10 on Gaussian inputs."""
    gen = torch.Generator().manual_seed(4321)
    x = torch.randn(n_train + n_test, dim, generator=gen)
    w1 = torch.randn(128, dim, generator=gen) / math.sqrt(dim)
    w2 = torch.randn(classes, 128, generator=gen) / math.sqrt(128)
    y = (torch.relu(x @ w1.T) @ w2.T).argmax(1)
    return Task("teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:], False)


# -- networks ----------------------------------------------------------------------------------------
def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@dataclass
class Config:
    task: str
    net: str
    build: object  # () -> nn.Module
    input_shape: tuple[int, ...]


def configs(quick: bool) -> list[Config]:
    uneven = [64, 1000, 50, 1000, 10] if not quick else [64, 500, 20, 500, 10]
    uneven_name = "-".join(map(str, uneven))
    out = [
        Config("digits", f"MLP {uneven_name}", lambda: mlp(uneven), (1, 64)),
        Config("digits", "MLP 64-128-128-128-10", lambda: mlp([64, 128, 128, 128, 10]), (1, 64)),
        Config("digits", "CNN+BN 8-16-32", cnn_bn, (1, 1, 8, 8)),
        Config("teacher", "MLP 64-1000-20-1000-10", lambda: mlp([64, 1000, 20, 1000, 10]), (1, 64)),
    ]
    return out[:2] if quick else out


# -- training ----------------------------------------------------------------------------------------
@dataclass
class Run:
    curve: list[float]  # full training loss at steps 0, e, 2e, ...
    final_loss: float
    test_acc: float

    def steps_to(self, target: float, every: int) -> float:
        for k, loss in enumerate(self.curve):
            if not math.isfinite(loss):
                return math.inf
            if loss <= target:
                return k * every
        return math.inf


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        value = float(nn.functional.cross_entropy(model(x), y))
    model.train()
    return value


def train(model: nn.Module, task: Task, lr: float, steps: int, every: int, seed: int, batch: int) -> Run:
    """Plain SGD on a batch order fixed by ``seed`` (the same in both arms)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(task.x_train)
    order = torch.randperm(n, generator=gen)
    pos, curve = 0, [full_loss(model, task.x_train, task.y_train)]
    model.train()
    for step in range(1, steps + 1):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
        if not torch.isfinite(loss):
            curve += [math.inf] * (steps // every + 1 - len(curve))
            return Run(curve, math.inf, float("nan"))
        loss.backward()
        opt.step()
        if step % every == 0:
            curve.append(full_loss(model, task.x_train, task.y_train))
    model.eval()
    with torch.no_grad():
        acc = float((model(task.x_test).argmax(1) == task.y_test).float().mean())
    return Run(curve, curve[-1], acc)


# -- the experiment -------------------------------------------------------------------------------------
@dataclass
class Result:
    config: Config
    target: float
    runs: dict[tuple[str, float], list[Run]] = field(default_factory=dict)  # (arm, lr) -> one per seed
    rescale_s: float = 0.0
    score_drop: float = 0.0
    relative_step: str = ""
    steps_per_epoch: float = 0.0


def run_config(cfg: Config, task: Task, args) -> Result:
    pairs = []
    res = Result(cfg, 0.0, steps_per_epoch=len(task.x_train) / 128)
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = cfg.build()
        rescaled = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = rescale_module_(rescaled, cfg.input_shape, device="cpu")
        res.rescale_s += time.perf_counter() - t0
        cond = report["conditioning"]
        res.score_drop = cond["log10_score_before"] - cond["log10_score_after"]
        res.relative_step = _relative_steps(report)
        pairs.append((base, rescaled))
    init = statistics.mean(full_loss(b, task.x_train, task.y_train) for b, _ in pairs)
    res.target = args.target * init
    for lr in sorted(set(args.lrs) | {args.fixed_lr}):
        for arm, k in (("baseline", 0), ("rescaled", 1)):
            res.runs[arm, lr] = [train(copy.deepcopy(p[k]), task, lr, args.steps, args.eval_every, seed, 128)
                                 for seed, p in enumerate(pairs)]
    return res


def _relative_steps(report: dict) -> str:
    """The per-layer geometric-mean relative-step factors of the report, when it carries them."""
    rows = [(r["node"], r.get("relative_step", {}).get("geo_mean")) for r in report.get("layers", [])]
    rows = [(n, f) for n, f in rows if f is not None]
    if not rows:
        return ""
    lo, hi = min(rows, key=lambda r: r[1]), max(rows, key=lambda r: r[1])
    return f"x{lo[1]:.2g} ({lo[0]}) .. x{hi[1]:.2g} ({hi[0]})"


def mean_std(values: list[float], fmt: str = "{:.0f}") -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{fmt.format(statistics.mean(finite))} ± {fmt.format(sd)}"


def summary(res: Result, arm: str, lr: float, every: int) -> dict:
    runs = res.runs[arm, lr]
    steps = [r.steps_to(res.target, every) for r in runs]
    reached = [s for s in steps if math.isfinite(s)]
    return {
        "steps": steps, "reached": len(reached), "n": len(runs),
        "mean_steps": statistics.mean(reached) if len(reached) == len(runs) else math.inf,
        "final": [r.final_loss for r in runs], "acc": [r.test_acc for r in runs],
    }


def best_lr(res: Result, arm: str, lrs: list[float], every: int) -> float:
    def key(lr: float):
        s = summary(res, arm, lr, every)
        finals = [f for f in s["final"] if math.isfinite(f)]
        return (-s["reached"], s["mean_steps"] if math.isfinite(s["mean_steps"]) else
                statistics.mean([x for x in s["steps"] if math.isfinite(x)] or [math.inf]),
                statistics.mean(finals) if len(finals) == len(s["final"]) else math.inf)
    return min(lrs, key=key)


def speed(base: dict, resc: dict) -> str:
    if math.isfinite(base["mean_steps"]) and math.isfinite(resc["mean_steps"]) and resc["mean_steps"] > 0:
        return f"{base['mean_steps'] / resc['mean_steps']:.2f}x"
    if math.isfinite(resc["mean_steps"]):
        return "only rescaled"
    if math.isfinite(base["mean_steps"]):
        return "only baseline"
    return "-"


def table(results: list[Result], args) -> list[str]:
    head = (f"{'task':8} {'net':24} {'lr rule':9} {'arm':9} {'lr':>6} {'steps to target':>16} {'reached':>7} "
            f"{'final loss':>15} {'test acc':>15} {'speed':>13}")
    lines = [head, "-" * len(head)]
    for res in results:
        rows = []
        b_best, r_best = best_lr(res, "baseline", args.lrs, args.eval_every), best_lr(res, "rescaled", args.lrs,
                                                                                      args.eval_every)
        for rule, lrs in (("fixed", (args.fixed_lr, args.fixed_lr)), ("best", (b_best, r_best))):
            b, r = summary(res, "baseline", lrs[0], args.eval_every), summary(res, "rescaled", lrs[1], args.eval_every)
            for arm, lr, s in (("baseline", lrs[0], b), ("rescaled", lrs[1], r)):
                rows.append(f"{res.config.task:8} {res.config.net:24} {rule:9} {arm:9} {lr:>6g} "
                            f"{mean_std(s['steps']):>16} {s['reached']:>3}/{s['n']:<3} "
                            f"{mean_std(s['final'], '{:.3f}'):>15} {mean_std(s['acc'], '{:.3f}'):>15} "
                            f"{speed(b, r) if arm == 'rescaled' else '':>13}")
        lines += rows
        epoch = res.steps_per_epoch
        lines.append(f"{'':8} score drop 10^{res.score_drop:.2f}, relative steps {res.relative_step}, "
                     f"loss target {res.target:.3f}, {epoch:.1f} steps per epoch, "
                     f"rescale {res.rescale_s / args.seeds:.2f}s per net")
    return lines


def lr_table(results: list[Result], args) -> list[str]:
    """Final training loss at every learning rate, baseline / rescaled (mean over seeds; "div k" when k
    seeds diverged): where each arm stops training."""
    lrs = sorted(set(args.lrs) | {args.fixed_lr})
    head = f"{'task':8} {'net':24} " + " ".join(f"{f'lr {lr:g}':>15}" for lr in lrs)
    lines = ["final training loss, baseline / rescaled", head, "-" * len(head)]
    for res in results:
        cells = []
        for lr in lrs:
            pair = []
            for arm in ("baseline", "rescaled"):
                finals = [r.final_loss for r in res.runs[arm, lr]]
                bad = sum(not math.isfinite(f) for f in finals)
                pair.append(f"div {bad}" if bad else f"{statistics.mean(finals):.3f}")
            cells.append(f"{' / '.join(pair):>15}")
        lines.append(f"{res.config.task:8} {res.config.net:24} " + " ".join(cells))
    return lines


def plot(results: list[Result], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        b_best, r_best = best_lr(res, "baseline", args.lrs, args.eval_every), best_lr(res, "rescaled", args.lrs,
                                                                                      args.eval_every)
        for ax, (rule, lrs) in zip(row, (("fixed lr", (args.fixed_lr, args.fixed_lr)), ("best lr", (b_best, r_best)))):
            for arm, lr, color in (("baseline", lrs[0], "tab:blue"), ("rescaled", lrs[1], "tab:orange")):
                curves = np.array([r.curve for r in res.runs[arm, lr]], dtype=float)
                curves[~np.isfinite(curves)] = np.nan
                steps = np.arange(curves.shape[1]) * args.eval_every
                mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
                ax.plot(steps, mean, color=color, label=f"{arm} (lr {lr:g})")
                ax.fill_between(steps, np.clip(mean - std, 1e-4, None), mean + std, color=color, alpha=0.25)
            ax.axhline(res.target, color="grey", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_title(f"{res.config.task}, {res.config.net}: {rule}", fontsize=9)
            ax.set_xlabel("SGD step")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 nets, 2 seeds, 3 lrs, 120 steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lrs", type=float, nargs="+", default=None)
    parser.add_argument("--fixed-lr", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.25, help="loss target, as a fraction of the initial loss")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--png", type=Path, default=Path("build/bench_training.png"))
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.steps = args.steps or (120 if args.quick else 300)
    args.lrs = args.lrs or ([0.01, 0.05, 0.2] if args.quick else [0.03, 0.1, 0.3, 1.0])
    torch.set_num_threads(args.threads)
    tasks = {"digits": digits_task(), "digits-img": digits_task(images=True), "teacher": teacher_task()}
    start, results = time.perf_counter(), []
    for cfg in configs(args.quick):
        task = tasks["digits-img" if cfg.net.startswith("CNN") else cfg.task]
        t0 = time.perf_counter()
        results.append(run_config(cfg, task, args))
        print(f"[{cfg.task} {cfg.net}: {time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
    print(f"plain SGD, batch 128, {args.steps} steps, {args.seeds} seeds, lr grid {args.lrs}, fixed lr "
          f"{args.fixed_lr}, loss target {args.target} x initial loss, torch threads {args.threads}")
    print("\n".join(table(results, args)))
    print()
    print("\n".join(lr_table(results, args)))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args, args.png)
    print(f"loss curves: {args.png}; total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
