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
import torch.nn.functional as F
from torch import nn

from ._utils import (
    DENSE_MAX_GROUP_CHANNELS,
    as_fraction,
    bn_scale_shift,
    check_choice,
    check_conv_args,
    check_positive_int,
    check_ratio,
    dense_gwc_pwc_weight,
    downsample,
    fold_bn,
    foldable_bn,
    is_channels_last,
    scale_conv,
)
from .registry import register_conv

__all__ = ["SPConv"]

_REPRESENTATIVE = ("gwc+pwc", "vanilla", "gwc-then-pwc")
_FUSION = ("softmax", "sum")


def _bn_train_args(bn: nn.BatchNorm2d) -> tuple:
    """What ``nn.BatchNorm2d.forward`` passes to the batch-norm kernel in training mode.

    Does the same bookkeeping (``num_batches_tracked += 1``; ``momentum=None`` means a
    cumulative average) and returns ``(running_mean, running_var, factor, eps)``.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    if bn.track_running_stats:
        return bn.running_mean, bn.running_var, factor, bn.eps
    return None, None, factor, bn.eps


def _batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` is an ``nn.BatchNorm2d`` normalising with batch statistics (training)."""
    return type(bn).forward is nn.BatchNorm2d.forward and bn.training


def _check_batch_stats(z: torch.Tensor) -> None:
    # As F.batch_norm in training: one value per channel has no batch statistics.
    if z.numel() // z.shape[1] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {z.size()}"
        )


def _bn_affine(weight, bias, mean, invstd):
    """Training-mode BN as ``u = z * a + c`` per channel (a, c shaped (1, C, 1, 1))."""
    a = invstd if weight is None else invstd * weight
    c = -mean * a if bias is None else bias - mean * a
    return a.view(1, -1, 1, 1), c.view(1, -1, 1, 1)


@torch.no_grad()
def _densify_with_centre(gwc: nn.Conv2d, pwc: nn.Conv2d) -> nn.Conv2d:
    """One dense conv module computing ``gwc(x) + pwc(x)`` (see
    :func:`~leanconv.layers._utils.dense_gwc_pwc_weight`); biases add up."""
    out_ch, _, kh, kw = gwc.weight.shape
    dense = nn.Conv2d(gwc.in_channels, out_ch, (kh, kw), 1, gwc.padding, gwc.dilation, bias=True,
                      device=gwc.weight.device, dtype=gwc.weight.dtype)
    dense.weight.copy_(dense_gwc_pwc_weight(gwc.weight, gwc.groups, pwc.weight))
    bias = torch.zeros(out_ch, device=gwc.weight.device, dtype=gwc.weight.dtype)
    for conv in (gwc, pwc):
        if conv.bias is not None:
            bias += conv.bias
    dense.bias.copy_(bias)
    return dense.eval()


class _SplitChannels(torch.autograd.Function):
    """``(x[:, :c], x[:, c:])`` as views, with a backward that writes both gradients into one
    tensor in x's memory format.

    Autograd's own backward of two slices zero-fills two full-size tensors in the default
    (NCHW) format and adds them, which hands a channels_last network NCHW gradients; PyTorch's
    CPU BatchNorm and ReLU backward run ~10x slower on such mixed layouts (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x, c):
        ctx.c, ctx.shape = c, x.shape
        ctx.memory_format = (torch.channels_last if is_channels_last(x)
                             else torch.contiguous_format)
        return x[:, :c], x[:, c:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_first, g_second):
        c = ctx.c
        like = g_first if g_first is not None else g_second
        grad = torch.empty(ctx.shape, dtype=like.dtype, device=like.device,
                           memory_format=ctx.memory_format)
        for part, g in ((grad[:, :c], g_first), (grad[:, c:], g_second)):
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return grad, None


class _LeanFusion(torch.autograd.Function):
    r"""Training-mode tail of SPConv with a lean backward (Eq. 2 right term, Eq. 4-6, both BNs).

    ``Y = lerp(U1, U3, beta)``, ``U3 = BN(Z3)``, ``U1 = BN(PWC_red(X_red))``,
    ``beta = sigmoid(GAP(U3) - GAP(U1))``. Autograd would keep Z3, Z1, U3 and U1 (four
    output-sized maps); this keeps only Z3 (X_red is a slice of the input, which the k x k conv
    keeps anyway) plus per-channel statistics and beta, and recomputes in backward
    ``Z1 = PWC_red(X_red)`` (a 1x1 conv) and ``U3 - U1`` (a per-channel affine map of Z3, Z1).
    The BN kernels, their running-statistics update and their backward are PyTorch's own
    (``native_batch_norm`` / ``native_batch_norm_backward``), so the results are those of
    ``nn.BatchNorm2d`` up to float rounding.

    Backward, with G = dL/dY and sums over the spatial positions of one (sample, channel):
    ``dL/dbeta = sum(G * (U3 - U1))``, ``g_s = beta (1 - beta) dL/dbeta / HW``,
    ``dL/dU3 = beta G + g_s``, ``dL/dU1 = G - dL/dU3``.
    """

    @staticmethod
    def forward(ctx, z3, x_red, w_red, w3, b3, w1, b1, stats3, stats1):
        # stats*: (running_mean, running_var, momentum factor, eps) of each BN, not learnable.
        z1 = F.conv2d(x_red, w_red)
        rm3, rv3, f3, eps3 = stats3
        rm1, rv1, f1, eps1 = stats1
        u3, mean3, invstd3 = torch.native_batch_norm(z3, w3, b3, rm3, rv3, True, f3, eps3)
        u1, mean1, invstd1 = torch.native_batch_norm(z1, w1, b1, rm1, rv1, True, f1, eps1)
        beta = torch.sigmoid(u3.mean((2, 3), keepdim=True) - u1.mean((2, 3), keepdim=True))
        y = u1.lerp_(u3, beta)
        ctx.save_for_backward(z3, x_red, w_red, w3, b3, w1, b1, mean3, invstd3, mean1,
                              invstd1, beta)
        ctx.eps = (eps3, eps1)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        z3, x_red, w_red, w3, b3, w1, b1, mean3, invstd3, mean1, invstd1, beta = ctx.saved_tensors
        need = ctx.needs_input_grad
        z1 = F.conv2d(x_red, w_red)
        a3, c3 = _bn_affine(w3, b3, mean3, invstd3)
        a1, c1 = _bn_affine(w1, b1, mean1, invstd1)
        # U3 - U1, then dL/dbeta = sum_hw G (U3 - U1) and the gradient of the softmax logits.
        d = torch.addcmul(c3 - c1, z3, a3).addcmul_(z1, a1, value=-1)
        g_s = d.mul_(gy).sum((2, 3), keepdim=True)
        g_s.mul_(beta * (1 - beta) / (gy.shape[2] * gy.shape[3]))
        gu3 = torch.addcmul(g_s, gy, beta)
        gu1 = gy - gu3
        mask3 = [need[0], need[3], need[4]]
        mask1 = [need[1] or need[2], need[5], need[6]]
        gz3, gw3, gb3 = torch.ops.aten.native_batch_norm_backward(
            gu3, z3, w3, None, None, mean3, invstd3, True, ctx.eps[0], mask3)
        gz1, gw1, gb1 = torch.ops.aten.native_batch_norm_backward(
            gu1, z1, w1, None, None, mean1, invstd1, True, ctx.eps[1], mask1)
        gx_red = gw_red = None
        if need[1] or need[2]:
            gx_red, gw_red, _ = torch.ops.aten.convolution_backward(
                gz1, x_red, w_red, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need[1], need[2], False])
        return gz3, gx_red, gw_red, gw3, gb3, gw1, gb1, None, None


@register_conv("spconv")
class SPConv(nn.Module):
    r"""SPConv (Zhang et al., IJCAI 2020), a drop-in replacement for a same-padded ``nn.Conv2d``.

    Symbols of the paper -> arguments: L = ``in_channels``, M = ``out_channels``,
    k = ``kernel_size``, alpha = ``split_ratio``, g (G) = ``gwc_groups``.

    Split (Eq. 2). The first ``C3 = floor(alpha * L)`` input channels are the representative part
    X_rep, the remaining ``C1 = L - C3`` the redundant part X_red (floor as the official code's
    ``int(inplanes * ratio)``; the split is computed with exact fractions, so ``alpha=1/3`` of 30
    channels is 10). ``split_ratio=1`` leaves no redundant part. Width-aligned values (the split
    a multiple of the CPU kernels' channel block, 16 on AVX-512 and 8 on AVX2, e.g. 1/4 or 3/4 of
    64 channels) are what ``leanconv plan`` tries beside the paper's 1/2 (docs/plan.md).

    Representative part (Eq. 3), then BN (the official code's, see the deviations):

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

    - The two BNs are the official code's, not the paper's: Eq. 2-6 have no normalisation
      (U3 is Eq. 3's GWC + PWC, U1 the redundant PWC). The official ``SPConv_3x3`` normalises
      both before the fusion (``bn1``, ``bn2``), and SPConv's Table 1 counts them: SPConv-
      ResNet-20 at alpha = 1/4 has 71,002 parameters with them (paper 0.071M) and 68,314
      without (0.068M). They add ``4*M`` parameters; the host block's BN after the module
      stays, as in the official code.
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

    :meth:`fuse_for_inference` folds both BNs (and the bias) into the convolutions and
    re-parameterises Eq. 3 into one dense k x k conv where small GWC groups make that faster;
    :meth:`absorb_bn` also
    folds the host network's BN after the module (``leanconv.prepare_for_inference``).

    Training memory: with ``fusion="softmax"`` and a redundant part, the redundant 1x1 conv,
    both BNs and Eq. 4-6 run as one autograd function (``_LeanFusion``) that keeps only the
    pre-BN map ``GWC + PWC`` (one output-sized map; the input is kept by the convs anyway) and
    recomputes the redundant 1x1 conv and ``U3 - U1`` in backward; plain autograd keeps four
    output-sized maps. Same maths, PyTorch's BN kernels and running-statistics update; eval
    mode and frozen BNs use the plain path. In the training forward the two 1x1 convs stay
    separate (a 2-group conv would not dispatch fewer ops: it trades two input slices for a
    weight concatenation and two output slices, and its backward is no leaner).
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
        # Set by fuse_for_inference (BNs folded; with fusion="sum" both 1x1 convs become one).
        self._fused = False
        self.pwc_merged: nn.Conv2d | None = None
        # Set by absorb_bn: per-channel factor on S3 - S1 (1/a of the absorbed BN's scale a).
        self.register_buffer("fusion_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused:
            return self._forward_fused(x)
        # Eq. 2: split the input channels into the representative and the redundant part.
        c3, c1 = self.rep_channels, self.red_channels
        # views: convolutions read channel slices without a copy
        if self.stride == 1 and c1 and torch.is_grad_enabled():
            x_rep, x_red = _SplitChannels.apply(x, c3)  # one gradient buffer in x's layout
        else:
            x_rep, x_red = x[:, :c3], x[:, c3:c3 + c1]
        # The 1x1 paths see the input pooled to the output size (pooled once for both parts).
        xp_rep = x_rep
        if self.stride > 1 and (c1 or self.representative == "gwc+pwc"):
            xp = downsample(x if c1 else x_rep, self.stride)
            xp_rep, x_red = xp[:, :c3], xp[:, c3:c3 + c1]
        # Eq. 3: representative part, k x k GWC and PWC summed (or the P20 / P22 variants).
        if self.training and self._densify():  # the same sum as one dense conv: faster
            conv = self.conv_kxk
            weight = dense_gwc_pwc_weight(conv.weight, conv.groups, self.pwc.weight)
            z3 = F.conv2d(x_rep, weight, None, 1, conv.padding, conv.dilation)
        else:
            z3 = self.conv_kxk(x_rep)
            if self.representative == "gwc+pwc":
                z3 = z3.add_(self.pwc(xp_rep))  # in place: a conv does not keep its output
            elif self.representative == "gwc-then-pwc":
                z3 = self.pwc(z3)
        if not c1:  # no redundant part (P1 off, or split_ratio=1)
            return self._add_bias(self.bn_rep(z3))
        if self.fusion == "softmax" and _batch_stats(self.bn_rep) and _batch_stats(self.bn_red):
            # Training: the same maths with a lean backward (_LeanFusion): Eq. 2 right term,
            # both BNs and Eq. 4-6, keeping only Z3 for backward.
            _check_batch_stats(z3)
            y = _LeanFusion.apply(z3, x_red, self.pwc_red.weight, self.bn_rep.weight,
                                  self.bn_rep.bias, self.bn_red.weight, self.bn_red.bias,
                                  _bn_train_args(self.bn_rep), _bn_train_args(self.bn_red))
            return self._add_bias(y)
        # Redundant part: 1x1 conv on the remaining channels.
        u3 = self.bn_rep(z3)
        u1 = self.bn_red(self.pwc_red(x_red))
        return self._add_bias(self._fuse(u3, u1))

    def _fuse(self, u3: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        if self.fusion == "sum":
            return u3 + u1
        # Eq. 4: channel statistics S3, S1 by global average pooling.
        s = u3.mean((2, 3), keepdim=True) - u1.mean((2, 3), keepdim=True)
        if self.fusion_scale is not None:  # set by absorb_bn: S3 - S1 of the unscaled branches
            s = s * self.fusion_scale.view(1, -1, 1, 1)
        # Eq. 5: softmax over the two branches, beta = e^S3 / (e^S3 + e^S1), gamma = 1 - beta.
        beta = torch.sigmoid(s)
        # Eq. 6: Y = beta * U3 + gamma * U1 = U1 + beta * (U3 - U1).
        return torch.lerp(u1, u3, beta)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # After fuse_for_inference: BNs and bias folded into the convs, PWC possibly inside the
        # k x k conv (densified) or, with fusion="sum", merged with the redundant PWC.
        c3, c1 = self.rep_channels, self.red_channels
        pooled = c1 or self.pwc_merged is not None or self.representative == "gwc+pwc"
        xp = downsample(x, self.stride) if pooled else x
        u3 = self.conv_kxk(x[:, :c3])
        if self.pwc_merged is not None:  # one dense 1x1 over the whole input: PWC + PWC_red
            return u3 + self.pwc_merged(xp)
        if self.representative == "gwc-then-pwc":
            u3 = self.pwc(u3)
        elif self.pwc is not None:
            u3 = u3 + self.pwc(xp[:, :c3])
        if not c1:
            return u3
        u1 = self.pwc_red(xp[:, c3:c3 + c1])
        return u3 + u1 if self.fusion == "sum" else self._fuse(u3, u1)

    # Largest GWC group (input channels per group) computed as one dense conv with PWC.
    DENSIFY_MAX_GROUP_CHANNELS = DENSE_MAX_GROUP_CHANNELS

    def _densify(self) -> bool:
        """Whether Eq. 3 runs as one dense k x k conv (GWC blocks + PWC in the centre tap).

        oneDNN's kernels for 4-8 channel groups are far below its dense throughput, forward and
        backward (CIFAR ResNet-56 stage 1, batch 64, 2 threads, forward + backward of Eq. 3:
        3.9 ms as GWC + PWC, 2.9 ms dense in channels_last; 9.1 vs 4.8 ms in NCHW). Stride 1
        only: at stride 2 PWC reads the average-pooled input, not the centre tap. In eval mode
        the unfused module keeps the two convs, so that profiles (:func:`leanconv.profile`)
        count Eq. 9's MACs; :meth:`fuse_for_inference` densifies by the same rule.
        """
        return (self.representative == "gwc+pwc" and self.stride == 1
                and self.rep_channels // self.gwc_groups <= self.DENSIFY_MAX_GROUP_CHANNELS)

    @torch.no_grad()
    def fuse_for_inference(self) -> SPConv:
        """Fold the BNs and the bias into the convs and re-parameterise for speed.

        Exact in eval mode (up to float rounding) and leaves the module inference-only (it is put
        in eval mode). Calling it twice is a no-op. Besides folding:

        - **Densify small groups** (``representative="gwc+pwc"``, stride 1, at most
          ``DENSIFY_MAX_GROUP_CHANNELS`` input channels per GWC group): the GWC becomes a dense
          k x k conv with zero off-group blocks and PWC is added to its centre tap, so Eq. 3 is
          one convolution. It computes more MACs (``k*k*C3*M`` instead of
          ``k*k*C3*M/g + C3*M``) but runs faster: oneDNN's kernels for 4-8 channel groups are
          far below its dense throughput (CIFAR ResNet-56 stage 1, batch 128, channels_last:
          GWC 8 -> 16 in two groups 1.76 ms + PWC 0.6 ms vs the dense 8 -> 16 conv 1.50 ms).
          Not at stride 2: there PWC reads the average-pooled input, not the centre tap.
        - **Merge the 1x1 convs** for ``fusion="sum"``: PWC and the redundant PWC become one dense
          1x1 conv over all L input channels (same MACs). With the softmax fusion they stay two
          convs: a 2-group 1x1 conv was measured slower than two convs on channel slices.
        """
        if self._fused:
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
        self._fused = True
        if self._densify():
            self.conv_kxk = _densify_with_centre(self.conv_kxk, self.pwc)
            self.pwc = None
        if self.pwc is not None and self.pwc_red is not None and self.fusion == "sum":
            weight = torch.cat([self.pwc.weight, self.pwc_red.weight], dim=1)
            merged = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=True,
                               device=weight.device, dtype=weight.dtype)
            merged.weight.copy_(weight)
            merged.bias.copy_(self.pwc.bias + self.pwc_red.bias)
            self.pwc_merged = merged.eval()
            self.pwc = self.pwc_red = None
        return self

    @torch.no_grad()
    def absorb_bn(self, bn: nn.Module) -> bool:
        r"""Fold an eval-mode BN applied to this module's output into the module, in place.

        Called by :func:`leanconv.prepare_for_inference` for the host network's BN after
        SPConv (``bn2(conv2(x))``); runs :meth:`fuse_for_inference` first. Returns ``False``
        (nothing changed) for anything but a ``BatchNorm2d`` with running statistics over
        ``out_channels`` channels.

        The BN is ``a * Y + b`` per channel. As beta + gamma = 1,
        ``a * Y + b = beta * (a U3 + b) + gamma * (a U1 + b)``, so both branches take the map
        (convs scaled by ``a``, ``b`` added to each branch's bias; once for ``fusion="sum"``).
        The fusion statistics are *not* invariant under it:
        ``GAP(a U3 + b) - GAP(a U1 + b) = a (S3 - S1)``, so beta would change. The module keeps
        the original beta by multiplying ``S3 - S1`` by ``1/a`` per channel (buffer
        ``fusion_scale``; channels with ``a = 0`` output ``b`` whatever beta is, and get 0).
        """
        if not foldable_bn(bn, self.out_channels):
            return False
        self.fuse_for_inference()
        a, b = bn_scale_shift(bn)
        softmax = self.fusion == "softmax" and self.red_channels > 0
        if self.pwc_merged is not None:  # fusion="sum": U3 + one dense 1x1 conv, b once
            scale_conv(self.conv_kxk, a)
            scale_conv(self.pwc_merged, a, b)
        else:
            # The convs producing U3 (the last gets b), then the redundant PWC (b too with the
            # softmax fusion, where Y is a convex combination of the branches).
            rep_convs = [self.conv_kxk, self.pwc] if self.representative == "gwc+pwc" else [
                self.pwc if self.representative == "gwc-then-pwc" else self.conv_kxk]
            rep_convs = [conv for conv in rep_convs if conv is not None]
            for conv in rep_convs[:-1]:
                scale_conv(conv, a)
            scale_conv(rep_convs[-1], a, b)
            if self.pwc_red is not None:
                scale_conv(self.pwc_red, a, b if softmax else None)
        if softmax:
            inv = torch.where(a != 0, 1 / a, torch.zeros_like(a))
            self.fusion_scale = inv if self.fusion_scale is None else self.fusion_scale * inv
        return True

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, split_ratio={self.split_ratio}, "
            f"rep/red channels={self.rep_channels}/{self.red_channels}, "
            f"gwc_groups={self.gwc_groups}, "
            f"representative={self.representative!r}, fusion={self.fusion!r}"
        )
