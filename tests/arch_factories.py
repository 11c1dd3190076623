"""Factories for ``--arch tests.arch_factories:NAME`` in the torch front-end tests."""

from __future__ import annotations

import torch
from torch import nn

from tests import nets


def mlp(seed: int = 0):
    return nets.mlp(seed)


def small_cnn(seed: int = 0):
    return nets.small_cnn(seed)


def resnet_like(seed: int = 0):
    return nets.resnet_like(seed)


def plain_resnet(seed: int = 0):
    return nets.plain_resnet(seed)


def concat_net(seed: int = 0):
    return nets.concat_net(seed)


class TwoNamesTied(nn.Module):
    """A 4 -> 4 -> 4 MLP whose second layer's weight is the first layer's (``b.weight is a.weight``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def two_names_tied():
    return TwoNamesTied().eval()


class BufferShift(nn.Module):
    """4 -> 6 -> 5 -> 3 MLP whose first hidden layer adds a non-persistent buffer (not in the
    state_dict: the code sets it, so a rewritten checkpoint cannot change it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 6), persistent=False)

    def forward(self, x):
        h = torch.relu(self.fc1(x) + self.shift)
        return self.fc3(torch.relu(self.fc2(h)))


def buffer_shift():
    return BufferShift().eval()


class InOutWeights(nn.Module):
    """x @ W + b with W stored (in, out), as hand-written MLPs do; W2 is square, so a weight written back
    untransposed would go unnoticed by shape checks."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.w1 = nn.Parameter(torch.randn(4, 6, generator=g))
        self.b1 = nn.Parameter(torch.randn(6, generator=g))
        self.w2 = nn.Parameter(torch.randn(6, 6, generator=g) * torch.linspace(0.2, 3.0, 6))
        self.w3 = nn.Parameter(torch.randn(6, 3, generator=g))
        self.b3 = nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x):
        h = torch.relu(x @ self.w1 + self.b1)
        h = torch.relu(h @ self.w2)
        return torch.addmm(self.b3, h, self.w3)


def in_out_weights():
    return InOutWeights().eval()


def tiny_unet(seed: int = 0):
    return nets.tiny_unet(seed)


def tiny_generator(seed: int = 0):
    return nets.tiny_generator(seed)
