"""Stage timings for the report's ``timings``: one helper, so that every stage is measured the same way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Store in ``timings[name]`` the wall-clock seconds the block took, also when it raises (the time
    spent before a failure is still the stage's time)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start
