"""The engine reproduces MATH §9's reference figures on torchvision-shaped networks at 224x224.

These are independent published-style numbers (torchvision parameter counts; path counts computed with
the all-ones sum-pool convention), reached here through torch.export -> IR -> path statistics.
"""

from __future__ import annotations

import math

import pytest

from pathcond_cli.frontends.torch_frontend import module_to_graph
from pathcond_cli.groups import build_groups
from pathcond_cli.stats import path_statistics
from tests.torchvision_like import resnet18, resnet50


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory, parameters, paths",
    [(resnet18, 11_689_512, 4.9e60), (resnet50, 25_557_032, 3.1e143)],
    ids=["resnet18", "resnet50"],
)
def test_parameters_and_paths(factory, parameters, paths):
    graph = module_to_graph(factory(), [(1, 3, 224, 224)])
    groups = build_groups(graph)
    assert groups.n_params == parameters
    stats = path_statistics(graph, groups)
    # the reference gives two significant digits: within half a unit of the second one
    mantissa = paths / 10 ** math.floor(math.log10(paths))
    assert abs(stats.log10_paths - math.log10(paths)) < math.log10(1.0 + 0.05 / mantissa)
    assert math.isfinite(stats.log10_path2_norm) and math.isfinite(stats.log10_path1_norm)
    assert all(bool(lg.isfinite().all()) for lg in stats.log_g)
