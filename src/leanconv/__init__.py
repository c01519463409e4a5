"""leanconv: SlimConv, SPConv, SCConv and CompConv as drop-in replacements for ``nn.Conv2d``.

>>> import leanconv
>>> conv = leanconv.create_conv("spconv", 64, 128, stride=2, split_ratio=0.5)
>>> model = leanconv.create_model("resnet50", conv="scconv", num_classes=1000)
>>> report = leanconv.profile(model, (1, 3, 224, 224))
"""

from .inference import prepare_for_inference
from .layers import (
    CRU,
    SRU,
    CompConv,
    GhostConv,
    SCConv,
    SlimConv,
    SPConv,
    VanillaConv,
    available_convs,
    conv_hparams,
    conv_out_channels,
    convert_convs,
    create_conv,
)
from .models import available_models, create_model
from .profile import ProfileReport, profile

__version__ = "0.1.0"

__all__ = [
    "CRU",
    "SRU",
    "CompConv",
    "GhostConv",
    "ProfileReport",
    "SCConv",
    "SPConv",
    "SlimConv",
    "VanillaConv",
    "available_convs",
    "available_models",
    "conv_hparams",
    "conv_out_channels",
    "convert_convs",
    "create_conv",
    "create_model",
    "prepare_for_inference",
    "profile",
]
