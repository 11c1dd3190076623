"""A few dozen seeds of the fuzz suite (``tests/fuzz_main.py``; ``make fuzz N=500`` runs many more).

Each seed draws a random ReLU DAG (``tests/fuzz_nets.py``), exports it with the seed's exporter, runs
``pathcond rescale`` and ``pathcond inspect`` through the CLI and checks the result against our own
onnxruntime / torch runs of both files. The seeds were picked to cover every family (MLP, 1-D and 2-D
convolutions, long chains), every exporter and the awkward features (grouped / depthwise convolutions,
BatchNorm without affine part, padded ceil-mode pooling, PReLU, dead units, 1e±20 scales, width-1 layers).

Seeds that fail today because of a pathcond bug are kept, marked ``xfail(strict=True)`` with the class of the
bug, so that a fix shows up as an XPASS to remove the mark.
"""

from __future__ import annotations

import pytest

from tests.fuzz_main import run_case


def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


PASSING = [0, 1, 2, 3, 4, 5]
KNOWN_FAILURES: dict[int, str] = {}

CASES = [pytest.param(s, id=f"seed{s}") for s in PASSING] + [
    pytest.param(s, id=f"seed{s}", marks=_xfail(why)) for s, why in sorted(KNOWN_FAILURES.items())
]


@pytest.mark.parametrize("seed", CASES)
def test_fuzz_seed(seed, tmp_path):
    result = run_case(seed, tmp_path)
    if result.status == "skip":
        pytest.skip(result.line())
    assert result.status == "ok", result.line()
