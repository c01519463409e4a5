"""DLA-46-C (Yu et al. 2018, *Deep Layer Aggregation*) with any registered conv type.

SlimConv Table 3 (ImageNet, 224x224): DLA-46-C 1.31M / 0.590 GFLOPs, Sc-DLA-46-C (r=8, L=16)
0.97M / 0.498G. The layout is the official ucbdrive/dla ``dla46_c`` (as timm's ``dla46_c``):

* ``base_layer``: 7x7 stride-1 conv to 16 channels; ``level0``: a 3x3 conv (16); ``level1``: a
  3x3 stride-2 conv (32). These three are the stem (role ``"stem"``).
* ``level2..level5``: hierarchical aggregation trees of depth 1, 2, 2, 1 with 64, 64, 128, 256
  channels, each entered through a 2x2 max pool (stride 2); a tree of depth 1 is two bottlenecks
  (expansion 2: ``1x1 -> 3x3 -> 1x1``, the first reads the pooled input with a 1x1 conv + BN
  projection as its shortcut where the width changes) and a 1x1 conv + BN + ReLU root over their
  outputs (and, in ``level3..5``, the pooled tree input: iterative deep aggregation).
* global average pooling and a linear classifier (the official 1x1 conv, same parameters).

Counts: 1,301,400 params at 1000 classes (timm ``dla46_c``). The official code also builds a
1x1 projection in depth-2 trees whose result is never used (in ``level4``, 64 -> 128: 8,448
params, 1,309,848 in all, the 1.31M of the tables); like timm, this build omits it.

Placement (docs/placement.md): bottleneck ``conv2`` is role ``"kxk"``, ``conv1`` / ``conv3`` and
the roots ``"pointwise"``, the projections ``"downsample"``, as in the ResNets; SlimConv removes
the BN after its module and ``conv3`` reads its ``C/k`` channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers._utils import check_choice
from .placement import Placement, resolve_placement
from .registry import register_model
from .resnet import _Builder, _check_width, _init_weights

__all__ = ["DLA", "DlaBottleneck", "dla46_c"]

STAGES = (2, 3, 4, 5)  # the trees level2..level5


class DlaBottleneck(nn.Module):
    """``1x1 -> 3x3 (strided) -> 1x1`` with expansion 2; the shortcut is given by the tree."""

    expansion = 2

    def __init__(self, inplanes: int, planes: int, stride: int, place: _Builder) -> None:
        super().__init__()
        mid = planes // self.expansion
        self.conv1, w1, rep = place("pointwise", inplanes, mid, 1)
        self.bn1 = place.norm(rep, w1, nn.BatchNorm2d)
        self.conv2, w2, rep = place("kxk", w1, mid, 3, stride)
        self.bn2 = place.norm(rep, w2, nn.BatchNorm2d)
        self.conv3, out, rep = place("pointwise", w2, planes, 1)
        _check_width("DlaBottleneck.conv3", place.conv, out, planes)
        self.bn3 = place.norm(rep, out, nn.BatchNorm2d)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        shortcut = x if shortcut is None else shortcut
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class DlaRoot(nn.Module):
    """Aggregation node: concatenate the children, 1x1 conv, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, place: _Builder) -> None:
        super().__init__()
        self.conv, width, rep = place("pointwise", in_channels, out_channels, 1)
        _check_width("DlaRoot.conv", place.conv, width, out_channels)
        self.bn = place.norm(rep, width, nn.BatchNorm2d)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, children: list[Tensor]) -> Tensor:
        return self.relu(self.bn(self.conv(torch.cat(children, 1))))


class DlaTree(nn.Module):
    """Hierarchical deep aggregation tree of ``levels`` (official ``Tree``, without the unused
    projection of depth > 1 trees)."""

    def __init__(self, levels: int, inplanes: int, planes: int, stride: int, place: _Builder, *,
                 level_root: bool = False, root_dim: int = 0) -> None:
        super().__init__()
        root_dim = root_dim or 2 * planes
        if level_root:
            root_dim += inplanes
        self.downsample = nn.MaxPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.project: nn.Module = nn.Identity()
        self.root: DlaRoot | None = None
        if levels == 1:
            self.tree1: nn.Module = DlaBottleneck(inplanes, planes, stride, place)
            self.tree2: nn.Module = DlaBottleneck(planes, planes, 1, place)
            if inplanes != planes:
                proj, width, rep = place("downsample", inplanes, planes, 1)
                _check_width("DlaTree.project", place.conv, width, planes)
                self.project = nn.Sequential(proj, place.norm(rep, width, nn.BatchNorm2d))
            self.root = DlaRoot(root_dim, planes, place)
        else:
            self.tree1 = DlaTree(levels - 1, inplanes, planes, stride, place)
            self.tree2 = DlaTree(levels - 1, planes, planes, 1, place, root_dim=root_dim + planes)
        self.level_root = level_root

    def forward(self, x: Tensor, shortcut: Tensor | None = None,
                children: list[Tensor] | None = None) -> Tensor:
        children = [] if children is None else children
        bottom = self.downsample(x)
        if self.level_root:
            children.append(bottom)
        if self.root is not None:
            x1 = self.tree1(x, self.project(bottom))
            return self.root([self.tree2(x1), x1, *children])
        x1 = self.tree1(x)
        children.append(x1)
        return self.tree2(x1, None, children)


class DLA(nn.Module):
    """DLA with bottleneck blocks; top level ``base_layer, level0..level5, fc``.

    Args:
        levels: convs of ``level0`` / ``level1``, then the tree depths of ``level2..level5``.
        channels: widths of ``base_layer`` (= ``level0``), ``level1``, ..., ``level5``.
        stages: the trees (2-5) whose convs ``conv`` may replace; default all.
    """

    def __init__(self, levels=(1, 1, 1, 2, 2, 1), channels=(16, 32, 64, 64, 128, 256),
                 num_classes: int = 1000, *, in_channels: int = 3, stem: str = "imagenet",
                 conv: str = "vanilla", placement: Placement | dict | str | None = None,
                 stages: tuple[int, ...] | None = None, **conv_hparams) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet",))
        place = _Builder(conv, resolve_placement(conv, placement), conv_hparams)
        per_stage = place.per_stage(stages, STAGES)
        self.base_layer = self._conv_level(place, in_channels, channels[0], 1, 7)
        self.level0 = self._conv_level(place, channels[0], channels[0], 1, 3, levels[0])
        self.level1 = self._conv_level(place, channels[0], channels[1], 2, 3, levels[1])
        for i in STAGES:
            self.add_module(f"level{i}", DlaTree(levels[i], channels[i - 1], channels[i], 2,
                                                 per_stage[i], level_root=i > 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        _init_weights(self)

    @staticmethod
    def _conv_level(place: _Builder, cin: int, cout: int, stride: int, k: int,
                    convs: int = 1) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(convs):
            conv, width, rep = place("stem", cin, cout, k, stride if i == 0 else 1)
            _check_width("DLA stem", place.conv, width, cout)
            layers += [conv, place.norm(rep, width, nn.BatchNorm2d), nn.ReLU(inplace=True)]
            cin = cout
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.level1(self.level0(self.base_layer(x)))
        x = self.level5(self.level4(self.level3(self.level2(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(stages=STAGES)
def dla46_c(*, conv: str = "vanilla", num_classes: int = 1000, **kwargs) -> DLA:
    """DLA-46-C: SlimConv Tab. 3 (1.31M / 0.59G; "Sc-DLA-46-C (r=8, L=16)" 0.97M / 0.498G)."""
    return DLA((1, 1, 1, 2, 2, 1), (16, 32, 64, 64, 128, 256), num_classes, conv=conv, **kwargs)
