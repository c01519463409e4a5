"""leanconv: SlimConv, SPConv, SCConv and CompConv as drop-in replacements for ``nn.Conv2d``.

>>> import leanconv
>>> conv = leanconv.create_conv("spconv", 64, 128, stride=2, split_ratio=0.5)
>>> model = leanconv.create_model("resnet50", conv="scconv", num_classes=1000)
>>> report = leanconv.profile(model, (1, 3, 224, 224))
>>> dry = leanconv.convert_convs(torchvision.models.resnet50(), "slimconv", dry_run=True)
>>> plan = leanconv.make_plan("resnet56", batch=128, max_macs=0.65)  # times measured here
"""

from .inference import prepare_for_inference
from .layers import (
    CRU,
    SRU,
    CompConv,
    ConversionReport,
    GhostConv,
    SCConv,
    SlimConv,
    SPConv,
    VanillaConv,
    available_convs,
    conv_hparams,
    conv_out_channels,
    conversion_report,
    convert_convs,
    create_conv,
)
from .models import available_models, create_model
from .plan import Plan, load_plan, make_plan
from .profile import ProfileReport, profile

__version__ = "0.1.0"

__all__ = [
    "CRU",
    "SRU",
    "CompConv",
    "ConversionReport",
    "GhostConv",
    "Plan",
    "ProfileReport",
    "SCConv",
    "SPConv",
    "SlimConv",
    "VanillaConv",
    "available_convs",
    "available_models",
    "conv_hparams",
    "conv_out_channels",
    "conversion_report",
    "convert_convs",
    "create_conv",
    "create_model",
    "load_plan",
    "make_plan",
    "prepare_for_inference",
    "profile",
]
