"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, Sec. 4.2) with any registered conv type.

6n+2 layers: a 3x3 conv to 16 channels, three stages of n basic blocks at 16, 32, 64 channels
(32x32, 16x16, 8x8), global average pooling and a linear classifier.

Shortcuts: ``shortcut="B"`` (default) projects with a 1x1 conv + BN where the shape changes;
``shortcut="A"`` (the paper's CIFAR option, parameter-free) subsamples and zero-pads the channels.
Option B is what reproduces the tables' counts: ResNet-20 0.272M (SPConv Tab. 1: 0.27M), ResNet-56
0.856M (SCConv Tab. 2: 0.86M); option A gives 0.270M and 0.853M (0.85M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers._utils import check_choice
from .placement import Placement, resolve_placement
from .registry import register_model
from .resnet import BasicBlock, _Builder, _check_width, _init_weights

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

STAGES = (1, 2, 3)  # layer1..layer3: the 16-, 32- and 64-channel stacks


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel, zero-pad channels up to ``out``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # ceil(H / stride), like the strided conv
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; top-level ``conv1, bn1, relu, layer1..3, avgpool, fc``."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: str = "B",
        stem: str = "cifar",
        conv: str = "vanilla",
        placement: Placement | dict | str | None = None,
        stages: tuple[int, ...] | None = None,
        zero_init_residual: bool = False,
        **conv_hparams,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        check_choice("shortcut", shortcut, ("A", "B"))
        check_choice("stem", stem, ("cifar",))
        self._place = _Builder(conv, resolve_placement(conv, placement), conv_hparams)
        self.shortcut = shortcut
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1, width, rep = self._place("stem", in_channels, widths[0], 3)
        _check_width("CifarResNet.conv1", conv, width, widths[0])
        self.bn1 = self._place.norm(rep, width, nn.BatchNorm2d)
        self.relu = nn.ReLU(inplace=True)
        place = self._place.per_stage(stages, STAGES)
        self.layer1 = self._make_layer(widths[0], n, 1, place[1])
        self.layer2 = self._make_layer(widths[1], n, 2, place[2])
        self.layer3 = self._make_layer(widths[2], n, 2, place[3])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        _init_weights(self, zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int, place: _Builder
                    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = PadShortcut(self.inplanes, planes, stride)
            else:
                proj, width, rep = place("downsample", self.inplanes, planes, 1, stride)
                _check_width("downsample", place.conv, width, planes)
                downsample = nn.Sequential(proj, place.norm(rep, width, nn.BatchNorm2d))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, place=place)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, place=place) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, *, num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(depth, num_classes=num_classes, **kwargs)


@register_model(input_size=32, stages=STAGES)
def resnet20(**kwargs) -> CifarResNet:
    """CIFAR ResNet-20: SPConv Tab. 1 and Tab. 4 (ablation)."""
    return _cifar_resnet(20, **kwargs)


@register_model(input_size=32, stages=STAGES)
def resnet32(**kwargs) -> CifarResNet:
    """CIFAR ResNet-32."""
    return _cifar_resnet(32, **kwargs)


@register_model(input_size=32, stages=STAGES)
def resnet44(**kwargs) -> CifarResNet:
    """CIFAR ResNet-44."""
    return _cifar_resnet(44, **kwargs)


@register_model(input_size=32, stages=STAGES)
def resnet56(**kwargs) -> CifarResNet:
    """CIFAR ResNet-56: SCConv Tab. 2."""
    return _cifar_resnet(56, **kwargs)


@register_model(input_size=32, stages=STAGES)
def resnet110(**kwargs) -> CifarResNet:
    """CIFAR ResNet-110."""
    return _cifar_resnet(110, **kwargs)
