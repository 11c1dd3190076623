"""pathcond: rescale ReLU networks to condition their path kernel (PathCond).

The Python API (``inspect_module``, ``rescale_module_``) imports torch on first use, so that the CLI's
``--help`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "inspect_module", "rescale_module_"]


def __getattr__(name: str):
    if name in ("inspect_module", "rescale_module_"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pathcond_cli' has no attribute {name!r}")
