"""Convolution modules, one file per paper, all reachable through :func:`create_conv`."""

from .compconv import CompConv
from .conversion_report import ConversionReport, conversion_report
from .convert import convert_convs
from .ghost import GhostConv
from .registry import (
    available_convs,
    conv_class,
    conv_hparams,
    conv_out_channels,
    create_conv,
    register_conv,
)
from .scconv import CRU, SRU, SCConv
from .slimconv import SlimConv
from .spconv import SPConv
from .vanilla import VanillaConv

__all__ = [
    "CRU",
    "SRU",
    "CompConv",
    "ConversionReport",
    "GhostConv",
    "SCConv",
    "SPConv",
    "SlimConv",
    "VanillaConv",
    "available_convs",
    "conv_class",
    "conv_hparams",
    "conv_out_channels",
    "conversion_report",
    "convert_convs",
    "create_conv",
    "register_conv",
]
