"""Model zoo: the architectures of the papers' tables, built with any registered conv type."""

from . import (  # noqa: F401  (importing a family registers its builders)
    densenet,
    dla,
    mobilenetv2,
    resnet,
    resnet_cifar,
    resnext_cifar,
    shufflenetv2,
    vgg,
    wide_resnet,
)
from .placement import Placement
from .registry import (
    available_models,
    create_model,
    default_input_size,
    model_stages,
    register_model,
)

__all__ = [
    "Placement",
    "available_models",
    "create_model",
    "default_input_size",
    "model_stages",
    "register_model",
]
