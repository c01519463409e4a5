"""SlimConv (Qiu, Chen, Liu, Zhang, Zeng; arXiv 2003.07469 / IEEE TIP 30:6434, 2021).

*SlimConv: Reducing Channel Redundancy in Convolutional Neural Networks by Weights Flipping*
(journal title: *... by Features Recombining*). Three steps, §3.1 and Fig. 1:

1. **Reconstruct** — a modified SE module (Fig. 2, Eq. 1) gives channel weights ``w``; the top
   pathway sums the chunks of ``w * X``, the bottom pathway the chunks of ``flip(w) * X`` (Eq. 2).
2. **Transform** — top: one k x k conv; bottom: a 1x1 conv halving the channels, then a k x k conv.
3. **Fuse** — concatenate the two pathways: ``C_in / k`` output channels (§3.2).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import (
    as_fraction,
    bn_scale_shift,
    check_choice,
    check_conv_args,
    check_divisible,
    check_positive_int,
    fold_bn,
    foldable_bn,
    scale_conv,
)
from .registry import register_conv

__all__ = ["SlimConv"]

_FLIPPING = ("flip", "none", "only")
# k values the papers tabulate: k = 2r/3 for r = 2..8 (SlimConv Table 10), and k = 1 (SCConv
# paper, Tables 2-3, "SlimConv-R56/R50/WRN28/D121 (k=1)").
_TABULATED_K = ("1", "4/3", "2", "8/3", "10/3", "4", "14/3", "16/3")


def _parse_compression_ratio(value: object) -> tuple[Fraction, int]:
    """``k`` -> (exact k, number of summed chunks r); ``k = 2r/3`` with integer r >= 2, or k = 1.

    Floats are compared with a tolerance, so ``4/3`` parsed by the CLI as ``1.333...`` is k = 4/3.
    """
    allowed = ", ".join(_TABULATED_K)
    try:
        k = float(as_fraction(value))
    except (TypeError, ValueError, ZeroDivisionError):
        k = math.nan
    if math.isfinite(k) and abs(k - 1) < 1e-6:
        return Fraction(1), 2
    r = 1.5 * k if math.isfinite(k) else math.nan
    if not (math.isfinite(r) and round(r) >= 2 and abs(r - round(r)) < 1e-6 * max(1.0, r)):
        raise ValueError(
            f"compression_ratio (k = C_in/C_out) must be 1 or 2r/3 for an integer r >= 2 "
            f"(the papers use {allowed}), got {value!r}"
        )
    return Fraction(2 * round(r), 3), round(r)


def _widths(in_channels: int, compression_ratio: object) -> tuple[Fraction, int, int, int, int]:
    """(k, r, top width, bottom 1x1 width, bottom k x k width) for ``in_channels``; validated."""
    check_positive_int("in_channels", in_channels)
    k, r = _parse_compression_ratio(compression_ratio)
    if in_channels < 2 * r:
        raise ValueError(
            f"in_channels={in_channels} must be at least 2r={2 * r} for compression_ratio={k} "
            f"(r={r} summed chunks of C//r channels, bottom 1x1 to C//(2r) >= 1 channels)"
        )
    # Floored widths as in the official code (C//r, C//(2r) = (C//r)//2); C not divisible by r
    # folds the C mod r leftover channels into the chunk sum (SlimConv.forward).
    top = in_channels // r
    mid = in_channels // (2 * r)
    # k = 1 keeps the width: the bottom k x k conv grows C/4 back to C/2 (see class docstring).
    bottom = top if k == 1 else mid
    return k, r, top, mid, bottom


def _reconstruct(weights: torch.Tensor, x: torch.Tensor, width: int) -> torch.Tensor:
    """Eq. 2 for every pathway at once: ``sum_j (w_p * X)^j`` over the chunks of ``width``.

    ``weights`` (P, N, C, 1, 1) holds one channel-weight vector per pathway (w and/or flip(w)),
    ``x`` is (N, C, H, W); returns (P, N, width, H, W). C not a multiple of ``width``: the
    channel axis is zero-padded to whole chunks, so the C mod r leftovers add into the first
    channels. One multiply and r - 1 in-place multiply-adds: no (P, N, C, H, W) temporary.
    """
    pad = -x.shape[1] % width
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        weights = F.pad(weights, (0, 0, 0, 0, 0, pad))
    xs, ws = x.split(width, 1), weights.split(width, 2)
    recon = ws[0] * xs[0]
    for wj, xj in zip(ws[1:], xs[1:], strict=True):
        recon.addcmul_(wj, xj)
    return recon


class _ReconstructTransform(torch.autograd.Function):
    """Reconstruct (Eq. 2) and the two convs reading it, with a lean backward (training).

    Returns ``top_conv(X'_w)`` and ``bottom_reduce(X'_flip(w))``. Autograd would keep the
    reconstructed maps (P x C/r channels, as large as X at r = 2) for the two convs' weight
    gradients; this keeps only X (which the host network keeps anyway) and the channel weights,
    and recomputes the reconstruction (one multiply-add per chunk) in backward.
    """

    @staticmethod
    def forward(ctx, x, weights, w_top, w_red, top_args):
        # top_args: (stride, padding, dilation, groups) of the top k x k conv
        recon = _reconstruct(weights, x, w_top.shape[1] * top_args[3]).unbind(0)
        top = F.conv2d(recon[0], w_top, None, *top_args)
        red = F.conv2d(recon[-1], w_red)
        ctx.save_for_backward(x, weights, w_top, w_red)
        ctx.top_args = top_args
        return top, red

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_top, g_red):
        x, weights, w_top, w_red = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.top_args
        need = ctx.needs_input_grad
        n, c, h, w_ = x.shape
        width = w_top.shape[1] * groups
        recon = _reconstruct(weights, x, width).unbind(0)
        g_rt, gw_top, _ = torch.ops.aten.convolution_backward(
            g_top, recon[0], w_top, None, [stride] * 2, [padding] * 2, [dilation] * 2, False,
            [0, 0], groups, [True, need[2], False])
        g_rb, gw_red, _ = torch.ops.aten.convolution_backward(
            g_red, recon[-1], w_red, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [True, need[3], False])
        del recon
        # Pathway p's gradient g_p (N, width, H, W); one pathway (P = 1) feeds both convs.
        g = torch.stack((g_rt, g_rb)) if weights.shape[0] == 2 else (g_rt + g_rb).unsqueeze(0)
        chunks = -(-c // width)
        if chunks * width != c:
            x = F.pad(x, (0, 0, 0, 0, 0, chunks * width - c))
            weights = F.pad(weights, (0, 0, 0, 0, 0, chunks * width - c))
        wv = weights.reshape(-1, n, chunks, width, 1, 1)
        gx = gw = None
        if need[0]:  # dX^j = sum_p w_p^j * g_p
            gx = wv[0] * g[0].unsqueeze(1)
            for p in range(1, wv.shape[0]):
                gx.addcmul_(wv[p], g[p].unsqueeze(1))
            gx = gx.reshape(n, chunks * width, h, w_)[:, :c]  # g may arrive channels_last
        if need[1]:  # dw_p^j = sum_hw X^j * g_p
            # One batched matmul per pathway, (n, C, HW) @ (n, HW, width), on views of X in
            # either layout (no permuted copies); its (width x width) diagonal blocks are the
            # per-chunk sums (width x more MACs than needed, still negligible).
            xf = x.flatten(2)
            gw = torch.stack([
                torch.bmm(xf, gp.flatten(2).transpose(1, 2)).view(n, chunks, width, width)
                .diagonal(dim1=2, dim2=3) for gp in g])
            gw = gw.reshape(-1, n, chunks * width)[..., :c].reshape(-1, n, c, 1, 1)
        return gx, gw, gw_top, gw_red, None


class _PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d of the SE's ``F_fc1`` on the pooled ``(N, C, 1, 1)`` map (Eq. 1).

    With one sample in training mode a pooled map has a single value per channel, where batch
    statistics are undefined (``nn.BatchNorm2d`` raises, and zero variance would zero every
    gradient through it). That step normalises with the running estimates instead, as in eval,
    and leaves them unchanged. With two or more samples it is exactly ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


@register_conv("slimconv")
class SlimConv(nn.Module):
    r"""SlimConv: reconstruct by weights flipping, transform, fuse (§3.1, Fig. 1).

    For an input :math:`X` with :math:`C` = ``in_channels`` channels and
    :math:`k` = ``compression_ratio`` :math:`= C_{in}/C_{out} = 2r/3` (:math:`r` summed chunks):

    **Reconstruct** (Eq. 1, Fig. 2, the modified SE module)

    .. math::
        z = F_{gp}(X),\qquad
        w = \sigma\big(F_{fc2}(\delta(\mathrm{BN}(F_{fc1}(z))))\big)\in(0,1)^C

    :math:`F_{fc1}`: 1x1 conv :math:`C \to h` without bias, :math:`h = \max(\lfloor C/s\rfloor, L)`
    (:math:`s` = ``se_reduction``, 32 in the paper; :math:`L` = ``se_min_channels``, §3.2), then
    BN; :math:`\delta` = ReLU; :math:`F_{fc2}`: 1x1 conv :math:`h \to C` with bias;
    :math:`\sigma` = sigmoid. Weights flipping reverses the channel order,
    :math:`\tilde w_i = w_{C-1-i}`. Eq. 2 with the features cut into :math:`r` chunks of
    :math:`C/r` channels (:math:`r = 2` in the paper's default, "halve"):

    .. math::
        X'_w = \sum_{j=1}^{r} (w * X)^j,\qquad X'_{\tilde w} = \sum_{j=1}^{r} (\tilde w * X)^j

    **Transform** (§3.1): top :math:`T = \mathrm{BN}(F_{k\times k}(X'_w))`, :math:`C/r \to C/r`;
    bottom :math:`B = \mathrm{BN}(F_{k\times k}(\delta(\mathrm{BN}(F_{1\times 1}
    (X'_{\tilde w})))))`, the 1x1 conv halving :math:`C/r \to C/(2r)`, the k x k conv keeping
    :math:`C/(2r)` (growing it back to :math:`C/2` at k = 1, see below). The paper's Transform
    names only the convs; the three BNs and the ReLU are the official code's (see the
    deviations below).

    **Fuse**: :math:`Y = [T, B]` (top first), :math:`C/r + C/(2r) = 3C/(2r) = C/k` channels
    (``3C/4`` at the default k = 4/3).

    Output shape: ``(N, C/k, ceil(H/stride), ceil(W/stride))``. ``out_channels`` is fixed by k;
    get it before building with :meth:`natural_out_channels` (or
    ``leanconv.conv_out_channels("slimconv", C, None, compression_ratio=k)``) and give the next
    layer that many input channels (Fig. 3: the block's last 1x1 conv takes ``C/k`` channels).

    Args map to the paper as follows: ``compression_ratio`` = k (§3.2; ``4/3`` default, Table 10:
    2, 8/3, 10/3, 4, 14/3, 16/3; and 1), ``se_reduction`` = r of the SE (32, Fig. 2; Table 3 uses
    24 and 8), ``se_min_channels`` = L (§3.2; Table 3 uses 6 and 16), ``flipping`` = Table 7's
    ablation: ``"flip"`` (the method), ``"none"`` ("w/o flipping": the bottom pathway uses ``w``
    too; ``None`` means the same) or ``"only"`` ("only flipping": both pathways use
    :math:`\tilde w`). ``groups`` applies to both k x k convs as in the official code
    (Sc-ResNeXt, §4.2); ``bottom_groups`` overrides it for the bottom k x k conv (``None`` =
    ``groups``): the README's Sc-ResNeXt-101 (32x3d, k=2, 23.70M) reproduces only with
    ``groups=32, bottom_groups=16``, its bottom width being a sixth of the block width
    (reference notes §1.3). The 1x1 convs are never grouped.

    Deviations from the paper text -- where this follows the official code (JiaxiongQ/SlimConv)
    rather than the paper, or departs from both:

    * Transform's normalisation and activation come from the official code, not the paper:
      §3.1 and Fig. 1(e)-(f) give the top pathway one k x k conv and the bottom pathway a 1x1
      conv "followed by" a k x k conv, with no BN or ReLU. The official ``slim_conv_3x3`` puts
      a BN after each k x k conv and BN + ReLU between the bottom 1x1 and k x k convs (and its
      Bottleneck drops the host ``bn2``, the module ending in BNs); the published parameter
      counts include those BNs (Sc-ResNet-50 k=4/3 16.76M exactly). The BN inside the SE's
      ``F_fc1`` is the paper's (Eq. 1: "F_fc1 includes the Batch Normalization").

    * Both k x k convs carry ``stride`` and ``dilation``; the bottom 1x1 conv runs at the input
      resolution before the stride; the SE runs on the input (official code).
    * ``k = 2r/3`` for ``r > 2`` sums ``r`` chunks (top ``C/r``, bottom ``C/(2r)``): the
      generalisation that reproduces the README's Sc-ResNet-50 (k=8/3) 12.10M params exactly.
    * ``C`` not divisible by ``2r`` (e.g. C = 64 at k = 2 or 4, r = 3 or 6: SlimConv Table 10's
      CIFAR ResNet-50): the widths are floored as in the official code, top ``C//r``, bottom
      1x1 ``C//(2r)``, out ``C//r + C//(2r)``. The official code then sums only the first
      ``r * (C//r)`` channels and silently drops the ``C mod r`` last ones; here they are added
      to the first channels of the sum (the channel axis zero-padded to whole chunks of
      ``C//r``, all chunks summed), so no input channel is lost and the parameter and MAC
      counts equal the official code's (Table 10: k=2 11.56M, k=4 9.08M). C divisible by r
      computes exactly as before. ``in_channels`` must be at least ``2r``.
    * ``k = 1`` (not in the SlimConv paper; the SCConv paper's "SlimConv (k=1)" rows): halves
      are summed as at k = 4/3 and the bottom k x k conv maps ``C/4 -> C/2``, so top and bottom
      each give ``C/2``. Replacing the second 3x3 conv of every CIFAR basic block (host BN
      kept) gives SlimConv-R56 (k=1) 0.597M params and, counted as the SCConv paper does (conv
      MACs + 2 per BN output + GAP), 88.82M FLOPs: the paper's 0.60M / 88.82M exactly. In
      ResNet-50's bottlenecks it gives 18.73M / 2.97 GMACs (SCConv Table 3: 18.81M / 3.00G).
    * SE hidden width ``max(C // se_reduction, se_min_channels)`` on every layer. The paper
      uses ``C/32`` (Fig. 2) and ``max(C/r, L)`` only for DLA46-C and MobileNetV2 (§3.2); the
      integer floor ``C // 32`` is the official code's, which has no lower bound (zero hidden
      channels and a crash for C < 32). The default ``se_min_channels=2`` is a library floor:
      the largest that leaves every layer of the paper's ImageNet ResNet/ResNeXt models
      (C >= 64) identical to the official code, hence the published parameter counts exact.
    * The BN inside ``F_fc1`` normalises a pooled ``(N, h, 1, 1)`` map; at batch size 1 in
      training mode it uses its running statistics (see ``_PooledBatchNorm2d``), where the
      official code raises.
    * The two final BNs (after the top and the bottom k x k convs) are one per-channel BN on
      the concatenation: the same parameters and the same maths, one kernel.
    * ``bias=True`` adds a learnable per-output-channel bias after that BN (API parity with
      ``nn.Conv2d``; the paper's module has none).
    * ``kernel_size`` other than 3 is allowed (the paper and official code use 3 x 3).

    Speed and memory (same maths): the chunk sums of Eq. 2 are one multiply and ``r - 1``
    in-place multiply-adds (no ``r``-times-larger temporary). In training, Eq. 2 and the two
    convs reading its result run as one autograd function (``_ReconstructTransform``) that
    recomputes the reconstruction in backward instead of keeping it (for r = 2 as large as the
    input). :meth:`fuse_for_inference` folds every BN; :meth:`absorb_bn` also folds a host BN
    after the module (``leanconv.prepare_for_inference``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | str | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        compression_ratio: float | Fraction | str = Fraction(4, 3),
        se_reduction: int = 32,
        se_min_channels: int = 2,
        flipping: str | None = "flip",
        bottom_groups: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        natural = self.natural_out_channels(in_channels, None, compression_ratio=compression_ratio)
        padding = check_conv_args(in_channels, natural if out_channels is None else out_channels,
                                  kernel_size, stride, padding, dilation)
        if out_channels != natural and out_channels is not None:
            raise ValueError(
                f"out_channels={out_channels} is not SlimConv's width: with in_channels="
                f"{in_channels} and compression_ratio={compression_ratio!r} it outputs "
                f"{natural} channels (C_in/k); pass out_channels={natural} or None"
            )
        k, r, top, mid, bottom = _widths(in_channels, compression_ratio)
        flipping = "none" if flipping is None else flipping  # CLI: "--flipping none" -> None
        check_positive_int("se_reduction", se_reduction)
        check_positive_int("se_min_channels", se_min_channels)
        check_choice("flipping", flipping, _FLIPPING)
        check_positive_int("groups", groups)
        bottom_groups = groups if bottom_groups is None else bottom_groups
        check_positive_int("bottom_groups", bottom_groups)
        check_divisible("top width C/r", top, groups, "groups")
        check_divisible("bottom width C/(2r)", mid, bottom_groups, "bottom_groups")
        check_divisible("bottom output width", bottom, bottom_groups, "bottom_groups")
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = natural
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.bottom_groups = bottom_groups
        self.compression_ratio = k
        self.chunks = r
        self.flipping = flipping
        self.se_channels = max(in_channels // se_reduction, se_min_channels)

        # Reconstruct: modified SE (Eq. 1, Fig. 2): fc layers are 1x1 convs, F_fc1 includes BN.
        self.fc1 = nn.Conv2d(in_channels, self.se_channels, 1, bias=False, **dd)
        self.fc1_bn = _PooledBatchNorm2d(self.se_channels, **dd)
        self.fc2 = nn.Conv2d(self.se_channels, in_channels, 1, bias=True, **dd)
        # Transform: top k x k conv (Fig. 1e); bottom 1x1 halving, then k x k (Fig. 1f).
        self.top_conv = nn.Conv2d(top, top, kernel_size, stride, padding, dilation, groups,
                                  bias=False, **dd)
        self.bottom_reduce = nn.Conv2d(top, mid, 1, bias=False, **dd)
        self.bottom_reduce_bn = nn.BatchNorm2d(mid, **dd)
        self.bottom_conv = nn.Conv2d(mid, bottom, kernel_size, stride, padding, dilation,
                                     bottom_groups, bias=False, **dd)
        # BN after each k x k conv, applied per channel on the fused output (same maths).
        self.bn = nn.BatchNorm2d(natural, **dd)
        if bias:
            self.bias = nn.Parameter(torch.zeros(natural, **dd))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def natural_out_channels(cls, in_channels: int, out_channels: int | None = None,
                             **hparams) -> int:
        """The width SlimConv produces: ``C/r + C/(2r) = in_channels / k`` (``in_channels`` at k=1).

        ``out_channels`` is the width the caller asked for (e.g. the vanilla conv's); SlimConv
        cannot honour it, so it is ignored and the natural width returned for the caller to
        rewire the next layer. Other ``hparams`` are accepted and ignored.
        """
        _, _, top, _, bottom = _widths(in_channels, hparams.get("compression_ratio",
                                                                Fraction(4, 3)))
        return top + bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reconstruct, Eq. 1: channel weights w from the modified SE module.
        z = x.mean((2, 3), keepdim=True)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1_bn(self.fc1(z)))))
        # Weights flipping (Fig. 1b); Table 7 ablations use w or flip(w) for both pathways.
        if self.flipping == "flip":
            weights = torch.stack((w, w.flip(1)))
        elif self.flipping == "none":
            weights = w.unsqueeze(0)
        else:
            weights = w.flip(1).unsqueeze(0)
        # Eq. 2 + Transform: re-weight and sum the r chunks (both pathways at once), then the
        # top k x k conv and the bottom 1x1 (halving); in training through _ReconstructTransform,
        # which recomputes the reconstruction in backward instead of keeping it.
        if self.training and torch.is_grad_enabled() and self.top_conv.bias is None:
            top_args = (self.stride, self.padding, self.dilation, self.groups)
            top, reduced = _ReconstructTransform.apply(x, weights, self.top_conv.weight,
                                                       self.bottom_reduce.weight, top_args)
        else:
            recon = _reconstruct(weights, x, self.top_conv.in_channels).unbind(0)
            top, reduced = self.top_conv(recon[0]), self.bottom_reduce(recon[-1])
        # Transform, bottom: BN + ReLU after the 1x1, then the k x k conv.
        bottom = self.bottom_conv(F.relu(self.bottom_reduce_bn(reduced)))
        # Fuse: concatenate (top first), then the BN of each transform, per channel.
        y = self.bn(torch.cat((top, bottom), 1))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    @torch.no_grad()
    def fuse_for_inference(self) -> SlimConv:
        """Fold every BN into the conv before it (eval only); puts the module in eval mode."""
        self.eval()
        if isinstance(self.bn, nn.Identity):
            return self
        fold_bn(self.fc1, self.fc1_bn)
        fold_bn(self.bottom_reduce, self.bottom_reduce_bn)
        top = self.top_conv.out_channels
        scale, shift = bn_scale_shift(self.bn)
        if self.bias is not None:
            shift = shift + self.bias
        for conv, s, b in ((self.top_conv, scale[:top], shift[:top]),
                           (self.bottom_conv, scale[top:], shift[top:])):
            scale_conv(conv, s, b)
        self.fc1_bn = nn.Identity()
        self.bottom_reduce_bn = nn.Identity()
        self.bn = nn.Identity()
        self.bias = None
        return self

    @torch.no_grad()
    def absorb_bn(self, bn: nn.Module) -> bool:
        """Fold an eval-mode BN applied to this module's output into it, in place.

        Called by :func:`leanconv.prepare_for_inference` when a host network keeps a BN after
        SlimConv (the paper's build removes it). The output ``[T, B]`` is linear per channel
        after :meth:`fuse_for_inference` (run first), so ``a * Y + b`` goes into the top and
        the bottom k x k convs' weights and biases. Returns ``False`` (nothing changed) for
        anything but a ``BatchNorm2d`` with running statistics over ``out_channels`` channels.
        """
        if not foldable_bn(bn, self.out_channels):
            return False
        self.fuse_for_inference()
        scale, shift = bn_scale_shift(bn)
        top = self.top_conv.out_channels
        for conv, a, b in ((self.top_conv, scale[:top], shift[:top]),
                           (self.bottom_conv, scale[top:], shift[top:])):
            scale_conv(conv, a, b)
        return True

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, compression_ratio={self.compression_ratio}")
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1 or self.bottom_groups != 1:
            s += f", groups={self.groups}, bottom_groups={self.bottom_groups}"
        if self.flipping != "flip":
            s += f", flipping={self.flipping!r}"
        return s

