"""The torch file formats: one class per container, each with load / fresh copy / write.

:class:`TorchModel` implements the ``LoadedModel`` protocol once (verification inputs, running, the
checks before a write); a subclass only says how its container is read into the IR (``_load``), rebuilt
from a file to be run (``_fresh_module``) and written back (``_write``). :data:`FORMAT_CLASSES` is the
one lookup from a detected format (:func:`.torch_detect.detect`) to its class: a new format is a new
class and a new entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import Offender, UnsupportedModelError, UsageError
from ..ir import Graph
from .base import UNNAMED, InputSpec, LoadOptions, name_lone_shape
from .torch_checkpoint import (
    _OPTIMIZER_WARNING,
    _alias_groups,
    _build_module,
    _copy_into_module,
    _find_module,
    _find_state_dict,
    _get,
    _has_optimizer_state,
    _load_into,
)
from .safetensors_io import Layout, load_tensors, read_layout, write_like
from .torch_detect import Unpickled, _load_pickle
from .torch_graph import Translation, translate
from .torch_module import (
    _as_stored,
    _first_line,
    flatten_outputs,
    ordered_shapes,
    reference_tensor,
    as_model_inputs,
    floating_dtypes,
    input_specs,
    module_translation,
    stored_layout,
)


def _shapes_from_options(options: LoadOptions, what: str) -> dict[str, tuple[int, ...]]:
    if not options.input_shapes:
        raise UsageError(f"a {what} carries no input shape: pass --input-shape NAME=1xCxHxW "
                         "(batch 1, e.g. x=1x3x224x224)")
    return {k: tuple(int(s) for s in v) for k, v in options.input_shapes.items()}


def _in_order(shapes: Mapping[str, tuple[int, ...]], names: list[str]) -> list[tuple[int, ...]]:
    """The given shapes in the order of the model's inputs ``names``. A shape given without a name is
    the only input's; with several inputs it is a usage error (which one would it be?), as for modules."""
    if UNNAMED in shapes:
        return list(name_lone_shape(shapes, names).values())  # raises unless the model has one input
    if len(shapes) == 1:
        return [next(iter(shapes.values()))]
    missing = [k for k in shapes if k not in names]
    if missing:
        raise UsageError(f"input(s) {', '.join(missing)} are not arguments of forward ({', '.join(names)})")
    return [shapes[n] for n in names if n in shapes]


def _has_batchnorm(graph: Graph) -> bool:
    return any(n.op == "batchnorm" for n in graph.nodes)


def _arch_module(path: Path, options: LoadOptions) -> nn.Module:
    """The ``--arch`` module a file of weights loads into (the same message for every such format)."""
    if not options.arch:
        raise UsageError(
            f"{path} is a state_dict (weights only, no architecture): pass --arch package.module:factory "
            "naming an importable function that builds the nn.Module (and --arch-kwargs for its keyword "
            "arguments), e.g. --arch torchvision.models:resnet18")
    return _build_module(options)


# --------------------------------------------------------------------------------------------------
# What every format shares


class TorchModel:
    """A torch file read into the IR (implements ``LoadedModel``); one subclass per format.

    IR parameter keys are state_dict names; ``_swapped`` keys are stored in another layout than the IR's
    (see :func:`.torch_module.stored_layout`), ``_aliases`` lists the keys tied to each one."""

    format: ClassVar[str]  # the report's name of the format, the key in FORMAT_CLASSES
    trains: ClassVar[bool] = True  # the container keeps a training mode, so BatchNorm is verified in it too

    def __init__(self, path: Path, options: LoadOptions):
        self.path = Path(path)
        self.options = options
        self.warnings: list[str] = []
        self.graph: Graph
        self.runtime_dtypes: set[torch.dtype] = set()  # floating dtypes the runtime computes in
        self._specs: list[InputSpec] = []
        self._input_dtypes: list[torch.dtype] = []  # the model's own (the specs hold numpy's closest)
        self._swapped: dict[str, int] = {}
        self._aliases: dict[str, list[str]] = {}
        self._last_run: tuple[tuple[str, int, int], Any] | None = None  # (file version, its module)

    # ---- what each format provides

    def _load(self, content: Unpickled | None) -> None:
        """Read ``self.path`` into the IR (``content``: the file as detection already unpickled it)."""
        raise NotImplementedError

    def _fresh_module(self, path: Path) -> Any:
        """The model stored at ``path`` (this file or a rewritten copy), rebuilt on CPU from the file
        alone, so that verification runs what was written (not in a defined mode)."""
        raise NotImplementedError

    def _write(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        """This container, with these values (state_dict keys, stored layout) in place, written to ``path``."""
        raise NotImplementedError

    def _in_mode(self, model: Any, train: bool) -> Any:
        model.train(train)
        return model

    # ---- loading steps every format takes

    def _set(self, tr: Translation, runtime_tensors: Iterable[Any],
             full_shapes: Sequence[tuple[int, ...]] | None = None) -> None:
        """Keep the IR, the inputs, and the dtypes the runtime computes in: those of the tensors it runs
        with (``runtime_tensors``: the module's parameters and buffers as loaded) and of its inputs."""
        self.graph = tr.graph
        self.warnings += tr.warnings
        self._specs = input_specs(tr, full_shapes)
        self._input_dtypes = [tr.input_dtypes.get(name, torch.float32) for name in tr.graph.inputs]
        self.runtime_dtypes = floating_dtypes(runtime_tensors) | {d for d in self._input_dtypes if d.is_floating_point}
        self._swapped = dict(tr.swapped)

    def _bind_state(self, state: Mapping[str, Any], buffers: Mapping[str, torch.Tensor]) -> None:
        """Every graph parameter must be a state_dict entry, which is what gets rewritten. A buffer
        outside the state_dict (``persistent=False``) is rebuilt by the model's code, not read from the
        file: it keeps its value and its channels are pinned. Tied entries get one value together."""
        outside = [k for k in self.graph.params if k not in state]
        missing = [k for k in outside if k not in buffers]
        if missing:  # a translation bug: keys must be state_dict names
            raise UnsupportedModelError(f"parameters {missing} are not in the model's state_dict",
                                        [Offender(k, "parameter", "not a state_dict entry") for k in missing])
        if outside:
            self.graph = self.graph.with_frozen(
                {k: "a non-persistent buffer (not in the state_dict): the model's code sets its value"
                 for k in outside})
        self._aliases = _alias_groups(state)

    def _expand(self, new_params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values for every state_dict key, tied aliases included."""
        out: dict[str, torch.Tensor] = {}
        for k, v in new_params.items():
            for alias in self._aliases.get(k, [k]):
                out[alias] = v
        return out

    # ---- LoadedModel

    def input_specs(self) -> list[InputSpec]:
        return list(self._specs)

    @property
    def has_batchnorm(self) -> bool:
        return self.trains and _has_batchnorm(self.graph)

    def run(self, path: Path, inputs: Mapping[str, np.ndarray], *, train: bool = False) -> list[np.ndarray]:
        model = self._in_mode(self._module_for(Path(path), train), train)
        args = as_model_inputs(self._specs, self._input_dtypes, inputs)
        with torch.no_grad():
            out = model(*args)
        return flatten_outputs(out)

    def _module_for(self, path: Path, train: bool) -> Any:
        """The module of ``path`` for one run. Eval-mode runs of the same file version share one module
        (verification runs every input on the original, then on the rewritten file: one load each, as
        onnxruntime gets one session per file); a training-mode run, which may change buffers (BatchNorm
        statistics) and other module state, gets a module of its own."""
        if train:
            return self._fresh_module(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if self._last_run is None or self._last_run[0] != key:
            self._last_run = None  # the previous module goes before the next one is loaded
            self._last_run = (key, self._fresh_module(path))
        return self._last_run[1]

    def save(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        unknown = [k for k in new_params if k not in self.graph.params]
        if unknown:
            raise KeyError(f"not parameters of this model: {unknown}")
        self._write(stored_layout(new_params, self._swapped), Path(path))


# --------------------------------------------------------------------------------------------------
# torch.export.save archive


def _read_export(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read this torch.export archive: {type(exc).__name__}: {exc}") from exc


def _user_placeholders(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [placeholders[name] for name in ep.graph_signature.user_inputs if name in placeholders]


def _has_dynamic_size(node: torch.fx.Node) -> bool:
    """Whether an input has a symbolic size other than the batch."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape[1:])


class ExportArchive(TorchModel):
    """A ``torch.export.save`` archive (``.pt2``): the ExportedProgram is the graph, its parameters live in
    its state_dict and constants. An exported program has no training mode: verified in eval mode only."""

    format = "torch-export"
    trains = False

    def _load(self, content: Unpickled | None) -> None:
        ep = self._static_export(_read_export(self.path))
        tr = translate(ep, partial=self.options.partial)
        self._set(tr, [*ep.state_dict.values(), *ep.constants.values()])
        if _has_batchnorm(tr.graph):
            self.warnings.append("torch.export archive: the rewritten file is verified in eval mode only "
                                 "(an exported program has no training mode)")

    def _fresh_module(self, path: Path) -> Any:
        return _read_export(path).module()

    def _in_mode(self, model: Any, train: bool) -> Any:
        if train:
            raise UsageError("a torch.export archive cannot be run in training mode")
        return model

    def _write(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        ep = _read_export(self.path)
        for k, v in new_params.items():
            target = ep.state_dict if k in ep.state_dict else ep.constants
            old = target[k]
            new = _as_stored(v, old)
            target[k] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        torch.export.save(ep, str(path))

    def _static_export(self, ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
        """The program itself, or (when its inputs have dynamic non-batch sizes) a retrace of it at the
        shapes given with --input-shape, so that every reshape and pooling window is static."""
        user = _user_placeholders(ep)
        if not any(_has_dynamic_size(node) for node in user):
            return ep
        if not self.options.input_shapes:
            raise UsageError("this torch.export archive has dynamic spatial sizes: pass --input-shape "
                             "NAME=1xCxHxW to fix them for the analysis")
        shapes = _shapes_from_options(self.options, "torch.export archive with dynamic sizes")
        ordered = _in_order(shapes, [n.name for n in user])
        args = tuple(torch.zeros((1, *s[1:]), dtype=n.meta["val"].dtype) for s, n in zip(ordered, user))
        try:
            return torch.export.export(ep.module(), args)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot retrace the exported program at shapes {ordered}: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------------
# TorchScript archive


def _read_script(path: Path) -> Any:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read this TorchScript archive: {type(exc).__name__}: {exc}") from exc


def _script_arg_names(ts: Any) -> list[str]:
    try:
        return [a.name for a in ts.forward.schema.arguments if a.name != "self"]
    except Exception:  # noqa: BLE001
        return ["x"]


def _script_to_export(ts: Any, shapes: Sequence[tuple[int, ...]]) -> torch.export.ExportedProgram:
    """The TorchScript module as an ExportedProgram traced at batch 1 and these shapes: the converter
    makes every dimension dynamic, so its program is retraced to make reshapes and pooling windows static."""
    ref = reference_tensor(ts)
    args = tuple(torch.zeros((1, *s[1:]), dtype=ref.dtype) for s in shapes)
    try:
        from torch._export.converter import TS2EPConverter

        ts.eval()
        ep = TS2EPConverter(ts, args).convert()
        return torch.export.export(ep.module(), args)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(
            f"cannot convert this TorchScript graph for analysis: {type(exc).__name__}: {_first_line(exc)}",
            [Offender("<torchscript>", "TS2EPConverter", _first_line(exc))]) from exc


class ScriptArchive(TorchModel):
    """A ``torch.jit.save`` archive: converted to an ExportedProgram for the graph (it carries no input
    shapes, so ``--input-shape`` is needed); the archive itself is what runs and what is rewritten."""

    format = "torchscript"

    def _load(self, content: Unpickled | None) -> None:
        ts = _read_script(self.path)
        shapes = _shapes_from_options(self.options, "TorchScript archive")
        names = _script_arg_names(ts)
        ordered = _in_order(shapes, names)
        tr = translate(_script_to_export(ts, ordered), names[: len(ordered)], partial=self.options.partial)
        self._set(tr, [*ts.parameters(), *ts.buffers()], full_shapes=[tuple(s) for s in ordered])
        self._bind_state(ts.state_dict(), dict(ts.named_buffers()))

    def _fresh_module(self, path: Path) -> Any:
        return _read_script(path)

    def _write(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        ts = _read_script(self.path)
        _copy_into_module(ts, self._expand(new_params))
        torch.jit.save(ts, str(path))


# --------------------------------------------------------------------------------------------------
# torch.save files: the model runs as an nn.Module


class _SavedModule(TorchModel):
    """What the two ``torch.save`` formats share: the IR comes from tracing an ``nn.Module``, and the
    rewrite reads the whole file back so that every other entry is written untouched."""

    _what: ClassVar[str]  # how a missing --input-shape names the file
    _holder: ClassVar[str]  # whose tensors, in the warning when they must come back on the CPU

    def _translate(self, module: nn.Module) -> tuple[Translation, list[tuple[int, ...]]]:
        """The module's IR and the full input shapes, in forward's order."""
        shapes = _shapes_from_options(self.options, self._what)
        tr = module_translation(module, shapes, partial=self.options.partial)
        return tr, ordered_shapes(module, shapes)[1]

    def _bind_stored(self, module: nn.Module, in_file: Callable[[str], torch.Tensor | None]) -> None:
        """Translate ``module`` (its values loaded from the file) and let the IR hold each parameter as
        the file stores it, in its own dtype: ``in_file(name)`` is the stored tensor of a module name."""
        tr, shapes = self._translate(module.eval())
        held = {k: v for k in tr.graph.params if (v := in_file(k)) is not None}
        tr.graph = tr.graph.with_params({k: v.detach().clone() for k, v in stored_layout(held, tr.swapped).items()})
        self._bind_module(module, tr, shapes)

    def _bind_module(self, module: nn.Module, tr: Translation, shapes: Sequence[tuple[int, ...]]) -> None:
        self._set(tr, [*module.parameters(), *module.buffers()], full_shapes=shapes)
        self._bind_state(module.state_dict(keep_vars=True), dict(module.named_buffers()))

    def _reload(self, weights_only: bool) -> Any:
        """The file's content again, its tensors on the devices they were saved on where this machine has
        them (the rewrite keeps them there), else on the CPU, with a warning."""
        try:
            return torch.load(self.path, weights_only=weights_only)
        except RuntimeError:  # tensors on a device this machine lacks
            self.warnings.append(f"the {self._holder}'s tensors were saved on a device not available here; the "
                                 "rewritten file holds them on the CPU")
            return torch.load(self.path, map_location="cpu", weights_only=weights_only)


class StateDictCheckpoint(_SavedModule):
    """A state_dict, or a training checkpoint dict that holds one (``--key`` says where): the module is
    rebuilt with ``--arch package.module:factory`` and the state_dict loaded into it. The IR holds the
    parameters as stored in the file, in their own dtype."""

    format = "torch-state-dict"
    _what = "state_dict"
    _holder = "checkpoint"

    def __init__(self, path: Path, options: LoadOptions):
        super().__init__(path, options)
        self._sd_path: list[str] = []  # where the state_dict sits in the file ([]: the whole file)
        self._prefix = ""  # what its keys carry before the module's names ("module." after DataParallel)
        self._full_pickle = False

    def _load(self, content: Unpickled | None) -> None:
        assert content is not None  # detection unpickled the file to tell its format
        self._full_pickle = content.full_pickle
        module, stored = self._module_from_container(content.obj)
        if _has_optimizer_state(content.obj):
            self.warnings.append(_OPTIMIZER_WARNING)
        self._bind_stored(module, lambda name: stored.get(self._prefix + name))

    def _module_from_container(self, container: Mapping) -> tuple[nn.Module, Mapping[str, torch.Tensor]]:
        """The --arch module with the file's state_dict loaded (in eval mode), and that state_dict."""
        module = _arch_module(self.path, self.options)
        self._sd_path, self._prefix = _find_state_dict(container, set(module.state_dict().keys()), self.options.key)
        stored = _get(container, self._sd_path)
        _load_into(module, stored, self._prefix)
        return module.eval(), stored

    def _fresh_module(self, path: Path) -> Any:
        obj, _ = _load_pickle(path, self.options.trust_pickle)
        if not isinstance(obj, Mapping):
            raise UsageError(f"{path} does not hold a state_dict or checkpoint dict")
        module = _build_module(self.options)
        _load_into(module, _get(obj, self._sd_path), self._prefix)
        return module

    def _write(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        container = self._reload(weights_only=not self._full_pickle)
        sd = _get(container, self._sd_path) if self._sd_path else container
        for k, v in self._expand(new_params).items():
            key = self._prefix + k
            if key not in sd:
                raise KeyError(f"{key!r} is not in the checkpoint's state_dict")
            sd[key] = _as_stored(v, sd[key])
        torch.save(container, path)


class PickledModule(_SavedModule):
    """A pickled ``nn.Module`` (``torch.save(model)``), alone or in a checkpoint dict (``--key`` names it
    when there are several). Reading it runs code from the file: detection only unpickles it fully
    with ``--trust-pickle``."""

    format = "torch-module"
    _what = "pickled module"
    _holder = "model"

    def __init__(self, path: Path, options: LoadOptions):
        super().__init__(path, options)
        self._module_path: list[str] = []  # where the module sits in its file ([]: the whole file)

    def _load(self, content: Unpickled | None) -> None:
        assert content is not None  # detection unpickled the file to tell its format
        self.warnings.append("loaded a pickled nn.Module with --trust-pickle (this ran code from the file)")
        in_dict = isinstance(content.obj, Mapping)
        self._module_path = (_find_module(content.obj, self.options.key) or []) if in_dict else []
        module = _get(content.obj, self._module_path)
        if in_dict and _has_optimizer_state(content.obj):
            self.warnings.append(_OPTIMIZER_WARNING)
        tr, shapes = self._translate(module)
        self._bind_module(module, tr, shapes)

    def _fresh_module(self, path: Path) -> Any:
        obj, _ = _load_pickle(path, True)
        module = _get(obj, self._module_path) if isinstance(obj, Mapping) else obj
        if not isinstance(module, nn.Module):
            raise UsageError(f"{path} does not hold a pickled nn.Module")
        return module.cpu()

    def _write(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        container = self._reload(weights_only=False)  # the module, or the dict that holds it
        _copy_into_module(_get(container, self._module_path), self._expand(new_params))
        torch.save(container, path)


# --------------------------------------------------------------------------------------------------
# safetensors: a state_dict in one file, or sharded behind an index


def _tied_in_file(stored: Mapping[str, torch.Tensor], aliases: Mapping[str, list[str]],
                  prefix: str, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by module name, each name the --arch module ties to one the file holds filled
    in: safetensors cannot store shared tensors, so a writer keeps one name of each tied group (as
    ``safetensors.torch.save_model`` does) or a copy under each. Copies must be equal: the module holds
    one value for all of them, and so will the output."""
    own = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
    filled = dict(own)
    seen: set[int] = set()
    for names in aliases.values():
        if len(names) < 2 or id(names) in seen:
            continue
        seen.add(id(names))
        present = [k for k in names if k in own]
        if not present:
            continue
        first = own[present[0]]
        for k in present[1:]:
            if own[k].shape != first.shape or not torch.equal(own[k], first):
                raise UsageError(
                    f"{path}: {prefix + present[0]} and {prefix + k} hold different values, but the --arch module "
                    "ties them (one parameter): only one of them would be loaded. Check --arch, or store one value")
        for k in names:
            filled.setdefault(k, first)
    return filled


def _some(names: Iterable[str], shown: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "") or "none"


class SafetensorsCheckpoint(_SavedModule):
    """A state_dict in a safetensors file, or a sharded checkpoint given by its index
    (``model.safetensors.index.json``): the module is rebuilt with ``--arch package.module:factory`` and
    the tensors loaded into it by name (keys may carry a ``module.`` / ``model.`` prefix). The rewrite
    keeps every other tensor, each file's ``__metadata__``, the shard names and the index.

    Tied parameters are one parameter of the --arch module (one IR key): the file may hold them under
    every name (equal copies) or under one; the output holds the one rescaled value under each name the
    input held."""

    format = "safetensors"
    _what = "safetensors state_dict"
    _holder = "checkpoint"

    def __init__(self, path: Path, options: LoadOptions):
        super().__init__(path, options)
        self._layout: Layout
        self._prefix = ""  # what the file's names carry before the module's

    def _load(self, content: Unpickled | None) -> None:
        if self.options.key is not None:
            raise UsageError("--key picks an entry of a checkpoint dict; a safetensors file holds one flat "
                             "state_dict: leave --key out")
        self._layout = read_layout(self.path)
        stored = load_tensors(self._layout)
        module = _arch_module(self.path, self.options)
        expected = set(module.state_dict().keys())
        try:
            _, self._prefix = _find_state_dict(stored, expected, None)
        except UsageError:
            raise UsageError(f"{self.path}: none of its tensor names match the --arch module's parameter names "
                             f"(file: {_some(stored)}; module: {_some(expected)}): check --arch") from None
        in_file = self._load_file_into(module, stored, self.path)
        self._bind_stored(module, in_file.get)

    def _load_file_into(self, module: nn.Module, stored: Mapping[str, torch.Tensor], path: Path) -> dict:
        """Load the file's tensors into ``module``; the tensors by module name (tied names filled in)."""
        aliases = _alias_groups(module.state_dict(keep_vars=True))
        in_file = _tied_in_file(stored, aliases, self._prefix, path)
        _load_into(module, in_file, "")
        return in_file

    def _fresh_module(self, path: Path) -> Any:
        layout = read_layout(path)
        module = _build_module(self.options)
        self._load_file_into(module, load_tensors(layout), path)
        return module

    def _write(self, new_params: Mapping[str, torch.Tensor], path: Path) -> None:
        tensors = load_tensors(self._layout)  # the input again: every other tensor is written as it was
        for k, v in new_params.items():
            # each tied name the file holds (one the file left out stays out), a copy each: no shared storage
            names = [self._prefix + a for a in self._aliases.get(k, [k]) if self._prefix + a in tensors]
            if not names:
                raise KeyError(f"{k!r} is not in the safetensors file under any of its tied names")
            for name in names:
                tensors[name] = _as_stored(v, tensors[name]).contiguous()
        write_like(self._layout, tensors, path)


# --------------------------------------------------------------------------------------------------
# The one lookup: detected format -> its class

FORMAT_CLASSES: dict[str, type[TorchModel]] = {
    "torch-state-dict": StateDictCheckpoint,
    "torch-export": ExportArchive,
    "torchscript": ScriptArchive,
    "torch-module": PickledModule,
    "safetensors": SafetensorsCheckpoint,
}
FORMATS = tuple(FORMAT_CLASSES)
