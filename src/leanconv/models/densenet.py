"""DenseNet-121 for CIFAR and DenseNet-161 (Huang et al. 2017) with any registered conv type.

The CIFAR DenseNet-BC-121 of kuangliu/pytorch-cifar, the one SCConv Table 2 counts (DenseNet-121
7.05M / 898.23M MACs, SCConv-DenseNet-121 5.45M / 594.34M): growth rate 32, dense blocks of
6/12/24/16 pre-activation bottleneck layers (BN-ReLU-1x1 conv to 4*growth, BN-ReLU-3x3 conv to
growth, concatenated to the input), transitions BN-ReLU-1x1 conv halving the width + 2x2 average
pool, a 3x3 stem conv to 2*growth channels, and BN-ReLU-global pool-linear at the end.
6,956,298 parameters and 888,350,720 MACs with 10 classes at 32x32 (-1.3% / -1.1%).
``stem="imagenet"`` (DenseNet-161, SlimConv Tab. 1) is torchvision's stem instead: 7x7/2 conv, BN,
ReLU, 3x3/2 max pool.

Placement (docs/placement.md): the conv type replaces the 3x3 conv (``4*growth -> growth``) of
every dense layer (role ``"kxk"``); the stem, the 1x1 convs and the transitions stay vanilla. The
pre-activation BNs sit before the convs and are always kept. A width-changing module (SlimConv:
``4*growth -> 4*growth/k``) is followed by a vanilla 1x1 conv back to ``growth`` channels (the
SlimConv author's advice, issue #2: "followed by a 1x1 conv that raises the channel dimension"),
so the growth rate and every concatenation stay as in the vanilla network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layers._utils import check_choice
from .placement import Placement, place_conv, resolve_placement, select_stages
from .registry import register_model

__all__ = ["DenseNet", "densenet121", "densenet161"]

STAGES = (1, 2, 3, 4)  # the dense blocks dense1..dense4


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (-> 4g) then BN-ReLU-kxk (-> g); output concatenated after the input."""

    def __init__(self, cin: int, growth: int, *, conv: str, place: Placement,
                 hparams: dict) -> None:
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2, width, _ = place_conv(conv, place, "kxk", inter, growth, 3, hparams=hparams)
        # A width-changing module is brought back to the growth rate by a 1x1 conv.
        self.proj = nn.Conv2d(width, growth, 1, bias=False) if width != growth else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.proj(self.conv2(self.relu(self.bn2(out))))
        return torch.cat((out, x), dim=1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """``conv1, dense1, trans1, ..., dense4, bn, linear`` (kuangliu's attribute names)."""

    def __init__(self, nblocks=(6, 12, 24, 16), growth: int = 32, reduction: float = 0.5,
                 num_classes: int = 10, *, in_channels: int = 3, stem: str = "cifar",
                 conv: str = "vanilla", placement: Placement | dict | str | None = None,
                 stages: tuple[int, ...] | None = None, **conv_hparams) -> None:
        super().__init__()
        check_choice("stem", stem, ("cifar", "imagenet"))
        place = resolve_placement(conv, placement)
        # stages: the dense blocks (dense1..dense4) whose 3x3 convs ``conv`` may replace
        selected = select_stages(stages, tuple(range(1, len(nblocks) + 1)))
        width = 2 * growth
        if stem == "cifar":  # kuangliu: one 3x3 conv, no norm
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        else:  # torchvision's conv0 / norm0 / relu0 / pool0
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        for i, n in enumerate(nblocks, 1):
            layers = []
            kind = conv if i in selected else "vanilla"
            for _ in range(n):
                layers.append(DenseLayer(width, growth, conv=kind, place=place,
                                         hparams=conv_hparams))
                width += growth
            setattr(self, f"dense{i}", nn.Sequential(*layers))
            if i < len(nblocks):
                out = math.floor(width * reduction)
                setattr(self, f"trans{i}", Transition(width, out))
                width = out
        self.num_blocks = len(nblocks)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for i in range(1, self.num_blocks + 1):
            out = getattr(self, f"dense{i}")(out)
            if i < self.num_blocks:
                out = getattr(self, f"trans{i}")(out)
        out = self.relu(self.bn(out)).mean((2, 3))
        return self.linear(out)


@register_model(input_size=32, stages=STAGES)
def densenet121(*, conv: str = "vanilla", num_classes: int = 10, stem: str = "cifar",
                **kwargs) -> DenseNet:
    """CIFAR DenseNet-121 (growth 32): SCConv Tab. 2 (7.05M / 898M MACs)."""
    check_choice("stem", stem, ("cifar",))
    return DenseNet((6, 12, 24, 16), 32, 0.5, num_classes, conv=conv, **kwargs)


@register_model(stages=STAGES)
def densenet161(*, conv: str = "vanilla", num_classes: int = 1000, stem: str = "imagenet",
                **kwargs) -> DenseNet:
    """DenseNet-161 (growth 48, blocks 6/12/36/24, 96 stem channels): SlimConv Tab. 1's ImageNet
    baseline (28.68M / 7.82G). ``stem="imagenet"`` is torchvision's ``densenet161`` (28,681,000
    params at 1000 classes); ``stem="cifar"`` the 3x3 stem of kuangliu's CIFAR DenseNets."""
    return DenseNet((6, 12, 36, 24), 48, 0.5, num_classes, conv=conv, stem=stem, **kwargs)
