"""SCConv: Spatial and Channel Reconstruction Convolution (Li, Wen, He, CVPR 2023).

SCConv replaces a k x k convolution by two units in sequence (Sec. 2, Fig. 1):

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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._utils import (
    DENSE_MAX_GROUP_CHANNELS,
    bn_scale_shift,
    check_choice,
    check_conv_args,
    check_divisible,
    check_positive_int,
    check_ratio,
    dense_gwc_pwc_weight,
    downsample,
    fold_bn,
    foldable_bn,
    scale_conv,
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


# ----------------------------------------------------------------------------------------------
# Lean forward/backward machinery (no maths of its own: Eq. 1-4 and 7-9 rewritten for memory).
#
# In training, autograd would keep several full-size maps per SRU (sigmoid output, mask, R * X,
# X^w) and per CRU fusion (Y1, Y2). The two autograd Functions below keep only what cannot be
# recomputed cheaply: the SRU keeps X (which the layer before saves anyway) and recomputes GN,
# the gate and X^w in backward; the fusion keeps D = Y1 - Y2 and beta1 (Y1 and Y2 are not
# needed: dY1 = beta1 dY + s, dY2 = dY - dY1 with s from sum_HW(dY * D)). Outside training
# (eval or no grad, e.g. torch.export) plain tensor code computes the same values.
# ----------------------------------------------------------------------------------------------


class _Branch(NamedTuple):
    """A conv reading channels ``[start, stop)`` of X^w, average-pooled by ``pool`` first."""

    start: int
    stop: int
    pool: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1


def _branch_input(xw: torch.Tensor, branch: _Branch) -> torch.Tensor:
    part = xw if branch.stop - branch.start == xw.shape[1] else xw[:, branch.start:branch.stop]
    return downsample(part, branch.pool)


def _run_branches(xw: torch.Tensor, branches, params) -> tuple[torch.Tensor, ...]:
    return tuple(
        F.conv2d(_branch_input(xw, b), params[2 * i], params[2 * i + 1], b.stride, b.padding,
                 b.dilation, b.groups)
        for i, b in enumerate(branches)
    )


def _logit(threshold: float) -> float:
    return math.log(threshold / (1.0 - threshold))


def _step(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[t > threshold]`` as 0./1. in ``t``'s dtype: the gate's masks are multiplied, not
    indexed (``torch.where`` / ``masked_fill`` with a bool mask run ~10x slower than a
    multiply on CPU), and multiplying by 0 or 1 is exact, so the values are unchanged."""
    with torch.no_grad():  # a comparison has no gradient; out= needs no autograd
        return torch.gt(t, threshold, out=torch.empty_like(t))


def _gate(z: torch.Tensor, threshold: float, soft: bool, inplace: bool):
    """Eq. 3 from z = W_gamma * GN(X): ``(R or None, informative mask [R > t] as 0./1.)``.

    Both gates decide with one comparison, ``z > logit(t)`` (``sigmoid(z) > t`` exactly, made
    before the sigmoid): after it, float32 rounds ``sigmoid(z)`` to 0.5 for 0 < z < 3e-8, and
    ``R > 0.5`` would call those positions non-informative where the hard gate does not.
    """
    informative = _step(z, _logit(threshold))
    if soft:
        return (z.sigmoid_() if inplace else torch.sigmoid(z)), informative
    return None, informative  # the hard gate needs no sigmoid


def _reconstruct(x: torch.Tensor, reweight: torch.Tensor | None, informative: torch.Tensor,
                 inplace: bool) -> torch.Tensor:
    """Eq. 4: ``X^w = [X^w_11 + X^w_22, X^w_21 + X^w_12] = X1 + roll(X2, C/2)`` from the gate.

    With the 0./1. mask ``m = [R > t]``: soft ``X1 = lerp(R X, X, m)`` (X above t, else R X),
    ``X2 = R X - m R X`` (0 above t, else R X); hard ``X1 = m X``, ``X2 = X - X1``. Every step
    is exact for m in {0, 1} (``lerp`` returns its end points exactly), so these are the values
    of the paper's W1 X and W2 X. ``inplace`` may overwrite ``reweight``.
    """
    if reweight is None:
        x1 = x * informative                                       # W1 = [R > t]
        x2 = x - x1                                                # W2 = 1 - W1
    else:
        x_rw = reweight.mul_(x) if inplace else reweight * x       # R * X
        x1 = torch.lerp(x_rw, x, informative)                      # W1 = 1 above t, else R
        x2 = x_rw.addcmul_(x_rw, informative, value=-1)            # W2 = 0 above t, else R
    return x1.add_(x2.roll(x.shape[1] // 2, dims=1))


class _SRUThenConvs(torch.autograd.Function):
    """SRU (Eq. 1-4) followed by convs on channel slices of X^w; saves X only.

    ``forward(x, gn_weight, gn_bias, spec, *conv_params)`` with ``gn_weight``/``gn_bias`` GN's
    affine with W_gamma folded in, ``spec = (gn_groups, eps, threshold, soft, branches)`` and
    ``conv_params`` a (weight, bias-or-None) pair per branch. Returns one output per branch, or
    ``(X^w,)`` without branches. Backward recomputes GN (same kernel, same values), the gate and
    X^w, then applies the conv backward and the SRU backward by hand.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *params):
        groups, eps, threshold, soft, branches = spec
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        n, c = x.shape[:2]
        z = torch.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), groups, eps)[0]
        xw = _reconstruct(x, *_gate(z, threshold, soft, inplace=True), inplace=True)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, *params)
        return _run_branches(xw, branches, params) if branches else (xw,)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, weight, bias, *params = ctx.saved_tensors
        groups, eps, threshold, soft, branches = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_xw = need_x or (soft and (need_w or need_b))
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        # recompute GN (Eq. 1, same kernel -> same values), the gate (Eq. 3) and X^w (Eq. 4)
        z, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        reweight, informative = _gate(z, threshold, soft, inplace=True)
        param_grads: list[torch.Tensor | None] = []
        if branches:
            xw = _reconstruct(x, reweight, informative, inplace=False)
            pieces = []
            for i, (b, grad) in enumerate(zip(branches, grads, strict=True)):
                w, bb = params[2 * i], params[2 * i + 1]
                inp = _branch_input(xw, b)
                mask = [need_xw, ctx.needs_input_grad[4 + 2 * i],
                        bb is not None and ctx.needs_input_grad[5 + 2 * i]]
                gi, gw, gb = torch.ops.aten.convolution_backward(
                    grad, inp, w, None if bb is None else [bb.shape[0]], [b.stride] * 2,
                    [b.padding] * 2, [b.dilation] * 2, False, [0, 0], b.groups, mask)
                if need_xw and b.pool > 1:
                    gi = torch.ops.aten.avg_pool2d_backward(
                        gi, xw[:, b.start:b.stop], [b.pool] * 2, [b.pool] * 2, [0, 0], True,
                        True, None)
                pieces.append(gi)
                param_grads += [gw, gb]
            g_xw = None
            if need_xw:
                g_xw = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        else:
            g_xw = grads[0]
        dx = gw = gb = None
        if need_xw:
            half = c // 2
            g5 = g_xw.unflatten(1, (2, half))
            m5 = informative.unflatten(1, (2, half))
            if reweight is None:  # hard gate: dX = W1 dX^w + W2 roll(dX^w)
                dx = torch.lerp(g_xw.roll(half, dims=1), g_xw, informative)
            else:
                # dS = dX^w_top + dX^w_bottom reaches W2 X on both halves
                gs = g5.sum(1, keepdim=True)
                r5 = reweight.unflatten(1, (2, half))
                # dR = W2-part * X * dS, then through the sigmoid and GN (Eq. 1-3)
                dr = x.unflatten(1, (2, half)) * gs
                dr = dr.addcmul_(dr, m5, value=-1).flatten(1, 2)
                dz = torch.ops.aten.sigmoid_backward(dr, reweight)
                gx, gw, gb = torch.ops.aten.native_group_norm_backward(
                    dz, x, mean, rstd, weight, n, c, hw, groups, [need_x, need_w, need_b])
                if need_x:  # direct path: dX = W1 dX^w + W2 dS
                    dx = torch.lerp(r5 * gs, g5, m5).flatten(1, 2).add_(gx)
        return (dx if need_x else None, gw, gb, None, *param_grads)


def _split(t: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Channel slices to modify in place (one split op when autograd is not recording: it
    forbids in-place writes to the outputs of a multi-view op)."""
    if torch.is_grad_enabled():
        return t[:, :sizes[0]], t[:, sizes[0]:]
    return t.split(sizes, 1)


def _fuse_terms(y1a, y1b, p2, x_low, *, modify_input: bool, keep_diff: bool, logit_scale=None):
    """Eq. 7-9 from the pieces ``Y1 = y1a (+ y1b)`` and ``Y2 = [p2, x_low]`` (Eq. 5-6).

    ``Y = beta1 Y1 + (1 - beta1) Y2 = Y2 + beta1 D`` with ``D = Y1 - Y2`` and
    ``beta1 = sigmoid(GAP(Y1) - GAP(Y2)) = sigmoid(GAP(D))`` (Eq. 8's pairwise softmax).
    No concatenation: Y2's two parts are subtracted / added on channel slices. Returns
    ``(Y, D, beta1)``; ``D`` is overwritten by Y unless ``keep_diff``.
    """
    if y1b is None:
        diff = y1a if modify_input else y1a.clone()
    else:
        diff = y1a.add_(y1b) if modify_input else y1a + y1b
    sizes = None if p2 is None else [p2.shape[1], x_low.shape[1]]
    if sizes:
        d_p2, d_low = _split(diff, sizes)
        d_p2.sub_(p2)
        d_low.sub_(x_low)
    else:
        diff.sub_(x_low)
    logits = diff.mean((2, 3), keepdim=True)                       # Eq. 7: S1 - S2
    if logit_scale is not None:  # set by CRU.absorb_bn: S1 - S2 of the unscaled branches
        logits = logits * logit_scale
    beta1 = logits.sigmoid_()                                       # Eq. 8
    y = diff * beta1 if keep_diff else diff.mul_(beta1)             # Eq. 9
    if sizes:
        y_p2, y_low = (d_p2, d_low) if y is diff else _split(y, sizes)
        y_p2.add_(p2)
        y_low.add_(x_low)
    else:
        y.add_(x_low)
    return y, diff, beta1


class _CRUFuse(torch.autograd.Function):
    """Eq. 7-9 from ``(y1a, y1b or None, p2 or None, x_low)``; saves ``D = Y1 - Y2`` and beta1."""

    @staticmethod
    def forward(ctx, y1a, y1b, p2, x_low):
        y, diff, beta1 = _fuse_terms(y1a, y1b, p2, x_low, modify_input=False, keep_diff=True)
        ctx.save_for_backward(diff, beta1)
        ctx.parts = (y1b is not None, 0 if p2 is None else p2.shape[1])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        diff, beta1 = ctx.saved_tensors
        has_y1b, c2 = ctx.parts
        # dbeta1 = sum_HW(dY * D); through the sigmoid and the GAP (1 / HW per pixel)
        dbeta = (grad * diff).sum((2, 3), keepdim=True)
        ds = torch.ops.aten.sigmoid_backward(dbeta, beta1).div_(diff.shape[2] * diff.shape[3])
        dy1 = torch.addcmul(ds, grad, beta1)                       # beta1 dY + dS / HW
        dy2 = grad - dy1                                           # (1 - beta1) dY - dS / HW
        dp2, dlow = dy2.split([c2, dy2.shape[1] - c2], 1) if c2 else (None, dy2)
        return dy1, dy1 if has_y1b else None, dp2, dlow


def _lean(module: nn.Module) -> bool:
    """Use the memory-lean autograd Functions: training with autograd recording."""
    return module.training and torch.is_grad_enabled()


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
        gate: ``"soft"`` (default) or ``"hard"``, two readings of the gate of Eq. 3.

            The paper's sentence (Sec. 2.1) is "We set those weights above the threshold to 1
            to obtain the informative weights W_1 while setting them to 0 to gain the
            non-informative weights W_2": it fixes the weights *above* the threshold (1 in
            :math:`W_1`, 0 in :math:`W_2`) and says nothing about those below it, which may be
            0 / 1 (binary masks) or keep their sigmoid value :math:`R`. Both readings fit it:

            * ``"soft"`` -- below the threshold the weights keep :math:`R`: :math:`W_1 = 1`
              where :math:`R > t` else :math:`R`; :math:`W_2 = 0` where :math:`R > t` else
              :math:`R`. This is the popular code's reading (cheng-haha/ScConv after its issue
              #13, which quotes the sentence above). It is the default because it is the one
              reading under which the Separate step is learnable as Sec. 2.1 describes (GN's
              :math:`\gamma` are "trainable" and measure the feature maps' information):
              gradients reach :math:`\gamma, \beta` through the below-threshold weights.
            * ``"hard"`` -- binary masks: :math:`W_1 = [R > t]`, :math:`W_2 = 1 - W_1`, the
              literal reading of "set to 1 / set to 0" for every weight. GN then only feeds the
              non-differentiable mask, so :math:`\gamma, \beta` can never get a gradient: in
              this mode they are made non-trainable (``requires_grad=False``; they stay in the
              state dict), which keeps "every trainable parameter gets a gradient" true.

            In both, "above the threshold" is decided by one comparison, :math:`z >
            \mathrm{logit}(t)` on :math:`z = W_\gamma \odot \mathrm{GN}(X)` (equivalent to
            :math:`\sigma(z) > t`; a sign test at t = 0.5): comparing :math:`R` after a float32
            sigmoid would round :math:`\sigma(z)` to 0.5 for 0 < z < 3e-8 and make the soft
            gate disagree with the hard one there.

    Deviations: :math:`\sum_j \gamma_j` is used as in Eq. 2, without an epsilon or absolute value;
    it starts at C and could in principle approach 0 during training. Algebraically equivalent
    rewrites for speed: :math:`W_\gamma` is folded into GN's affine parameters (one fused
    ``group_norm`` call), the two gated products come from one sigmoid, and the cross-reconstruct
    is ``X1 + roll(X2, C/2)``, with the products and the sum written in place.

    Memory: in training the unit runs as a custom autograd Function that saves only X (and
    GN's two affine vectors); GN, the gate and X^w are recomputed in backward, giving the same
    gradients as autograd through the steps above. :meth:`forward_then_convs` extends this to
    the convs that read X^w (the SRU's k x k conv, the CRU's squeezes), so X^w is not kept either.
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
        # set by fuse_for_inference: the folded affine below, computed once
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2 folded into GN's affine (Eq. 1): ``W_gamma * GN(X)`` is a GroupNorm with weight
        ``gamma * W_gamma`` and bias ``beta * W_gamma``, ``W_gamma = gamma / sum(gamma)``."""
        if self.folded_weight is not None:
            return self.folded_weight, self.folded_bias
        gamma, beta = self.gn.weight, self.gn.bias
        w_gamma = gamma / gamma.sum()
        return gamma * w_gamma, beta * w_gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _lean(self):
            return self.forward_then_convs(x, (), ())[0]
        # Eq. 1-2: z = W_gamma * GN(X), one fused group_norm call
        weight, bias = self.folded_affine()
        z = F.group_norm(x, self.gn.num_groups, weight, bias, self.gn.eps)
        # Eq. 3: gate R = Sigmoid(z) at t; Eq. 4: cross-reconstruct W1 X and W2 X
        inplace = not torch.is_grad_enabled()
        gate = _gate(z, self.gate_threshold, self.gate == "soft", inplace)
        return _reconstruct(x, *gate, inplace=inplace)

    @torch.no_grad()
    def fuse_for_inference(self) -> SpatialReconstruction:
        """Compute the folded GN affine (Eq. 2) once instead of at every call (4 small ops);
        GN itself stays (it normalises with per-sample statistics). Inference only after this:
        later changes to ``gn.weight`` / ``gn.bias`` are not seen."""
        weight, bias = self.folded_affine()
        self.folded_weight, self.folded_bias = weight.clone(), bias.clone()
        return self

    def forward_then_convs(self, x: torch.Tensor, branches, params) -> tuple[torch.Tensor, ...]:
        """``conv_i(X^w[:, start_i:stop_i])`` for each branch (see ``_Branch``), or ``(X^w,)``.

        In training the SRU and the convs after it run as one autograd Function that keeps only
        X for backward (X^w and the gate are recomputed); otherwise plain code.
        """
        if not _lean(self):
            xw = self(x)
            return _run_branches(xw, branches, params) if branches else (xw,)
        weight, bias = self.folded_affine()
        spec = (self.gn.num_groups, self.gn.eps, self.gate_threshold, self.gate == "soft",
                tuple(branches))
        return _SRUThenConvs.apply(x, weight, bias, spec, *params)

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
    :class:`SpatialReconstruction` for the gate options (``gate="soft"`` default, GN's affine
    trains; ``gate="hard"`` binary masks, GN frozen; the paper's text allows both).
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
        # Sec. 2.1 then the host's k x k conv (one memory-lean Function in training)
        conv = self.conv
        branch = _Branch(0, self.in_channels, 1, self.stride, conv.padding[0], self.dilation)
        return self.sru.forward_then_convs(x, (branch,), (conv.weight, conv.bias))[0]

    @torch.no_grad()
    def absorb_bn(self, bn: nn.BatchNorm2d) -> bool:
        """Fold an eval-mode BN that follows this module into its k x k conv (exact: the conv is
        the last, linear step). Called by :func:`leanconv.prepare_for_inference`."""
        if not foldable_bn(bn, self.conv.out_channels):
            return False
        fold_bn(self.conv, bn)
        return True


@register_conv("cru")
class CRU(nn.Module):
    r"""Channel Reconstruction Unit (Sec. 2.2, Fig. 3, Eq. 5-9) as a drop-in k x k conv.

    With :math:`C_1` = ``in_channels``, :math:`C_2` = ``out_channels``, :math:`\alpha` =
    ``split_ratio``, :math:`r` = ``squeeze_ratio``, :math:`g` = ``gwc_groups``:

    * Split: the first :math:`u = \mathrm{round}(\alpha C_1)` channels are the upper part, the
      other :math:`l = C_1 - u` the lower part (``leanconv plan`` also tries width-aligned
      :math:`\alpha`, e.g. 1/4: :math:`u` a multiple of the CPU kernels' channel block); 1x1
      convs squeeze them to :math:`u_s = \lfloor u/r \rfloor` and :math:`l_s = \lfloor l/r
      \rfloor` channels (:math:`X_{up}`, :math:`X_{low}`).
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

    Memory and speed: the fusion never concatenates Y2 (its two parts are subtracted from / added
    to channel slices of one buffer) and, in training, runs as a custom autograd Function that
    keeps only :math:`D = Y_1 - Y_2` and :math:`\beta_1` for backward (not Y1 and Y2):
    :math:`dY_1 = \beta_1 dY + s`, :math:`dY_2 = dY - dY_1`, :math:`s = \beta_1 (1 - \beta_1)
    \mathrm{sum}_{HW}(dY \odot D) / HW`. It computes :math:`\beta_1 = \sigma(\mathrm{GAP}(D))`,
    equal to Eq. 8's :math:`\sigma(S_1 - S_2)` up to float rounding. A BN after the CRU is
    absorbed by :meth:`absorb_bn` (inference): :math:`a Y + b = \beta_1 (a Y_1 + b) + \beta_2
    (a Y_2 + b)`, with the fusion logits multiplied by :math:`1/a` (0 where :math:`a = 0`).
    At stride 1 with an even split the two squeeze convs run as one 2-group 1x1 conv.
    :meth:`fuse_for_inference` (stride 1 only) merges GWC + PWC1 into one dense k x k conv
    (PWC1 added to the centre tap of the per-group-expanded GWC weight; exact). The fused conv
    has more weights (:math:`k^2 u_s C_2` instead of :math:`k^2 u_s C_2 / g + u_s C_2`) but
    saves a conv and an add.
    """

    # prepare_for_inference(compile=True) runs CRU eagerly: inductor's code for it (with
    # freezing) was slower than the eager forward on the CPU of docs/performance.md (64@56
    # batch 8: 5.1 vs 3.4 ms; 256@14: 2.8 vs 2.2 ms).
    compile_eager = True

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
        # set by fuse_for_inference: GWC + PWC1 merged into one k x k conv, and the two squeeze
        # weights concatenated once for the 2-group squeeze conv
        self.fused_upper: nn.Conv2d | None = None
        self.register_buffer("squeeze_weight", None, persistent=False)
        # set by absorb_bn: 1/a on the fusion logits, a*X_low + b on the reused channels
        self.register_buffer("fusion_scale", None)
        self.register_buffer("reuse_scale", None)
        self.register_buffer("reuse_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform_fuse(*self.split_squeeze(x))

    def transform_fuse(self, x_up: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
        """Transform (Eq. 5-6) and Fuse (Eq. 7-9) from the squeezed parts, without
        concatenating Y2; in training the fusion keeps only D = Y1 - Y2 for backward."""
        y1a, y1b = self._upper(x_up)                                    # Eq. 5
        # Eq. 6: Y2 = PWC2(X_low) U X_low   (feature reuse)
        p2 = None if self.pwc2 is None else self.pwc2(x_low)
        x_low = self._reused(x_low)
        # Eq. 7-9: Y = beta1 Y1 + beta2 Y2
        if _lean(self) and self.fusion_scale is None:
            return _CRUFuse.apply(y1a, y1b, p2, x_low)
        return _fuse_terms(y1a, y1b, p2, x_low, modify_input=True,
                           keep_diff=torch.is_grad_enabled(), logit_scale=self.fusion_scale)[0]

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split and Transform: return (Y1, Y2) of Eq. 5 and 6 (after :meth:`absorb_bn`, with
        the host BN's affine in both, so that ``fuse(*transform(x)) == forward(x)``)."""
        x_up, x_low = self.split_squeeze(x)
        y1a, y1b = self._upper(x_up)                                    # Eq. 5
        y1 = y1a if y1b is None else y1a + y1b
        # Eq. 6: Y2 = PWC2(X_low) U X_low   (feature reuse)
        reused = self._reused(x_low)
        y2 = reused if self.pwc2 is None else torch.cat([self.pwc2(x_low), reused], dim=1)
        return y1, y2

    def _reused(self, x_low: torch.Tensor) -> torch.Tensor:
        """The reused X_low of Eq. 6; after :meth:`absorb_bn` with the host BN's affine (PWC2
        reads the unscaled X_low, its weights carry the affine)."""
        if self.reuse_scale is None:
            return x_low
        return torch.addcmul(self.reuse_shift, x_low, self.reuse_scale)

    def _upper(self, x_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 5, ``Y1 = GWC(X_up) + PWC1(X_up)`` (the GWC carries the stride), as the two terms,
        or as ``(Y1, None)`` from one dense conv: after :meth:`fuse_for_inference`, and in
        training at stride 1 with at most ``DENSE_MAX_GROUP_CHANNELS`` channels per GWC group,
        where the dense conv's weight is rebuilt from the two weights at every step (same
        function and gradients, faster on oneDNN; eval mode keeps the two convs so that
        profiles count Eq. 11's MACs)."""
        if self.fused_upper is not None:
            return self.fused_upper(x_up), None
        gwc = self.gwc
        if (self.training and self.stride == 1
                and gwc.in_channels // self.gwc_groups <= DENSE_MAX_GROUP_CHANNELS):
            weight = dense_gwc_pwc_weight(gwc.weight, self.gwc_groups, self.pwc1.weight)
            return F.conv2d(x_up, weight, gwc.bias, 1, gwc.padding, gwc.dilation), None
        return gwc(x_up), self.pwc1(downsample(x_up, self.stride))

    def split_squeeze(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split alpha*C / (1-alpha)*C channels and squeeze each by r: (X_up, X_low).

        X_up stays at input size (the strided GWC reads it); X_low is already downsampled.
        """
        return self._squeezed(_run_branches(x, *self.squeeze_branches()))

    def squeeze_branches(self) -> tuple[tuple[_Branch, ...], tuple]:
        """The squeeze convs as ``(branches, params)`` for ``_run_branches`` or
        :meth:`SpatialReconstruction.forward_then_convs`."""
        up, c1 = self.up_channels, self.in_channels
        if self.stride == 1 and up == self.low_channels:
            # equal halves: both 1x1 squeezes as one 2-group conv (same weights, one dispatch)
            weight = self.squeeze_weight
            if weight is None:
                weight = torch.cat([self.squeeze_up.weight, self.squeeze_low.weight])
            return (_Branch(0, c1, groups=2),), (weight, None)
        # avg pooling commutes with a bias-free 1x1 conv: pool first, squeeze fewer pixels
        return ((_Branch(0, up), _Branch(up, c1, pool=self.stride)),
                (self.squeeze_up.weight, None, self.squeeze_low.weight, None))

    def _squeezed(self, outs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(outs) == 2:
            return outs
        return outs[0].split([self.squeeze_up.out_channels, self.squeeze_low.out_channels], 1)

    def _beta1(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        # Eq. 7: S_m = GAP(Y_m); Eq. 8: beta1 = e^S1 / (e^S1 + e^S2) = sigmoid(S1 - S2)
        logits = y1.mean((2, 3), keepdim=True) - y2.mean((2, 3), keepdim=True)
        if self.fusion_scale is not None:  # absorb_bn: S1 - S2 of the unscaled Y1, Y2
            logits = logits * self.fusion_scale
        return torch.sigmoid(logits)

    def fuse_weights(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7-8: per-channel two-way softmax of the GAP descriptors -> (beta1, beta2) (after
        :meth:`absorb_bn` of the logits it would have had without the BN, as ``forward``)."""
        beta1 = self._beta1(y1, y2)
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
        sizes, so nothing is merged. The 2-group squeeze weight (stride 1, even split) is also
        concatenated once here. After fusing, the module is meant for inference only.
        """
        if self.stride != 1 or self.fused_upper is not None:
            return self
        if self.up_channels == self.low_channels:
            self.squeeze_weight = torch.cat([self.squeeze_up.weight, self.squeeze_low.weight])
        gwc, pwc1 = self.gwc, self.pwc1
        k, c_out, c_in = self.kernel_size, gwc.out_channels, gwc.in_channels
        dense = dense_gwc_pwc_weight(gwc.weight, self.gwc_groups, pwc1.weight)
        upper = nn.Conv2d(c_in, c_out, k, 1, gwc.padding, gwc.dilation, bias=gwc.bias is not None,
                          device=dense.device, dtype=dense.dtype)
        upper.weight.copy_(dense)
        if gwc.bias is not None:
            upper.bias.copy_(gwc.bias)
        self.fused_upper = upper
        del self.gwc, self.pwc1
        return self

    @torch.no_grad()
    def absorb_bn(self, bn: nn.Module) -> bool:
        r"""Fold an eval-mode BN applied to this module's output into it, in place (inference).

        Called by :func:`leanconv.prepare_for_inference` for the host network's BN after the
        CRU; runs :meth:`fuse_for_inference` first. Returns ``False`` (nothing changed) for
        anything but a ``BatchNorm2d`` with running statistics over ``out_channels``.

        The BN is ``a * Y + b`` per channel; as beta1 + beta2 = 1,
        ``a Y + b = beta1 (a Y1 + b) + beta2 (a Y2 + b)``: the convs producing Y1 and PWC2's
        part of Y2 take ``a`` and ``b`` into their weights and biases, the reused X_low part of
        Y2 gets an explicit per-channel affine (after PWC2 has read the unscaled X_low). The
        fusion logits are not invariant, ``GAP(a Y1 + b) - GAP(a Y2 + b) = a (S1 - S2)``, so
        they are multiplied by ``1/a`` (buffer ``fusion_scale``; ``a = 0`` channels output ``b``
        whatever beta1 is, and get 0).
        """
        if not foldable_bn(bn, self.out_channels):
            return False
        self.fuse_for_inference()
        a, b = bn_scale_shift(bn)
        upper = [self.fused_upper] if self.fused_upper is not None else [self.pwc1, self.gwc]
        for conv in upper[:-1]:
            scale_conv(conv, a)
        scale_conv(upper[-1], a, b)
        c2 = 0 if self.pwc2 is None else self.pwc2.out_channels
        if self.pwc2 is not None:
            scale_conv(self.pwc2, a[:c2], b[:c2])
        inv = torch.where(a != 0, 1 / a, torch.zeros_like(a)).view(1, -1, 1, 1)
        low_a, low_b = a[c2:].view(1, -1, 1, 1), b[c2:].view(1, -1, 1, 1)
        if self.reuse_scale is not None:  # a second BN: compose with the first affine
            low_b = low_a * self.reuse_shift + low_b
            low_a = low_a * self.reuse_scale
            inv = inv * self.fusion_scale
        self.reuse_scale, self.reuse_shift, self.fusion_scale = low_a, low_b, inv
        return True


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
            # X -> SRU -> X^w -> CRU -> Y (Sec. 2); the SRU and the CRU's squeeze run as one
            # memory-lean step in training (X^w is recomputed in backward, not kept)
            squeezed = self.sru.forward_then_convs(x, *self.cru.squeeze_branches())
            return self.cru.transform_fuse(*self.cru._squeezed(squeezed))
        if self.order == "cs":
            return self.sru(self.cru(x))
        return self.cru(x) + downsample(self.sru(x), self.stride)

    def fuse_for_inference(self) -> SCConv:
        """Merge the CRU's GWC + PWC1 (see :meth:`CRU.fuse_for_inference`) and fold the SRU's
        W_gamma into GN's affine once (:meth:`SpatialReconstruction.fuse_for_inference`); GN
        itself stays (it normalises with per-sample statistics)."""
        self.sru.fuse_for_inference()
        self.cru.fuse_for_inference()
        return self

    @torch.no_grad()
    def absorb_bn(self, bn: nn.Module) -> bool:
        """Fold the host network's BN after SCConv into its CRU (``order="sc"``, where the CRU
        is the last step; see :meth:`CRU.absorb_bn`). Other orders end in the SRU's gate or a
        sum with it and return ``False``."""
        if self.order != "sc" or not foldable_bn(bn, self.cru.out_channels):
            return False  # decided before anything changes
        self.sru.fuse_for_inference()
        return self.cru.absorb_bn(bn)
