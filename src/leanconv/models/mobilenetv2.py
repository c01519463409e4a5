"""MobileNetV2 (Sandler et al. 2018) for ImageNet and CIFAR with any registered conv type.

SlimConv Table 3 (ImageNet, 224x224): MobileNetV2 3.51M / 0.320 GFLOPs, Sc-MobileNetV2
(k=8/3, r=24, L=6) 3.38M / 0.256G. SlimConv Table 8 (CIFAR-100): 2.41M / 94.72M and
2.19M / 74.80M.

* ``stem="imagenet"``: torchvision's ``mobilenet_v2`` layer for layer (3,504,872 parameters and
  300,774,272 MACs at 224x224 with 1000 classes).
* ``stem="cifar"``: kuangliu/pytorch-cifar's CIFAR MobileNetV2, the build whose count matches
  Table 8 (2.41M with 100 classes): 3x3 stride-1 stem, the 24-channel stage at stride 1 (so the
  strides are 1,1,2,2,1,2,1), and a 1x1 conv + BN projection shortcut in every stride-1 block
  whose width changes (torchvision has no shortcut there).

Placement (docs/placement.md): the conv type replaces the 3x3 **depthwise** conv of every
inverted residual block (the stem and the 1x1 expand/project convs stay vanilla):

* ``vanilla`` and any conv with a ``groups`` argument stay depthwise (``groups = C``);
* ``slimconv`` is depthwise in both its pathways (``groups = C/r``, ``bottom_groups = C/(2r)``),
  its BNs replace the host BN, and the 1x1 project conv reads its ``C/k`` channels (SlimConv §3.2,
  Fig. 3); Table 3's Sc-MobileNetV2 uses k=8/3 with the SE floor ``max(C/24, 6)``;
* conv types without ``groups`` (SPConv, SCConv, CompConv, Ghost) become a full k x k conv
  C -> C in that position (their own grouping), which costs far more than the depthwise conv
  they replace: none of the papers builds them into MobileNetV2.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from ..layers import conv_class, conv_out_channels, create_conv
from ..layers._utils import check_choice
from .placement import select_stages
from .registry import register_model

__all__ = ["MobileNetV2", "depthwise_conv", "mobilenet_v2"]

STAGES = (1, 2, 3, 4, 5, 6, 7)  # the bottleneck sequences of Sandler et al. Tab. 2


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def depthwise_conv(conv: str, channels: int, stride: int = 1, kernel_size: int = 3,
                   **hparams) -> tuple[nn.Module, int, bool]:
    """The conv placed where a host network has a k x k depthwise conv.

    Returns ``(module, width it produces, keep the host's BN)``. See the module docstring for
    the rule per conv type.
    """
    if conv == "vanilla":
        return create_conv("vanilla", channels, channels, kernel_size, stride,
                           groups=channels), channels, True
    width = conv_out_channels(conv, channels, channels, **hparams)
    if conv == "slimconv":
        # widths: top C/r, bottom C/(2r) (k > 1: out = 3C/(2r)); k = 1: top C/2, bottom 1x1 C/4
        top, mid = (channels // 2, channels // 4) if width == channels else (2 * width // 3,
                                                                              width // 3)
        module = create_conv(conv, channels, None, kernel_size, stride, groups=top,
                             bottom_groups=mid, **hparams)
        return module, width, False
    params = inspect.signature(conv_class(conv).__init__).parameters
    extra = {"groups": channels} if "groups" in params and width == channels else {}
    module = create_conv(conv, channels, width, kernel_size, stride, **extra, **hparams)
    return module, width, True


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1 on ImageNet) -> 3x3 depthwise -> 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, *, conv: str,
                 hparams: dict, cifar: bool) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        layers: list[nn.Module] = []
        if expand_ratio != 1 or cifar:  # kuangliu's CIFAR blocks always expand, t = 1 too
            layers.append(_conv_bn_relu(cin, hidden, 1))
        dw, width, keep_bn = depthwise_conv(conv, hidden, stride, **hparams)
        layers += [
            nn.Sequential(dw, nn.BatchNorm2d(width) if keep_bn else nn.Identity(),
                          nn.ReLU6(inplace=True)),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout
        # kuangliu's CIFAR build projects the shortcut of stride-1 blocks that change width.
        self.shortcut = None
        if cifar and stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.use_res_connect:
            return x + out
        if self.shortcut is not None:
            return out + self.shortcut(x)
        return out


class MobileNetV2(nn.Module):
    """torchvision's layout: ``features`` (stem, 17 blocks, last 1x1 conv), ``classifier``.

    ``stages``: the bottleneck sequences (1-7, the rows t, c, n, s of Sandler et al. Tab. 2,
    timm's ``blocks.0..6``) whose depthwise convs ``conv`` replaces; default all.
    """

    def __init__(self, num_classes: int = 1000, *, in_channels: int = 3, width_mult: float = 1.0,
                 stem: str = "imagenet", conv: str = "vanilla", dropout: float = 0.2,
                 stages: tuple[int, ...] | None = None, **conv_hparams) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet", "cifar"))
        selected = select_stages(stages, STAGES)
        cifar = stem == "cifar"
        # t, c, n, s (Table 2 of the MobileNetV2 paper); CIFAR: stride 1 at the 24-channel stage
        setting = [[1, 16, 1, 1], [6, 24, 2, 1 if cifar else 2], [6, 32, 3, 2], [6, 64, 4, 2],
                   [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu(in_channels, cin, 3, 1 if cifar else 2)]
        for stage, (t, c, n, s) in enumerate(setting, start=1):
            cout = _make_divisible(c * width_mult)
            kind, hp = (conv, conv_hparams) if stage in selected else ("vanilla", {})
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, conv=kind,
                                                 hparams=hp, cifar=cifar))
                cin = cout
        features.append(_conv_bn_relu(cin, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


@register_model(stages=STAGES)
def mobilenet_v2(*, conv: str = "vanilla", num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 1.0: ``stem="imagenet"`` (SlimConv Tab. 3) or ``"cifar"`` (Tab. 8).

    With ``conv="slimconv"`` the compression ratio defaults to the paper's Sc-MobileNetV2 value
    k = 8/3 (Tab. 3; the only k SlimConv builds into MobileNetV2); Tab. 8's CIFAR-100 row
    (2.19M) is that k with the module's default SE (reduction 32).
    """
    if conv == "slimconv":
        kwargs.setdefault("compression_ratio", "8/3")
    return MobileNetV2(num_classes, conv=conv, **kwargs)
