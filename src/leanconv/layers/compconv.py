"""CompConv (Zhang, Xu, Shen, CVPRW 2021, arXiv 2106.10486): a compact convolution built by
divide-and-conquer over the channel axis.

Sec. 3.2, core unit (Eq. 2): a C-channel map is ``X = X_A (+) W X_B`` where ``(+)`` concatenates
channels, ``X_A`` is borrowed from the input by identity and only ``X_B`` is convolved.
Sec. 3.3 applies the unit recursively (Eq. 3) to depth ``d``; the first split is special
("tailing channels": ``X_A0`` is a depthwise conv of ``X_B0``), and the output integrates every
intermediate result, followed by a channel shuffle in 4 groups (Sec. 4.2, Table 1).
Sec. 3.4 sizes the smallest unit ``C_prim`` (Eq. 4-5) and chooses ``d`` from the input width
(Eq. 6). Sec. 3.5 gives the cost (Eq. 8). No public implementation exists; this file is the
reference one, and every choice the paper leaves open is stated in :class:`CompConv`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._utils import (
    bn_scale_shift,
    channel_shuffle,
    check_choice,
    check_conv_args,
    check_positive_int,
    downsample,
    foldable_bn,
    is_channels_last,
    scale_conv,
)
from .registry import register_conv

__all__ = ["CompConv", "adaptive_depth", "compconv_layout"]

IDENTITY_OPTIONS = ("fixed", "group", "random", "conv")
SHUFFLE_GROUPS = 4  # Sec. 4.2: "a shuffle block in 4 groups after the concatenation"
MAX_ADAPTIVE_DEPTH = 3  # Eq. 6: "we bound the depth d with a maximum value 3"


def adaptive_depth(in_channels: int, base_channels: int = 128) -> int:
    """Eq. 6: ``d = min(log2(max(1, C_in / C0)) + 1, 3)``, with ``log2`` rounded down.

    The paper only uses powers of two (C_in and C0 in {32, ..., 512}); for other ratios ``d`` must
    still be an integer, and rounding down keeps Eq. 6's reading that ``d`` grows by one each time
    ``C_in`` doubles past ``C0`` (C_in = 192, C0 = 128 gives d = 1, as for C_in = 128).
    Computed exactly in integers: ``floor(log2(r)) + 1 == floor(r).bit_length()`` for r >= 1.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("base_channels", base_channels)
    ratio = in_channels // base_channels
    return max(1, min(ratio.bit_length(), MAX_ADAPTIVE_DEPTH))


def _prim_fits(out_channels: int, depth: int, prim: int, keep_tail: bool = False) -> bool:
    """The Eq. 4 width exceeds ``out_channels`` by no more than the X_A0 channels we may drop
    (by fewer, with ``keep_tail``, so that at least one X_A0 channel remains)."""
    excess = 2 * (2**depth - 1) * prim - out_channels
    return excess < 2 ** (depth - 1) * prim + (not keep_tail)


def compconv_layout(
    in_channels: int,
    out_channels: int,
    depth: int,
    identity: str = "fixed",
    even_prim: bool = True,
) -> tuple[int, int, int]:
    """``(C_prim, identity channels, kept tailing channels)`` of a CompConv, or ``ValueError``.

    * ``C_prim = ceil(C_out / (2 (2^d - 1)))`` (Eq. 5), rounded up to an even number when
      ``even_prim`` and the rounded value still leaves X_A0 a channel (see :class:`CompConv`).
    * The identity parts ``X_A1 .. X_A(d-1)`` take ``(2^(d-1) - 1) C_prim`` distinct input
      channels (none for ``identity="conv"``, where a 1x1 conv produces them).
    * ``X_A0`` keeps ``2^(d-1) C_prim - excess`` channels, where ``excess`` is by how much the
      Eq. 4 width ``2 (2^d - 1) C_prim`` exceeds ``C_out`` (Sec. 3.4: drop X_A0's last channels).
    """
    check_positive_int("depth", depth)
    prim = math.ceil(out_channels / (2 * (2**depth - 1)))
    if not _prim_fits(out_channels, depth, prim):
        raise ValueError(
            f"out_channels={out_channels} is too small for depth={depth}: Eq. 4 gives "
            f"{2 * (2**depth - 1) * prim} channels (C_prim={prim}), more than out_channels plus "
            f"the {2 ** (depth - 1) * prim} tailing channels X_A0 that Sec. 3.4 may drop; "
            f"use a smaller depth"
        )
    if even_prim and prim % 2 and _prim_fits(out_channels, depth, prim + 1, keep_tail=True):
        prim += 1
    identity_channels = (2 ** (depth - 1) - 1) * prim
    if identity != "conv" and identity_channels > in_channels:
        raise ValueError(
            f"in_channels={in_channels} is too small for depth={depth}: the identity parts "
            f"X_A1..X_A{depth - 1} borrow {identity_channels} distinct input channels "
            f"(C_prim={prim}); use a smaller depth, depth=None (adaptive, Eq. 6) or identity='conv'"
        )
    tail = 2 ** (depth - 1) * prim - (2 * (2**depth - 1) * prim - out_channels)
    return prim, identity_channels, tail


@register_conv("compconv")
class CompConv(nn.Module):
    r"""CompConv: recursive divide-and-conquer convolution (Sec. 3, Eq. 2-8, Fig. 2).

    Symbols -> arguments: ``C_in`` = ``in_channels``, ``C_out`` = ``out_channels``, ``k`` =
    ``kernel_size``, recursion depth ``d`` = ``depth`` (or Eq. 6 from ``C0`` = ``base_channels``),
    ``C_prim`` = attribute ``prim_channels``. Let ``P = C_prim``. With ``Conv`` a k x k conv
    (dilation ``dilation``, same padding, no bias) and ``(+)`` channel concatenation:

    * level 0 (the minimum unit ``X_B(d-1)``): ``P_0 = Conv(X_in)``, ``C_in -> P``, carrying the
      stride;
    * levels ``j = 1 .. d-1`` (Eq. 3): ``B_j = A_j (+) P_(j-1)`` with ``A_j`` the identity part of
      ``2^(j-1) P`` input channels, and ``P_j = Conv(B_j)``, ``2^j P -> 2^j P``;
    * tailing channels (Sec. 3.3): ``X_B0 = P_(d-1)`` (``2^(d-1) P`` channels) and
      ``X_A0 = DWConv(X_B0)``, a k x k conv with groups = channels;
    * integrating recursive results (Sec. 3.3): ``Y = X_A0 (+) X_B0 (+) B_1 (+) ... (+) B_(d-1)``,
      ``2 (2^d - 1) P`` channels (Eq. 4); the last channels of ``X_A0`` are dropped to reach
      ``C_out`` (Sec. 3.4); then a channel shuffle in 4 groups (Sec. 4.2, Table 1).

    Cost, Eq. 8: ``H W k^2 (C_in P + sum_{i=1}^{d-1} (2^i P)^2 + 2^(d-1) P)`` MACs at the output
    resolution, and the same divided by ``H W`` parameters. The dropped ``X_A0`` channels are
    never computed, so when Eq. 4 exceeds ``C_out`` by ``e`` channels the last term is
    ``2^(d-1) P - e`` (Eq. 8 exactly when ``C_out = 2 (2^d - 1) P``). ``identity="conv"`` adds
    ``C_in (2^(d-1) - 1) P`` for its 1x1 conv, ``bias=True`` adds ``C_out`` parameters.
    ``d = 1`` is a conv ``C_in -> C_out/2`` plus its depthwise copy (half the cost, Table 3).

    Output: ``(N, C_out, ceil(H / stride), ceil(W / stride))``, like a same-padded ``nn.Conv2d``.

    Choices the paper leaves open, settled against the VGG-16 (CIFAR) rows of Tables 1-4 by
    building the network (13 convs with BN + Linear(512, 10); MACs counted by FlopCounterMode;
    the paper's counter adds about 0.8M for BN/ReLU: vanilla is 313.2M here, 314M there):

    * **C_prim** (``even_prim=True``): Eq. 5's ceiling is rounded up to an even number, unless
      that would leave ``X_A0`` empty; the ``2 (2^d - 1) P`` concatenated channels then split
      evenly into the 4 shuffle groups. This departs from the letter of Eq. 5 because the
      paper's own counts need it: CompConv128 is 3.28M / 107.1M with it, 3.18M / 105.6M without
      (paper 3.3M / 107M, Tables 1-3, 5); global d = 3 is 2.94M vs 2.81M (paper 2.9M); the
      last-stage rows of Table 4 are 8.25M / 252.0M, 5.53M / 227.2M, 4.28M / 215.3M for d = 1, 2,
      3 (paper 8.2M / 253M, 5.5M / 228M, 4.3M / 216M; without rounding d = 3 gives 4.17M / 214.2M).
      Only Table 3's d = 4 row (2.2M / 56M) fits Eq. 5 unrounded better (2.24M / 55.1M vs 2.29M
      / 60.7M). ``even_prim=False`` follows Eq. 5 literally.
    * **Depth**: ``depth`` fixes ``d`` (any d >= 1; Table 3 uses d = 4); ``depth=None`` uses
      Eq. 6 with ``log2`` rounded down (:func:`adaptive_depth`): d grows by one each time C_in
      doubles past C0, so C0 = 128 gives d = 1, 1, 2, 3, 3 for C_in = 64, 128, 256, 512, 1024 and
      d = 1 for C_in = 192. A given ``depth`` the channels cannot hold raises ``ValueError``; an
      adaptive one is lowered until they can (d = 1 always can).
    * **Identity parts** (``identity``): ``A_1 .. A_(d-1)`` are disjoint consecutive blocks of
      one slab of ``(2^(d-1) - 1) P`` channels, ``A_1`` first. ``"fixed"`` (default, Sec. 4.2):
      the slab is the starting channels of the input, a slicing view. ``"group"``: the input is
      cut into as many equal groups as the slab has channels and the first channel of each group
      is taken (a strided view when that divides evenly). ``"random"``: distinct channels drawn at
      construction from torch's global generator (``torch.manual_seed`` fixes them as it fixes
      the initial weights), kept in the persistent buffer ``identity_index`` so checkpoints and
      exports carry them. ``"conv"``: a 1x1 conv ``C_in -> slab``; distinct blocks give +0.34M /
      +4.4M on CompConv128-VGG16 (3.62M / 111.5M; paper 3.6M / 112M, Table 2), shared blocks
      would give only +0.24M. With ``d = 1`` there are no identity parts and no option applies.
    * **Too few input channels**: ``"fixed"``, ``"group"`` and ``"random"`` need
      ``C_in >= (2^(d-1) - 1) P``; there is no zero-filling. VGG-16's first conv (3 -> 64) holds
      only d = 1 (:meth:`max_depth`). Keeping that conv vanilla for d >= 2 matches Table 4's
      first-stage rows (294.0M, 288.0M, 285.7M for d = 1, 2, 3 vs 295M, 289M, 287M), and global
      d = 2, 3 give 4.35M / 99.6M and 2.94M / 71.8M (paper 4.3M / 100M, 2.9M / 73M); building it
      at d = 1 instead gives 99.0M and 71.2M; zero-filling the missing channels would give
      292.0M / 290.7M on the first stage, too many. That choice belongs to the model builder.
    * **Stride**: the level-0 conv carries the stride; the identity slab is average-pooled with
      :func:`~leanconv.layers._utils.downsample`; all later convs run at the output size.
    * **No BN or activation inside**: the paper names none, so the module is linear like the
      ``nn.Conv2d`` it replaces and the host block's BN/ReLU follow it; Eq. 8 stays exact.
    * **Truncation** drops only ``X_A0`` channels (never computed), all of them if ``X_B0`` and
      the ``B_j`` already fill ``C_out``; a ``C_out`` needing more raises ``ValueError``.
    * **Shuffle** for ``C_out`` not a multiple of 4: groups of ``ceil(C_out / 4)`` channels (the
      last shorter) read column by column, ShuffleNet's order when it divides.
    * ``bias=True`` adds one learnable bias per output channel after the shuffle.

    Speed: for ``4 | C_out`` the concatenation and the shuffle are one ``torch.stack`` of the four
    shuffle groups (slices of the parts), i.e. one copy instead of two (concatenate, then
    transpose-copy). :meth:`absorb_bn` folds a following BN for inference
    (:func:`leanconv.prepare_for_inference`): exactly into ``X_A0``'s depthwise conv, and as one
    per-channel affine on the other parts, which also feed later convs.
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
        depth: int | None = None,
        base_channels: int = 128,
        shuffle: bool = True,
        identity: str = "fixed",
        even_prim: bool = True,
    ) -> None:
        padding = check_conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation)
        super().__init__()
        check_positive_int("base_channels", base_channels)
        check_choice("identity", identity, IDENTITY_OPTIONS)
        for name, value in (("shuffle", shuffle), ("even_prim", even_prim), ("bias", bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if depth is None:
            # Eq. 6, lowered while the channels cannot hold it (d = 1 always can).
            depth = adaptive_depth(in_channels, base_channels)
            while True:
                try:
                    layout = compconv_layout(in_channels, out_channels, depth, identity, even_prim)
                    break
                except ValueError:
                    if depth == 1:
                        raise
                    depth -= 1
        else:
            layout = compconv_layout(in_channels, out_channels, depth, identity, even_prim)
        prim, identity_channels, tail_channels = layout

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.depth = depth
        self.base_channels = base_channels
        self.prim_channels = prim
        self.identity = identity
        self.identity_channels = identity_channels
        self.tail_channels = tail_channels
        self.shuffle = shuffle
        self.even_prim = even_prim

        factory = {"device": device, "dtype": dtype}

        def conv(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups,
                             bias=False, **factory)

        # Level 0: the minimum computing unit, C_in -> C_prim (first term of Eq. 8).
        self.prim_conv = conv(in_channels, prim, stride)
        # Levels 1..d-1: 2^j C_prim -> 2^j C_prim (the sum in Eq. 8).
        self.level_convs = nn.ModuleList(conv(prim << j, prim << j) for j in range(1, depth))
        # Tailing channels X_A0: depthwise conv of X_B0's kept channels (last term of Eq. 8).
        self.tail_conv = (conv(tail_channels, tail_channels, groups=tail_channels)
                          if tail_channels else None)

        # Identity parts A_1..A_(d-1) (Sec. 4.2, Table 2).
        self._identity_step = 0  # > 0: strided view x[:, ::step] ("group" dividing evenly)
        self.identity_conv = None
        index, persistent = None, False
        if identity_channels and identity == "conv":
            self.identity_conv = nn.Conv2d(in_channels, identity_channels, 1, bias=False, **factory)
        elif identity_channels and identity == "group":
            if in_channels % identity_channels == 0:
                self._identity_step = in_channels // identity_channels
            else:
                index = torch.arange(identity_channels, device="cpu") * in_channels
                index = index // identity_channels
        elif identity_channels and identity == "random":
            index = torch.randperm(in_channels, device="cpu")[:identity_channels]
            persistent = True  # the draw is part of the model: checkpoints carry it
        self.register_buffer("identity_index", _to(index, device), persistent=persistent)

        # Shuffle (Sec. 4.2): ShuffleNet's view/transpose when C_out divides into 4 groups.
        order = None
        if shuffle and out_channels % SHUFFLE_GROUPS:
            order = _to(_shuffle_order(out_channels), device)
        self.register_buffer("shuffle_index", order, persistent=False)
        # Concatenation order of the parts: X_A0, X_B0, B_1, ..., B_(d-1).
        widths = [tail_channels, prim << (depth - 1)] + [prim << j for j in range(1, depth)]
        self._part_widths = tuple(w for w in widths if w)
        # Shuffle with 4 | C_out: the shuffled output viewed as (N, C_out/4, 4, H, W) holds
        # concatenated channel g * C_out/4 + k at [:, k, g], so one torch.stack of the 4 groups
        # (each a slice of one part, or rarely of two) writes the shuffled result directly.
        self._shuffle_groups = (_group_segments(self._part_widths, SHUFFLE_GROUPS)
                                if shuffle and order is None else None)
        # Set by absorb_bn: a per-channel affine (a BN folded in) on every part but X_A0, whose
        # depthwise conv absorbs it in its weights and bias instead.
        self.register_buffer("part_scale", None)
        self.register_buffer("part_shift", None)

        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, **factory))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def max_depth(
        cls,
        in_channels: int,
        out_channels: int,
        *,
        identity: str = "fixed",
        even_prim: bool = True,
        limit: int = 4,
    ) -> int:
        """Largest ``d <= limit`` the channels can hold (0 if none), e.g. 1 for VGG's 3 -> 64."""
        for depth in range(limit, 0, -1):
            try:
                compconv_layout(in_channels, out_channels, depth, identity, even_prim)
            except ValueError:
                continue
            return depth
        return 0

    def _identity_parts(self, x: torch.Tensor) -> torch.Tensor:
        """The slab A_1 (+) ... (+) A_(d-1) at the output resolution."""
        if self.identity_conv is not None:
            return self.identity_conv(downsample(x, self.stride))
        if self.identity_index is not None:
            slab = x.index_select(1, self.identity_index)
        elif self._identity_step:
            slab = x[:, :: self._identity_step]
        else:
            slab = x[:, : self.identity_channels]  # "fixed": the starting channels (a view)
        return downsample(slab, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Identity mappings X_A1..X_A(d-1), borrowed from the input (Eq. 2, Sec. 4.2).
        slab = self._identity_parts(x) if self.identity_channels else None
        # Minimum unit X_B(d-1): conv C_in -> C_prim, carrying the stride.
        result = self.prim_conv(x)
        # Recursion (Eq. 3): B_j = A_j (+) P_(j-1), P_j = W_j B_j; B_j is kept for the output.
        intermediate = []
        start = 0
        for j, conv in enumerate(self.level_convs):
            width = self.prim_channels << j  # |A_(j+1)| = 2^j C_prim
            unit = torch.cat([slab[:, start:start + width], result], dim=1)
            start += width
            intermediate.append(unit)
            result = conv(unit)
        # Tailing channels (Sec. 3.3): X_B0 = P_(d-1), X_A0 = depthwise conv of X_B0, computed
        # only for the channels kept after truncation to C_out (Sec. 3.4).
        parts = [result, *intermediate]
        if self.part_scale is not None:  # a BN absorbed by absorb_bn (X_A0 took it in its conv)
            scales, shifts = (self.part_scale,), (self.part_shift,)
            if len(parts) > 1:
                widths = self._part_widths[-len(parts):]
                scales, shifts = self.part_scale.split(widths, 1), self.part_shift.split(widths, 1)
            parts = [torch.addcmul(shift, part, scale)
                     for part, scale, shift in zip(parts, scales, shifts, strict=True)]
        if self.tail_conv is not None:
            tail = self.tail_channels
            parts.insert(0, self.tail_conv(result if tail == result.shape[1] else result[:, :tail]))
        # Integrate all recursive results (Sec. 3.3), then shuffle in 4 groups (Sec. 4.2):
        # one copy into the shuffled order (no concatenated intermediate).
        if self._shuffle_groups is not None:
            if not is_channels_last(x):
                groups = [_gather(parts, segments) for segments in self._shuffle_groups]
                out = torch.stack(groups, dim=2).flatten(1, 2)
            elif torch.is_grad_enabled():  # same values, a backward that stays channels_last
                out = _ShuffleChannelsLast.apply(self._shuffle_groups, *parts)
            else:
                out = _shuffle_channels_last(parts, self._shuffle_groups)
        else:
            out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if self.shuffle_index is not None:
                out = out.index_select(1, self.shuffle_index)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def absorb_bn(self, bn: nn.BatchNorm2d) -> bool:
        """Fold an eval-mode BN that follows this module into it (for inference).

        The module is linear, but only X_A0's depthwise conv feeds nothing else: it takes the
        BN's scale and shift into its weight and bias exactly. X_B0 and the B_j also feed the
        next level's conv (and the A_j are input channels), so they keep their values and get
        the BN as one per-channel affine (``torch.addcmul``) before the shuffle copy; a
        ``bias`` of the module is folded into that shift. Exact up to float rounding; returns
        True. Called by :func:`leanconv.prepare_for_inference`.
        """
        if not foldable_bn(bn, self.out_channels) or self.part_scale is not None:
            return False
        scale, shift = bn_scale_shift(bn)
        if self.bias is not None:
            shift = shift + scale * self.bias
        # BN channels are output (shuffled) channels; parts are in concatenation order.
        order = self._concat_to_output()
        scale, shift = scale[order], shift[order]
        tail = self.tail_channels
        if self.tail_conv is not None:
            scale_conv(self.tail_conv, scale[:tail], shift[:tail])
        self.part_scale = scale[tail:].view(1, -1, 1, 1).clone()
        self.part_shift = shift[tail:].view(1, -1, 1, 1).clone()
        self.bias = None
        return True

    def _concat_to_output(self) -> torch.Tensor:
        """Output channel of each concatenated channel (the shuffle's inverse permutation)."""
        channels = self.out_channels
        if not self.shuffle:
            return torch.arange(channels)
        if self.shuffle_index is not None:
            return torch.argsort(self.shuffle_index.cpu())
        return channel_shuffle(torch.arange(channels).view(1, channels, 1, 1),
                               SHUFFLE_GROUPS).view(-1).argsort()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, depth={self.depth}, "
            f"prim_channels={self.prim_channels}, identity={self.identity!r}, "
            f"shuffle={self.shuffle}, bias={self.bias is not None}"
        )


def _shuffle_order(channels: int, groups: int = SHUFFLE_GROUPS) -> torch.Tensor:
    """Source channel of each output channel of a 4-group shuffle, for any channel count.

    Channels are cut into groups of ``ceil(C / groups)`` (the last shorter) and read column by
    column; for ``C`` divisible by ``groups`` this is exactly ShuffleNet's view/transpose.
    """
    size = -(-channels // groups)
    grid = torch.arange(groups * size, device="cpu").view(groups, size).t().reshape(-1)
    return grid[grid < channels]


_Segments = tuple[tuple[int, int, int], ...]  # (part, start, stop) slices


def _group_segments(widths: tuple[int, ...], groups: int) -> tuple[_Segments, ...]:
    """Cut the concatenation of parts of the given widths into ``groups`` equal channel groups:
    for each group the ``(part, start, stop)`` slices (part-local channels) that make it up."""
    size = sum(widths) // groups
    bounds, start = [], 0
    for i, w in enumerate(widths):
        bounds.append((i, start, start + w))
        start += w
    plan = []
    for g in range(groups):
        lo, hi = g * size, (g + 1) * size
        plan.append(tuple((i, max(lo, a) - a, min(hi, b) - a) for i, a, b in bounds
                          if a < hi and b > lo))
    return tuple(plan)


def _shuffle_channels_last(parts: list[torch.Tensor], plan) -> torch.Tensor:
    """The 4-group shuffle of the concatenated parts, written in channels_last: the groups are
    stacked along NHWC's innermost axis, so output channel ``c * 4 + g`` is channel ``c`` of
    group ``g`` (concatenated channel ``g * size + c``), as ShuffleNet's view/transpose."""
    groups = [_gather(parts, segments) for segments in plan]
    out = torch.stack([g.permute(0, 2, 3, 1) for g in groups], dim=-1)
    return out.flatten(3).permute(0, 3, 1, 2)


class _ShuffleChannelsLast(torch.autograd.Function):
    """:func:`_shuffle_channels_last` with a backward that un-shuffles in one channels_last copy.

    Autograd's own backward (selections from the stack, zero-filled slice gradients) hands the
    convs and the host block's BN/ReLU NCHW gradients of channels_last maps, and PyTorch's CPU
    kernels for mixed layouts are ~10x slower (BN backward at 16@32, batch 64: 5.8 vs 0.5 ms).
    """

    @staticmethod
    def forward(ctx, plan, *parts):
        ctx.widths = [p.shape[1] for p in parts]
        return _shuffle_channels_last(list(parts), plan)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        n, c, h, w = grad.shape
        # output channel c' * 4 + g  ->  concatenated channel g * size + c'
        nhwc = grad.permute(0, 2, 3, 1).reshape(n, h, w, c // SHUFFLE_GROUPS, SHUFFLE_GROUPS)
        concat = nhwc.transpose(3, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return (None, *concat.split(ctx.widths, dim=1))


def _gather(parts: list[torch.Tensor], segments) -> torch.Tensor:
    """One shuffle group: a slice of one part (a view), or the concatenation of a few slices."""
    views = [parts[i] if b - a == parts[i].shape[1] else parts[i][:, a:b] for i, a, b in segments]
    return views[0] if len(views) == 1 else torch.cat(views, dim=1)


def _to(index: torch.Tensor | None, device) -> torch.Tensor | None:
    return index if index is None or device is None else index.to(device)
