"""End-to-end benchmark: `pathcond rescale` stages on torchvision-shaped models at 224x224.

Exports each model to ONNX and to a torch.export archive in a temporary folder, then runs the rescale
job on both and prints the time of every stage with the headline figures. Run from the repository root:
``python benchmarks/bench_models.py [--models resnet18 resnet50 vgg16] [--device auto]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathcond_cli.frontends.base import LoadOptions  # noqa: E402
from pathcond_cli.jobs import RescaleOptions, SolveOptions, rescale_model  # noqa: E402
from tests.torchvision_like import resnet18, resnet50, vgg16  # noqa: E402

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16}


def export(name: str, folder: Path) -> dict[str, Path]:
    model, x = MODELS[name](), torch.randn(1, 3, 224, 224)
    paths = {"onnx": folder / f"{name}.onnx", "pt2": folder / f"{name}.pt2"}
    torch.onnx.export(model, (x,), str(paths["onnx"]), dynamo=False, do_constant_folding=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    torch.export.save(torch.export.export(model, (x,)), str(paths["pt2"]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], choices=sorted(MODELS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            for fmt, path in export(name, folder).items():
                start = time.perf_counter()
                result = rescale_model(path, folder / f"out-{path.name}", LoadOptions(), SolveOptions(device=args.device),
                                       RescaleOptions(force=True))
                total = time.perf_counter() - start
                r = result.report
                stages = "  ".join(f"{k} {v:.2f}s" for k, v in r["timings"].items())
                print(f"{name:9s} {fmt:4s} {r['model']['parameters']:>11,} params  total {total:6.2f}s  {stages}")
                print(f"{'':15s}score {r['conditioning']['score_before']:.4g} -> {r['conditioning']['score_after']:.4g}, "
                      f"{r['conditioning']['sweeps']} sweeps, verification rel error "
                      f"{r['verification']['max_rel_error']:.2e}, device {r['device']}")


if __name__ == "__main__":
    main()
