"""ResNeXt-29 for CIFAR (Xie et al. 2017, Sec. 5.3), the "RX29" of SCConv Tab. 2.

Built as in kuangliu/pytorch-cifar (the CIFAR code base SPConv's author names in issue #14):
a 3x3 conv to 64 channels, three stages of 3 bottlenecks ``1x1 -> 3x3 (groups=cardinality,
strided) -> 1x1`` with group width ``cardinality * bottleneck_width`` doubling per stage and
output twice the group width, global average pooling and a linear classifier.

Default ``cardinality=4, bottleneck_width=64`` (ResNeXt29_4x64d): 27.11M params / 4.23 GMACs, the
closest standard build to SCConv's 28.27M / 4.55G (no standard 29-layer ResNeXt gives those
numbers: 8x64d of Xie et al. is 34.43M / 5.39G, kuangliu's 2x64d 9.13M / 1.41G).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers._utils import check_choice
from .placement import Placement, resolve_placement
from .registry import register_model
from .resnet import _Builder, _check_width, _init_weights

__all__ = ["CifarResNeXt", "ResNeXtBlock", "resnext29"]

STAGES = (1, 2, 3)  # layer1..layer3


class ResNeXtBlock(nn.Module):
    """Grouped bottleneck with expansion 2 (``conv1/bn1, conv2/bn2, conv3/bn3, downsample``)."""

    def __init__(self, inplanes: int, group_width: int, cardinality: int, stride: int,
                 place: _Builder) -> None:
        super().__init__()
        out_channels = 2 * group_width
        self.conv1, w1, rep = place("pointwise", inplanes, group_width, 1)
        self.bn1 = place.norm(rep, w1, nn.BatchNorm2d)
        self.conv2, w2, rep = place("kxk", w1, group_width, 3, stride, groups=cardinality)
        self.bn2 = place.norm(rep, w2, nn.BatchNorm2d)
        self.conv3, out, rep = place("pointwise", w2, out_channels, 1)
        _check_width("ResNeXtBlock.conv3", place.conv, out, out_channels)
        self.bn3 = place.norm(rep, out, nn.BatchNorm2d)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out_channels:
            proj, width, rep = place("downsample", inplanes, out_channels, 1, stride)
            _check_width("ResNeXtBlock.downsample", place.conv, width, out_channels)
            self.downsample = nn.Sequential(proj, place.norm(rep, width, nn.BatchNorm2d))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNeXt(nn.Module):
    """ResNeXt-(9n+2) for 32x32 inputs; top level ``conv1, bn1, relu, layer1..3, avgpool, fc``."""

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 4,
        bottleneck_width: int = 64,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        stem: str = "cifar",
        conv: str = "vanilla",
        placement: Placement | dict | str | None = None,
        stages: tuple[int, ...] | None = None,
        **conv_hparams,
    ) -> None:
        super().__init__()
        if (depth - 2) % 9 or depth < 11:
            raise ValueError(f"depth must be 9n+2 with n >= 1 (11, 20, 29), got {depth}")
        check_choice("stem", stem, ("cifar",))
        place = _Builder(conv, resolve_placement(conv, placement), conv_hparams)
        per_stage = place.per_stage(stages, STAGES)
        n = (depth - 2) // 9
        self.conv1, width, rep = place("stem", in_channels, 64, 3)
        _check_width("CifarResNeXt.conv1", conv, width, 64)
        self.bn1 = place.norm(rep, width, nn.BatchNorm2d)
        self.relu = nn.ReLU(inplace=True)
        inplanes, group_width = 64, cardinality * bottleneck_width
        for i, stride in enumerate((1, 2, 2), start=1):
            blocks = []
            for j in range(n):
                blocks.append(ResNeXtBlock(inplanes, group_width, cardinality,
                                           stride if j == 0 else 1, per_stage[i]))
                inplanes = 2 * group_width
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            group_width *= 2
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(input_size=32, stages=STAGES)
def resnext29(*, num_classes: int = 10, **kwargs) -> CifarResNeXt:
    """ResNeXt-29, default 4x64d (``cardinality``, ``bottleneck_width``: 2x64d, 8x64d, 32x4d)."""
    return CifarResNeXt(29, num_classes=num_classes, **kwargs)
