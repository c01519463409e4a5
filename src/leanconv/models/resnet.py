"""ResNet / ResNeXt / SE-ResNet (He et al. 2016, Xie et al. 2017, Hu et al. 2018) with any
registered conv type.

The layout is torchvision's ``torchvision/models/resnet.py`` (ResNet V1.5: stride on the 3x3 of the
bottleneck): top-level ``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``, an ``inplanes``
attribute and ``replace_stride_with_dilation``, so torchvision's ``IntermediateLayerGetter``,
``BackboneWithFPN`` and DeepLabV3 heads accept these models, and a vanilla build has exactly
torchvision's parameters and state_dict keys (ResNet-50: 25,557,032).

Every conv is placed through :func:`leanconv.models.placement.place_conv`; which ones a module
replaces, and what happens to the host BN, follows the paper's own build (docs/placement.md).

``stem="cifar"`` swaps the ImageNet stem (7x7/2 conv + 3x3/2 max pool) for the CIFAR stem of
kuangliu/pytorch-cifar (3x3/1 conv, no pool; ``maxpool`` becomes ``nn.Identity``), which is the
"ResNet-18/50/101 for CIFAR" of SlimConv Tab. 9-10, SCConv Tab. 1-2 and CompConv Tab. 7.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..layers import conv_hparams
from ..layers._utils import check_choice
from .placement import Placement, place_conv, place_norm, resolve_placement, select_stages
from .registry import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "SEBottleneck",
    "SqueezeExcitation",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x3d",
    "resnext101_32x4d",
    "resnext101_32x8d",
    "se_resnet50",
    "se_resnet101",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


#: stage numbers of the torchvision layout: ``layer1..layer4`` (He et al. 2016 Tab. 1 conv2_x..5_x)
STAGES = (1, 2, 3, 4)


class _Builder:
    """What every block needs to place a conv: conv type, placement, hparams."""

    def __init__(self, conv: str, placement: Placement, hparams: dict) -> None:
        unknown = sorted(set(hparams) - set(conv_hparams(conv)))
        if unknown:
            raise ValueError(
                f"conv {conv!r} does not take {', '.join(unknown)}; its hyperparameters are: "
                f"{', '.join(conv_hparams(conv)) or '(none)'}"
            )
        self.conv, self.placement, self.hparams = conv, placement, hparams

    def for_basic_block(self, channels: int) -> _Builder:
        """This builder with ``placement.basic="auto"`` resolved for a block of ``channels``."""
        placement = self.placement.resolve_basic(self.conv, channels, self.hparams)
        return self if placement is self.placement else _Builder(self.conv, placement,
                                                                 self.hparams)

    def __call__(self, role: str, cin: int, cout: int, k: int, stride: int = 1, **kw):
        return place_conv(self.conv, self.placement, role, cin, cout, k, stride,
                          hparams=self.hparams, **kw)

    def norm(self, replaced: bool, channels: int, norm_layer: Callable[..., nn.Module]):
        return place_norm(self.placement, replaced, channels, norm_layer)

    def per_stage(self, stages, allowed: tuple[int, ...]) -> dict[int, _Builder]:
        """Stage number -> this builder if ``stages`` selects it (:func:`select_stages`), else a
        vanilla one."""
        selected = select_stages(stages, allowed)
        vanilla = _Builder("vanilla", Placement(), {})
        return {s: self if s in selected else vanilla for s in allowed}


class BasicBlock(nn.Module):
    """Two k x k convs (ResNet-18/34). ``conv1`` carries the stride.

    With a width-changing module in ``conv1`` (SlimConv: C -> C/k) ``bn1`` and ``conv2`` read the
    produced width; ``conv2`` must give back ``planes`` for the residual sum.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        place: _Builder | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock only supports groups=1 and base_width=64, got {groups}, {base_width}"
            )
        norm_layer = norm_layer or nn.BatchNorm2d
        place = (place or _Builder("vanilla", Placement(), {})).for_basic_block(planes)
        self.conv1, width, rep = place("basic1", inplanes, planes, 3, stride, dilation=dilation)
        self.bn1 = place.norm(rep, width, norm_layer)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, out, rep = place("basic2", width, planes, 3, dilation=dilation)
        _check_width("BasicBlock.conv2", place.conv, out, planes)
        self.bn2 = place.norm(rep, out, norm_layer)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> k x k (strided, grouped) -> 1x1 expand (ResNet-50+/ResNeXt).

    SlimConv in ``conv2`` outputs ``width / k`` channels; ``conv3`` then reads that width (the
    official SC-ResNet wiring) and ``bn2`` is removed.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        place: _Builder | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        place = place or _Builder("vanilla", Placement(), {})
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1, w1, rep = place("pointwise", inplanes, width, 1)
        self.bn1 = place.norm(rep, w1, norm_layer)
        self.conv2, w2, rep = place("kxk", w1, width, 3, stride, groups=groups, dilation=dilation)
        self.bn2 = place.norm(rep, w2, norm_layer)
        self.conv3, out, rep = place("pointwise", w2, planes * self.expansion, 1)
        _check_width("Bottleneck.conv3", place.conv, out, planes * self.expansion)
        self.bn3 = place.norm(rep, out, norm_layer)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al. 2018, Fig. 3): global average pool, FC ``C -> C/r``, ReLU, FC
    ``C/r -> C``, sigmoid, channel-wise scale. The FCs are 1x1 convs with bias (timm's
    ``SEModule``): the same ``2 C^2 / r + C / r + C`` parameters as the paper's FC layers."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class SEBottleneck(Bottleneck):
    """Bottleneck with an SE block (reduction 16) on the residual branch, after ``bn3`` and before
    the sum with the identity (Hu et al. 2018, Fig. 3 "SE-ResNet module"). The convs are placed
    as in :class:`Bottleneck`; the SE block is part of the host and never replaced."""

    def __init__(self, inplanes: int, planes: int, *args, **kwargs) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.se = SqueezeExcitation(planes * self.expansion, 16)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def _check_width(where: str, conv: str, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(
            f"{where}: {conv} produces {got} channels where the residual needs {expected}; "
            f"choose a placement that does not put a width-changing conv there"
        )


class ResNet(nn.Module):
    """torchvision's ResNet with conv placement, configurable input channels and a CIFAR stem.

    Args (beyond torchvision's):
        in_channels: image channels (1 for Fashion-MNIST).
        stem: ``"imagenet"`` (7x7/2 conv + max pool) or ``"cifar"`` (3x3/1 conv, no pool).
        conv: registered conv type placed according to ``placement``.
        placement: see :func:`leanconv.models.placement.resolve_placement` (default: the paper's).
        stages: the stages (1-4: ``layer1..layer4``) whose convs ``conv`` may replace; the
            others stay vanilla (default: all). The stem follows the placement alone.
        **conv_hparams: the conv type's paper hyperparameters (``split_ratio=0.5``, ...).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        in_channels: int = 3,
        stem: str = "imagenet",
        conv: str = "vanilla",
        placement: Placement | dict | str | None = None,
        stages: tuple[int, ...] | None = None,
        **conv_hparams,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet", "cifar"))
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self._place = _Builder(conv, resolve_placement(conv, placement), conv_hparams)
        place = self._place.per_stage(stages, STAGES)
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, "
                f"got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        if stem == "imagenet":
            self.conv1, width, rep = self._place("stem", in_channels, self.inplanes, 7, 2)
        else:
            self.conv1, width, rep = self._place("stem", in_channels, self.inplanes, 3, 1)
        _check_width("ResNet.conv1", conv, width, self.inplanes)
        self.bn1 = self._place.norm(rep, width, self._norm_layer)
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(block, 64, layers[0], place=place[1])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0],
                                       place=place[2])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1],
                                       place=place[3])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2],
                                       place=place[4])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_weights(self, zero_init_residual)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False, *, place: _Builder | None = None) -> nn.Sequential:
        place = place or self._place
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            proj, width, rep = place("downsample", self.inplanes, planes * block.expansion, 1,
                                     stride)
            _check_width("downsample", place.conv, width, planes * block.expansion)
            downsample = nn.Sequential(proj, place.norm(rep, width, norm_layer))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer, place=place)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer, place=place))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's init: Kaiming-normal (fan_out) convs, unit/zero norms, optional zero-gamma
    on the last BN of each residual branch (Goyal et al. 2017)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else (
                getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None)
            if isinstance(last, nn.BatchNorm2d) and last.weight is not None:
                nn.init.constant_(last.weight, 0)


def _resnet(block, layers, *, conv: str = "vanilla", num_classes: int = 1000,
            **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes=num_classes, conv=conv, **kwargs)


@register_model(stages=STAGES)
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (He et al. 2016); ``stem="cifar"`` for CompConv Tab. 7's CIFAR-100 model."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model(stages=STAGES)
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (He et al. 2016)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model(stages=STAGES)
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: SlimConv Tab. 1/9/10, SPConv Tab. 2, SCConv Tab. 1-3, CompConv Tab. 7-8."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model(stages=STAGES)
def resnet101(**kwargs) -> ResNet:
    """ResNet-101: SlimConv Tab. 1, SCConv Tab. 3."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model(stages=STAGES)
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (He et al. 2016)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


@register_model(stages=STAGES)
def se_resnet50(**kwargs) -> ResNet:
    """SE-ResNet-50 (Hu et al. 2018; SE reduction 16): SlimConv Tab. 1 (ImageNet, 28.09M) and
    Tab. 9 with ``stem="cifar"`` (CIFAR-100, 26.50M; "Sc-SE-ResNet-50" with ``conv="slimconv"``).
    Vanilla: 28,088,024 params at 1000 classes, as timm's ``seresnet50``."""
    return _resnet(SEBottleneck, [3, 4, 6, 3], **kwargs)


@register_model(stages=STAGES)
def se_resnet101(**kwargs) -> ResNet:
    """SE-ResNet-101 (Hu et al. 2018): SlimConv Tab. 1 (49.33M) and Tab. 9 (CIFAR-100, 47.77M;
    "Sc-SE-ResNet-101"). Vanilla: 49,326,872 params at 1000 classes, as timm's ``seresnet101``."""
    return _resnet(SEBottleneck, [3, 4, 23, 3], **kwargs)


@register_model(stages=STAGES)
def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017): SlimConv Tab. 1."""
    return _resnet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


@register_model(stages=STAGES)
def resnext101_32x4d(**kwargs) -> ResNet:
    """ResNeXt-101 32x4d (Xie et al. 2017): SlimConv Tab. 1 baseline."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, **kwargs)


@register_model(stages=STAGES)
def resnext101_32x3d(**kwargs) -> ResNet:
    """ResNeXt-101 32x3d as built by SlimConv's official ``resnext101_32x3d``: stage depths
    [4, 8, 18, 3] (not [3, 4, 23, 3]; 33 bottlenecks all the same) and width 3 per group
    (SlimConv Tab. 1 "Sc-ResNeXt-101", k=2; reference notes §1.3).

    With ``conv="slimconv"`` the bottom k x k conv of the module defaults to
    ``bottom_groups=16`` (half the cardinality): its width ``96/6 = 16`` cannot take 32 groups,
    and 16 is what reproduces the README's 23.70M."""
    if kwargs.get("conv") == "slimconv":
        kwargs.setdefault("bottom_groups", 16)
    return _resnet(Bottleneck, [4, 8, 18, 3], groups=32, width_per_group=3, **kwargs)


@register_model(stages=STAGES)
def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 32x8d (Xie et al. 2017)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)


@register_model(stages=STAGES)
def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 (torchvision's: bottleneck width doubled)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


@register_model(stages=STAGES)
def wide_resnet101_2(**kwargs) -> ResNet:
    """Wide ResNet-101-2 (torchvision's: bottleneck width doubled)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], width_per_group=128, **kwargs)
