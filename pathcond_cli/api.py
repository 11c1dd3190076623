"""Python API for training scripts: inspect or rescale an ``nn.Module`` before its first step.

    import pathcond_cli as pc

    model = build_model()
    stats = pc.inspect_module(model, (1, 3, 32, 32))
    result = pc.rescale_module_(model, (1, 3, 32, 32))   # in place, verified, returns the report
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)   # create the optimizer afterwards

The graph comes from ``torch.export`` of the module (never from the order in which layers were
registered), through the same engine as the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .analysis import Analysis, analyze, rescaled_params
from .errors import VerificationError
from .report import build_report

Shape = Sequence[int]


def _translation(module: nn.Module, input_shape: Shape | dict[str, Shape]):
    from .frontends.torch_frontend import module_translation

    shapes = input_shape if isinstance(input_shape, dict) else [tuple(input_shape)]
    return module_translation(module, shapes)


def _analyze(module: nn.Module, input_shape, device: str, tol: float, max_sweeps: int) -> tuple[Analysis, dict[str, int]]:
    """The analysis and the IR keys held in another layout than the module's (see ``stored_layout``)."""
    was_training = module.training
    module.eval()
    try:
        tr = _translation(module, input_shape)
        return analyze(tr.graph, device=device, tol=tol, max_sweeps=max_sweeps), dict(tr.swapped)
    finally:
        module.train(was_training)


def _module_info(module: nn.Module) -> dict[str, Any]:
    return {"path": None, "sha256": None, "format": f"nn.Module ({type(module).__name__})"}


def inspect_module(
    module: nn.Module, input_shape: Shape | dict[str, Shape], *, device: str = "auto", tol: float = 1e-3,
    max_sweeps: int = 2000,
) -> dict[str, Any]:
    """Path statistics and the conditioning score before/after the optimal rescaling (the same report as
    ``pathcond inspect --json``). ``input_shape`` is the shape of one example input, batch 1 included."""
    analysis, _ = _analyze(module, input_shape, device, tol, max_sweeps)
    return build_report(analysis, input_info=_module_info(module), timings=analysis.timings)


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor by state_dict name (tied names included), non-persistent buffers too: a live module
    can take new values for those, unlike a file."""
    return {**dict(module.named_buffers(remove_duplicate=False)), **module.state_dict(keep_vars=True)}


def _copy_into(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    tensors = _state_tensors(module)
    with torch.no_grad():
        for key, value in values.items():
            tensors[key].copy_(value)


def _outputs(module: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    flat = list(out) if isinstance(out, (tuple, list)) else [out]
    return [t.detach().double().clone() for t in flat]


def rescale_module_(
    module: nn.Module, input_shape: Shape | dict[str, Shape], *, device: str = "auto", tol: float = 1e-3,
    max_sweeps: int = 2000, rtol: float | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Rescale ``module``'s parameters in place with the optimal PathCond rescaling; the function it
    computes is unchanged (checked on seeded random inputs in eval mode; on failure the original values
    are restored and :class:`~pathcond_cli.errors.VerificationError` is raised). Returns the report,
    with ``changed`` listing the state_dict entries that were rescaled.

    Create the optimizer after calling this: optimizer state refers to the old parametrisation.
    """
    from .verify import default_rtol

    from .frontends.torch_frontend import stored_layout

    analysis, swapped = _analyze(module, input_shape, device, tol, max_sweeps)
    new = stored_layout(rescaled_params(analysis), swapped)
    shapes = list(input_shape.values()) if isinstance(input_shape, dict) else [tuple(input_shape)]
    gen = torch.Generator().manual_seed(seed)
    first = next(iter(_state_tensors(module).values()), torch.zeros(()))
    inputs = [torch.randn(tuple(s), generator=gen).to(first.device, first.dtype) for s in shapes]
    was_training = module.training
    module.eval()
    try:
        before = _outputs(module, inputs)
        originals = {k: v.detach().clone() for k, v in _state_tensors(module).items() if k in new}
        _copy_into(module, new)
        after = _outputs(module, inputs)
    finally:
        module.train(was_training)
    tolerance = default_rtol(analysis.graph.params) if rtol is None else rtol
    worst = max((float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)) for a, b in zip(before, after)), default=0.0)
    if worst > tolerance:
        _copy_into(module, originals)
        raise VerificationError(f"rescaling changed the module's outputs (relative error {worst:.3g} > {tolerance:.3g}); "
                                "the original parameters were restored")
    report = build_report(analysis, input_info=_module_info(module), timings=analysis.timings)
    report["changed"] = sorted(new)
    report["verification"] = {"passed": True, "max_rel_error": worst, "rtol": tolerance, "inputs": 1, "modes": ["eval"]}
    return report
