"""ResNet families: torchvision parity, the papers' counts, placement rules, every conv type."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from leanconv import available_convs, create_model
from leanconv.layers import conv_class
from leanconv.models.placement import PAPER_PLACEMENTS, Placement, resolve_placement
from leanconv.models.resnet import BasicBlock, Bottleneck, _Builder
from leanconv.models.resnet_cifar import CifarResNet
from leanconv.models.resnext_cifar import CifarResNeXt
from leanconv.models.wide_resnet import WideResNet


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, size: int, in_channels: int = 3) -> int:
    with torch.device("meta"):
        x = torch.empty(1, in_channels, size, size)
        with FlopCounterMode(display=False) as counter:
            model.eval()(x)
    return counter.get_total_flops() // 2


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _build_or_skip(factory, conv: str):
    try:
        return factory()
    except NotImplementedError:
        pytest.skip(f"{conv} is not written yet")


# ----------------------------------------------------------------------------------------------
# torchvision parity
# ----------------------------------------------------------------------------------------------
TORCHVISION_TWINS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2"]


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_vanilla_state_dict_matches_torchvision(name):
    ours = _meta(name, num_classes=1000)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)()
    assert _params(ours) == _params(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    top = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
           "fc"]
    assert [n for n, _ in ours.named_children()] == top
    assert ours.inplanes == theirs.inplanes


def test_resnet50_exact_count_and_loads_into_torchvision():
    ours = create_model("resnet50", num_classes=1000)
    assert _params(ours) == 25_557_032
    theirs = torchvision.models.resnet50()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_resnext101_32x4d_count():
    # no torchvision twin; Xie et al. / SlimConv Tab. 1: 44.18M
    assert _params(_meta("resnext101_32x4d", num_classes=1000)) == 44_177_704


def test_torchvision_backbone_utilities_accept_our_resnets():
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    model = create_model("resnet50", replace_stride_with_dilation=[False, True, True])
    feats = IntermediateLayerGetter(model, {"layer4": "out"})(torch.randn(1, 3, 64, 64))
    assert feats["out"].shape == (1, 2048, 8, 8)  # output stride 8, as DeepLabV3 uses it
    fpn = BackboneWithFPN(create_model("resnet18", in_channels=1),
                          {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 32)
    out = fpn(torch.randn(1, 1, 64, 64))
    assert [v.shape[-1] for v in out.values()] == [8, 4, 2, 1]


# ----------------------------------------------------------------------------------------------
# The papers' vanilla baselines (complexity.csv)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "size", "params", "macs"),
    [
        # ResNet-50 ImageNet: 25.56M / 4.09G (SCConv Tab. 3; SPConv's 4.14G adds non-conv ops)
        ("resnet50", {"num_classes": 1000}, 224, 25_557_032, 4_089_184_256),
        # CIFAR-100 ResNet-50 with the 3x3 stem (SlimConv Tab. 9: 23.71M / 1.305G)
        ("resnet50", {"stem": "cifar", "num_classes": 100}, 32, 23_705_252, None),
        # CIFAR-10 ResNet-20/56, option-B shortcuts (SPConv Tab. 1 0.27M, SCConv Tab. 2 0.86M)
        ("resnet20", {}, 32, 272_474, None),
        ("resnet56", {}, 32, 855_770, None),
    ],
)
def test_pinned_vanilla_counts(name, kwargs, size, params, macs):
    model = _meta(name, **kwargs)
    assert _params(model) == params
    if macs is not None:
        assert _macs(model, size) == macs


def test_cifar_baselines_within_paper_tolerance():
    rows = [  # name, kwargs, params_M, macs_G (paper)
        ("resnet18", {"stem": "cifar", "num_classes": 100}, 11.2, 0.556),  # CompConv Tab. 7 "0.6"
        ("resnet56", {}, 0.86, 0.12684),
        ("resnext29", {}, 27.11, 4.23),  # our 4x64d build; SCConv reports 28.27M / 4.55G
        ("wrn28_10", {}, 36.55, 5.96),
    ]
    for name, kwargs, p, g in rows:
        model = _meta(name, **kwargs)
        assert _params(model) / 1e6 == pytest.approx(p, rel=0.03), name
        assert _macs(model, 32) / 1e9 == pytest.approx(g, rel=0.05), name


def test_option_a_shortcut_is_parameter_free():
    a, b = _meta("resnet20", shortcut="A"), _meta("resnet20", shortcut="B")
    assert _params(b) - _params(a) == 16 * 32 + 32 * 64 + 2 * (32 + 64)
    out = create_model("resnet20", shortcut="A")(torch.randn(2, 3, 15, 15))
    assert out.shape == (2, 10)


def test_wrn_stride_position_changes_macs_only():
    a, b = _meta("wrn28_10"), _meta("wrn28_10", stride_on="conv1")
    assert _params(a) == _params(b) == 36_489_290
    assert _macs(a, 32) > _macs(b, 32)


# ----------------------------------------------------------------------------------------------
# Placement rules
# ----------------------------------------------------------------------------------------------
def test_placement_truth_table():
    p = Placement()
    assert p.replaces("kxk", 2) and p.replaces("basic1") and p.replaces("basic2")
    assert not p.replaces("stem") and not p.replaces("pointwise") and not p.replaces("downsample")
    assert not Placement(strided=False).replaces("kxk", 2)
    assert Placement(strided=False).replaces("kxk", 1)
    first = Placement(basic="first")
    assert first.replaces("basic1", 2) and not first.replaces("basic2")
    assert not Placement(kxk=False).replaces("basic1")
    assert PAPER_PLACEMENTS["slimconv"].keep_bn is False
    assert resolve_placement("spconv", {"strided": False}) == Placement(strided=False)
    assert resolve_placement("ghost") == Placement(pointwise=True, downsample=True)
    assert resolve_placement("ghost", "kxk") == Placement()
    for bad in ("nope", {"colour": 1}, 3):
        with pytest.raises(ValueError, match="placement"):
            resolve_placement("spconv", bad)
    with pytest.raises(ValueError, match="basic"):
        Placement(basic="third")


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet50", stem="mnist")
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="conv"):
        create_model("resnet20", conv="nope")


def _replaced(model: nn.Module, conv: str) -> dict[str, nn.Module]:
    cls = conv_class(conv)
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("conv", [c for c in available_convs() if c != "vanilla"])
def test_paper_placement_is_applied(conv):
    model = _build_or_skip(lambda: _meta("resnet50", conv=conv), conv)
    placement = resolve_placement(conv)
    names = set(_replaced(model, conv))
    assert "conv1" not in names  # every paper keeps the stem
    assert all(f"{s}.conv2" in names for s in ("layer1.0", "layer2.0", "layer4.2"))
    assert ("layer1.0.conv1" in names) == placement.pointwise
    assert ("layer2.0.downsample.0" in names) == placement.downsample
    assert isinstance(model.layer1[0].bn2, nn.Identity) == (not placement.keep_bn)
    # no replaced conv sits inside another replaced conv (modules may use convs internally)
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)


# ----------------------------------------------------------------------------------------------
# Every family with every conv type: forward, output shape, backward (tiny builds)
# ----------------------------------------------------------------------------------------------
def _block_net(block, conv: str, in_channels: int, groups: int = 1, width_per_group: int = 64):
    """Stem + one strided block (with its projection) of the ImageNet-layout ResNet, tiny widths:
    what ``ResNet._make_layer`` builds for a stage, without ResNet's fixed 64..2048 widths."""
    place = _Builder(conv, resolve_placement(conv), {})
    stem, width, _ = place("stem", in_channels, 32, 3)
    planes = 16 if block is Bottleneck else 32
    proj, out, rep = place("downsample", width, planes * block.expansion, 1, 2)
    downsample = nn.Sequential(proj, place.norm(rep, out, nn.BatchNorm2d))
    body = block(width, planes, 2, downsample, groups, width_per_group, place=place)
    tail = block(out, planes, groups=groups, base_width=width_per_group, place=place)
    return nn.Sequential(stem, nn.BatchNorm2d(width), nn.ReLU(), body, tail,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out, 5))


FAMILIES = {
    "resnet_basic": lambda conv, **kw: _block_net(BasicBlock, conv, **kw),
    "resnet_bottleneck": lambda conv, **kw: _block_net(Bottleneck, conv, **kw),
    # ResNeXt widths such that CRU / SCConv can keep the 4 paths (2 x 4 GWC groups, SCConv Tab. 2)
    "resnext_bottleneck": lambda conv, **kw: _block_net(Bottleneck, conv, groups=4,
                                                        width_per_group=32, **kw),
    "resnet_cifar": lambda conv, **kw: CifarResNet(8, num_classes=5, conv=conv, **kw),
    "wide_resnet": lambda conv, **kw: WideResNet(10, 1, num_classes=5, conv=conv, **kw),
    "resnext_cifar": lambda conv, **kw: CifarResNeXt(11, cardinality=4, bottleneck_width=8,
                                                     num_classes=5, conv=conv, **kw),
}


@pytest.mark.parametrize("conv", available_convs())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_forward_backward(family, conv):
    model = _build_or_skip(lambda: FAMILIES[family](conv, in_channels=1), conv)
    model.train()
    x = torch.randn(2, 1, 16, 16)
    out = model(x)
    assert out.shape == (2, 5)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.eval()
    assert model(x[:1]).shape == (1, 5)


def test_create_model_forwards_conv_hparams_and_in_channels():
    model = create_model("resnet20", in_channels=1, num_classes=7)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 7)  # Fashion-MNIST sized input
    with pytest.raises(ValueError, match="does not take"):
        create_model("resnet20", conv="vanilla", split_ratio=0.5)


# ----------------------------------------------------------------------------------------------
# Pinned module rows (complexity.csv): exact counts of our builds, paper value in the comment
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "size", "params", "macs"),
    [
        # SPConv Tab. 2, alpha 1/2: 18.34M (official code 18,345,448 = ours + its 3,776 redundant
        # 1x1 biases) / 2.97G (their counter adds ~0.06G of non-conv ops, as for the baseline)
        ("resnet50", {"conv": "spconv", "split_ratio": 0.5}, 224, 18_341_672, 2_907_439_104),
        # SlimConv Tab. 1, k=4/3: 16.76M / 2.65G (README; Tab. 1 prints 2.69G)
        ("resnet50", {"conv": "slimconv", "compression_ratio": "4/3"}, 224, 16_758_740,
         2_652_222_208),
        # SlimConv README Sc-ResNeXt-101 32x3d, k=2: 23.70M / 4.58G
        ("resnext101_32x3d", {"conv": "slimconv", "compression_ratio": 2}, 224, 23_698_976,
         4_580_553_984),
        # SPConv Tab. 1 ResNet-20 alpha 1/2: 0.10M (both 3x3s of every basic block)
        ("resnet20", {"conv": "spconv", "split_ratio": 0.5}, 32, 104_410, None),
        # SCConv Tab. 2: WRN-28-10 21.12M / 3.75G and R56 0.52M, the second 3x3 of each block
        ("wrn28_10", {"conv": "scconv", "split_ratio": 0.5}, 32, 21_042_250, 3_709_786_368),
        ("resnet56", {"conv": "scconv", "split_ratio": 0.5}, 32, 510_026, None),
        # SCConv Tab. 2 "SlimConv-R56 (k=1)": 0.60M (second 3x3, host BN dropped)
        ("resnet56", {"conv": "slimconv", "compression_ratio": 1}, 32, 595_310, None),
        # SCConv Tab. 3 Ghost-R50 (s=2): 13.95M / 2.15G (every conv but the stem)
        ("resnet50", {"conv": "ghost"}, 224, 13_953_512, 2_151_023_360),
    ],
)
def test_pinned_module_counts(name, kwargs, size, params, macs):
    conv = kwargs["conv"]
    model = _build_or_skip(lambda: _meta(name, num_classes=1000 if size == 224 else 10,
                                         **kwargs), conv)
    assert _params(model) == params
    if macs is not None:
        assert _macs(model, size) == macs


def test_table_placement_for_competitors_in_scconv_table2():
    from leanconv.models.placement import TABLE_PLACEMENTS

    placement = TABLE_PLACEMENTS[("SCConv", "spconv")]
    model = _build_or_skip(lambda: _meta("resnet56", conv="spconv", split_ratio=0.5,
                                         placement=placement), "spconv")
    assert _params(model) == 581_594  # paper: 0.58M


def test_scconv_keeps_the_resnext_cardinality_in_its_gwc():
    """SCConv Tab. 2 SCConv-RX29 (22.31M / 3.57G): CRU's GWC keeps the host's c = 4 paths, g x c
    = 8 groups (keep_cardinality). Params: the vanilla RX29 minus its grouped 3x3 weights plus,
    per replaced conv, Eq. 11 with g*c groups and SRU's GN affine (2 C1); MACs: only the GWC
    term changes against g = 2 groups, k^2 (alpha C / r) C H W (1/g - 1/(g c)) per conv."""
    alpha, r, g, c, k = 0.5, 2, 2, 4, 3
    model = _meta("resnext29", conv="scconv")
    assert all(m.cru.gwc.groups == g * c for n, m in model.named_modules() if n.endswith("conv2"))
    vanilla = _meta("resnext29")
    widths = [256] * 3 + [512] * 3 + [1024] * 3  # the grouped 3x3 of each of the 9 blocks

    def eq11(C1, C2, groups):
        up, low = alpha * C1, (1 - alpha) * C1
        return (up * up / r + k * k * (up / (groups * r)) * (C2 / groups) * groups + up / r * C2
                + low * low / r + low / r * (C2 - low / r))

    expected = _params(vanilla) + sum(eq11(C, C, g * c) + 2 * C - k * k * C * C / c
                                      for C in widths)
    assert _params(model) == expected == 21_826_890
    # output sizes of the 9 convs: 32x32 in stage 1, 16x16 and 8x8 (stride on the first block)
    sizes = [32 * 32] * 3 + [16 * 16] * 3 + [8 * 8] * 3
    own = _meta("resnext29", conv="scconv", placement={"keep_cardinality": False})
    gwc_saved = sum(k * k * (alpha * C / r) * C * hw * (1 / g - 1 / (g * c))
                    for C, hw in zip(widths, sizes, strict=True))
    assert _macs(own, 32) - _macs(model, 32) == gwc_saved
    with pytest.raises(ValueError, match="keep_cardinality"):
        _meta("resnext50_32x4d", conv="scconv")  # 32 squeezed channels cannot take 2 x 32 groups
    with pytest.raises(ValueError, match="no group-wise conv"):
        _meta("resnext29", conv="ghost", placement={"keep_cardinality": True})
