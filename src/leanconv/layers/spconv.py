"""SPConv: Zhang et al., *Split to Be Slim: An Overlooked Redundancy in Vanilla Convolution*,
IJCAI 2020.

A vanilla k x k convolution treats every input channel alike. SPConv splits the input channels
into a *representative* part, which gets the k x k kernels (as a group-wise conv plus a point-wise
conv, Sec. 3.3), and a *redundant* part, which only gets a cheap 1x1 conv (Sec. 3.2). The two
results are recombined by a parameter-free, per-channel soft attention (Sec. 3.4).
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from ._utils import (
    as_fraction,
    check_choice,
    check_conv_args,
    check_positive_int,
    check_ratio,
    downsample,
    fold_bn,
)
from .registry import register_conv

__all__ = ["SPConv"]

_REPRESENTATIVE = ("gwc+pwc", "vanilla", "gwc-then-pwc")
_FUSION = ("softmax", "sum")


@register_conv("spconv")
class SPConv(nn.Module):
    r"""SPConv (Zhang et al., IJCAI 2020), a drop-in replacement for a same-padded ``nn.Conv2d``.

    Symbols of the paper -> arguments: L = ``in_channels``, M = ``out_channels``,
    k = ``kernel_size``, alpha = ``split_ratio``, g (G) = ``gwc_groups``.

    Split (Eq. 2). The first ``C3 = floor(alpha * L)`` input channels are the representative part
    X_rep, the remaining ``C1 = L - C3`` the redundant part X_red (floor as the official code's
    ``int(inplanes * ratio)``; the split is computed with exact fractions, so ``alpha=1/3`` of 30
    channels is 10). ``split_ratio=1`` leaves no redundant part.

    Representative part (Eq. 3), then BN:

    .. math:: U_3 = \mathrm{BN}(\mathrm{GWC}_{k\times k, g}(X_{rep}) + \mathrm{PWC}(X_{rep}))

    Redundant part (Eq. 2, right term), then BN:

    .. math:: U_1 = \mathrm{BN}(\mathrm{PWC}(X_{red}))

    Parameter-free fusion (Eq. 4-6): :math:`S_k = \mathrm{GAP}(U_k)` per channel,
    :math:`\beta = e^{S_3} / (e^{S_3} + e^{S_1}) = \sigma(S_3 - S_1)`, :math:`\gamma = 1 - \beta`,

    .. math:: Y = \beta \odot U_3 + \gamma \odot U_1

    Output shape (N, M, ceil(H / stride), ceil(W / stride)), as ``nn.Conv2d`` with same padding.

    Parameters (Eq. 9 for the convolutions, plus 2M affine parameters per BN):
    ``k*k*C3*M/g + C3*M + C1*M + 4*M`` (``+ M`` with ``bias=True``); with ``C3 = alpha*L`` this is
    ``(k*k*alpha/g + 1)*L*M + 4*M``.

    Ablation switches (Table 4):

    - ``representative="gwc+pwc"`` (P21, default); ``"vanilla"`` (P20: a dense k x k conv
      C3 -> M, no PWC); ``"gwc-then-pwc"`` (P22: GWC C3 -> M followed by PWC M -> M, no BN in
      between). These structures reproduce Table 4's parameter and FLOP differences for ResNet-20
      (P20 - P21 = 7.79M MACs exactly, P22 - P21 = 2.49M against 2.47M reported).
    - ``fusion="softmax"`` (P3, default) or ``"sum"`` (Y = U3 + U1, both still batch-normalised).
    - ``redundant=False`` (P1 off): the redundant channels are dropped, Y = U3.
      With no redundant part (also ``split_ratio=1``) ``fusion`` has nothing to fuse and Y = U3.

    Deliberate deviations from the paper / official code:

    - Stride: the k x k conv carries the stride; the 1x1 paths see ``downsample(x, stride)``
      (average pooling, ceil mode) instead of the official ``AvgPool2d(2, 2)``, which floors and
      breaks on odd sizes. Stride 1 is unchanged.
    - No bias on the redundant 1x1 conv (the paper's equations have none; the official code has a
      redundant PyTorch-default bias before its BN). Our counts are therefore ``M`` lower than the
      official ``SPConv_3x3`` (64->64: 13,568 here, 13,632 there).
    - ``dilation`` reaches the k x k conv (padding ``dilation*(k-1)//2``); ``kernel_size`` is free
      (the paper uses 3); ``gwc_groups`` is a parameter (the official code hard-wires 2).
    - ``bias=True`` adds a learnable per-output-channel bias to Y.
    - Sec. 3.4 writes the fusion softmax in exponentials; it is computed as the equal and
      overflow-free sigmoid of ``S3 - S1``, and Eq. 6 as ``lerp(U1, U3, beta)``.

    :meth:`fuse_for_inference` folds both BNs (and the bias) into the convolutions and, where it
    costs no extra MACs, computes both 1x1 convolutions with one conv.
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
        split_ratio: float = 0.5,
        gwc_groups: int = 2,
        representative: str = "gwc+pwc",
        fusion: str = "softmax",
        redundant: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        super().__init__()
        split_ratio = check_ratio("split_ratio", split_ratio)
        check_positive_int("gwc_groups", gwc_groups)
        check_choice("representative", representative, _REPRESENTATIVE)
        check_choice("fusion", fusion, _FUSION)
        if not isinstance(redundant, bool):
            raise ValueError(f"redundant must be True or False, got {redundant!r}")
        rep_channels = int(as_fraction(split_ratio) * Fraction(in_channels))  # floor, Eq. 2
        if rep_channels == 0:
            raise ValueError(
                f"split_ratio={split_ratio} leaves no representative channel of "
                f"in_channels={in_channels}; need split_ratio >= 1/{in_channels}"
            )
        grouped = representative != "vanilla"
        if grouped and (rep_channels % gwc_groups or out_channels % gwc_groups):
            raise ValueError(
                f"gwc_groups={gwc_groups} must divide the representative channels "
                f"floor(split_ratio*in_channels) = floor({split_ratio}*{in_channels}) = "
                f"{rep_channels} and out_channels={out_channels}"
            )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.split_ratio = split_ratio
        self.gwc_groups = gwc_groups
        self.representative = representative
        self.fusion = fusion
        self.rep_channels = rep_channels
        self.red_channels = in_channels - rep_channels if redundant else 0
        fk = {"device": device, "dtype": dtype}

        # Representative part (Eq. 3): the k x k conv (GWC, or dense for P20) carries the stride.
        self.conv_kxk = nn.Conv2d(
            rep_channels, out_channels, kernel_size, stride, padding, dilation,
            groups=gwc_groups if grouped else 1, bias=False, **fk,
        )
        if representative == "gwc+pwc":
            self.pwc = nn.Conv2d(rep_channels, out_channels, 1, bias=False, **fk)
        elif representative == "gwc-then-pwc":
            self.pwc = nn.Conv2d(out_channels, out_channels, 1, bias=False, **fk)
        else:
            self.pwc = None
        self.bn_rep = nn.BatchNorm2d(out_channels, **fk)
        # Redundant part (Eq. 2, second term): a 1x1 conv only.
        if self.red_channels:
            self.pwc_red = nn.Conv2d(self.red_channels, out_channels, 1, bias=False, **fk)
            self.bn_red = nn.BatchNorm2d(out_channels, **fk)
        else:
            self.pwc_red = self.bn_red = None
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None
        # Set by fuse_for_inference when both 1x1 convs become one.
        self.pwc_merged: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pwc_merged is not None:
            return self._forward_merged(x)
        # Eq. 2: split the input channels into the representative and the redundant part.
        c3 = self.rep_channels
        x_rep = x[:, :c3]
        # Eq. 3: representative part, k x k GWC and PWC summed (or the P20 / P22 variants).
        u3 = self.conv_kxk(x_rep)
        if self.representative == "gwc+pwc":
            u3 = u3 + self.pwc(downsample(x_rep, self.stride))
        elif self.representative == "gwc-then-pwc":
            u3 = self.pwc(u3)
        u3 = self.bn_rep(u3)
        if self.pwc_red is None:  # no redundant part (P1 off, or split_ratio=1)
            return self._add_bias(u3)
        # Redundant part: 1x1 conv on the remaining channels.
        x_red = x[:, c3:c3 + self.red_channels]
        u1 = self.bn_red(self.pwc_red(downsample(x_red, self.stride)))
        return self._add_bias(self._fuse(u3, u1))

    def _fuse(self, u3: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        if self.fusion == "sum":
            return u3 + u1
        # Eq. 4: channel statistics S3, S1 by global average pooling.
        s3 = u3.mean((2, 3), keepdim=True)
        s1 = u1.mean((2, 3), keepdim=True)
        # Eq. 5: softmax over the two branches, beta = e^S3 / (e^S3 + e^S1), gamma = 1 - beta.
        beta = torch.sigmoid(s3 - s1)
        # Eq. 6: Y = beta * U3 + gamma * U1 = U1 + beta * (U3 - U1).
        return torch.lerp(u1, u3, beta)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        # After fuse_for_inference: BNs folded, both 1x1 convs computed by pwc_merged.
        pw = self.pwc_merged(downsample(x, self.stride))
        u3 = self.conv_kxk(x[:, :self.rep_channels])
        if self.fusion == "sum":  # one dense 1x1 over the whole input holds PWC + redundant PWC
            return u3 + pw
        m = self.out_channels  # grouped 1x1: [PWC(X_rep); PWC(X_red)]
        return self._fuse(u3 + pw[:, :m], pw[:, m:])

    @torch.no_grad()
    def fuse_for_inference(self) -> SPConv:
        """Fold the BNs and the bias into the convs; merge the two 1x1 convs when it is free.

        Exact in eval mode (up to float rounding) and leaves the module inference-only (it is put
        in eval mode). Both 1x1 convs become one conv when ``representative="gwc+pwc"`` and
        there is a redundant part, and either ``fusion="sum"`` (a dense 1x1 over all L input
        channels, same MACs) or the split is even, C3 == C1 (a 2-group 1x1, same MACs).
        Merging PWC into the GWC's centre tap is *not* done: it would densify the GWC
        (k*k*C3*M instead of k*k*C3*M/g + C3*M MACs). Calling it twice is a no-op.
        """
        if isinstance(self.bn_rep, nn.Identity):
            return self
        self.eval()
        # BN of U3: scale into every conv feeding it, shift into one of them.
        if self.representative == "gwc+pwc":
            fold_bn(self.conv_kxk, self.bn_rep, shift=False)
            fold_bn(self.pwc, self.bn_rep)
        elif self.representative == "gwc-then-pwc":
            fold_bn(self.pwc, self.bn_rep)
        else:
            fold_bn(self.conv_kxk, self.bn_rep)
        self.bn_rep = nn.Identity()
        rep_out = self.conv_kxk if self.pwc is None else self.pwc
        if self.pwc_red is not None:
            fold_bn(self.pwc_red, self.bn_red)
            self.bn_red = nn.Identity()
        # A bias on Y can go into both branches: beta + gamma = 1 and S3 - S1 is unchanged.
        if self.bias is not None:
            rep_out.bias.add_(self.bias)
            if self.pwc_red is not None and self.fusion == "softmax":
                self.pwc_red.bias.add_(self.bias)
            self.bias = None
        if self.representative == "gwc+pwc" and self.pwc_red is not None:
            if self.fusion == "sum":
                weight = torch.cat([self.pwc.weight, self.pwc_red.weight], dim=1)
                bias, groups = self.pwc.bias + self.pwc_red.bias, 1
            elif self.rep_channels == self.red_channels:
                weight = torch.cat([self.pwc.weight, self.pwc_red.weight], dim=0)
                bias, groups = torch.cat([self.pwc.bias, self.pwc_red.bias]), 2
            else:
                return self
            merged = nn.Conv2d(self.in_channels, weight.shape[0], 1, groups=groups, bias=True,
                               device=weight.device, dtype=weight.dtype)
            merged.weight.copy_(weight)
            merged.bias.copy_(bias)
            self.pwc_merged = merged.eval()
            self.pwc = self.pwc_red = None
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, split_ratio={self.split_ratio}, "
            f"rep/red channels={self.rep_channels}/{self.red_channels}, "
            f"gwc_groups={self.gwc_groups}, "
            f"representative={self.representative!r}, fusion={self.fusion!r}"
        )
