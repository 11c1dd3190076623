"""``nn.Module`` / ``ExportedProgram`` -> IR, and tensors in and out of a torch runtime.

Shared by every torch file format (:mod:`.torch_formats`) and by the in-memory Python API
(:mod:`pathcond_cli.api`): tracing with ``torch.export`` at batch 1, the verification inputs a translated
model takes, its outputs as numpy arrays, and the layout parameters are stored in.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import Offender, UnsupportedModelError, UsageError
from ..ir import Graph, swap_group_axes
from .base import UNNAMED, InputSpec, name_lone_shape
from .torch_graph import Translation, translate

Shapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------------
# nn.Module / ExportedProgram -> IR


def _forward_arg_names(module: nn.Module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def reference_tensor(module: nn.Module) -> torch.Tensor:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return torch.zeros((), dtype=torch.float32)


def ordered_shapes(module: nn.Module, input_shapes: Shapes) -> tuple[list[str], list[tuple[int, ...]]]:
    """The forward's argument names and the shapes fed to them, in order."""
    argnames = _forward_arg_names(module)
    if isinstance(input_shapes, Mapping):
        return _named_shapes(module, argnames, input_shapes)
    shapes = [tuple(int(s) for s in shape) for shape in input_shapes]
    names = [argnames[i] if i < len(argnames) else f"input{i}" for i in range(len(shapes))]
    return names, shapes


def _named_shapes(module: nn.Module, argnames: list[str],
                  input_shapes: Mapping[str, Sequence[int]]) -> tuple[list[str], list[tuple[int, ...]]]:
    """Shapes given by argument name: a lone shape under any name is the first argument's; several
    must name a leading run of forward's arguments (the rest keep their defaults)."""
    _check_lone_shape(module, argnames, input_shapes)
    items = [(str(k), tuple(int(s) for s in v)) for k, v in input_shapes.items()]
    if len(items) == 1 and (items[0][0] not in argnames):
        return [argnames[0] if argnames else items[0][0]], [items[0][1]]
    missing = [k for k, _ in items if k not in argnames]
    if missing:
        raise UsageError(f"input(s) {', '.join(missing)} are not arguments of {type(module).__name__}.forward "
                         f"({', '.join(argnames) or 'no named arguments'})")
    given = dict(items)
    names = [n for n in argnames if n in given]
    if names != argnames[: len(names)]:
        raise UsageError(f"give shapes for the first {len(names)} arguments of forward in order: "
                         f"{', '.join(argnames[: len(names)])}")
    return names, [given[n] for n in names]


def _check_lone_shape(module: nn.Module, argnames: list[str], input_shapes: Mapping[str, Sequence[int]]) -> None:
    """A shape given without a name is the first argument's, unless forward requires more than one
    (which input would it be?): then a usage error."""
    if UNNAMED not in input_shapes:
        return
    params = inspect.signature(module.forward).parameters if argnames else {}
    required = [n for n in argnames if params[n].default is inspect.Parameter.empty]
    if len(required) > 1:
        name_lone_shape(input_shapes, required)  # raises


def _check_batch1(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
    for name, shape in zip(names, shapes):
        if len(shape) < 2:
            raise UsageError(f"input {name!r}: shape {shape} must be (1, C, ...) (batch first, channels on axis 1)")


def export_module(module: nn.Module, input_shapes: Shapes) -> tuple[torch.export.ExportedProgram, list[str]]:
    """``torch.export`` the module in eval mode on batch-1 example inputs (its training flag is restored)."""
    names, shapes = ordered_shapes(module, input_shapes)
    _check_batch1(names, shapes)
    ref = reference_tensor(module)
    args = tuple(torch.zeros((1, *s[1:]), dtype=ref.dtype, device=ref.device) for s in shapes)
    was_training = module.training
    module.eval()
    try:
        _dry_run(module, names, shapes, args)
        return _trace(module, args), names
    finally:
        module.train(was_training)


def _dry_run(module: nn.Module, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
             args: tuple[torch.Tensor, ...]) -> None:
    """Run the module once: a model that cannot even run on these inputs was given the wrong shape (a
    usage error), not an unsupported op."""
    try:
        with torch.no_grad():
            module(*args)
    except Exception as exc:  # noqa: BLE001
        given = ", ".join(f"{n}={'x'.join(map(str, (1, *s[1:])))}" for n, s in zip(names, shapes))
        raise UsageError(f"{type(module).__name__} does not run on inputs of shape {given}: {type(exc).__name__}: "
                         f"{_first_line(exc)} (check --input-shape)") from exc


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, args)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a model pathcond cannot read
        name, line = type(module).__name__, _first_line(exc)
        raise UnsupportedModelError(f"torch.export could not trace {name}: {type(exc).__name__}: {line}",
                                    [Offender(name, "torch.export", line if str(exc) else type(exc).__name__)]) from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def module_translation(module: nn.Module, input_shapes: Shapes, partial: bool = False) -> Translation:
    ep, names = export_module(module, input_shapes)
    return translate(ep, names, partial=partial)


def module_to_graph(module: nn.Module, input_shapes: Shapes) -> Graph:
    """The IR of ``module`` (traced in eval mode with ``torch.export`` at batch 1).

    ``input_shapes``: one full shape per forward argument (a list, in order, or a dict by argument name; a
    single entry may use any name). IR inputs are named after the forward's arguments; IR parameter keys
    are ``module.state_dict()`` names.
    """
    return module_translation(module, input_shapes).graph


def exported_to_graph(ep: torch.export.ExportedProgram) -> Graph:
    """The IR of an ExportedProgram (its aten graph; inputs named after its placeholders, batch -> 1)."""
    return translate(ep).graph


# --------------------------------------------------------------------------------------------------
# Tensors in and out of a torch runtime


def stored_layout(values: Mapping[str, torch.Tensor], swapped: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """IR parameter values in the layout the model stores them (and back: the swap is its own inverse).

    A weight used as ``x @ W`` is stored (in, out), a transposed convolution's (I, O/groups, *k); the IR
    holds both output channels first (``swap_group_axes``)."""
    return {k: (swap_group_axes(v, swapped[k]).contiguous() if k in swapped else v) for k, v in values.items()}


def _as_stored(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if tuple(new.shape) != tuple(old.shape):
        raise ValueError(f"new value of shape {tuple(new.shape)} for a parameter of shape {tuple(old.shape)}")
    return new.detach().to(device=old.device, dtype=old.dtype).clone()



def flatten_outputs(out: Any) -> list[np.ndarray]:
    flat: list[np.ndarray] = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            flat.append(_to_numpy(o))
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(out)
    return flat


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array; floating dtypes numpy lacks (bfloat16, float8) are widened to float32,
    exactly. The dtype the model computed in is known from :attr:`TorchModel.runtime_dtypes`."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in _NUMPY_FLOATS:
        t = t.float()
    return t.numpy()  # noqa: PD011


def _dtype_np(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of the verification inputs for a torch input dtype: the same one, or float32 for
    the floating dtypes numpy lacks (the runner casts them to the model's own dtype)."""
    if dtype.is_floating_point and dtype not in _NUMPY_FLOATS:
        return np.dtype(np.float32)
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def floating_dtypes(tensors: Iterable[Any]) -> set[torch.dtype]:
    """The floating dtypes among these tensors (anything else is skipped)."""
    return {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}


def input_specs(tr: Translation, full_shapes: Sequence[tuple[int, ...]] | None = None) -> list[InputSpec]:
    """The verification inputs of a translated model: its inputs' names, full shapes (the given ones, else
    the exported ones with a dynamic batch as 1) and dtypes (see :func:`_dtype_np`)."""
    specs = []
    for i, (name, shape) in enumerate(tr.graph.inputs.items()):
        if full_shapes is not None:
            full = tuple(full_shapes[i])
        else:
            full = tuple(1 if s is None else s for s in tr.input_full_shapes.get(name, shape))
        specs.append(InputSpec(name, full, _dtype_np(tr.input_dtypes.get(name, torch.float32))))
    return specs


def as_model_inputs(specs: Sequence[InputSpec], dtypes: Sequence[torch.dtype], feeds: Mapping[str, np.ndarray],
                    device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The feeds as tensors in the model's own input dtypes (bfloat16 inputs arrive as float32 arrays),
    in the order of ``specs``."""
    args = []
    for i, spec in enumerate(specs):
        arr = feeds[spec.name] if spec.name in feeds else list(feeds.values())[i]
        t = torch.from_numpy(np.ascontiguousarray(arr))
        args.append(t.to(device=device, dtype=dtypes[i] if i < len(dtypes) else t.dtype))
    return args
