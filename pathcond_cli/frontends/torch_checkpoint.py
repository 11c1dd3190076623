"""Checkpoint dicts: where the state_dict or the pickled module sits in them, and the ``--arch`` module.

A training checkpoint is a dict that holds a state_dict (or, pickled with ``--trust-pickle``, a module)
next to other entries: optimizer state, epoch, EMA copies. These helpers find the entry pathcond rewrites
and build the module a state_dict loads into; everything else in the dict is left untouched.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UsageError
from .base import LoadOptions
from .torch_module import _as_stored


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
    """Where the state_dict sits in the container (a key path) and the prefix its keys carry: of every
    candidate and prefix, the one whose names match the architecture's best (all of them, ideally)."""
    candidates = _state_dict_candidates(container, key)
    scored = [(_match_score(_get(container, path), prefix, expected), path, prefix)
              for path in candidates for prefix in _prefixes(_get(container, path))]
    best = max(scored, key=lambda s: s[0], default=None)  # the first of equal scores, as listed
    if best is None or best[0] == 0:
        where = ", ".join("/".join(p) or "<root>" for p in candidates) or "none"
        raise UsageError(f"no state_dict in the checkpoint matches the architecture's parameter names "
                         f"(state_dict candidates: {where}); pass --key to say where it is")
    return best[1], best[2]


def _state_dict_candidates(container: Any, key: str | None) -> list[list[str]]:
    """Key paths of the state_dicts the container may hold: the ``--key`` entry (which must be one), the
    container itself, or every state_dict nested up to four levels down (a training checkpoint's
    ``model`` / ``ema`` / ``teacher`` entries)."""
    if key is None:
        return [[]] if _is_state_dict(container) else _nested_state_dicts(container, [], 0)
    found = _entry(container, key)
    if found is None:
        raise UsageError(f"the checkpoint has no entry {key!r} (top-level keys: "
                         f"{', '.join(map(str, container.keys())) if isinstance(container, Mapping) else '-'})")
    if not _is_state_dict(found[1]):
        raise UsageError(f"checkpoint entry {key!r} is not a state_dict (a mapping of names to tensors)")
    return [found[0]]


def _nested_state_dicts(obj: Any, path: list[str], depth: int) -> list[list[str]]:
    if depth > 3 or not isinstance(obj, Mapping):
        return []
    found: list[list[str]] = []
    for k, v in obj.items():
        if isinstance(k, str) and _is_state_dict(v):
            found.append(path + [k])
        elif isinstance(k, str) and isinstance(v, Mapping):
            found += _nested_state_dicts(v, path + [k], depth + 1)
    return found


def _match_score(sd: Mapping[str, Any], prefix: str, expected: set[str]) -> int:
    """How many of the architecture's names the state_dict holds under ``prefix``; an exact match of
    the whole set outranks any partial one."""
    keys = {k[len(prefix):] for k in sd if k.startswith(prefix)}
    return len(keys & expected) + (10**9 if keys == expected else 0)


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


def _check_dtypes(module: nn.Module, sd: Mapping[str, torch.Tensor], shown: int = 5) -> None:
    """Refuse a state_dict that stores as integers (or booleans) a tensor the --arch module holds as floats:
    load_state_dict would cast it silently, and the rewritten file would keep integers where the
    rescaling writes fractions. Integer buffers (BatchNorm's num_batches_tracked) stay integers in both."""
    own = module.state_dict()
    bad = [(k, v.dtype, own[k].dtype) for k, v in sd.items()
           if k in own and own[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if bad:
        listed = "; ".join(f"{k} is {_dtype_name(a)} in the file, {_dtype_name(b)} in the module"
                           for k, a, b in bad[:shown])
        more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
        raise UsageError(f"the state_dict does not match the --arch module: {listed}{more}. A parameter must be "
                         "stored as a floating-point tensor")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str) -> None:
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    _check_shapes(module, stripped)
    _check_dtypes(module, stripped)
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


def _copy_into_module(module: nn.Module, new_params: Mapping[str, torch.Tensor]) -> None:
    state = module.state_dict(keep_vars=True)
    missing = [k for k in new_params if k not in state]
    if missing:
        raise KeyError(f"no such parameters in the model: {missing}")
    with torch.no_grad():
        for k, v in new_params.items():
            state[k].copy_(_as_stored(v, state[k]))
