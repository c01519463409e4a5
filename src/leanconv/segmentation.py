"""Semantic segmentation on torchvision's DeepLabV3 head with a leanconv ResNet backbone.

DeepLabV3 (Chen et al. 2017, *Rethinking Atrous Convolution for Semantic Image Segmentation*,
arXiv:1706.05587) as torchvision builds it (``torchvision.models.segmentation.deeplabv3``:
``_deeplabv3_resnet``): ``IntermediateLayerGetter(backbone, {"layer4": "out", "layer3":
"aux"})``, ``DeepLabHead`` (ASPP, rates 12/24/36) and an optional ``FCNHead`` on layer3. The
backbone is a zoo ImageNet ResNet with any conv type, its last stages dilated instead of strided
(``replace_stride_with_dilation``; output stride 8 by default, as torchvision's builders). Every
k x k module of a dilated stage must then run with dilation 2 or 4: the builder checks the
modules it got and raises ``ValueError`` naming the conv type and the layer that does not.

>>> model = leanconv.segmentation.deeplabv3("resnet50", conv="spconv", num_classes=21)
>>> model(images)["out"].shape            # (N, 21, H, W)

Requires torchvision (``pip install 'leanconv[vision]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .detection import _torchvision, resnet_backbone
from .layers import available_convs, conv_class, conv_hparams

__all__ = ["check_dilation", "deeplabv3"]

# output stride -> replace_stride_with_dilation of layer2, layer3, layer4
_DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


def check_dilation(backbone: nn.Module, replace_stride_with_dilation: Sequence[bool]) -> None:
    """Raise ``ValueError`` if a k x k conv of a dilated ResNet stage does not run dilated.

    In a stage whose stride became dilation, every block after the first has dilation >= 2
    (torchvision's ``_make_layer``); each conv module there (registered conv types, including
    the ones nested inside another, and plain ``nn.Conv2d``) with a kernel larger than 1 must
    report it.
    """
    registered = tuple(conv_class(n) for n in available_convs())
    for stage, dilated in zip(("layer2", "layer3", "layer4"), replace_stride_with_dilation,
                              strict=True):
        if not dilated:
            continue
        for index, block in enumerate(getattr(backbone, stage)):
            if index == 0:
                continue
            for name, m in block.named_modules():
                if not isinstance(m, (nn.Conv2d, *registered)):
                    continue
                k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
                d = getattr(m, "dilation", 1)
                d = d[0] if isinstance(d, tuple) else d
                if k > 1 and d < 2:
                    raise ValueError(
                        f"{type(m).__name__} at {stage}.{index}.{name} runs with dilation {d}; "
                        f"the dilated {stage} needs >= 2 (this conv type cannot be dilated: use "
                        f"output_stride=32 or another conv)")


def deeplabv3(backbone: str = "resnet50", conv: str = "scconv", num_classes: int = 21, *,
              aux: bool = False, output_stride: int = 8,
              atrous_rates: Sequence[int] = (12, 24, 36), placement=None,
              **hparams) -> nn.Module:
    """torchvision's ``DeepLabV3`` on a dilated zoo ResNet with conv type ``conv``.

    Args:
        backbone: a zoo ImageNet ResNet (resnet18/34/50/101/152, ResNeXt, Wide ResNet).
        conv: registered conv type, placed by ``placement`` (default: the paper's rules).
        num_classes: output channels of the head (background included).
        aux: add torchvision's ``FCNHead`` on layer3 (output ``"aux"``).
        output_stride: 8 (layer3 and layer4 dilated, torchvision's default), 16 (layer4) or
            32 (no dilation).
        atrous_rates: the ASPP rates of ``DeepLabHead``.
        **hparams: the conv's paper hyperparameters.
    """
    _torchvision()
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    if output_stride not in _DILATION:
        raise ValueError(f"output_stride must be one of 8, 16, 32, got {output_stride!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    unknown = sorted(set(hparams) - set(conv_hparams(conv)))
    if unknown:
        raise ValueError(f"deeplabv3 with conv {conv!r} does not take {', '.join(unknown)}; "
                         f"conv hyperparameters: {', '.join(conv_hparams(conv)) or '(none)'}")
    replace = _DILATION[output_stride]
    try:
        body = resnet_backbone(backbone, conv, placement=placement,
                               replace_stride_with_dilation=replace, **hparams)
    except (ValueError, NotImplementedError) as e:
        if "dilation" not in str(e):
            raise
        raise ValueError(f"conv {conv!r} cannot be dilated as output stride {output_stride} "
                         f"needs: {e}") from None
    check_dilation(body, replace)
    c5 = body.inplanes  # layer4's output width (512 x block expansion)
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux else {})}
    return DeepLabV3(IntermediateLayerGetter(body, return_layers=return_layers),
                     DeepLabHead(c5, num_classes, atrous_rates),
                     FCNHead(c5 // 2, num_classes) if aux else None)
