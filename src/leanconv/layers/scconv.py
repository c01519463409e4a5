"""SCConv: Spatial and Channel Reconstruction Convolution (Li, Wen, He, CVPR 2023).

Paper: ``/work/shared/papers/002_*.txt``. SCConv replaces a k x k convolution by two units in
sequence (Sec. 2, Fig. 1):

* the Spatial Reconstruction Unit (SRU, Sec. 2.1, Eq. 1-4) separates informative from less
  informative positions with Group Normalization's scale factors and cross-adds the two parts;
* the Channel Reconstruction Unit (CRU, Sec. 2.2, Eq. 5-9) splits the channels, transforms the
  upper part with a group-wise plus a point-wise conv and the lower part with a cheap point-wise
  conv plus feature reuse, and fuses both with a per-channel two-way softmax.

Registered conv types (all drop-in replacements for a same-padded ``nn.Conv2d``):

* ``"sru"``    :class:`SRU`    -- SRU unit, then the unchanged k x k conv (Table 1, "ResNet50 + S").
* ``"cru"``    :class:`CRU`    -- the CRU alone (Table 1, "ResNet50 + C").
* ``"scconv"`` :class:`SCConv` -- SRU unit then CRU (the paper's module), or the Table 1 orderings.

:class:`SpatialReconstruction` is the bare SRU unit (C -> C, no conv); it is not registered.

No official code exists; the popular public copy (cheng-haha/ScConv) contradicts the paper in its
fusion (softmax over all 2C channels). This file follows the paper; every deviation is listed in
the class docstrings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import (
    check_choice,
    check_conv_args,
    check_divisible,
    check_positive_int,
    check_ratio,
    downsample,
)
from .registry import register_conv

__all__ = ["CRU", "SRU", "SCConv", "SpatialReconstruction"]

_GATES = ("soft", "hard")
_ORDERS = ("sc", "cs", "parallel")


def _check_threshold(value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"gate_threshold must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"gate_threshold must be in (0, 1) (it thresholds a sigmoid), got {value}")
    return value


class SpatialReconstruction(nn.Module):
    r"""The bare Spatial Reconstruction Unit (Sec. 2.1, Fig. 2): ``(N, C, H, W) -> (N, C, H, W)``.

    Separate (Eq. 1-3):

    .. math::
        \mathrm{GN}(X) = \gamma \frac{X-\mu}{\sqrt{\sigma^2+\varepsilon}} + \beta, \qquad
        W_\gamma = \gamma_i / \textstyle\sum_j \gamma_j, \qquad
        R = \mathrm{Sigmoid}(W_\gamma \odot \mathrm{GN}(X)),

    and the gate at threshold :math:`t` (``gate_threshold``, 0.5 in the paper) gives the
    informative weights :math:`W_1` and the non-informative weights :math:`W_2`.
    Reconstruct (Eq. 4): :math:`X^w_1 = W_1 \otimes X`, :math:`X^w_2 = W_2 \otimes X` (the
    *input* X, not GN(X)), each split into channel halves, then
    :math:`X^w = [X^w_{11} + X^w_{22},\; X^w_{21} + X^w_{12}]`.

    Args:
        channels: C; must be even (Eq. 4 cross-adds two channel halves).
        gn_groups: number of GN groups. The paper gives none; 4 follows the popular code. Must
            divide ``channels``. GN is ``nn.GroupNorm`` with affine weight 1 and bias 0 at init.
        gate_threshold: t in (0, 1).
        name: the constructor argument ``channels`` came from, used in error messages.
        gate: ``"soft"`` (default) or ``"hard"``.

            * ``"soft"`` -- the popular code's variant (cheng-haha/ScConv after its issue #13),
              *not* the paper text: :math:`W_1 = 1` where :math:`R > t` else :math:`R`;
              :math:`W_2 = 0` where :math:`R > t` else :math:`R`. Gradients reach GN's
              :math:`\gamma, \beta` through the below-threshold weights.
            * ``"hard"`` -- the paper text: binary :math:`W_1 = [R > t]`, :math:`W_2 = 1 - W_1`.
              Since :math:`\sigma(z) > t \Leftrightarrow z > \mathrm{logit}(t)`, the gate is a
              sign test on :math:`W_\gamma \odot \mathrm{GN}(X)` at t = 0.5. GN only feeds the
              non-differentiable mask, so :math:`\gamma, \beta` can never get a gradient: in
              this mode they are made non-trainable (``requires_grad=False``; they stay in the
              state dict), which keeps "every trainable parameter gets a gradient" true.

    Deviations: :math:`\sum_j \gamma_j` is used as in Eq. 2, without an epsilon or absolute value;
    it starts at C and could in principle approach 0 during training. Algebraically equivalent
    rewrites for speed: :math:`W_\gamma` is folded into GN's affine parameters (one fused
    ``group_norm`` call), the two gated products come from one sigmoid, and the cross-reconstruct
    is ``X1 + roll(X2, C/2)``.
    """

    def __init__(
        self,
        channels: int,
        *,
        gn_groups: int = 4,
        gate_threshold: float = 0.5,
        gate: str = "soft",
        name: str = "in_channels",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(name, channels)
        check_positive_int("gn_groups", gn_groups)
        if channels % 2:
            raise ValueError(
                f"{name}={channels} must be even: SRU cross-reconstructs two channel halves (Eq. 4)"
            )
        check_divisible(name, channels, gn_groups, "gn_groups")
        check_choice("gate", gate, _GATES)
        self.channels = channels
        self.gate = gate
        self.gate_threshold = _check_threshold(gate_threshold)
        self.gn = nn.GroupNorm(gn_groups, channels, device=device, dtype=dtype)
        if gate == "hard":
            # Binary masks: GN's affine parameters only reach a step function -> no gradient.
            self.gn.weight.requires_grad_(False)
            self.gn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gn.weight, self.gn.bias
        # Eq. 2: W_gamma = gamma / sum(gamma), folded into GN's affine (Eq. 1): W_gamma * GN(X)
        w_gamma = gamma / gamma.sum()
        z = F.group_norm(x, self.gn.num_groups, gamma * w_gamma, beta * w_gamma, self.gn.eps)
        # Eq. 3: W = Gate(Sigmoid(z)); Eq. 4: X1 = W1 * X, X2 = W2 * X
        if self.gate == "soft":
            reweight = torch.sigmoid(z)
            informative = reweight > self.gate_threshold
            x_reweighted = reweight * x
            x1 = torch.where(informative, x, x_reweighted)    # W1 = 1 above t, else R
            x2 = x_reweighted.masked_fill(informative, 0.0)   # W2 = 0 above t, else R
        else:
            informative = z > math.log(self.gate_threshold / (1.0 - self.gate_threshold))
            x1 = torch.where(informative, x, 0.0)             # W1 = [R > t]
            x2 = x - x1                                       # W2 = 1 - W1
        # Eq. 4 reconstruct: [X11 + X22, X21 + X12] == X1 + (X2 with its halves swapped)
        return x1 + x2.roll(self.channels // 2, dims=1)

    def extra_repr(self) -> str:
        return f"{self.channels}, gate={self.gate!r}, gate_threshold={self.gate_threshold}"


@register_conv("sru")
class SRU(nn.Module):
    r"""SRU as a drop-in conv: SRU unit on ``in_channels`` then the unchanged k x k conv.

    Table 1's "ResNet50 + S" row keeps ResNet-50's FLOPs and adds only the GN parameters
    (23.53M vs 23.52M, Table 2), so the SRU was inserted *before* the unchanged 3x3 conv. This
    class is that unit: ``conv(SpatialReconstruction(x))`` with ``conv = nn.Conv2d(in_channels,
    out_channels, kernel_size, stride, same padding, dilation, bias)``.

    Output: ``(N, out_channels, ceil(H/stride), ceil(W/stride))``.
    Parameters: :math:`k^2 C_1 C_2` (+ :math:`C_2` with ``bias``) + :math:`2 C_1` (GN affine).
    ``in_channels`` must be even and divisible by ``gn_groups``. See
    :class:`SpatialReconstruction` for the gate options (``gate="soft"`` default, popular code;
    ``gate="hard"`` paper text, GN frozen).
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
        device=None,
        dtype=None,
        *,
        gn_groups: int = 4,
        gate_threshold: float = 0.5,
        gate: str = "soft",
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.sru = SpatialReconstruction(in_channels, gn_groups=gn_groups,
                                         gate_threshold=gate_threshold, gate=gate,
                                         device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.sru(x))   # Sec. 2.1 then the host's k x k conv


@register_conv("cru")
class CRU(nn.Module):
    r"""Channel Reconstruction Unit (Sec. 2.2, Fig. 3, Eq. 5-9) as a drop-in k x k conv.

    With :math:`C_1` = ``in_channels``, :math:`C_2` = ``out_channels``, :math:`\alpha` =
    ``split_ratio``, :math:`r` = ``squeeze_ratio``, :math:`g` = ``gwc_groups``:

    * Split: the first :math:`u = \mathrm{round}(\alpha C_1)` channels are the upper part, the
      other :math:`l = C_1 - u` the lower part; 1x1 convs squeeze them to :math:`u_s = \lfloor u/r
      \rfloor` and :math:`l_s = \lfloor l/r \rfloor` channels (:math:`X_{up}`, :math:`X_{low}`).
    * Transform, Eq. 5: :math:`Y_1 = M^G X_{up} + M^{P1} X_{up}` with a k x k group-wise conv
      (:math:`g` groups, ``gwc``) and a 1x1 conv (``pwc1``), both :math:`u_s \to C_2`.
    * Transform, Eq. 6: :math:`Y_2 = M^{P2} X_{low} \cup X_{low}`, with ``pwc2``:
      :math:`l_s \to C_2 - l_s` and the reused :math:`X_{low}` concatenated after it.
    * Fuse, Eq. 7-9: :math:`S_m = \mathrm{GAP}(Y_m)`, per channel
      :math:`\beta_1 = e^{S_1}/(e^{S_1}+e^{S_2})` (:math:`=\sigma(S_1-S_2)`),
      :math:`\beta_2 = 1-\beta_1`, :math:`Y = \beta_1 Y_1 + \beta_2 Y_2`. This is the paper's
      pairwise softmax, not the popular code's softmax over all 2C channels.

    Parameters (Eq. 11): :math:`\alpha C_1 \frac{\alpha C_1}{r} + k^2\frac{\alpha C_1}{gr}C_2 +
    \frac{\alpha C_1}{r} C_2 + (1-\alpha)C_1\frac{(1-\alpha)C_1}{r} + \frac{(1-\alpha)C_1}{r}
    (C_2 - \frac{(1-\alpha)C_1}{r})`, plus :math:`C_2` with ``bias=True``.

    Output: ``(N, out_channels, ceil(H/stride), ceil(W/stride))``.

    Library choices (the paper leaves them open):

    * Stride: the k x k GWC carries the stride. The 1x1 paths (PWC1 on :math:`X_{up}`, the lower
      squeeze, PWC2 and the reused :math:`X_{low}`) see :func:`~leanconv.layers._utils.downsample`d
      inputs (ceil-mode average pooling, so odd sizes work). The lower part is pooled *before* its
      squeeze: pooling and a bias-free 1x1 conv commute, so this only saves work.
    * ``in_channels != out_channels``: every branch maps to :math:`C_2`; requires
      :math:`C_2 \ge l_s` and :math:`g \mid C_2`. At :math:`C_2 = l_s` (e.g. DenseNet's
      128 -> 32 bottleneck 3x3 conv at :math:`\alpha = 1/2, r = 2`) PWC2 would produce no
      channel and is omitted (``pwc2 is None``): :math:`Y_2 = X_{low}`, the limit of Eq. 6. This
      reproduces SCConv Table 2's SCConv-D121 (5.45M: 5.40M here).
    * Bias: the paper omits biases (footnote 1) and the host block's BN follows, so the default
      is ``bias=False``. ``bias=True`` puts the per-output-channel bias in the GWC, as the popular
      code does (it then matches the notes' reference counts, e.g. 7,616 for SCConv(64, 64)).
    * Widths use ``round`` for the split and floor division by :math:`r`; Eq. 11 holds exactly
      when :math:`\alpha C_1` and the squeezed widths are integers.

    Speed: at stride 1 with an even split the two squeeze convs run as one 2-group 1x1 conv.
    :meth:`fuse_for_inference` (stride 1 only) merges GWC + PWC1 into one dense k x k conv
    (PWC1 added to the centre tap of the per-group-expanded GWC weight; exact). The fused conv
    has more weights (:math:`k^2 u_s C_2` instead of :math:`k^2 u_s C_2 / g + u_s C_2`) but
    saves a conv and an add.
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
        device=None,
        dtype=None,
        *,
        split_ratio: float = 0.5,
        squeeze_ratio: int = 2,
        gwc_groups: int = 2,
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        super().__init__()
        alpha = check_ratio("split_ratio", split_ratio)
        check_positive_int("squeeze_ratio", squeeze_ratio)
        check_positive_int("gwc_groups", gwc_groups)
        up = round(alpha * in_channels)
        low = in_channels - up
        up_sq, low_sq = up // squeeze_ratio, low // squeeze_ratio
        for part, width, sq in (("upper", up, up_sq), ("lower", low, low_sq)):
            if sq < 1:
                raise ValueError(
                    f"split_ratio={split_ratio} and squeeze_ratio={squeeze_ratio} give the {part} "
                    f"part of in_channels={in_channels} {width} channels, squeezed to {sq}; "
                    f"each squeezed part needs >= 1 channel (0 < split_ratio < 1, larger "
                    f"in_channels or smaller squeeze_ratio)"
                )
        if up_sq % gwc_groups:
            raise ValueError(
                f"upper squeezed width round(split_ratio*in_channels)//squeeze_ratio = {up_sq} "
                f"(in_channels={in_channels}, split_ratio={split_ratio}, "
                f"squeeze_ratio={squeeze_ratio}) must be divisible by gwc_groups={gwc_groups}"
            )
        check_divisible("out_channels", out_channels, gwc_groups, "gwc_groups")
        if out_channels < low_sq:
            raise ValueError(
                f"out_channels={out_channels} must be at least the reused lower width "
                f"{low_sq} (Eq. 6 concatenates PWC2's out_channels - {low_sq} channels with it)"
            )
        dd = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.split_ratio, self.squeeze_ratio, self.gwc_groups = alpha, squeeze_ratio, gwc_groups
        self.up_channels, self.low_channels = up, low
        # Split + squeeze (Sec. 2.2)
        self.squeeze_up = nn.Conv2d(up, up_sq, 1, bias=False, **dd)
        self.squeeze_low = nn.Conv2d(low, low_sq, 1, bias=False, **dd)
        # Transform (Eq. 5, 6)
        self.gwc = nn.Conv2d(up_sq, out_channels, kernel_size, stride, padding, dilation,
                             groups=gwc_groups, bias=bias, **dd)
        self.pwc1 = nn.Conv2d(up_sq, out_channels, 1, bias=False, **dd)
        # out_channels == l_s: PWC2 would have no output channel; Y2 is the reused X_low alone.
        self.pwc2 = (nn.Conv2d(low_sq, out_channels - low_sq, 1, bias=False, **dd)
                     if out_channels > low_sq else None)
        # set by fuse_for_inference: GWC + PWC1 merged into one k x k conv
        self.fused_upper: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1, y2 = self.transform(x)
        return self.fuse(y1, y2)

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split and Transform: return (Y1, Y2) of Eq. 5 and 6."""
        x_up, x_low = self.split_squeeze(x)
        if self.fused_upper is not None:
            y1 = self.fused_upper(x_up)                                  # Eq. 5, merged
        else:
            # Eq. 5: Y1 = GWC(X_up) + PWC1(X_up)   (the GWC carries the stride)
            y1 = self.gwc(x_up) + self.pwc1(downsample(x_up, self.stride))
        # Eq. 6: Y2 = PWC2(X_low) U X_low   (feature reuse)
        y2 = x_low if self.pwc2 is None else torch.cat([self.pwc2(x_low), x_low], dim=1)
        return y1, y2

    def split_squeeze(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split alpha*C / (1-alpha)*C channels and squeeze each by r: (X_up, X_low).

        X_up stays at input size (the strided GWC reads it); X_low is already downsampled.
        """
        up = self.up_channels
        if self.stride == 1 and up == self.low_channels:
            # equal halves: both 1x1 squeezes as one 2-group conv (same weights, one dispatch)
            weight = torch.cat([self.squeeze_up.weight, self.squeeze_low.weight])
            squeezed = F.conv2d(x, weight, groups=2)
            up_sq = self.squeeze_up.out_channels
            return squeezed[:, :up_sq], squeezed[:, up_sq:]
        x_up = self.squeeze_up(x[:, :up])
        # avg pooling commutes with a bias-free 1x1 conv: pool first, squeeze fewer pixels
        x_low = self.squeeze_low(downsample(x[:, up:], self.stride))
        return x_up, x_low

    @staticmethod
    def _beta1(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        # Eq. 7: S_m = GAP(Y_m); Eq. 8: beta1 = e^S1 / (e^S1 + e^S2) = sigmoid(S1 - S2)
        return torch.sigmoid(y1.mean((2, 3), keepdim=True) - y2.mean((2, 3), keepdim=True))

    @classmethod
    def fuse_weights(cls, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7-8: per-channel two-way softmax of the GAP descriptors -> (beta1, beta2)."""
        beta1 = cls._beta1(y1, y2)
        return beta1, 1.0 - beta1

    def fuse(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """Eq. 7-9: Y = beta1 * Y1 + beta2 * Y2 with beta1 + beta2 = 1 per channel."""
        beta1 = self._beta1(y1, y2)
        # Eq. 9: beta1 * Y1 + (1 - beta1) * Y2 == lerp(Y2, Y1, beta1)
        return torch.lerp(y2, y1, beta1)

    @torch.no_grad()
    def fuse_for_inference(self) -> CRU:
        """Merge GWC + PWC1 (Eq. 5) into one dense k x k conv, in place (stride 1 only).

        The grouped GWC weight is expanded to all input channels (zeros outside each group's
        block) and the PWC1 weight is added to its centre tap: exact up to float rounding. At
        stride 2 PWC1 reads average-pooled inputs, which no single strided conv reproduces on odd
        sizes, so nothing is merged. After fusing, the module is meant for inference only.
        """
        if self.stride != 1 or self.fused_upper is not None:
            return self
        gwc, pwc1 = self.gwc, self.pwc1
        g, k, c_out, c_in = self.gwc_groups, self.kernel_size, gwc.out_channels, gwc.in_channels
        # (C2, c_in/g, k, k) grouped -> (g, C2/g, g, c_in/g, k, k) block-diagonal dense
        dense = gwc.weight.new_zeros(g, c_out // g, g, c_in // g, k, k)
        idx = torch.arange(g, device=dense.device)
        dense[idx, :, idx] = gwc.weight.view(g, c_out // g, c_in // g, k, k)
        dense = dense.view(c_out, c_in, k, k)
        dense[:, :, k // 2, k // 2] += pwc1.weight[:, :, 0, 0]
        upper = nn.Conv2d(c_in, c_out, k, 1, gwc.padding, gwc.dilation, bias=gwc.bias is not None,
                          device=dense.device, dtype=dense.dtype)
        upper.weight.copy_(dense)
        if gwc.bias is not None:
            upper.bias.copy_(gwc.bias)
        self.fused_upper = upper
        del self.gwc, self.pwc1
        return self


@register_conv("scconv")
class SCConv(nn.Module):
    r"""SCConv (Sec. 2, Fig. 1): SRU unit on the input, then CRU (:class:`CRU`), as a k x k conv.

    ``order`` selects Table 1's arrangements:

    * ``"sc"`` (default, the paper's SCConv, "S+C"): ``CRU(SRU(X))``; SRU on ``in_channels``.
    * ``"cs"`` ("C+S"): ``SRU(CRU(X))``; the SRU then runs on ``out_channels`` at output size.
    * ``"parallel"`` ("C&S"): ``CRU(X) + downsample(SRU(X))`` -- both units read X and their
      outputs are summed, with no extra parameters (Table 1 gives C&S the same Params/FLOPs as
      S+C). The paper does not say how; this is a library choice. Summing needs equal widths, so
      ``parallel`` requires ``in_channels == out_channels`` (true of every 3x3 conv in the ResNet
      bottlenecks where Table 1 was measured); with stride, the SRU branch is average-pooled.

    Hyperparameters: those of :class:`SpatialReconstruction` (``gn_groups``, ``gate_threshold``,
    ``gate``) and :class:`CRU` (``split_ratio``, ``squeeze_ratio``, ``gwc_groups``); ``bias`` goes
    to the CRU's GWC. Parameters: Eq. 11 + 2 x (SRU width) for GN (+ :math:`C_2` with ``bias``),
    e.g. 7,616 for ``SCConv(64, 64, bias=True)``.

    Output: ``(N, out_channels, ceil(H/stride), ceil(W/stride))``.
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
        device=None,
        dtype=None,
        *,
        split_ratio: float = 0.5,
        squeeze_ratio: int = 2,
        gwc_groups: int = 2,
        gn_groups: int = 4,
        gate_threshold: float = 0.5,
        gate: str = "soft",
        order: str = "sc",
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        super().__init__()
        check_choice("order", order, _ORDERS)
        if order == "parallel" and in_channels != out_channels:
            raise ValueError(
                f"order='parallel' sums the SRU and CRU outputs and needs in_channels == "
                f"out_channels, got in_channels={in_channels}, out_channels={out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.order = order
        sru_channels, sru_name = ((out_channels, "out_channels") if order == "cs"
                                  else (in_channels, "in_channels"))
        self.sru = SpatialReconstruction(sru_channels, gn_groups=gn_groups,
                                         gate_threshold=gate_threshold, gate=gate,
                                         name=sru_name, device=device, dtype=dtype)
        self.cru = CRU(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                       device, dtype, split_ratio=split_ratio, squeeze_ratio=squeeze_ratio,
                       gwc_groups=gwc_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "sc":
            return self.cru(self.sru(x))         # X -> SRU -> X^w -> CRU -> Y (Sec. 2)
        if self.order == "cs":
            return self.sru(self.cru(x))
        return self.cru(x) + downsample(self.sru(x), self.stride)

    def fuse_for_inference(self) -> SCConv:
        """Merge the CRU's GWC + PWC1 (see :meth:`CRU.fuse_for_inference`); the SRU has nothing
        to fold (GN normalises with per-sample statistics)."""
        self.cru.fuse_for_inference()
        return self
