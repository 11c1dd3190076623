"""Regenerate the sample ONNX models of this folder.

Run from the repository root:  python sample_models/make_samples.py

Each model is exported with the TorchScript exporter (``dynamo=False``) in eval mode with
``do_constant_folding=False`` so that BatchNormalization stays a node of its own, and with a dynamic
batch axis. Seeds are fixed, so the files are reproducible for one torch version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests import nets  # noqa: E402

SAMPLES = {
    # name: (factory, input shape at batch 1)
    "mlp_uneven": (lambda: nets.mlp(seed=1, widths=(16, 64, 8, 32, 4)), (1, 16)),
    "small_cnn": (lambda: nets.small_cnn(seed=2), (1, 3, 16, 16)),
    "resnet_like": (lambda: nets.resnet_like(seed=3), (1, 3, 8, 8)),
}


def export(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> None:
    torch.onnx.export(
        model.eval(), (torch.zeros(shape),), str(path), dynamo=False, do_constant_folding=False,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
    )


def main() -> None:
    for name, (factory, shape) in SAMPLES.items():
        path = HERE / f"{name}.onnx"
        export(factory(), shape, path)
        print(f"wrote {path.relative_to(HERE.parent)} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
