"""PLACEHOLDER: being written (see the modules issue)."""

from torch import nn

from .registry import register_conv

__all__ = ["CompConv"]


@register_conv("compconv")
class CompConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1):
        raise NotImplementedError("CompConv is not written yet")
