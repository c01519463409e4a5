"""Small helpers shared by the convolution modules: argument checks, padding, strided side paths.

Every module in :mod:`leanconv.layers` is a drop-in replacement for a "same"-padded
``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=dilation*(kernel_size-1)//2,
dilation)``: for an input of size H x W it returns ``ceil(H/stride) x ceil(W/stride)``. Side paths
that do not carry the strided k x k convolution (1x1 branches, identity slices) are downsampled
with :func:`downsample`, which yields exactly that size for even and odd inputs alike.
"""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "as_fraction",
    "bn_scale_shift",
    "channel_shuffle",
    "check_choice",
    "check_conv_args",
    "check_divisible",
    "check_positive_int",
    "check_ratio",
    "conv_output_size",
    "dense_gwc_pwc_weight",
    "downsample",
    "fold_bn",
    "is_channels_last",
    "same_padding",
]


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps ``ceil(H / stride)`` outputs for an odd kernel."""
    return dilation * (kernel_size - 1) // 2


def conv_output_size(size: int, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Output length of a same-padded convolution along one axis (``ceil(size / stride)``)."""
    padding = same_padding(kernel_size, dilation)
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_conv_args(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int | str | None,
    dilation: int,
) -> int:
    """Validate the ``nn.Conv2d``-shaped arguments shared by every module; return the padding.

    Only "same" padding is supported (``None``, ``"same"`` or
    ``dilation * (kernel_size - 1) // 2``):
    the modules add or concatenate branches whose sizes must agree, so any other padding has no
    consistent meaning.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (1, 3, 5, ...), got {kernel_size}")
    check_positive_int("stride", stride)
    check_positive_int("dilation", dilation)
    expected = same_padding(kernel_size, dilation)
    if padding is None or padding == "same" or padding == expected:
        return expected
    if isinstance(padding, tuple) and all(p == expected for p in padding):
        return expected
    raise ValueError(
        f"padding must be None, 'same' or dilation*(kernel_size-1)//2 = {expected} "
        f"(kernel_size={kernel_size}, dilation={dilation}), got {padding!r}"
    )


def check_ratio(name: str, value: Real, low_open: float = 0.0, high: float = 1.0) -> float:
    """``value`` must lie in ``(low_open, high]``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a number in ({low_open}, {high}], got {value!r}"
        ) from None
    if not (low_open < value <= high) or math.isnan(value):
        raise ValueError(f"{name} must be in ({low_open}, {high}], got {value}")
    return value


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    if value % divisor != 0:
        raise ValueError(
            f"{name}={value} must be divisible by {divisor_name}={divisor}"
        )


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def as_fraction(value: object) -> Fraction:
    """Parse ``"4/3"``, ``"0.5"``, ``0.5`` or ``Fraction`` into an exact fraction (for hparams)."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, str):
        return Fraction(value.strip())
    if isinstance(value, float):
        return Fraction(value).limit_denominator(1000)
    return Fraction(value)


def downsample(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool ``stride x stride`` windows, rounding the output size up.

    Gives ``ceil(H / stride)`` rows, the size a same-padded strided k x k convolution returns, so
    side paths stay aligned on odd inputs (SPConv's official 2x2 pooling floors and breaks at
    7x7). Border windows average only the pixels they cover.
    """
    if stride == 1:
        return x
    return F.avg_pool2d(x, kernel_size=stride, stride=stride, ceil_mode=True)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (N, g*c, H, W) -> transpose the (g, c) axes."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is (strictly) channels_last, so outputs and gradients should be produced in
    that layout (a 4-D tensor that is NHWC-contiguous and not NCHW-contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = scale * x + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, shift: bool = True) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place, so that ``bn(conv(x)) == conv'(x)``.

    With ``shift=False`` only the scale is folded: for a conv whose output is summed with another
    conv's before the BN, where the other conv receives the shift.
    """
    scale, offset = bn_scale_shift(bn)
    scale_conv(conv, scale, offset if shift else None)


@torch.no_grad()
def scale_conv(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """``conv(x) -> a * conv(x) + b`` per output channel, in place (``b=None``: no shift).

    How a module's ``absorb_bn`` takes a following BN's ``a * y + b`` into its convs.
    """
    conv.weight.mul_(a.view(-1, 1, 1, 1))
    if conv.bias is not None:
        conv.bias.mul_(a)
        if b is not None:
            conv.bias.add_(b)
    elif b is not None:
        conv.bias = nn.Parameter(b.clone())


def foldable_bn(bn: nn.Module, channels: int) -> bool:
    """Whether ``bn`` is a BatchNorm2d (or SyncBatchNorm) over ``channels`` channels with running
    statistics: what an ``absorb_bn`` can fold (anything else is declined, nothing changed)."""
    return (isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == channels)


# Largest group (input channels per group) of a k x k group-wise conv that SPConv and CRU run
# as one dense conv together with their parallel 1x1 conv (see dense_gwc_pwc_weight).
DENSE_MAX_GROUP_CHANNELS = 8


def dense_gwc_pwc_weight(gwc_weight: torch.Tensor, groups: int,
                         pwc_weight: torch.Tensor) -> torch.Tensor:
    """Weight of one dense k x k conv computing ``GWC(x) + PWC(x)`` (same padding, stride 1,
    odd k): the grouped weight in its diagonal blocks, zeros elsewhere, the 1x1 weight added
    to the centre tap (SPConv Eq. 3, SCConv Eq. 5).

    More MACs (``k*k*C_in*C_out`` instead of ``k*k*C_in*C_out/g + C_in*C_out``) but one conv
    instead of two and an add; oneDNN's kernels for groups of 2-8 channels run far below its
    dense throughput, forward and backward (docs/performance.md). Differentiable: in training
    autograd routes the dense conv's weight gradient back to the blocks and the centre tap.
    """
    c_out, in_per_group, k, _ = gwc_weight.shape
    out_per_group = c_out // groups
    # (C_out, C_in/g, k, k) grouped -> (g, C_out/g, g, C_in/g, k, k) block-diagonal dense
    dense = gwc_weight.new_zeros(groups, out_per_group, groups, in_per_group, k, k)
    idx = torch.arange(groups, device=dense.device)
    dense[idx, :, idx] = gwc_weight.view(groups, out_per_group, in_per_group, k, k)
    dense = dense.view(c_out, groups * in_per_group, k, k)
    centre = F.pad(pwc_weight, [k // 2] * 4)  # the 1x1 weight as the centre tap of a k x k
    return dense + centre
