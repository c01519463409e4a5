"""The baseline every paper compares against: a plain same-padded k x k convolution."""

from __future__ import annotations

from torch import nn

from ._utils import check_conv_args
from .registry import register_conv

__all__ = ["VanillaConv"]


@register_conv("vanilla")
class VanillaConv(nn.Conv2d):
    """``nn.Conv2d`` with same padding and, as in the papers' ResNets, no bias by default."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | str | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                f"by groups={groups}"
            )
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, device=device, dtype=dtype)
