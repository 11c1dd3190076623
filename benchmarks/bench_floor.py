"""Floor benchmark: `pathcond rescale` against what no implementation can avoid, plus start-up and memory.

For each model (ONNX, exported in code from ``tests/torchvision_like.py`` with BatchNorm kept), in one
run and interleaved (floor, rescale, floor, rescale, ...), this times

* the **floor**, in a child process, from the first byte read to the last byte written: ``onnx.load``,
  one float64 forward and backward of the *squared* network in plain torch (every stored tensor
  squared, the module run on an all-ones input, ``backward`` to every squared parameter), ``onnx.save``;
* ``pathcond rescale IN OUT --force --json`` as a child process: wall time *including* Python and
  torch start-up, the stage timings of its report, and its peak resident memory (``os.wait4``'s
  ``ru_maxrss`` of that one child).

Each figure is the minimum over ``--repeats`` runs (timings on a shared machine only err upwards). It
prints rescale wall / floor wall (target <= 2.5x), the headline: rescale's wall includes Python and
torch start-up, the floor's does not. A second, clearly labelled ratio divides by the floor *as a
program*, its child process's wall (Python start-up, ``import torch`` and ``onnx``, building the module
on the meta device included), which is what a user would compare. It also prints peak RSS / (float32
size of the stored float tensors + file size) (target <= 3x), and the floor's own peak on the same scale:
one float64 squared forward keeps its activations for the backward, so on convolutional nets at 224x224
the floor alone is above 3x. The start-up figure is the wall time of ``pathcond inspect
sample_models/mlp_uneven.onnx`` minus that of ``python -c "import torch"`` (target <= 0.5 s). Both the
floor and ``rescale`` write a new file on every run (on some file systems rewriting an existing file in
place is several times faster than creating one). The peak RSS of ``python -c "import torch, onnx,
onnxruntime"`` is printed too: every process pays it, whatever the model, and each model's memory line
also gives both peaks beyond it.

Child processes run with Python's bytecode cache enabled (``PYTHONDONTWRITEBYTECODE`` is dropped from
their environment), as an installed package has its ``.pyc`` files: otherwise every run would compile
pathcond's own modules from source (about 0.1 s), which no user pays.

Run from the repository root: ``python benchmarks/bench_floor.py [--models resnet50 vgg16] [--repeats 2]``
(``resnet18`` and ``vgg16_quarter``, a VGG-16 with a quarter of the widths, are quick stand-ins).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "mlp_uneven.onnx"
TARGET_WALL, TARGET_RSS, TARGET_STARTUP = 2.5, 3.0, 0.5


def build(name: str):
    """The torch module of a benchmark model (eval mode), from tests/torchvision_like.py."""
    sys.path.insert(0, str(ROOT))
    from torch import nn

    from tests import torchvision_like as tv

    if name == "vgg16_quarter":
        cfg = [c // 4 if isinstance(c, int) else c for c in tv.VGG16_CFG]
        model = tv.VGG(cfg)
        model.classifier = nn.Sequential(nn.Linear(128 * 49, 1024), nn.ReLU(True), nn.Dropout(),
                                         nn.Linear(1024, 1024), nn.ReLU(True), nn.Dropout(), nn.Linear(1024, 1000))
        return model.eval()
    return getattr(tv, name)()


MODELS = ("resnet18", "resnet50", "vgg16", "vgg16_quarter")


def export(name: str, path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = build(name)
    with torch.no_grad():  # trained-like BatchNorm (fresh ones are all equal: the exporter would share them)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})


def floor(name: str, path: Path, out: Path) -> float:
    """The floor, timed from onnx.load to the end of onnx.save (start-up excluded)."""
    import onnx
    import torch
    from onnx import numpy_helper
    from torch.func import functional_call

    with torch.device("meta"):
        module = build(name)
    start = time.perf_counter()
    model = onnx.load(str(path))
    params = dict(module.named_parameters())
    names = params | dict(module.named_buffers())
    state = {}
    for tensor in model.graph.initializer:
        value = torch.from_numpy(numpy_helper.to_array(tensor).astype("float64"))
        state[tensor.name] = value.square_().requires_grad_(tensor.name in params)
    missing = [k for k in names if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"floor: {len(missing)} module tensors not in the ONNX file, e.g. {missing[:3]}")
    used = {k: v for k, v in state.items() if k in names}
    y = functional_call(module, used, (torch.ones(1, 3, 224, 224, dtype=torch.float64),))
    y.sum().backward()
    assert all(used[k].grad is not None for k in params)
    onnx.save(model, str(out))
    return time.perf_counter() - start


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, int, str, int]:
    """(wall s, peak RSS bytes, stdout, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    stdout = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, stdout.decode(), proc.returncode


def stored_float_bytes(path: Path) -> int:
    """float32 size of every floating tensor stored in the file (parameters and BatchNorm statistics)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    count = 0
    for t in model.graph.initializer:
        if t.data_type in floats:
            n = 1
            for d in t.dims:
                n *= d
            count += n
    return 4 * count


def startup(python: str, env: dict[str, str], repeats: int) -> tuple[float, float]:
    """(min wall of `pathcond inspect` on the sample, min wall of `import torch`), interleaved."""
    inspect, torch_only = [], []
    for _ in range(repeats):
        torch_only.append(run_child([python, "-c", "import torch"], env)[0])
        wall, _, _, code = run_child([python, "-m", "pathcond_cli", "inspect", str(SAMPLE), "--json"], env)
        if code != 0:
            raise SystemExit(f"pathcond inspect {SAMPLE} exited with {code}")
        inspect.append(wall)
    return min(inspect), min(torch_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"], choices=MODELS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--_floor", nargs=3, metavar=("NAME", "IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--_export", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._floor:  # a child: one floor measurement, printed as JSON
        print(json.dumps({"floor": floor(args._floor[0], Path(args._floor[1]), Path(args._floor[2]))}))
        return
    if args._export:  # a child, so that the exporter's memory is not the parent's
        export(args._export[0], Path(args._export[1]))
        return

    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # children cache bytecode, as an installed package has it
    print(f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, device {args.device}, min of {args.repeats} runs")
    with_start, torch_start = startup(python, env, max(args.repeats, 3))
    flag = "ok" if with_start - torch_start <= TARGET_STARTUP else "over target"
    print(f"start-up: inspect {SAMPLE.name} {with_start:.2f}s - import torch {torch_start:.2f}s = "
          f"{with_start - torch_start:.2f}s (target <= {TARGET_STARTUP}s: {flag})")
    libraries = min(run_child([python, "-c", "import torch, onnx, onnxruntime"], env)[1] for _ in range(2))
    print(f"libraries: peak RSS of python -c 'import torch, onnx, onnxruntime' {libraries / 2**30:.2f} GiB "
          "(in every process, whatever the model)")
    with tempfile.TemporaryDirectory(prefix="pathcond-bench-") as tmp:
        folder = Path(tmp)
        for name in args.models:
            src = folder / f"{name}.onnx"
            subprocess.run([python, __file__, "--_export", name, str(src)], check=True, env=env, cwd=ROOT,
                           stderr=subprocess.DEVNULL)
            floors, programs, rescales, rss, floor_rss, stages = [], [], [], [], [], {}
            for _ in range(args.repeats):
                (folder / "floor.onnx").unlink(missing_ok=True)  # a new file, as rescale writes one
                wall, peak, out, code = run_child([python, __file__, "--_floor", name, str(src), str(folder / "floor.onnx")], env)
                if code != 0:
                    raise SystemExit(f"floor run on {name} exited with {code}")
                floors.append(json.loads(out)["floor"])
                programs.append(wall)
                floor_rss.append(peak)
                argv = [python, "-m", "pathcond_cli", "rescale", str(src), str(folder / f"out-{name}.onnx"),
                        "--force", "--json", "--device", args.device]
                wall, peak, out, code = run_child(argv, env)
                if code != 0:
                    raise SystemExit(f"pathcond rescale on {name} exited with {code}")
                report = json.loads(out)
                rescales.append(wall)
                rss.append(peak)
                for key, value in report["timings"].items():
                    stages[key] = min(stages.get(key, float("inf")), value)
            base = stored_float_bytes(src) + src.stat().st_size
            f, r, m = min(floors), min(rescales), min(rss)
            print(f"\n{name}: {report['model']['parameters']:,} parameters, file {src.stat().st_size / 2**20:.0f} MiB")
            print(f"  floor   {f:7.2f}s  (peak RSS {min(floor_rss) / 2**30:.2f} GiB)   runs: "
                  + " ".join(f"{x:.2f}" for x in floors))
            print(f"  rescale {r:7.2f}s  wall incl. start-up   runs: " + " ".join(f"{x:.2f}" for x in rescales))
            print("  stages  " + "  ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
            print(f"  ratio   rescale / floor = {r / f:.2f}x (target <= {TARGET_WALL}x: "
                  f"{'ok' if r / f <= TARGET_WALL else 'over target'})")
            fp = min(programs)
            print(f"  ratio   rescale / floor as a program (its child's wall incl. start-up, {fp:.2f}s) = "
                  f"{r / fp:.2f}x (second figure: start-up counted on both sides)")
            print(f"  memory  peak RSS {m / 2**30:.2f} GiB / (float32 tensors + file) {base / 2**30:.2f} GiB = "
                  f"{m / base:.2f}x (target <= {TARGET_RSS}x: {'ok' if m / base <= TARGET_RSS else 'over target'}; "
                  f"the floor's own peak: {min(floor_rss) / base:.2f}x)")
            print(f"  memory  beyond the libraries: {(m - libraries) / base:.2f}x (the floor's: "
                  f"{(min(floor_rss) - libraries) / base:.2f}x)")
            src.unlink()


if __name__ == "__main__":
    main()
