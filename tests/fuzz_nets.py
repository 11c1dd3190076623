"""A seeded generator of random ReLU DAGs, for fuzzing pathcond end to end (``tests/fuzz_main.py``).

``random_net(seed)`` draws everything from the seed: the family (MLP, 1-D conv, 2-D conv, a long thin chain),
the blocks (plain layers, residual blocks with identity or projection shortcuts, concatenated branches), the
layer options (grouped and depthwise convolutions, strides, dilations, biases on or off), BatchNorm with random
running statistics (some without affine part), max / average pooling with padding, ceil mode and
``count_include_pad``, ReLU / LeakyReLU / PReLU, and the awkward values: dead units (zero incoming or outgoing
weights), layers scaled by 1e-20 or 1e20, width-1 bottlenecks. Every net is a positively homogeneous ReLU network
that pathcond claims to support, so any refusal is a finding. ``features`` records what was drawn, to print with
a failing seed.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

FAMILIES = ("mlp", "conv1d", "conv2d", "chain")
EXPORTERS = ("onnx-ts", "onnx-dynamo", "pt2")


# --------------------------------------------------------------------------------------------------
# Building blocks: plain modules, so that every exporter sees ordinary torch code


class Residual(nn.Module):
    """``post(body(x) + shortcut(x))``: identity shortcut when shapes match, a projection otherwise."""

    def __init__(self, body: nn.Module, shortcut: nn.Module, post: nn.Module):
        super().__init__()
        self.body, self.shortcut, self.post = body, shortcut, post

    def forward(self, x):
        return self.post(self.body(x) + self.shortcut(x))


class Concat(nn.Module):
    """Branches concatenated along the channel axis (a branch may be the identity, DenseNet-style)."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class Head(nn.Module):
    """Global pooling (average or max over the spatial axes) or flatten, then a linear layer."""

    def __init__(self, reduce: str, linear: nn.Linear):
        super().__init__()
        self.reduce, self.linear = reduce, linear

    def forward(self, x):
        if self.reduce == "mean":
            x = x.mean(dim=tuple(range(2, x.dim())))
        elif self.reduce == "adaptive_avg":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1) if x.dim() == 4
                              else nn.functional.adaptive_avg_pool1d(x, 1), 1)
        elif self.reduce == "adaptive_max":
            x = torch.flatten(nn.functional.adaptive_max_pool2d(x, 1) if x.dim() == 4
                              else nn.functional.adaptive_max_pool1d(x, 1), 1)
        else:
            x = torch.flatten(x, 1)
        return self.linear(x)


# --------------------------------------------------------------------------------------------------
# The generator


class _Builder:
    """Draws layers for one family; ``tags`` collects the features drawn."""

    def __init__(self, rng: random.Random, dims: int):
        self.rng, self.dims = rng, dims
        self.tags: set[str] = set()

    # -- single layers -------------------------------------------------------------------------------
    def width(self) -> int:
        r = self.rng.random()
        if r < 0.06:
            self.tags.add("width1")
            return 1
        return self.rng.randint(2, 16)

    def act(self, channels: int) -> nn.Module:
        r = self.rng.random()
        if r < 0.6:
            return nn.ReLU()
        if r < 0.8:
            self.tags.add("leaky")
            return nn.LeakyReLU(self.rng.choice([0.01, 0.1, 0.3]))
        self.tags.add("prelu")
        n = channels if self.rng.random() < 0.5 else 1
        prelu = nn.PReLU(n)
        with torch.no_grad():
            prelu.weight.copy_(torch.rand(n) * 0.6 - 0.1)  # slopes in [-0.1, 0.5): negative ones too
        return prelu

    def bn(self, channels: int) -> nn.Module:
        affine = self.rng.random() < 0.75
        self.tags.add("bn" if affine else "bn_noaffine")
        bn = (nn.BatchNorm1d if self.dims <= 1 else nn.BatchNorm2d)(channels, affine=affine)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(channels) * 0.5)
            bn.running_var.copy_(torch.rand(channels) * 2 + 0.05)
            if affine:
                bn.weight.copy_(torch.rand(channels) * 1.5 + 0.25)
                bn.bias.copy_(torch.randn(channels) * 0.3)
        return bn

    def layer(self, cin: int, cout: int, *, spatial_ok: bool = True, kernel1: bool = False) -> tuple[nn.Module, int]:
        """A linear or conv layer from ``cin`` channels; returns it and its real output width (depthwise
        convolutions pick their own)."""
        bias = self.rng.random() < 0.7
        if not bias:
            self.tags.add("nobias")
        if self.dims == 0:
            return nn.Linear(cin, cout, bias=bias), cout
        conv = nn.Conv1d if self.dims == 1 else nn.Conv2d
        groups = 1
        r = self.rng.random()
        if r < 0.15 and cin > 1:
            self.tags.add("depthwise")
            groups, cout = cin, cin * self.rng.choice([1, 1, 2])
        elif r < 0.3:
            divisors = [g for g in range(2, cin + 1) if cin % g == 0]
            if divisors:
                groups = self.rng.choice(divisors)
                cout = max(groups, cout - cout % groups)
                self.tags.add("grouped")
        if kernel1 or not spatial_ok:  # keeps the spatial shape (residual bodies, shortcuts, concat branches)
            k = 1 if kernel1 else self.rng.choice([1, 3])
            stride, dilation, padding = 1, 1, (k - 1) // 2
        else:
            k = self.rng.choice([1, 2, 3, 3])
            stride = self.rng.choice([1, 1, 1, 2])
            dilation = self.rng.choice([1, 1, 1, 2]) if k > 1 else 1
            padding = self.rng.randint(0, (k * dilation) // 2)
        if stride > 1:
            self.tags.add("stride")
        if dilation > 1:
            self.tags.add("dilation")
        return conv(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias), cout

    def pool(self) -> nn.Module:
        k = self.rng.choice([2, 3])
        stride = self.rng.choice([1, 2, k])
        padding = self.rng.randint(0, k // 2)
        ceil = self.rng.random() < 0.4
        if padding:
            self.tags.add("pool_pad")
        if ceil:
            self.tags.add("pool_ceil")
        if self.rng.random() < 0.5:
            self.tags.add("maxpool")
            cls = nn.MaxPool1d if self.dims == 1 else nn.MaxPool2d
            return cls(k, stride, padding, ceil_mode=ceil)
        include_pad = self.rng.random() < 0.5
        self.tags.add("avgpool" + ("_incpad" if include_pad and padding else ""))
        cls = nn.AvgPool1d if self.dims == 1 else nn.AvgPool2d
        return cls(k, stride, padding, ceil_mode=ceil, count_include_pad=include_pad)

    # -- blocks ---------------------------------------------------------------------------------------
    def unit(self, cin: int, cout: int, *, spatial_ok: bool = True, with_act: bool = True) -> tuple[nn.Module, int]:
        """layer [+ BN] [+ activation] [+ pooling]."""
        layer, cout = self.layer(cin, cout, spatial_ok=spatial_ok)
        parts: list[nn.Module] = [layer]
        if self.rng.random() < 0.35:
            parts.append(self.bn(cout))
        if with_act:
            parts.append(self.act(cout))
        if self.dims and spatial_ok and self.rng.random() < 0.3:
            parts.append(self.pool())
        return (parts[0] if len(parts) == 1 else nn.Sequential(*parts)), cout

    def plain(self, cin: int) -> tuple[nn.Module, int]:
        self.tags.add("plain")
        return self.unit(cin, self.width())

    def residual(self, cin: int) -> tuple[nn.Module, int]:
        """Two layers and a shortcut; the shortcut is the identity when the body keeps the shape."""
        mid = self.width()
        identity = self.rng.random() < 0.5
        cout = cin if identity else self.width()
        first, mid = self.unit(cin, mid, spatial_ok=False)
        second, got = self.layer(mid, cout, spatial_ok=False)
        parts: list[nn.Module] = [first, second]
        if self.rng.random() < 0.4:
            parts.append(self.bn(got))
        if identity and got == cin:
            self.tags.add("res_identity")
            shortcut: nn.Module = nn.Identity()
        else:
            self.tags.add("res_projection")
            proj, got2 = self.layer(cin, got, spatial_ok=False, kernel1=True)
            if got2 != got:  # a depthwise draw changed the width: use a plain 1x1 projection
                proj = (nn.Linear(cin, got) if self.dims == 0 else
                        (nn.Conv1d if self.dims == 1 else nn.Conv2d)(cin, got, 1))
            shortcut = nn.Sequential(proj, self.bn(got)) if self.rng.random() < 0.3 else proj
        post = self.act(got) if self.rng.random() < 0.8 else nn.Identity()
        if isinstance(post, nn.Identity):
            self.tags.add("res_noact")
        return Residual(nn.Sequential(*parts), shortcut, post), got

    def concat(self, cin: int) -> tuple[nn.Module, int]:
        self.tags.add("concat")
        branches: list[nn.Module] = []
        total = 0
        for _ in range(self.rng.choice([2, 2, 3])):
            if self.rng.random() < 0.2:
                self.tags.add("concat_identity")
                branches.append(nn.Identity())
                total += cin
            else:
                branch, c = self.unit(cin, self.width(), spatial_ok=False)
                branches.append(branch)
                total += c
        return Concat(branches), total


def _spatial_ok(shape: tuple[int, ...]) -> bool:
    return all(d >= 1 for d in shape) and (len(shape) <= 2 or min(shape[2:]) >= 1)


def _input_shape(rng: random.Random, family: str) -> tuple[int, ...]:
    if family == "mlp":
        return (1, rng.randint(1, 12))
    if family == "chain":
        return (1, rng.randint(2, 4))
    if family == "conv1d":
        return (1, rng.randint(1, 4), rng.randint(6, 20))
    return (1, rng.randint(1, 4), rng.randint(5, 10), rng.randint(5, 10))


def _chain(rng: random.Random, cin: int, tags: set[str]) -> nn.Module:
    """A long thin chain: up to 300 linear layers of width 2-4 (LeakyReLU mostly, so that not all of it dies)."""
    tags.add("chain")
    depth = rng.choice([50, 120, 300])
    tags.add(f"depth{depth}")
    layers: list[nn.Module] = []
    c = cin
    for i in range(depth):
        w = rng.randint(2, 4)
        lin = nn.Linear(c, w, bias=rng.random() < 0.8)
        with torch.no_grad():  # keep the signal O(1) through hundreds of layers
            lin.weight.mul_(1.2 / lin.weight.std().clamp_min(1e-3) / c ** 0.5 * (0.5 + rng.random()))
        layers += [lin, nn.LeakyReLU(0.2) if rng.random() < 0.7 else nn.ReLU()]
        c = w
    layers.append(nn.Linear(c, rng.randint(1, 3)))
    return nn.Sequential(*layers)


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def _perturb(rng: random.Random, model: nn.Module, tags: set[str]) -> None:
    """Uneven layer scales, larger biases, dead units and (rarely) extreme scales."""
    layers = _weight_layers(model)
    with torch.no_grad():
        for m in layers:
            m.weight.mul_(2.0 ** rng.uniform(-2, 2))
            if m.bias is not None and rng.random() < 0.5:
                m.bias.copy_(torch.randn_like(m.bias) * rng.choice([0.1, 0.5, 1.0]))
        if rng.random() < 0.3:
            for m in rng.sample(layers, min(len(layers), rng.randint(1, 2))):
                unit = rng.randrange(m.weight.shape[0])
                if rng.random() < 0.5:
                    tags.add("dead_in")
                    m.weight[unit].zero_()
                    if m.bias is not None and rng.random() < 0.5:
                        m.bias[unit] = 0.0
                else:
                    tags.add("dead_out")
                    m.weight[:, rng.randrange(m.weight.shape[1])].zero_()
        r = rng.random()
        if r < 0.08 and layers:
            scale = rng.choice([1e-20, 1e20])
            tags.add(f"scale{scale:.0e}")
            m = rng.choice(layers)
            m.weight.mul_(scale)
            if m.bias is not None and rng.random() < 0.5:
                m.bias.mul_(scale)


def _draw(seed: int) -> tuple[nn.Module, tuple[int, ...], dict[str, Any]]:
    rng = random.Random(seed)
    r = rng.random()
    family = "chain" if r < 0.03 else ("mlp" if r < 0.33 else ("conv1d" if r < 0.58 else "conv2d"))
    dims = {"mlp": 0, "chain": 0, "conv1d": 1, "conv2d": 2}[family]
    shape = _input_shape(rng, family)
    b = _Builder(rng, dims)
    if family == "chain":
        model = _chain(rng, shape[1], b.tags)
    else:
        blocks: list[nn.Module] = []
        x = torch.zeros(shape)
        for _ in range(rng.randint(1, 5)):
            kind = rng.choices(["plain", "residual", "concat"], [0.5, 0.3, 0.2])[0]
            kept_tags = set(b.tags)
            for _attempt in range(4):  # redraw when a stride or pool leaves no spatial extent
                b.tags = set(kept_tags)  # features of a discarded draw are not the net's
                block, _c = getattr(b, kind)(x.shape[1])
                try:
                    with torch.no_grad():
                        y = block.eval()(x)
                except RuntimeError:
                    continue
                if y.numel() > 0 and y.shape[1] <= 64:
                    break
            else:
                b.tags = kept_tags
                continue
            blocks.append(block)
            x = y
        classes = rng.randint(1, 5)
        if dims == 0:
            head: nn.Module = nn.Linear(x.shape[1], classes, bias=rng.random() < 0.8)
        elif rng.random() < 0.15:
            head = nn.Conv1d(x.shape[1], classes, 1) if dims == 1 else nn.Conv2d(x.shape[1], classes, 1)
            b.tags.add("featuremap_out")
        else:
            reduce = rng.choice(["flatten", "flatten", "mean", "adaptive_avg", "adaptive_max"])
            b.tags.add(f"head_{reduce}")
            n = x[0].numel() if reduce == "flatten" else x.shape[1]
            head = Head(reduce, nn.Linear(n, classes, bias=rng.random() < 0.8))
        model = nn.Sequential(*blocks, head)
    _perturb(rng, model, b.tags)
    features = {"family": family, "shape": "x".join(map(str, shape)), "blocks": len(model),
                "tags": sorted(b.tags)}
    return model.eval(), shape, features


def random_net(seed: int) -> tuple[nn.Module, tuple[int, ...], dict[str, Any]]:
    """A random ReLU DAG in eval mode, its input shape (batch 1) and the features drawn; the same for the
    same seed (torch's global RNG is used for parameter initialisation inside a forked RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, shape, features = _draw(seed)
    features["exporter"] = pick_exporter(seed)
    return model, shape, features


def pick_exporter(seed: int) -> str:
    """The exporter for a seed, independent of the net drawn (a separate stream)."""
    return random.Random(seed * 7919 + 17).choice(EXPORTERS)
