"""PLACEHOLDER: being written (see the modules issue)."""

from torch import nn

from .registry import register_conv

__all__ = ["GhostConv"]


@register_conv("ghost")
class GhostConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1):
        raise NotImplementedError("GhostConv is not written yet")
