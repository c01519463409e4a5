"""GhostConv: Han et al., *GhostNet: More Features from Cheap Operations*, CVPR 2020.

The baseline every paper in leanconv compares against ("Ghost-ResNet, s=2"). A primary
convolution produces a few *intrinsic* feature maps; cheap depthwise convolutions turn each of
them into s - 1 *ghost* maps; intrinsic and ghost maps together form the output (GhostNet Sec. 3.1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._utils import (
    bn_scale_shift,
    check_conv_args,
    check_positive_int,
    foldable_bn,
    same_padding,
)
from .registry import register_conv

__all__ = ["GhostConv"]


@register_conv("ghost")
class GhostConv(nn.Module):
    r"""Ghost module (GhostNet Sec. 3.1) as a drop-in, same-padded ``nn.Conv2d``.

    Symbols of the paper -> arguments: n = ``out_channels``, s = ``ratio``,
    d = ``dw_kernel_size``, k = ``kernel_size``; m = ceil(n / s) intrinsic maps.

    1. Primary conv (Eq. 2), carrying ``kernel_size``, ``stride`` and ``dilation``:
       :math:`Y' = X * f'`, ``in_channels -> m``.
    2. Cheap operations (Eq. 3): :math:`y_{ij} = \Phi_{i,j}(y'_i)`, ``j = 1 .. s-1``, a depthwise
       d x d conv with channel multiplier s - 1 (same dilation as the primary conv).
    3. Output: ``cat([Y', ghosts])`` truncated to ``out_channels`` (the identity mapping is the
       paper's last :math:`\Phi_{i,s}`). Shape (N, n, ceil(H / stride), ceil(W / stride)).

    Parameters: ``k*k*in*m + d*d*(n - m)`` when s - 1 divides ``n - m`` (always for s = 2),
    in general the ghost count ``n - m`` rounded up to a multiple of s - 1.

    Placement and normalisation (the library's choice, checked against the published counts):
    the module is *linear*, with no BN or ReLU inside. It replaces a conv whose host block keeps
    its own BN (+ ReLU) after it. GhostNet's own ``GhostModule`` puts BN (+ ReLU) after the
    primary and after the cheap conv; that adds 2n parameters per module and breaks the count
    below. Replacing every conv of ResNet-50 except the stem (1x1s and downsample projections
    included, as in the authors' ``ghost_resnet.py``) with s=2, d=3 and the host BNs kept gives
    13,953,512 parameters and 2.151 GMACs at 224x224: the 13.95M / 2.15G of the SlimConv README
    and SCConv Table 3 exactly (with internal BNs: 14.01M).

    Deliberate deviations from the reference code:

    - Ghost maps that the truncation to ``out_channels`` would discard are not computed: the
      cheap conv reads only the first ceil((n - m) / (s - 1)) intrinsic maps. The output equals
      the reference's (which computes m*(s-1) ghosts and slices), without the dead weights.
      Up to s - 2 computed ghosts can still be discarded when s > 2 (their weights then get no
      gradient).
    - ``dilation`` also dilates the cheap conv, so a dilated backbone keeps its receptive field.
    - ``bias=True`` adds a learnable per-output-channel bias after the concatenation.

    Inference: :meth:`absorb_bn` folds a following BN (:func:`leanconv.prepare_for_inference`),
    exactly: into the cheap conv for the ghost maps, as one per-channel affine on the intrinsic
    maps (they also feed the cheap conv, so the primary conv cannot take it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | str | None = None,
        dilation: int = 1,
        bias: bool = False,
        *,
        ratio: int = 2,
        dw_kernel_size: int = 3,
        device=None,
        dtype=None,
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        super().__init__()
        check_positive_int("ratio", ratio, minimum=2)
        check_positive_int("dw_kernel_size", dw_kernel_size)
        if dw_kernel_size % 2 == 0:
            raise ValueError(f"dw_kernel_size must be odd (1, 3, 5, ...), got {dw_kernel_size}")
        intrinsic = math.ceil(out_channels / ratio)
        ghosts = out_channels - intrinsic
        if ghosts == 0:
            raise ValueError(
                f"out_channels={out_channels} leaves no ghost map with ratio={ratio}; "
                f"a Ghost module needs out_channels >= 2"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.ratio = ratio
        self.dw_kernel_size = dw_kernel_size
        self.intrinsic_channels = intrinsic
        self.ghost_channels = ghosts
        # Intrinsic maps that feed a ghost map which survives the truncation.
        self.cheap_inputs = math.ceil(ghosts / (ratio - 1))
        fk = {"device": device, "dtype": dtype}

        self.primary = nn.Conv2d(in_channels, intrinsic, kernel_size, stride, padding, dilation,
                                 bias=False, **fk)
        self.cheap = nn.Conv2d(
            self.cheap_inputs, self.cheap_inputs * (ratio - 1), dw_kernel_size, 1,
            same_padding(dw_kernel_size, dilation), dilation, groups=self.cheap_inputs,
            bias=False, **fk,
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None
        # Set by absorb_bn: the folded BN's scale and shift for the intrinsic maps.
        self.register_buffer("intrinsic_scale", None)
        self.register_buffer("intrinsic_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eq. 2: intrinsic feature maps from the primary convolution.
        intrinsic = self.primary(x)
        # Eq. 3: s - 1 ghost maps per intrinsic map by a cheap depthwise convolution.
        cheap_in = intrinsic
        if self.cheap_inputs != self.intrinsic_channels:
            cheap_in = intrinsic[:, :self.cheap_inputs]
        ghosts = self.cheap(cheap_in)
        if self.cheap.out_channels != self.ghost_channels:  # only if s > 2
            ghosts = ghosts[:, :self.ghost_channels]
        if self.intrinsic_scale is not None:  # a BN absorbed by absorb_bn
            intrinsic = torch.addcmul(self.intrinsic_shift, intrinsic, self.intrinsic_scale)
        # Identity + ghosts, truncated to out_channels.
        y = torch.cat([intrinsic, ghosts], dim=1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def absorb_bn(self, bn: nn.BatchNorm2d) -> bool:
        """Fold an eval-mode BN that follows this module into it (for inference).

        The ghost maps come only from the cheap conv, which takes the BN's scale and shift into
        its weight and bias exactly. The intrinsic maps also feed the cheap conv, so the primary
        conv keeps its weights and the intrinsic maps get the BN as one per-channel affine
        (``torch.addcmul``, the cheap conv reading the unscaled maps); a ``bias`` of the module
        is folded into the shifts. This replaces a full pass of the BN by a pass over the m
        intrinsic channels. Returns True; called by :func:`leanconv.prepare_for_inference`.
        """
        if not foldable_bn(bn, self.out_channels) or self.intrinsic_scale is not None:
            return False
        scale, shift = bn_scale_shift(bn)
        if self.bias is not None:
            shift = shift + scale * self.bias
        m, ghosts, cheap = self.intrinsic_channels, self.ghost_channels, self.cheap
        weight_scale = torch.ones(cheap.out_channels, dtype=scale.dtype, device=scale.device)
        weight_scale[:ghosts] = scale[m:]
        cheap.weight.mul_(weight_scale.view(-1, 1, 1, 1).to(cheap.weight.dtype))
        bias = torch.zeros_like(weight_scale)
        bias[:ghosts] = shift[m:]
        cheap.bias = nn.Parameter(bias.to(cheap.weight.dtype))
        self.intrinsic_scale = scale[:m].view(1, -1, 1, 1).clone()
        self.intrinsic_shift = shift[:m].view(1, -1, 1, 1).clone()
        self.bias = None
        return True

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, ratio={self.ratio}, "
            f"dw_kernel_size={self.dw_kernel_size}"
        )
