"""pathcond: rescale ReLU networks to condition their path kernel (PathCond)."""

__version__ = "0.1.0"
