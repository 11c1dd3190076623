"""Small test architectures written here (torchvision is not available beside the CPU torch build).

Each factory returns a module in eval mode with deterministic, non-trivial parameters (BatchNorm running
statistics and affine parameters randomised so that a wrong rescaling of them would show).
"""

from __future__ import annotations

import torch
from torch import nn


def _randomise_bn(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=generator) * 0.2)


def _finish(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _randomise_bn(module, g)
    return module.eval()


class MLP(nn.Module):
    """Uneven widths, biases: the case where PathCond matters most."""

    def __init__(self, widths=(8, 32, 4, 16, 3), bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv + BN + ReLU + max-pool, conv + BN + ReLU + average pool, global pooling, linear head."""

    def __init__(self, in_ch: int = 3, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNetLike(nn.Module):
    """A stem, two identity-shortcut blocks, one block with a 1x1 conv shortcut, global pool, fc."""

    def __init__(self, in_ch: int = 3, width: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class PlainResNet(nn.Module):
    """Residual blocks without BatchNorm: identity shortcuts join groups across the whole stream."""

    def __init__(self, in_ch: int = 2, width: int = 4, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        self.a1 = nn.Conv2d(width, 6, 3, padding=1)
        self.a2 = nn.Conv2d(6, width, 3, padding=1)
        self.b1 = nn.Conv2d(width, 5, 1)
        self.b2 = nn.Conv2d(5, width, 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(x + self.b2(torch.relu(self.b1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a max-pool and a linear head."""

    def __init__(self, in_ch: int = 3, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 3, padding=1)
        self.right = nn.Conv2d(6, 7, 1)
        self.mix = nn.Conv2d(11, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(5 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = self.pool(torch.relu(self.mix(x)))
        return self.head(torch.flatten(x, 1))


class TinyUNet(nn.Module):
    """An encoder-decoder: conv + BN, max-pool down, conv, nearest upsampling back (nn.Upsample), concat
    with the skip connection, a bilinear resize (F.interpolate), a per-pixel conv head (a feature map)."""

    def __init__(self, in_ch: int = 2, classes: int = 3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(in_ch, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.down = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(4, 6, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(4 + 6, 5, 3, padding=1)
        self.head = nn.Conv2d(5, classes, 1)

    def forward(self, x):
        skip = self.enc(x)
        deep = torch.relu(self.mid(self.down(skip)))
        y = torch.relu(self.dec(torch.cat([skip, self.up(deep)], dim=1)))
        y = nn.functional.interpolate(y, size=(y.shape[2], 2 * y.shape[3]), mode="bilinear", align_corners=False)
        return self.head(y)


class TinyGenerator(nn.Module):
    """A DCGAN-like generator from a latent map: transposed convolutions (stride 1; stride 2 with
    padding, output_padding and 2 groups; one without bias) with BatchNorm and ReLU."""

    def __init__(self, latent: int = 5):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),  # 1x1 -> 3x3
            nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.ReLU(),  # -> 6x6
            nn.ConvTranspose2d(6, 2, 4, stride=2, padding=1, bias=False),  # -> 12x12
        )

    def forward(self, x):
        return self.net(x)


class _DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-conv 1x1, BN-ReLU-conv 3x3, output concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.norm2(y)))], 1)


class TinyDenseNet(nn.Module):
    """DenseNet-shaped: BatchNorm reads concatenations (so those channels are pinned), a transition with
    average pooling, a final BN-ReLU and adaptive pooling."""

    def __init__(self, in_ch: int = 3, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 6, 3, padding=1, bias=False)
        self.block = nn.Sequential(_DenseLayer(6, 3), _DenseLayer(9, 3))
        self.transition = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 8, 1, bias=False), nn.AvgPool2d(2))
        self.norm, self.fc = nn.BatchNorm2d(8), nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.transition(self.block(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _build(cls: type[nn.Module], seed: int, *args) -> nn.Module:
    """``cls(*args)`` initialised under ``seed``, BatchNorm randomised, in eval mode."""
    torch.manual_seed(seed)
    return _finish(cls(*args), seed)


def mlp(seed: int = 0, widths=(8, 32, 4, 16, 3)) -> nn.Module:
    return _build(MLP, seed, widths)


def small_cnn(seed: int = 0) -> nn.Module:
    return _build(SmallCNN, seed)


def resnet_like(seed: int = 0) -> nn.Module:
    return _build(ResNetLike, seed)


def plain_resnet(seed: int = 0) -> nn.Module:
    return _build(PlainResNet, seed)


def concat_net(seed: int = 0) -> nn.Module:
    return _build(ConcatNet, seed)


def tiny_unet(seed: int = 0) -> nn.Module:
    return _build(TinyUNet, seed)


def tiny_generator(seed: int = 0) -> nn.Module:
    return _build(TinyGenerator, seed)


def dense_net(seed: int = 0) -> nn.Module:
    return _build(TinyDenseNet, seed)


#: name -> (factory, input shape at batch 1)
ZOO = {
    "mlp": (mlp, (1, 8)),
    "small_cnn": (small_cnn, (1, 3, 16, 16)),
    "resnet_like": (resnet_like, (1, 3, 8, 8)),
    "plain_resnet": (plain_resnet, (1, 2, 6, 6)),
    "concat_net": (concat_net, (1, 3, 8, 8)),
    "tiny_unet": (tiny_unet, (1, 2, 6, 8)),
    "tiny_generator": (tiny_generator, (1, 5, 1, 1)),
    "dense_net": (dense_net, (1, 3, 8, 8)),
}


def resnet_like_default_init(seed: int = 0) -> nn.Module:
    """ResNetLike with BatchNorm as PyTorch initialises it (γ = 1, β = 0, mean 0, var 1): the equal
    tensors that ONNX exporters share between several names."""
    torch.manual_seed(seed)
    return ResNetLike().eval()
