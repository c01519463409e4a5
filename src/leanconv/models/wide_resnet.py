"""Wide ResNet for CIFAR (Zagoruyko & Komodakis 2016), WRN-28-10 of SCConv Tab. 2.

Pre-activation basic blocks ``BN-ReLU-conv1-(dropout)-BN-ReLU-conv2`` at widths 16k, 32k, 64k,
(depth-4)/6 blocks per stage, a 1x1 projection where the shape changes, then BN-ReLU, global
average pooling and a linear classifier.

The default build is the widely used meliketoy/wide-resnet.pytorch one: the stride sits on
``conv2`` (``stride_on="conv2"``) and the convs have biases. That layout is what SCConv Tab. 2
measured: WRN-28-10 36.49M params / 5.96 GMACs (paper 36.55M / 5.96G); with the original stride on
``conv1`` the MACs would be 5.25G (``stride_on="conv1", bias=False`` gives the paper's WRN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers._utils import check_choice
from .placement import Placement, resolve_placement
from .registry import register_model
from .resnet import _Builder, _check_width, _init_weights

__all__ = ["WideBasic", "WideResNet", "wrn28_10"]

STAGES = (1, 2, 3)  # layer1..layer3: widths 16k, 32k, 64k


class WideBasic(nn.Module):
    """Pre-activation wide basic block; roles ``basic1`` (conv1) and ``basic2`` (conv2)."""

    def __init__(self, inplanes: int, planes: int, stride: int, place: _Builder, *,
                 dropout: float = 0.0, stride_on: str = "conv2", bias: bool = True) -> None:
        super().__init__()
        s1, s2 = (1, stride) if stride_on == "conv2" else (stride, 1)
        place = place.for_basic_block(planes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1, width, rep = place("basic1", inplanes, planes, 3, s1, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = place.norm(rep, width, nn.BatchNorm2d)  # the BN right after conv1
        self.conv2, out, _ = place("basic2", width, planes, 3, s2, bias=bias)
        _check_width("WideBasic.conv2", place.conv, out, planes)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut, width, _ = place("downsample", inplanes, planes, 1, stride, bias=bias)
            _check_width("WideBasic.shortcut", place.conv, width, planes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(self.dropout(out))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs; top level ``conv1, layer1..3, bn, relu, avgpool, fc``."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        dropout: float = 0.0,
        stride_on: str = "conv2",
        bias: bool = True,
        stem: str = "cifar",
        conv: str = "vanilla",
        placement: Placement | dict | str | None = None,
        stages: tuple[int, ...] | None = None,
        **conv_hparams,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (16, 22, 28, 40), got {depth}")
        check_choice("stride_on", stride_on, ("conv1", "conv2"))
        check_choice("stem", stem, ("cifar",))
        place = _Builder(conv, resolve_placement(conv, placement), conv_hparams)
        per_stage = place.per_stage(stages, STAGES)
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1, width, _ = place("stem", in_channels, 16, 3, bias=bias)
        _check_width("WideResNet.conv1", conv, width, 16)
        inplanes = 16
        for i, (planes, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(inplanes, planes, stride if j == 0 else 1, per_stage[i],
                                        dropout=dropout, stride_on=stride_on, bias=bias))
                inplanes = planes
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


@register_model(input_size=32, stages=STAGES)
def wrn28_10(*, num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-28-10: SCConv Tab. 2 (36.55M / 5.96G)."""
    return WideResNet(28, 10, num_classes=num_classes, **kwargs)
