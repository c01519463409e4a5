"""Where each paper puts its module inside a host network, in one place (see docs/placement.md).

A host network (ResNet, CIFAR ResNet, WRN, ResNeXt-29, ...) asks :func:`place_conv` for every
conv it builds, naming the conv's *role*; a :class:`Placement` decides per role whether the
paper's module or a plain :class:`~leanconv.layers.VanillaConv` goes there, and
:func:`place_norm` whether the host's BN after a replaced conv is kept.

Roles:

* ``"stem"``: the first conv, reading the image (7x7/2 on ImageNet, 3x3 on CIFAR).
* ``"kxk"``: the k x k conv of a bottleneck (``conv2``) or of a plain stack (VGG).
* ``"basic1"`` / ``"basic2"``: the first / second k x k conv of a two-conv basic block.
* ``"pointwise"``: the 1x1 convs of a bottleneck (``conv1``, ``conv3``).
* ``"downsample"``: the 1x1 projection of a shortcut.

Defaults (``placement=None`` or ``"paper"``) follow each paper's own build:

========== ===== ========================= ======= ========= ========== =======
conv       stem  block k x k               strided 1x1       downsample host BN
========== ===== ========================= ======= ========= ========== =======
slimconv   no    bottleneck conv2; basic:  yes     no        no         removed
                 conv2 if k=1, else conv1
spconv     no    all (basic: both)         yes     no        no         kept
sru/cru/   no    all (basic: the second)   yes     no        no         kept
scconv
compconv   no    all (basic: both)         yes     yes       yes        kept
ghost      no    all (basic: both)         yes     yes       yes        kept
other      no    all (basic: both)         yes     no        no         kept
========== ===== ========================= ======= ========= ========== =======

In a grouped host conv (ResNeXt) ``cru`` and ``scconv`` keep the host's cardinality in their
group-wise conv (``keep_cardinality``, SCConv Tab. 2); the other modules use their own grouping.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace

from torch import nn

from ..layers import conv_class, conv_out_channels, create_conv
from ..layers._utils import check_choice

__all__ = [
    "PAPER_PLACEMENTS",
    "TABLE_PLACEMENTS",
    "Placement",
    "place_conv",
    "place_norm",
    "resolve_placement",
    "select_stages",
]

_ROLES = ("stem", "kxk", "basic1", "basic2", "pointwise", "downsample")


@dataclass(frozen=True)
class Placement:
    """Which convs of a host network a conv type replaces.

    Args:
        stem: replace the stem conv that reads the image.
        kxk: replace the k x k convs of the blocks (bottleneck ``conv2``, basic-block convs).
        basic: which k x k convs of a two-conv basic block: ``"both"``, ``"first"``, ``"second"``,
            or ``"auto"``: the second when the conv keeps the width, else the first (a
            width-changing conv such as SlimConv with k != 1 can only sit where the next conv
            can read its output; see :meth:`resolve_basic`).
        strided: also replace k x k convs that carry the stage's stride 2.
        pointwise: replace the 1x1 convs of bottlenecks.
        downsample: replace the 1x1 projection shortcuts.
        keep_bn: keep the host's BN after a replaced conv (``False``: the module's own internal
            norms stand in for it, as in SlimConv's official bottleneck, and the BN is removed).
        keep_cardinality: in a grouped host conv (ResNeXt, cardinality c), a module without a
            ``groups`` argument keeps the host's grouping in its group-wise conv: ``gwc_groups``
            becomes ``g x c`` (g groups inside each of the c paths). ``False``: the module's own
            ``gwc_groups`` replace the host's groups. Modules that take ``groups`` (SlimConv)
            always get the host's groups; modules with neither cannot keep it (``ValueError``).
    """

    stem: bool = False
    kxk: bool = True
    basic: str = "both"
    strided: bool = True
    pointwise: bool = False
    downsample: bool = False
    keep_bn: bool = True
    keep_cardinality: bool = False

    def __post_init__(self) -> None:
        check_choice("placement.basic", self.basic, ("both", "first", "second", "auto"))

    def replaces(self, role: str, stride: int = 1) -> bool:
        """Whether the conv in ``role`` (carrying ``stride``) gets the paper's module."""
        check_choice("role", role, _ROLES)
        if role == "stem":
            return self.stem
        if role == "pointwise":
            return self.pointwise
        if role == "downsample":
            return self.downsample
        if not self.kxk or (stride > 1 and not self.strided):
            return False
        if role in ("basic1", "basic2") and self.basic == "auto":
            raise ValueError("placement.basic='auto' must be resolved first (resolve_basic)")
        if role == "basic1":
            return self.basic in ("both", "first")
        if role == "basic2":
            return self.basic in ("both", "second")
        return True  # "kxk"

    def resolve_basic(self, conv: str, channels: int, hparams: dict) -> Placement:
        """Replace ``basic="auto"`` by ``"second"`` if ``conv`` keeps ``channels`` channels,
        else ``"first"``; other placements are returned unchanged."""
        if self.basic != "auto":
            return self
        keeps = conv_out_channels(conv, channels, channels, **hparams) == channels
        return replace(self, basic="second" if keeps else "first")


#: Each paper's own build; a conv type not listed here gets ``Placement()``.
PAPER_PLACEMENTS: dict[str, Placement] = {
    # SlimConv official SC-ResNet.py: only Bottleneck.conv2, bn2 dropped (the module ends in BNs),
    # conv3 reads the module's C/k channels. Basic blocks (untouched in the official code): one
    # conv per block, the second one when k = 1 keeps the width (SCConv Tab. 2 "SlimConv-R56
    # (k=1)" 0.60M), else the first (conv2 then reads C/k and gives the residual width back).
    "slimconv": Placement(basic="auto", keep_bn=False),
    # SPConv official resnet_sp.py (after 78c734f): Bottleneck.conv2, BasicBlock.conv1 + conv2,
    # strided ones included; stem, 1x1s and downsample vanilla; host bn2 kept.
    "spconv": Placement(),
    # SCConv Sec. 3.3-3.4: "only the bottleneck 3x3 convolutions" replaced, strided included
    # (the -34% of Table 3 needs them); GN is the module's only norm, so the host BN stays.
    # Basic blocks (Tab. 2 R56, WRN-28): one 3x3 per block, the second: SCConv-WRN28 21.04M /
    # 3.71G (paper 21.12M / 3.75G), SCConv-R56 0.510M (0.52M); both convs would give 7.6M / 0.18M.
    # ResNeXt (Tab. 2 RX29): CRU replaces the grouped 3x3 "without any model architecture
    # adjustment" (Sec. 4), so its GWC keeps the cardinality: g x c groups (Eq. 5, Eq. 11's GWC
    # term over g*c): SCConv-RX29 21.83M / 3.52G (paper 22.31M / 3.57G); with g = 2 groups in
    # place of the host's 4 it would be 25.31M / 4.03G. SRU's conv has no grouping to keep.
    "sru": Placement(basic="second"),
    "cru": Placement(basic="second", keep_cardinality=True),
    "scconv": Placement(basic="second", keep_cardinality=True),
    # CompConv Sec. 4.3: "replacing regular convolutions with CompConv except for the Conv1 before
    # the first MaxPooling" / Tab. 7 "We replace all convolutions in both basic block and
    # bottleneck": 1x1s and projections included.
    "compconv": Placement(pointwise=True, downsample=True),
    # GhostNet's ghost_resnet.py: the drop-in Ghost conv is every conv of the bottleneck, 1x1s and
    # downsample included; only the stem stays vanilla.
    "ghost": Placement(pointwise=True, downsample=True),
}

#: Overrides a paper's *table* applied to another paper's module. SCConv Tab. 2 built its
#: competitors in CIFAR basic blocks the way it built SCConv (the second 3x3 of each block):
#: SPConv-R56 0.582M / 85.1M (paper 0.58M / 87.95M), SPConv-WRN28 24.14M / 4.14G (24.20M /
#: 4.16G); SPConv's own placement (both convs) gives 0.32M / 13.4M there. Ghost and SlimConv rows
#: of that table already match with their own placements. Keys: (paper, conv) as in
#: complexity.csv; values: dicts for ``placement=``.
TABLE_PLACEMENTS: dict[tuple[str, str], dict] = {
    ("SCConv", "spconv"): {"basic": "second"},
    # CompConv Tab. 7 built Ghost into every block conv but kept the projection shortcuts
    # vanilla: Ghost-Res50 (CIFAR-100) 13.47M / 0.722G (paper 13.5M / 0.7G; projections
    # replaced: 12.10M / 0.665G), Ghost-Res18 5.75M / 0.284G (5.7M / 0.3G).
    ("CompConv", "ghost"): {"downsample": False},
}

_PRESETS = {
    "kxk": Placement(),  # every block k x k conv, strided ones included, host BN kept
    "all": Placement(pointwise=True, downsample=True),  # every conv but the stem
    "everything": Placement(stem=True, pointwise=True, downsample=True),
    "none": Placement(kxk=False),  # all vanilla (a baseline with the module's hparams ignored)
}


def resolve_placement(conv: str, placement: Placement | dict | str | None = None) -> Placement:
    """The :class:`Placement` for ``conv``.

    ``placement`` may be ``None`` / ``"paper"`` (the paper's own build, :data:`PAPER_PLACEMENTS`),
    a preset name (``"kxk"``, ``"all"``, ``"everything"``, ``"none"``), a :class:`Placement`, or a
    dict of field overrides applied on top of the paper's placement, e.g. ``{"strided": False}``.
    """
    paper = PAPER_PLACEMENTS.get(conv, Placement())
    if placement is None or placement == "paper":
        return paper
    if isinstance(placement, Placement):
        return placement
    if isinstance(placement, str):
        check_choice("placement", placement, ("paper", *_PRESETS))
        return _PRESETS[placement]
    if isinstance(placement, dict):
        names = {f.name for f in fields(Placement)}
        unknown = sorted(set(placement) - names)
        if unknown:
            raise ValueError(
                f"placement does not take {', '.join(unknown)}; fields: {', '.join(sorted(names))}"
            )
        return replace(paper, **placement)
    raise ValueError(
        f"placement must be None, 'paper', a preset name, a Placement or a dict; got {placement!r}"
    )


def _accepts(conv: str, argument: str) -> bool:
    return argument in inspect.signature(conv_class(conv).__init__).parameters


def _default(conv: str, argument: str):
    return inspect.signature(conv_class(conv).__init__).parameters[argument].default


def place_conv(
    conv: str,
    placement: Placement,
    role: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    *,
    groups: int = 1,
    dilation: int = 1,
    bias: bool = False,
    hparams: dict | None = None,
) -> tuple[nn.Module, int, bool]:
    """Build the conv for ``role``; return ``(module, width it produces, replaced?)``.

    A replaced conv is ``create_conv(conv, ...)`` with the paper hyperparameters ``hparams``; the
    rest are ``VanillaConv``. The host's ``groups`` (ResNeXt cardinality) is passed on to conv
    types that take a ``groups`` argument; with ``placement.keep_cardinality`` a conv type with a
    group-wise conv (``gwc_groups``: CRU, SCConv, SPConv) gets ``gwc_groups x groups``; otherwise
    the module uses its own grouping in place of the host's, as SPConv's official code does. The
    produced width comes from :func:`~leanconv.layers.conv_out_channels` (SlimConv gives
    ``in_channels / k``).
    """
    replaced = conv != "vanilla" and placement.replaces(role, stride)
    name = conv if replaced else "vanilla"
    params = dict(hparams or {}) if replaced else {}
    extra: dict = {}
    if dilation != 1:
        extra["dilation"] = dilation
    if bias:
        extra["bias"] = True
    kept = None  # (module's own gwc_groups, host groups) when the cardinality moves into its GWC
    if groups != 1 and (name == "vanilla" or _accepts(name, "groups")):
        extra["groups"] = groups
    elif groups != 1 and placement.keep_cardinality:
        if not _accepts(name, "gwc_groups"):
            raise ValueError(f"placement.keep_cardinality: conv {name!r} has no group-wise conv "
                             f"to keep the host's {groups} groups in (no 'groups' or "
                             f"'gwc_groups' argument); use placement={{'keep_cardinality': "
                             f"False}}")
        own = params.get("gwc_groups", _default(name, "gwc_groups"))
        params["gwc_groups"] = own * groups
        kept = own
    width = conv_out_channels(name, in_channels, out_channels, **params)
    try:
        module = create_conv(name, in_channels, width, kernel_size, stride, **extra, **params)
    except ValueError as exc:
        if kept is None:
            raise
        raise ValueError(f"{role} conv {in_channels} -> {width} with the host's {groups} groups: "
                         f"{name} keeps them (placement.keep_cardinality) as gwc_groups = {kept} "
                         f"x {groups} = {kept * groups}, which this width cannot take ({exc}); "
                         f"pass a smaller gwc_groups or placement={{'keep_cardinality': False}}"
                         ) from exc
    return module, width, replaced


def place_norm(placement: Placement, replaced: bool, channels: int, norm_layer=nn.BatchNorm2d):
    """The host's norm after a conv: ``norm_layer(channels)``, or ``nn.Identity`` when the conv was
    replaced and the placement drops the host BN (``keep_bn=False``)."""
    if replaced and not placement.keep_bn:
        return nn.Identity()
    return norm_layer(channels)


def select_stages(stages, allowed: tuple[int, ...]) -> frozenset[int]:
    """The stages whose convs the conv type may replace: all of ``allowed`` for ``None``, else
    ``stages`` (an int or an iterable of ints), each checked against ``allowed``. A conv in a stage
    not selected stays vanilla; convs outside every stage (a stem) follow the placement alone."""
    if stages is None:
        return frozenset(allowed)
    values = (stages,) if isinstance(stages, int) else tuple(stages)
    if not values:
        raise ValueError(f"stages must name at least one of {', '.join(map(str, allowed))}")
    for value in values:
        check_choice("stages", value, allowed)
    return frozenset(values)
