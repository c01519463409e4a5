"""Object detectors on torchvision's heads with a leanconv ResNet backbone.

The heads, losses, anchors and box coding are torchvision's own
(``torchvision.models.detection``: Ren et al. 2015, *Faster R-CNN*, arXiv:1506.01497; Lin et
al. 2017, *Focal Loss for Dense Object Detection* (RetinaNet), arXiv:1708.02002); only the
backbone changes. A zoo ImageNet ResNet (:func:`leanconv.create_model`, any conv type and
placement) keeps torchvision's top-level layout (``conv1, bn1, relu, maxpool, layer1..layer4``
and ``inplanes``), so torchvision's ``_resnet_fpn_extractor`` wires it into a
``BackboneWithFPN`` exactly as ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn`` do:
C2-C5 (RetinaNet: C3-C5 plus P6/P7 from ``LastLevelP6P7``) into a 256-channel FPN.

Nothing is pretrained (``weights=None`` throughout: nothing is downloaded), so the backbone uses
trainable ``BatchNorm2d`` and all five stages train by default, as torchvision does without
weights.

>>> model = leanconv.detection.fasterrcnn("resnet50", conv="scconv", num_classes=3)
>>> losses = model(images, targets)          # train mode: dict of losses
>>> detections = model.eval()(images)        # [{"boxes", "labels", "scores"}, ...]

Requires torchvision (``pip install 'leanconv[vision]'``).
"""

from __future__ import annotations

import inspect

from torch import nn

from .layers import conv_hparams
from .models import create_model

__all__ = ["fasterrcnn", "resnet_backbone", "retinanet"]


def _torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ImportError("leanconv.detection needs torchvision: "
                          "pip install 'leanconv[vision]'") from None


def _resnet_names() -> list[str]:
    from .models import resnet

    return [n for n in resnet.__all__ if n[0].islower()]


def _split_kwargs(conv: str, kwargs: dict, head_cls: type) -> tuple[dict, dict]:
    """Split ``kwargs`` into the conv's hyperparameters and ``head_cls``'s keyword arguments;
    anything else is a ``ValueError`` naming both lists."""
    conv_keys = set(conv_hparams(conv))
    head_keys = set(inspect.signature(head_cls.__init__).parameters) - {"self", "backbone",
                                                                        "num_classes", "kwargs"}
    # GeneralizedRCNNTransform's extras, passed through **kwargs by both torchvision detectors.
    head_keys |= {"size_divisible", "fixed_size"}
    unknown = sorted(set(kwargs) - conv_keys - head_keys)
    if unknown:
        raise ValueError(
            f"{head_cls.__name__} with conv {conv!r} does not take {', '.join(unknown)}; "
            f"conv hyperparameters: {', '.join(sorted(conv_keys)) or '(none)'}; "
            f"detector arguments: {', '.join(sorted(head_keys))}")
    return ({k: v for k, v in kwargs.items() if k in conv_keys},
            {k: v for k, v in kwargs.items() if k not in conv_keys})


def resnet_backbone(backbone: str, conv: str, **kwargs) -> nn.Module:
    """A zoo ImageNet ResNet ``backbone`` built with ``conv`` (``kwargs``: ``placement``,
    ``replace_stride_with_dilation``, ``norm_layer``, conv hyperparameters, ...)."""
    from .models.resnet import ResNet

    names = _resnet_names()
    if backbone not in names:
        raise ValueError(f"backbone must be a zoo ResNet, one of {', '.join(names)}; "
                         f"got {backbone!r}")
    model = create_model(backbone, conv=conv, **kwargs)
    if not isinstance(model, ResNet):  # pragma: no cover - the names above are ResNets
        raise ValueError(f"{backbone} did not build a ResNet")
    return model


def _fpn_backbone(backbone: str, conv: str, trainable_layers: int, returned_layers,
                  extra_blocks, hparams: dict, placement):
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    if isinstance(trainable_layers, bool) or trainable_layers not in range(6):
        raise ValueError(f"trainable_layers must be an integer in 0..5, got {trainable_layers!r}")
    body = resnet_backbone(backbone, conv, placement=placement, **hparams)
    return _resnet_fpn_extractor(body, trainable_layers, returned_layers=returned_layers,
                                 extra_blocks=extra_blocks)


def fasterrcnn(backbone: str = "resnet50", conv: str = "scconv", num_classes: int = 91, *,
               trainable_layers: int = 5, placement=None, **kwargs) -> nn.Module:
    """torchvision's ``FasterRCNN`` on a ResNet-FPN backbone with conv type ``conv``.

    Same wiring as ``torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None)``: FPN
    on C2-C5 plus a max-pooled P6, torchvision's anchors, RPN and RoI heads. ``kwargs`` holds
    the conv's hyperparameters (``split_ratio=0.5``, ...) and ``FasterRCNN``'s own arguments
    (``min_size``, ``max_size``, ``box_detections_per_img``, ...).
    """
    _torchvision()
    from torchvision.models.detection import FasterRCNN

    _check_classes(num_classes, 2)  # background included
    hparams, head = _split_kwargs(conv, kwargs, FasterRCNN)
    body = _fpn_backbone(backbone, conv, trainable_layers, None, None, hparams, placement)
    return FasterRCNN(body, num_classes=num_classes, **head)


def retinanet(backbone: str = "resnet50", conv: str = "scconv", num_classes: int = 91, *,
              trainable_layers: int = 5, placement=None, **kwargs) -> nn.Module:
    """torchvision's ``RetinaNet`` on a ResNet-FPN backbone with conv type ``conv``.

    Same wiring as ``torchvision.models.detection.retinanet_resnet50_fpn(weights=None)``: FPN on
    C3-C5 plus P6/P7 (``LastLevelP6P7(256, 256)``), torchvision's anchors, heads and focal
    loss. ``kwargs``: the conv's hyperparameters and ``RetinaNet``'s own arguments.
    """
    _torchvision()
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    _check_classes(num_classes, 1)  # sigmoid per class, no background slot
    hparams, head = _split_kwargs(conv, kwargs, RetinaNet)
    body = _fpn_backbone(backbone, conv, trainable_layers, [2, 3, 4], LastLevelP6P7(256, 256),
                         hparams, placement)
    return RetinaNet(body, num_classes=num_classes, **head)


def _check_classes(num_classes: int, minimum: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < minimum:
        raise ValueError(f"num_classes must be an integer >= {minimum}, got {num_classes!r}")
