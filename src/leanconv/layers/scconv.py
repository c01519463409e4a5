"""PLACEHOLDER: being written (see the modules issue)."""

from torch import nn

from .registry import register_conv

__all__ = ["CRU", "SRU", "SCConv"]


@register_conv("sru")
class SRU(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1):
        raise NotImplementedError


@register_conv("cru")
class CRU(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1):
        raise NotImplementedError


@register_conv("scconv")
class SCConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1):
        raise NotImplementedError
