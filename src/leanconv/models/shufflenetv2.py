"""ShuffleNetV2 1.0x (Ma et al. 2018) for ImageNet and CIFAR with any registered conv type.

SlimConv Table 3 (ImageNet, 224x224): ShuffleNetV2 2.28M / 0.151 GFLOPs, Sc-ShuffleNetV2
2.25M / 0.147G. SlimConv Table 8 (CIFAR-100): 1.36M / 46.22M and 1.34M / 44.58M.

* ``stem="imagenet"``: torchvision's ``shufflenet_v2_x1_0`` layer for layer (2,278,604
  parameters and 144,907,992 MACs at 224x224 with 1000 classes).
* ``stem="cifar"``: the stem conv is 3x3 stride 1 and the max pool is dropped (kuangliu /
  pytorch-cifar); stages 2-4 then run at 16, 8, 4 pixels on 32x32 inputs (1.36M parameters with
  100 classes).

Placement (docs/placement.md): the conv type replaces the 3x3 depthwise conv of the main
branch (``branch2``) of every unit of the chosen ``stages`` (2, 3, 4; all by default), stride-2
units included; the stem, the 1x1 convs and the shortcut branch (``branch1``) of the stride-2
units stay vanilla. Stage 2's branches have 58 channels, which SPConv and SCConv (even splits
divisible by their groups) cannot take and SlimConv's paper build leaves vanilla (58 is not
divisible by 2r = 4; the module floors such widths, but Table 3's 2.25M keeps stage 2 vanilla):
for them the default is stages 3 and 4, and CRU / SCConv (which squeeze ``C/2`` by r = 2 into
g = 2 groups: C divisible by 8) only stage 4. Vanilla, Ghost and CompConv default to all three.
Depthwise handling per conv type is :func:`~leanconv.models.mobilenetv2.depthwise_conv`
(SlimConv: depthwise in both pathways, its BNs replace the host BN, the following 1x1 conv reads
its ``C/k`` channels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers._utils import channel_shuffle, check_choice
from .mobilenetv2 import depthwise_conv
from .placement import select_stages
from .registry import register_model

__all__ = ["ShuffleNetV2", "shufflenet_v2_x1_0"]

STAGES = (2, 3, 4)  # Ma et al. Tab. 5's Stage2..Stage4 (torchvision's stage2..stage4)
_ANY_WIDTH = ("vanilla", "ghost", "compconv")  # conv types that take the 58-channel stage 2
_START = {"cru": (4,), "scconv": (4,)}  # 116 channels: 116/2/2 = 29 is not divisible by g = 2


def _dw(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: split (stride 1) or copy (stride 2), two branches, concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int, *, conv: str, hparams: dict) -> None:
        super().__init__()
        self.stride = stride
        bf = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _dw(cin, stride), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        b_in = cin if stride > 1 else bf
        dw, width, keep_bn = depthwise_conv(conv, bf, stride, **hparams)
        self.branch2 = nn.Sequential(
            nn.Conv2d(b_in, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
            dw, nn.BatchNorm2d(width) if keep_bn else nn.Identity(),
            nn.Conv2d(width, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's layout: ``conv1, maxpool, stage2..4, conv5, fc``."""

    def __init__(self, stages_repeats=(4, 8, 4), stages_out_channels=(24, 116, 232, 464, 1024),
                 num_classes: int = 1000, *, in_channels: int = 3, stem: str = "imagenet",
                 conv: str = "vanilla", stages: tuple[int, ...] | None = None,
                 **conv_hparams) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet", "cifar"))
        if stages is None:
            # Stage 2's branches have 58 channels: SPConv and SCConv need even halves divisible
            # by their groups; SlimConv's paper build (Table 3) also starts at stage 3.
            # CRU (and SCConv) also squeeze alpha*C by r into groups of g: C divisible by 8.
            stages = (2, 3, 4) if conv in _ANY_WIDTH else _START.get(conv, (3, 4))
        stages = select_stages(stages, STAGES)
        cifar = stem == "cifar"
        c0 = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, 1 if cifar else 2, 1, bias=False),
            nn.BatchNorm2d(c0), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        cin = c0
        for index, repeats, cout in zip((2, 3, 4), stages_repeats, stages_out_channels[1:4],
                                        strict=True):
            kind, hp = (conv, conv_hparams) if index in stages else ("vanilla", {})
            units = [InvertedResidual(cin, cout, 2, conv=kind, hparams=hp)]
            units += [InvertedResidual(cout, cout, 1, conv=kind, hparams=hp)
                      for _ in range(repeats - 1)]
            name = f"stage{index}"
            setattr(self, name, nn.Sequential(*units))
            cin = cout
        last = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean((2, 3)))


@register_model(stages=STAGES)
def shufflenet_v2_x1_0(*, conv: str = "vanilla", num_classes: int = 1000,
                       **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x: ``stem="imagenet"`` (SlimConv Tab. 3) or ``"cifar"`` (Tab. 8)."""
    return ShuffleNetV2(num_classes=num_classes, conv=conv, **kwargs)
