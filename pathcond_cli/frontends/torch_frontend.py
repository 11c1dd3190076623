"""The PyTorch front end: ``nn.Module`` / ``ExportedProgram`` -> IR, and the four torch file formats.

Formats (told apart by content, never by extension):

* ``torch-state-dict``: a ``torch.save``'d state_dict, or a training checkpoint dict that holds one; the
  module is rebuilt with ``--arch package.module:factory``. Loaded with ``weights_only=True``.
* ``torch-export``: a ``torch.export.save`` archive (``.pt2``).
* ``torchscript``: a ``torch.jit.save`` archive (converted to an ExportedProgram for the graph).
* ``torch-module``: a pickled ``nn.Module`` (``torch.save(model)``): loading it runs code from the file,
  so it is refused unless ``--trust-pickle`` is given.

Every graph goes through ``torch.export`` and :mod:`.torch_graph`; IR parameter keys are state_dict names.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import Offender, UnsupportedModelError, UsageError
from ..ir import Graph, swap_group_axes
from .base import UNNAMED, InputSpec, LoadOptions, name_lone_shape
from .torch_graph import Translation, translate

Shapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]

FORMATS = ("torch-state-dict", "torch-export", "torchscript", "torch-module")


# --------------------------------------------------------------------------------------------------
# nn.Module / ExportedProgram -> IR


def _forward_arg_names(module: nn.Module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _reference_tensor(module: nn.Module) -> torch.Tensor:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return torch.zeros((), dtype=torch.float32)


def _ordered_shapes(module: nn.Module, input_shapes: Shapes) -> tuple[list[str], list[tuple[int, ...]]]:
    """The forward's argument names and the shapes fed to them, in order."""
    argnames = _forward_arg_names(module)
    if isinstance(input_shapes, Mapping) and UNNAMED in input_shapes:  # a lone shape: for the first argument,
        defaults = inspect.signature(module.forward).parameters if argnames else {}  # unless more are required
        required = [n for n in argnames if defaults[n].default is inspect.Parameter.empty]
        if len(required) > 1:
            name_lone_shape(input_shapes, required)  # raises: which input would it be?
    if isinstance(input_shapes, Mapping):
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
    shapes = [tuple(int(s) for s in shape) for shape in input_shapes]
    names = [argnames[i] if i < len(argnames) else f"input{i}" for i in range(len(shapes))]
    return names, shapes


def _check_batch1(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
    for name, shape in zip(names, shapes):
        if len(shape) < 2:
            raise UsageError(f"input {name!r}: shape {shape} must be (1, C, ...) (batch first, channels on axis 1)")


def export_module(module: nn.Module, input_shapes: Shapes) -> tuple[torch.export.ExportedProgram, list[str]]:
    """``torch.export`` the module in eval mode on batch-1 example inputs (its training flag is restored)."""
    names, shapes = _ordered_shapes(module, input_shapes)
    _check_batch1(names, shapes)
    ref = _reference_tensor(module)
    args = tuple(torch.zeros((1, *s[1:]), dtype=ref.dtype, device=ref.device) for s in shapes)
    was_training = module.training
    module.eval()
    try:
        try:  # a model that cannot even run on these inputs was given the wrong shape, not an unsupported op
            with torch.no_grad():
                module(*args)
        except Exception as exc:  # noqa: BLE001
            given = ", ".join(f"{n}={'x'.join(map(str, (1, *s[1:])))}" for n, s in zip(names, shapes))
            raise UsageError(f"{type(module).__name__} does not run on inputs of shape {given}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''} (check --input-shape)") from exc
        ep = torch.export.export(module, args)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a model pathcond cannot read
        raise UnsupportedModelError(
            f"torch.export could not trace {type(module).__name__}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            [Offender(type(module).__name__, "torch.export", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)],
        ) from exc
    finally:
        module.train(was_training)
    return ep, names


def module_translation(module: nn.Module, input_shapes: Shapes) -> Translation:
    ep, names = export_module(module, input_shapes)
    return translate(ep, names)


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
# Format detection and loading helpers


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{path}: not a readable zip archive: {exc}") from exc


def archive_records(names: Sequence[str]) -> set[str]:
    """The archive's records: member names below the one folder every member sits in.

    ``torch.save``, ``torch.jit.save`` and ``torch.export.save`` write every record under a folder named
    after the file (``model/data.pkl``); ``torch.export.save`` before PyTorch 2.6 wrote its records at
    the root. The folder's name says nothing (a file ``models.pt`` gives ``models/``), nor do paths deeper
    down (TorchScript keeps the model's code at ``code/__torch__/<its package path>/``)."""
    first = names[0].split("/", 1) if names else []
    if len(first) == 2 and all(n.startswith(first[0] + "/") for n in names):
        return {n[len(first[0]) + 1:] for n in names}
    return set(names)


def _records_format(records: set[str]) -> str | None:
    """The torch format a set of archive records is laid out in (see :func:`archive_records`), or None.

    * ``torch.export.save``: an ``archive_format`` record (the PT2 archive, PyTorch >= 2.6) or a
      ``serialized_exported_program.json`` record (earlier versions);
    * ``torch.jit.save``: ``constants.pkl`` and the model's code under ``code/``, beside ``data.pkl``;
    * ``torch.save``: ``data.pkl`` alone (its tensors under ``data/``)."""
    if "archive_format" in records or "serialized_exported_program.json" in records:
        return "torch-export"
    if "data.pkl" in records and "constants.pkl" in records and any(r.startswith("code/") for r in records):
        return "torchscript"
    if "data.pkl" in records and "constants.pkl" not in records:
        return "torch-pickle"
    return None


def detect_torch_format(path: Path) -> str:
    """"torch-export", "torchscript" or "torch-pickle" (a plain ``torch.save`` file: state dict,
    checkpoint or pickled module, told apart when loading), from the archive's top-level records."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        fmt = _records_format(archive_records(_zip_names(path)))
        if fmt is None:
            raise UsageError(f"{path}: a zip archive that is neither a torch.save, torch.jit.save nor "
                             "torch.export.save file")
        return fmt
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":
        return "torch-pickle"
    raise UsageError(f"{path}: not a PyTorch file (no torch.save / torch.jit.save / torch.export.save content)")


def _load_weights_only(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_pickle(path: Path, trust: bool) -> tuple[Any, bool]:
    """(object, needed_full_pickle)."""
    try:
        return _load_weights_only(path), False
    except pickle.UnpicklingError as exc:
        if not trust:
            import re

            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            hint = f" (it references {found.group(1)})" if found else ""
            raise UsageError(
                f"{path} holds pickled Python objects (most likely a whole nn.Module saved with torch.save(model))"
                f"{hint}. Loading it would run arbitrary code from the file, so pathcond refuses by default. "
                "If you trust the file, pass --trust-pickle; better, save model.state_dict() and pass "
                "--arch package.module:factory, or use torch.export.save."
            ) from exc
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read this torch file: {type(exc).__name__}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot unpickle this torch file: {type(exc).__name__}: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _entry(container: Any, key: str) -> tuple[list[str], Any] | None:
    """(key path, value) of the ``--key`` entry: a top-level key, else a dotted path; None if absent."""
    parts = [key] if isinstance(container, Mapping) and key in container else key.split(".")
    node = container
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return parts, node


def _find_state_dict(container: Any, expected: set[str], key: str | None) -> tuple[list[str], str]:
    """Where the state_dict sits in the container (a key path) and the prefix its keys carry."""
    candidates: list[list[str]] = []
    if key is not None:
        found = _entry(container, key)
        if found is None:
            raise UsageError(f"the checkpoint has no entry {key!r} (top-level keys: "
                             f"{', '.join(map(str, container.keys())) if isinstance(container, Mapping) else '-'})")
        path, node = found
        if not _is_state_dict(node):
            raise UsageError(f"checkpoint entry {key!r} is not a state_dict (a mapping of names to tensors)")
        candidates = [path]
    elif _is_state_dict(container):
        candidates = [[]]
    else:

        def walk(obj, path, depth):
            if depth > 3 or not isinstance(obj, Mapping):
                return
            for k, v in obj.items():
                if isinstance(k, str):
                    if _is_state_dict(v):
                        candidates.append(path + [k])
                    elif isinstance(v, Mapping):
                        walk(v, path + [k], depth + 1)

        walk(container, [], 0)
    best: tuple[int, list[str], str] | None = None
    for path in candidates:
        sd = _get(container, path)
        for prefix in _prefixes(sd):
            keys = {k[len(prefix):] for k in sd if k.startswith(prefix)}
            score = len(keys & expected)
            if keys == expected:
                score += 10**9
            if best is None or score > best[0]:
                best = (score, path, prefix)
    if best is None or best[0] == 0:
        where = ", ".join("/".join(p) or "<root>" for p in candidates) or "none"
        raise UsageError(f"no state_dict in the checkpoint matches the architecture's parameter names "
                         f"(state_dict candidates: {where}); pass --key to say where it is")
    return best[1], best[2]


def _find_module(container: Mapping, key: str | None) -> list[str] | None:
    """The key path of the one nn.Module inside a checkpoint dict (``key`` names it), or None."""
    if key is not None:
        found = _entry(container, key)
        return found[0] if found is not None and isinstance(found[1], nn.Module) else None
    found: list[list[str]] = []

    def walk(obj: Mapping, path: list[str], depth: int) -> None:
        for k, v in obj.items():
            if isinstance(v, nn.Module):
                found.append(path + [k])
            elif isinstance(v, Mapping) and depth < 3:
                walk(v, path + [k], depth + 1)

    walk(container, [], 0)
    if len(found) > 1:
        raise UsageError("the checkpoint holds several nn.Modules (" + ", ".join(".".join(map(str, p)) for p in found)
                         + "): pass --key to say which one to rescale")
    return found[0] if found else None


def _prefixes(sd: Mapping[str, Any]) -> list[str]:
    out = [""]
    for p in ("module.", "_orig_mod.", "model."):
        if sd and all(k.startswith(p) for k in sd):
            out.append(p)
    return out


def _get(container: Any, path: Sequence[str]) -> Any:
    for k in path:
        container = container[k]
    return container


def _import_factory(arch: str) -> Callable[..., nn.Module]:
    if ":" not in arch:
        raise UsageError(f"--arch {arch!r} must look like package.module:factory")
    mod_name, _, attr = arch.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--arch: cannot import module {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--arch: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--arch: {arch} is not callable")
    return obj


def _build_module(options: LoadOptions) -> nn.Module:
    factory = _import_factory(options.arch)  # type: ignore[arg-type]
    try:
        # the same seed on every build: whatever the state_dict does not hold (non-persistent buffers)
        # comes out the same for the original and the rewritten checkpoint; the caller's RNG is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = factory(**dict(options.arch_kwargs))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--arch {options.arch}: calling the factory failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise UsageError(f"--arch {options.arch} returned a {type(module).__name__}, not an nn.Module")
    return module


def _check_shapes(module: nn.Module, sd: Mapping[str, torch.Tensor], shown: int = 5) -> None:
    """Refuse a state_dict whose tensors do not have the --arch module's shapes (another width, depth or
    variant of the architecture), naming the first mismatching keys."""
    own = module.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        listed = "; ".join(f"{k}: {'x'.join(map(str, a)) or 'scalar'} in the file, "
                           f"{'x'.join(map(str, b)) or 'scalar'} in the module" for k, a, b in bad[:shown])
        more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
        raise UsageError(f"the state_dict does not match the --arch module: {len(bad)} tensor(s) have other "
                         f"shapes: {listed}{more}. Check --arch and --arch-kwargs (width, depth, number of classes)")


def _load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str) -> None:
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    _check_shapes(module, stripped)
    try:
        result = module.load_state_dict(stripped, strict=False)
    except RuntimeError as exc:  # anything else load_state_dict refuses is about the file, not pathcond
        raise UsageError(f"the state_dict does not load into the --arch module: {str(exc).strip()}") from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys: {', '.join(result.missing_keys[:20])}"
                         + (" ..." if len(result.missing_keys) > 20 else ""))
        if result.unexpected_keys:
            parts.append(f"unexpected keys: {', '.join(result.unexpected_keys[:20])}"
                         + (" ..." if len(result.unexpected_keys) > 20 else ""))
        raise UsageError("the state_dict does not match the --arch module (" + "; ".join(parts) + ")")


_OPTIMIZER_WARNING = (
    "the checkpoint holds optimizer state (e.g. momentum buffers) that refers to the old parametrisation; it is "
    "kept unchanged in the rewritten file: reset the optimizer (or drop that entry) before resuming training")


def _has_optimizer_state(obj: Any, depth: int = 0) -> bool:
    if not isinstance(obj, Mapping) or depth > 3:
        return False
    if "state" in obj and "param_groups" in obj:
        return True
    return any(_has_optimizer_state(v, depth + 1) for v in obj.values())


def _alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """key -> every key whose tensor shares its storage (tied parameters)."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, t in state.items():
        try:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        except Exception:  # noqa: BLE001
            ident = (id(t),)
        if t.numel() == 0:
            ident = (id(t),)
        by_ptr.setdefault(ident, []).append(k)
    return {k: ks for ks in by_ptr.values() for k in ks}


def stored_layout(values: Mapping[str, torch.Tensor], swapped: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """IR parameter values in the layout the model stores them (and back: the swap is its own inverse).

    A weight used as ``x @ W`` is stored (in, out), a transposed convolution's (I, O/groups, *k); the IR
    holds both output channels first (``swap_group_axes``)."""
    return {k: (swap_group_axes(v, swapped[k]).contiguous() if k in swapped else v) for k, v in values.items()}


def _as_stored(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if tuple(new.shape) != tuple(old.shape):
        raise ValueError(f"new value of shape {tuple(new.shape)} for a parameter of shape {tuple(old.shape)}")
    return new.detach().to(device=old.device, dtype=old.dtype).clone()


def _copy_into_module(module: nn.Module, new_params: Mapping[str, torch.Tensor]) -> None:
    state = module.state_dict(keep_vars=True)
    missing = [k for k in new_params if k not in state]
    if missing:
        raise KeyError(f"no such parameters in the model: {missing}")
    with torch.no_grad():
        for k, v in new_params.items():
            state[k].copy_(_as_stored(v, state[k]))


def _flatten_outputs(out: Any) -> list[np.ndarray]:
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


def _shapes_from_options(options: LoadOptions, what: str) -> dict[str, tuple[int, ...]]:
    if not options.input_shapes:
        raise UsageError(f"a {what} carries no input shape: pass --input-shape NAME=1xCxHxW "
                         "(batch 1, e.g. x=1x3x224x224)")
    return {k: tuple(int(s) for s in v) for k, v in options.input_shapes.items()}


# --------------------------------------------------------------------------------------------------
# The loaded model


class TorchModel:
    """A torch checkpoint in one of :data:`FORMATS`, with its IR (implements ``LoadedModel``)."""

    def __init__(self, path: Path, fmt: str, options: LoadOptions):
        self.path = Path(path)
        self.format = fmt
        self.options = options
        self.warnings: list[str] = []
        self._sd_path: list[str] = []
        self._module_path: list[str] = []  # where a pickled module sits in its file ([]: the whole file)
        self._prefix = ""
        self._aliases: dict[str, list[str]] = {}
        self._specs: list[InputSpec] = []
        self._input_dtypes: list[torch.dtype] = []  # the model's own (the specs hold numpy's closest)
        self.runtime_dtypes: set[torch.dtype] = set()  # floating dtypes the runtime computes in
        self._arg_names: list[str] = []
        self._train_ok = True
        self._swapped: dict[str, int] = {}  # IR keys held in another layout (see stored_layout)
        self._full_pickle = False
        self._stored: Any = None
        self.graph: Graph

    # ---- loading (no writes)

    def _load(self) -> None:
        if self.format == "torch-export":
            ep = self._static_export(self._read_export(self.path))
            tr = translate(ep)
            self._train_ok = False
            self._set(tr, [*ep.state_dict.values(), *ep.constants.values()])
            if tr.graph and any(n.op == "batchnorm" for n in tr.graph.nodes):
                self.warnings.append("torch.export archive: the rewritten file is verified in eval mode only "
                                     "(an exported program has no training mode)")
        elif self.format == "torchscript":
            ts = self._read_script(self.path)
            shapes = _shapes_from_options(self.options, "TorchScript archive")
            names = self._script_arg_names(ts)
            ordered = self._order(shapes, names)
            ref = next((t for t in list(ts.parameters()) + list(ts.buffers()) if t.is_floating_point()),
                       torch.zeros(()))
            args = tuple(torch.zeros((1, *s[1:]), dtype=ref.dtype) for s in ordered)
            try:
                from torch._export.converter import TS2EPConverter

                ts.eval()
                ep = TS2EPConverter(ts, args).convert()
                # the converter traces with every dimension dynamic; retrace at the given shapes so that
                # reshapes and pooling windows are static
                ep = torch.export.export(ep.module(), args)
            except Exception as exc:  # noqa: BLE001
                raise UnsupportedModelError(
                    f"cannot convert this TorchScript graph for analysis: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}",
                    [Offender("<torchscript>", "TS2EPConverter", str(exc).splitlines()[0] if str(exc) else "")]) from exc
            tr = translate(ep, names[: len(ordered)])
            self._set(tr, [*ts.parameters(), *ts.buffers()], full_shapes=[tuple(s) for s in ordered])
            state = ts.state_dict()
            self._check_keys(state, dict(ts.named_buffers()))
            self._aliases = _alias_groups(state)
        else:  # state dict or pickled module
            obj, full = _load_pickle(self.path, self.options.trust_pickle)
            self._full_pickle = full
            in_dict = None
            if isinstance(obj, Mapping) and full and not self.options.arch:
                in_dict = _find_module(obj, self.options.key)
            if isinstance(obj, nn.Module) or in_dict is not None:
                self.format = "torch-module"
                self.warnings.append("loaded a pickled nn.Module with --trust-pickle (this ran code from the file)")
                self._module_path = in_dict or []
                module = _get(obj, self._module_path)
                if in_dict is not None and _has_optimizer_state(obj):
                    self.warnings.append(_OPTIMIZER_WARNING)
            elif isinstance(obj, Mapping):
                self.format = "torch-state-dict"
                module = self._module_from_container(obj)
                if _has_optimizer_state(obj):
                    self.warnings.append(_OPTIMIZER_WARNING)
            else:
                raise UsageError(f"{self.path} holds a {type(obj).__name__}, not a state_dict, checkpoint dict or "
                                 "nn.Module")
            shapes = _shapes_from_options(self.options, "state_dict" if self.format == "torch-state-dict"
                                          else "pickled module")
            tr = module_translation(module, shapes)
            if self.format == "torch-state-dict":  # parameters as stored in the file (their own dtype)
                stored = {k: self._stored[self._prefix + k] for k in tr.graph.params if self._prefix + k in self._stored}
                stored = stored_layout(stored, tr.swapped)
                tr.graph = tr.graph.with_params({k: v.detach().clone() for k, v in stored.items()})
                self._stored = None
            names, ordered = _ordered_shapes(module, shapes)
            self._set(tr, [*module.parameters(), *module.buffers()], full_shapes=ordered)
            state = module.state_dict(keep_vars=True)
            self._check_keys(state, dict(module.named_buffers()))
            self._aliases = _alias_groups(state)

    def _check_keys(self, state: Mapping[str, Any], buffers: Mapping[str, torch.Tensor]) -> None:
        """Every graph parameter must be a state_dict entry, which is what gets rewritten. A buffer
        outside the state_dict (``persistent=False``) is rebuilt by the model's code, not read from the
        file: it keeps its value and its channels are pinned."""
        outside = [k for k in self.graph.params if k not in state]
        missing = [k for k in outside if k not in buffers]
        if missing:  # a translation bug: keys must be state_dict names
            raise UnsupportedModelError(f"parameters {missing} are not in the model's state_dict",
                                        [Offender(k, "parameter", "not a state_dict entry") for k in missing])
        if outside:
            self.graph = self.graph.with_frozen(
                {k: "a non-persistent buffer (not in the state_dict): the model's code sets its value"
                 for k in outside})

    def _set(self, tr: Translation, runtime_tensors: Iterable[Any],
             full_shapes: Sequence[tuple[int, ...]] | None = None) -> None:
        """Keep the IR, the inputs, and the dtypes the runtime computes in: those of the tensors it runs
        with (``runtime_tensors``: the module's parameters and buffers as loaded) and of its inputs."""
        self.graph = tr.graph
        self.warnings += tr.warnings
        self._specs = input_specs(tr, full_shapes)
        self._input_dtypes = [tr.input_dtypes.get(name, torch.float32) for name in tr.graph.inputs]
        self.runtime_dtypes = floating_dtypes(runtime_tensors) | {d for d in self._input_dtypes if d.is_floating_point}
        self._arg_names = list(tr.graph.inputs)
        self._swapped = dict(tr.swapped)

    def _order(self, shapes: Mapping[str, tuple[int, ...]], names: list[str]) -> list[tuple[int, ...]]:
        if len(shapes) == 1:
            return [next(iter(shapes.values()))]
        missing = [k for k in shapes if k not in names]
        if missing:
            raise UsageError(f"input(s) {', '.join(missing)} are not arguments of forward ({', '.join(names)})")
        return [shapes[n] for n in names if n in shapes]

    @staticmethod
    def _script_arg_names(ts) -> list[str]:
        try:
            args = ts.forward.schema.arguments
            return [a.name for a in args if a.name != "self"]
        except Exception:  # noqa: BLE001
            return ["x"]

    def _static_export(self, ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
        """The program itself, or (when its inputs have dynamic non-batch sizes) a retrace of it at the
        shapes given with --input-shape, so that every reshape and pooling window is static."""
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        user = [placeholders[name] for name in ep.graph_signature.user_inputs if name in placeholders]
        dynamic = False
        for node in user:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape[1:]):
                dynamic = True
        if not dynamic:
            return ep
        if not self.options.input_shapes:
            raise UsageError("this torch.export archive has dynamic spatial sizes: pass --input-shape "
                             "NAME=1xCxHxW to fix them for the analysis")
        shapes = _shapes_from_options(self.options, "torch.export archive with dynamic sizes")
        ordered = self._order(shapes, [n.name for n in user])
        args = tuple(torch.zeros((1, *s[1:]), dtype=n.meta["val"].dtype) for s, n in zip(ordered, user))
        try:
            return torch.export.export(ep.module(), args)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot retrace the exported program at shapes {ordered}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

    def _read_export(self, path: Path) -> torch.export.ExportedProgram:
        try:
            return torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{path}: cannot read this torch.export archive: {type(exc).__name__}: {exc}") from exc

    def _read_script(self, path: Path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{path}: cannot read this TorchScript archive: {type(exc).__name__}: {exc}") from exc

    def _module_from_container(self, container: Mapping) -> nn.Module:
        if not self.options.arch:
            raise UsageError(
                f"{self.path} is a state_dict (weights only, no architecture): pass --arch package.module:factory "
                "naming an importable function that builds the nn.Module (and --arch-kwargs for its keyword "
                "arguments), e.g. --arch torchvision.models:resnet18")
        module = _build_module(self.options)
        expected = set(module.state_dict().keys())
        self._sd_path, self._prefix = _find_state_dict(container, expected, self.options.key)
        self._stored = _get(container, self._sd_path)
        _load_into(module, self._stored, self._prefix)
        return module.eval()

    def _fresh_module(self, path: Path) -> Any:
        """The model stored at ``path``, rebuilt in this format, on CPU (not in a defined mode)."""
        if self.format == "torch-export":
            return self._read_export(path).module()
        if self.format == "torchscript":
            return self._read_script(path)
        obj, _ = _load_pickle(path, self.options.trust_pickle or self.format == "torch-module")
        if self.format == "torch-module":
            module = _get(obj, self._module_path) if isinstance(obj, Mapping) else obj
            if not isinstance(module, nn.Module):
                raise UsageError(f"{path} does not hold a pickled nn.Module")
            return module.cpu()
        if not isinstance(obj, Mapping):
            raise UsageError(f"{path} does not hold a state_dict or checkpoint dict")
        module = _build_module(self.options)
        _load_into(module, _get(obj, self._sd_path), self._prefix)
        return module

    # ---- LoadedModel

    def input_specs(self) -> list[InputSpec]:
        return list(self._specs)

    @property
    def has_batchnorm(self) -> bool:
        return self._train_ok and any(n.op == "batchnorm" for n in self.graph.nodes)

    def run(self, path: Path, inputs: Mapping[str, np.ndarray], *, train: bool = False) -> list[np.ndarray]:
        model = self._fresh_module(Path(path))
        if self.format != "torch-export":
            model.train(train)
        elif train:
            raise UsageError("a torch.export archive cannot be run in training mode")
        args = as_model_inputs(self._specs, self._input_dtypes, inputs)
        with torch.no_grad():
            out = model(*args)
        return _flatten_outputs(out)

    def _expand(self, new_params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values for every state_dict key, tied aliases included."""
        out: dict[str, torch.Tensor] = {}
        for k, v in new_params.items():
            for alias in self._aliases.get(k, [k]):
                out[alias] = v
        return out

    def save(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        path = Path(path)
        unknown = [k for k in new_params if k not in self.graph.params]
        if unknown:
            raise KeyError(f"not parameters of this model: {unknown}")
        new_params = stored_layout(new_params, self._swapped)
        if self.format == "torch-export":
            ep = self._read_export(self.path)
            sd = ep.state_dict
            for k, v in new_params.items():
                target = sd if k in sd else ep.constants
                old = target[k]
                new = _as_stored(v, old)
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                target[k] = new
            torch.export.save(ep, str(path))
        elif self.format == "torchscript":
            ts = self._read_script(self.path)
            state = ts.state_dict()
            with torch.no_grad():
                for k, v in self._expand(new_params).items():
                    state[k].copy_(_as_stored(v, state[k]))
            torch.jit.save(ts, str(path))
        elif self.format == "torch-module":
            container = self._load_module_for_save()  # the module, or the dict that holds it
            _copy_into_module(_get(container, self._module_path), self._expand(new_params))
            torch.save(container, path)
        else:
            container = self._load_container_for_save()
            sd = _get(container, self._sd_path) if self._sd_path else container
            for k, v in self._expand(new_params).items():
                key = self._prefix + k
                if key not in sd:
                    raise KeyError(f"{key!r} is not in the checkpoint's state_dict")
                sd[key] = _as_stored(v, sd[key])
            torch.save(container, path)

    def _load_module_for_save(self) -> nn.Module:
        try:
            return torch.load(self.path, weights_only=False)
        except RuntimeError:  # tensors on a device this machine lacks
            self.warnings.append("the model's tensors were saved on a device not available here; the rewritten "
                                 "file holds them on the CPU")
            return torch.load(self.path, map_location="cpu", weights_only=False)

    def _load_container_for_save(self) -> Any:
        weights_only = not self._full_pickle
        try:
            return torch.load(self.path, weights_only=weights_only)
        except RuntimeError:
            self.warnings.append("the checkpoint's tensors were saved on a device not available here; the "
                                 "rewritten file holds them on the CPU")
            return torch.load(self.path, map_location="cpu", weights_only=weights_only)


def load_torch(path: Path, options: LoadOptions | None = None) -> TorchModel:
    """Read a torch file (format told from its content) and build its IR. Never writes anything."""
    path = Path(path)
    options = options or LoadOptions()
    fmt = detect_torch_format(path)
    model = TorchModel(path, fmt, options)
    model._load()
    return model


__all__ = ["FORMATS", "TorchModel", "archive_records", "as_model_inputs", "detect_torch_format", "export_module",
           "exported_to_graph", "floating_dtypes", "input_specs", "load_torch", "module_to_graph", "module_translation",
           "stored_layout"]
