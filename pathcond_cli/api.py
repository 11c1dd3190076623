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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .analysis import Analysis, analyze, rescaled_params
from .errors import VerificationError
from .frontends.base import InputSpec
from .report import build_report
from .timing import timed
from .verify import Runner, compare_cases, run_cases, verification_cases

if TYPE_CHECKING:
    from .frontends.torch_graph import Translation

Shape = Sequence[int]


def _translation(module: nn.Module, input_shape: Shape | dict[str, Shape], partial: bool = False):
    from .errors import UnsupportedModelError
    from .frontends.torch_module import module_translation
    from .segments import with_partial_hint

    try:
        return module_translation(module, _shapes(input_shape), partial=partial)
    except UnsupportedModelError as exc:
        raise with_partial_hint(exc) from None


def _shapes(input_shape: Shape | dict[str, Shape]) -> dict[str, Shape] | list[tuple[int, ...]]:
    return input_shape if isinstance(input_shape, dict) else [tuple(input_shape)]


def _analyze(module: nn.Module, input_shape, device: str, tol: float, max_sweeps: int,
             path_counts: bool, partial: bool = False) -> tuple[Analysis, Translation]:
    """The analysis and the translation it was made from (inputs, IR keys held in another layout)."""
    was_training = module.training
    module.eval()
    try:
        tr = _translation(module, input_shape, partial)
        return analyze(tr.graph, device=device, tol=tol, max_sweeps=max_sweeps, path_counts=path_counts), tr
    finally:
        module.train(was_training)


def _module_info(module: nn.Module) -> dict[str, Any]:
    return {"path": None, "sha256": None, "format": f"nn.Module ({type(module).__name__})"}


def inspect_module(
    module: nn.Module, input_shape: Shape | dict[str, Shape], *, device: str = "auto", tol: float = 1e-3,
    max_sweeps: int = 2000, partial: bool = False,
) -> dict[str, Any]:
    """Path statistics and the conditioning score before/after the optimal rescaling (the same report as
    ``pathcond inspect --json``). ``input_shape`` is the shape of one example input, batch 1 included.
    ``partial``: keep ops that are not positively homogeneous as opaque (``--partial``)."""
    analysis, _ = _analyze(module, input_shape, device, tol, max_sweeps, path_counts=True, partial=partial)
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


def _live_runner(module: nn.Module, specs: list[InputSpec], dtypes: list[torch.dtype]) -> Runner:
    """Run the module as it is now, like a file's runtime runs a file (:mod:`pathcond_cli.verify`).

    A training-mode run updates BatchNorm's running statistics (and any other buffer the module's code
    changes): every buffer is put back afterwards, so verifying leaves the module as it found it. The
    module's own training flag is restored too."""
    from .frontends.torch_module import as_model_inputs, flatten_outputs, reference_tensor

    device = reference_tensor(module).device

    def run(feeds, train: bool) -> list[np.ndarray]:
        args = as_model_inputs(specs, dtypes, feeds, device)
        buffers = [(b, b.detach().clone()) for b in module.buffers()] if train else []
        was_training = module.training
        module.train(train)
        try:
            with torch.no_grad():
                out = module(*args)
        finally:
            module.train(was_training)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return flatten_outputs(out)

    return run


def _cuda_devices(module: nn.Module) -> list[int]:
    """The CUDA devices the module's tensors are on (their random generators are seeded per run)."""
    return sorted({t.device.index or 0 for t in [*module.parameters(), *module.buffers()] if t.device.type == "cuda"})


def rescale_module_(
    module: nn.Module, input_shape: Shape | dict[str, Shape], *, device: str = "auto", tol: float = 1e-3,
    max_sweeps: int = 2000, rtol: float | None = None, verify_inputs: int = 3, seed: int = 0,
    partial: bool = False,
) -> dict[str, Any]:
    """Rescale ``module``'s parameters in place with the optimal PathCond rescaling; the function it
    computes is unchanged. Returns the report (the same schema as ``pathcond rescale``'s: the number of
    paths and the path-1 norm are null, :func:`inspect_module` gives them), with ``changed`` listing the
    state_dict entries that were rescaled.

    Verified like the CLI verifies a file: the module's outputs before and after, on ``verify_inputs``
    seeded random inputs in eval mode, plus one batch in training mode when it has BatchNorm (its
    running statistics are put back after that run). The tolerance defaults to that of the module's least
    precise dtype. On failure the original values are restored and
    :class:`~pathcond_cli.errors.VerificationError` is raised, carrying the report.

    ``partial``: keep ops that are not positively homogeneous (LayerNorm, attention, GELU, ...) unchanged as
    opaque and rescale the ReLU segments between them (``--partial``); their parameters are not touched.

    Create the optimizer after calling this: optimizer state refers to the old parametrisation.
    """
    from .frontends.torch_module import floating_dtypes, input_specs, ordered_shapes, stored_layout

    analysis, tr = _analyze(module, input_shape, device, tol, max_sweeps, path_counts=False, partial=partial)
    timings = dict(analysis.timings)
    new = stored_layout(rescaled_params(analysis), tr.swapped)
    _, full_shapes = ordered_shapes(module, _shapes(input_shape))
    specs = input_specs(tr, full_shapes)
    input_dtypes = [tr.input_dtypes.get(name, torch.float32) for name in tr.graph.inputs]
    runner = _live_runner(module, specs, input_dtypes)
    train = any(n.op == "batchnorm" for n in analysis.graph.nodes)
    cases = verification_cases(specs, n_inputs=verify_inputs, seed=seed, train=train)
    cuda = _cuda_devices(module)
    with timed(timings, "verify"):
        before = run_cases(runner, cases, cuda)  # the reference: before any value changes
        originals = {k: v.detach().clone() for k, v in _state_tensors(module).items() if k in new}
        _copy_into(module, new)
        try:
            after = run_cases(runner, cases, cuda)
            dtypes = floating_dtypes(_state_tensors(module).values()) | set(input_dtypes)
            result = compare_cases(cases, before, after, n_inputs=verify_inputs, rtol=rtol, dtypes=dtypes)
        except BaseException:
            _copy_into(module, originals)
            raise
    report = build_report(analysis, input_info=_module_info(module), verification=result, timings=timings)
    report["changed"] = sorted(new)
    if not result.passed:
        _copy_into(module, originals)
        raise VerificationError(
            f"rescaling changed the module's outputs: max relative error {result.max_rel_error:.3g} > rtol "
            f"{result.rtol:.3g}; the original parameters were restored", report)
    return report
