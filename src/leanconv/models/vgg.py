"""VGG-16 for CIFAR (13 conv + BN + ReLU, 5 max pools) with any registered conv type.

* ``vgg16``: 13 conv + 1 FC (``Linear(512, classes)``): the CIFAR VGG-16 of CompConv Table 3
  (14.7M / 314M; here 14,724,042 parameters and 313,201,664 MACs with 10 classes) and of
  HetConv (313.7M).
* ``vgg15``: 13 conv + 2 FC with BN (``Linear(512, 512) + BN1d + ReLU + Linear(512, classes)``,
  the CIFAR VGG of Li et al. 2017 "Pruning filters for efficient convnets"): SPConv's "VGG-16"
  of Table 1, called VGG-15 in the targets. It gives 14,987,722 parameters, not the 16.62M of
  SPConv's baseline row: SPConv's own alpha rows (5.6M, 3.77M, 2.85M, 2.39M) are only
  consistent with this 512-wide head; a head wide enough to add the missing 1.9M (e.g. 4096)
  would put every SPConv row 30-80% too high (docs/reproduction.md). ``hidden`` sets its width.

Placement (docs/placement.md): the conv type replaces the 3x3 convs (role ``"kxk"`` of
:mod:`leanconv.models.placement`) except the first, which reads the image (role ``"stem"``;
SPConv Table 1 note: "first 3x3 conv kept"). The host BN after each replaced conv is kept,
except where the paper's placement drops it (SlimConv). After a width-changing module
(SlimConv, ``C -> C/k``) the next conv stays vanilla, reads the ``C/k`` channels and restores the
planned width (SlimConv Fig. 3 and the author's advice to follow it by a conv that raises the
width again), so SlimConv takes every other conv; no paper builds Sc-VGG.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import conv_out_channels
from ..layers._utils import check_choice, check_positive_int
from .placement import Placement, place_conv, place_norm, resolve_placement, select_stages
from .registry import register_model

__all__ = ["VGG", "vgg15", "vgg16"]

_CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M")
STAGES = (1, 2, 3, 4, 5)  # the conv groups before each of the 5 max pools


class VGG(nn.Module):
    """``features`` (conv/BN/ReLU stack with max pools), ``avgpool``, ``classifier``.

    Args:
        cfg: widths and ``"M"`` (2x2 max pool) in order.
        head: ``"linear"`` (1 FC) or ``"mlp"`` (FC -> BN1d -> ReLU -> FC).
        hidden: width of the ``"mlp"`` head's hidden layer.
        placement: where the conv type goes (see :func:`resolve_placement`).
        stages: the stages (1-5, the conv groups between max pools, CompConv Tab. 4's
            "Comp-VGG16-1s" / "-5s") whose convs ``conv`` may replace; default all.
    """

    def __init__(self, cfg=_CFG16, num_classes: int = 10, *, in_channels: int = 3,
                 head: str = "linear", hidden: int = 512, stem: str = "cifar",
                 conv: str = "vanilla", placement: Placement | dict | str | None = None,
                 stages: tuple[int, ...] | None = None, **conv_hparams) -> None:
        super().__init__()
        check_choice("head", head, ("linear", "mlp"))
        check_choice("stem", stem, ("cifar",))
        check_positive_int("hidden", hidden)
        place = resolve_placement(conv, placement)
        selected = select_stages(stages, tuple(range(1, cfg.count("M") + 1)))
        layers: list[nn.Module] = []
        cin, first, narrowed, stage = in_channels, True, False, 1
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                stage += 1
                continue
            kind = conv if stage in selected else "vanilla"
            # The conv after a width-changing module stays vanilla and restores the planned width.
            role = "stem" if first or narrowed else "kxk"
            want = item
            if kind != "vanilla" and place.replaces(role):
                item = conv_out_channels(kind, cin, item, **conv_hparams)  # SlimConv: C/k
            module, width, replaced = place_conv(kind, place, role, cin, item, 3,
                                                 hparams=conv_hparams)
            layers += [module, place_norm(place, replaced, width), nn.ReLU(inplace=True)]
            narrowed = replaced and width != want
            cin, first = width, False
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # 1x1 already at 32x32: free, any input size
        if head == "linear":
            self.classifier = nn.Linear(cin, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model(input_size=32, stages=STAGES)
def vgg16(*, conv: str = "vanilla", num_classes: int = 10, **kwargs) -> VGG:
    """CIFAR VGG-16, 13 conv + 1 FC (CompConv Tab. 3: 14.7M / 314M MACs)."""
    return VGG(_CFG16, num_classes, conv=conv, head="linear", **kwargs)


@register_model(input_size=32, stages=STAGES)
def vgg15(*, conv: str = "vanilla", num_classes: int = 10, **kwargs) -> VGG:
    """CIFAR VGG, 13 conv + 2 FC with BN (SPConv Tab. 1's VGG-16; see the module docstring)."""
    kwargs.setdefault("head", "mlp")
    return VGG(_CFG16, num_classes, conv=conv, **kwargs)
