"""SlimConv (Qiu et al., arXiv 2003.07469 / TIP 2021): structure, counts, k variants, ablations."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_bns
from leanconv.layers import SlimConv, conv_hparams, conv_out_channels, create_conv

# k -> r (summed chunks); k = 2r/3 (SlimConv Table 10) and k = 1 (SCConv paper Tables 2-3)
K_VARIANTS = {"1": 2, "4/3": 2, "2": 3, "8/3": 4, "10/3": 5, "4": 6, "14/3": 7, "16/3": 8}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_params(c, k=Fraction(4, 3), kernel=3, groups=1, bottom_groups=None, se_reduction=32,
                    se_min_channels=2, bias=False):
    """The module's parameter count from the paper's structure (Eq. 1-2, Fig. 1)."""
    r = 2 if k == 1 else int(Fraction(k) * 3 / 2)
    bottom_groups = groups if bottom_groups is None else bottom_groups
    top, mid = c // r, c // (2 * r)
    bottom = top if k == 1 else mid
    h = max(c // se_reduction, se_min_channels)
    se = c * h + 2 * h + h * c + c              # F_fc1 (no bias) + BN + F_fc2 (bias)
    top_path = kernel**2 * top * top // groups + 2 * top
    bottom_path = top * mid + 2 * mid + kernel**2 * mid * bottom // bottom_groups + 2 * bottom
    return se + top_path + bottom_path + (top + bottom if bias else 0)


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c, out, params", [(64, 48, 12_484), (128, 96, 49_544),
                                            (256, 192, 197_392), (512, 384, 788_000)])
def test_official_reference_counts(c, out, params):
    """Notes §1.7: official slim_conv_3x3 (k=4/3, SE C//32) at the ResNet-50 widths."""
    conv = SlimConv(c)
    assert conv.out_channels == out
    assert n_params(conv) == params
    # se_min_channels=2 <= C//32 for C >= 64: identical to the official code (no floor)
    assert n_params(conv) == expected_params(c, se_min_channels=0)


@pytest.mark.parametrize("k", list(K_VARIANTS))
@pytest.mark.parametrize("kernel", [3, 5])
def test_counts_follow_formula_for_every_k(k, kernel):
    c = 2 * K_VARIANTS[k] * 8
    conv = SlimConv(c, kernel_size=kernel, compression_ratio=k)
    assert n_params(conv) == expected_params(c, Fraction(k), kernel)


def test_counts_with_small_c_floor_groups_and_bias():
    # C=16: C//32 = 0, the floor L gives 2 hidden SE channels (the official code has 0 and fails)
    assert SlimConv(16).se_channels == 2
    assert n_params(SlimConv(16)) == expected_params(16)
    # MobileNetV2 setting of Table 3: r=24, L=6
    conv = SlimConv(96, compression_ratio="8/3", se_reduction=24, se_min_channels=6)
    assert conv.se_channels == 6
    assert n_params(conv) == expected_params(96, Fraction(8, 3), se_reduction=24, se_min_channels=6)
    conv = SlimConv(256, groups=4, bias=True)
    assert n_params(conv) == expected_params(256, groups=4, bias=True)
    conv = SlimConv(192, compression_ratio=2, groups=32, bottom_groups=16)
    assert n_params(conv) == expected_params(192, Fraction(2), groups=32, bottom_groups=16)


def test_about_a_third_of_a_vanilla_conv():
    """§1.7: weights (9/4 + 1/8 + 9/16 + 1/16) C^2 = 3 C^2 against 9 C^2 (1/16: the SE's two fc)."""
    c = 256
    conv = SlimConv(c)
    weights = sum(m.weight.numel() for m in (conv.top_conv, conv.bottom_reduce, conv.bottom_conv,
                                             conv.fc1, conv.fc2))
    assert weights == 3 * c * c


def _sc_resnet(depths, k, groups=1, width_per_group=64, bottom_groups=None):
    """torchvision ResNet with the official Bottleneck surgery (notes §1.2), on the meta device."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet

    with torch.device("meta"):
        model = ResNet(Bottleneck, depths, groups=groups, width_per_group=width_per_group)
        for block in (m for m in model.modules() if isinstance(m, Bottleneck)):
            width = block.conv2.in_channels
            block.conv2 = SlimConv(width, None, 3, block.conv2.stride[0], groups=groups,
                                   compression_ratio=k, bottom_groups=bottom_groups)
            block.bn2 = nn.Identity()
            block.conv3 = nn.Conv2d(block.conv2.out_channels, block.conv3.out_channels, 1,
                                    bias=False)
    assert torchvision is not None
    return n_params(model)


@pytest.mark.parametrize("depths, k, params", [
    ([3, 4, 6, 3], "4/3", 16_758_740),    # README / Table 1: 16.76M
    ([3, 4, 6, 3], "8/3", 12_098_388),    # README: 12.10M
    ([3, 4, 23, 3], "4/3", 27_956_708),   # abstract / Table 1: 27.96M
    ([3, 4, 6, 3], "1", 18_725_428),      # SCConv Table 3 "SlimConv-R50_k=1": 18.81M (-0.45%)
])
def test_sc_resnet_counts(depths, k, params):
    assert _sc_resnet(depths, k) == params


def test_sc_resnext101_32x3d_k2_needs_half_groups_in_bottom():
    """README: Sc-ResNeXt-101 (32x3d, k=2) 23.70M; depths [4, 8, 18, 3], bottom groups 16."""
    params = _sc_resnet([4, 8, 18, 3], 2, groups=32, width_per_group=3, bottom_groups=16)
    assert params == 23_698_976
    with pytest.raises(ValueError, match="bottom_groups"):
        SlimConv(96, compression_ratio=2, groups=32)  # the released module cannot build it


# ---------------------------------------------------------------------------------------------
# Widths and the k variants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", list(K_VARIANTS))
@pytest.mark.parametrize("stride", [1, 2])
def test_every_k_builds_and_runs_with_width_c_over_k(k, stride):
    r = K_VARIANTS[k]
    c = 2 * r * 4
    natural = c if k == "1" else 3 * c // (2 * r)
    assert natural == c / Fraction(k)
    assert SlimConv.natural_out_channels(c, compression_ratio=k) == natural
    conv = SlimConv(c, natural, stride=stride, compression_ratio=k)
    assert conv.chunks == r and conv.compression_ratio == Fraction(k)
    assert conv.top_conv.out_channels == c // r
    assert conv.bottom_reduce.out_channels == c // (2 * r)
    assert conv.out_channels == natural
    y = conv(torch.randn(2, c, 9, 9))
    assert y.shape == (2, natural, 5 if stride == 2 else 9, 5 if stride == 2 else 9)


@pytest.mark.parametrize("value", [4 / 3, "4/3", Fraction(4, 3), 1.3333333333333333])
def test_compression_ratio_accepts_float_string_fraction(value):
    assert SlimConv(64, compression_ratio=value).out_channels == 48
    assert conv_out_channels("slimconv", 64, None, compression_ratio=value) == 48


def test_registry_and_out_channels_query():
    assert conv_hparams("slimconv") == {"compression_ratio": Fraction(4, 3), "se_reduction": 32,
                                        "se_min_channels": 2, "flipping": "flip",
                                        "bottom_groups": None}
    # the requested width (a vanilla conv's) is not SlimConv's; the query returns the real one
    assert conv_out_channels("slimconv", 64, 64) == 48
    assert conv_out_channels("slimconv", 64, 64, compression_ratio=1, flipping="none") == 64
    assert conv_out_channels("slimconv", 96, None, compression_ratio=2.0) == 48
    conv = create_conv("slimconv", 64, None, stride=2, compression_ratio="8/3")
    assert conv.out_channels == 24


# ---------------------------------------------------------------------------------------------
# The forward pass against a literal transcription of the official code
# ---------------------------------------------------------------------------------------------

def _reference(conv: SlimConv, x: torch.Tensor, which=("w", "flip")) -> torch.Tensor:
    """Official slim_conv_3x3 step by step (torch.split of halves, two BNs), r chunks general."""
    c, r = x.shape[1], conv.chunks
    z = F.adaptive_avg_pool2d(x, 1)
    bn = conv.fc1_bn
    hid = F.batch_norm(conv.fc1(z), bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                       bn.bias, conv.training, 0.0, bn.eps)
    w = torch.sigmoid(conv.fc2(F.relu(hid)))
    weights = {"w": w, "flip": torch.flip(w, [1])}
    x_top = sum(torch.split(weights[which[0]] * x, c // r, dim=1))
    x_bottom = sum(torch.split(weights[which[1]] * x, c // r, dim=1))
    top = conv.top_conv(x_top)
    b = conv.bottom_reduce_bn
    bottom = F.relu(F.batch_norm(conv.bottom_reduce(x_bottom), b.running_mean.clone(),
                                 b.running_var.clone(), b.weight, b.bias, conv.training, 0.0,
                                 b.eps))
    bottom = conv.bottom_conv(bottom)
    t = top.shape[1]
    out = []
    for y, sl in ((top, slice(0, t)), (bottom, slice(t, None))):
        bn = conv.bn
        out.append(F.batch_norm(y, bn.running_mean[sl].clone(), bn.running_var[sl].clone(),
                                bn.weight[sl], bn.bias[sl], conv.training, 0.0, bn.eps))
    return torch.cat(out, 1)


def _randomise_bn(conv):
    for m in conv.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("k", ["4/3", "8/3", "1"])
@pytest.mark.parametrize("train", [True, False])
def test_matches_official_transcription(k, train):
    c = 48
    conv = SlimConv(c, compression_ratio=k, stride=2)
    with torch.no_grad():
        _randomise_bn(conv)
    conv.train(train)
    x = torch.randn(3, c, 10, 10)
    expected = _reference(conv, x)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def _pathway_inputs(conv, x):
    seen = {}
    hooks = [conv.top_conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("top", a[0])),
             conv.bottom_reduce.register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("bottom", a[0]))]
    conv(x)
    for h in hooks:
        h.remove()
    return seen["top"], seen["bottom"]


@pytest.mark.parametrize("flipping, which", [("flip", ("w", "flip")), ("none", ("w", "w")),
                                             ("only", ("flip", "flip"))])
def test_flipping_ablations_table7(flipping, which):
    torch.manual_seed(1)
    conv = SlimConv(32, flipping=flipping).eval()
    with torch.no_grad():
        nn.init.normal_(conv.fc2.weight, std=1.0)  # make w clearly non-symmetric
        nn.init.normal_(conv.fc2.bias, std=1.0)
        x = torch.randn(2, 32, 6, 6)
        top, bottom = _pathway_inputs(conv, x)
        if flipping == "flip":
            assert not torch.allclose(top, bottom)
        else:
            torch.testing.assert_close(top, bottom, rtol=0, atol=0)
        torch.testing.assert_close(conv(x), _reference(conv, x, which), rtol=1e-5, atol=1e-5)
    outputs = {}
    for mode in ("flip", "none", "only"):
        other = SlimConv(32, flipping=mode).eval()
        other.load_state_dict(conv.state_dict())
        outputs[mode] = other(x)
    assert not torch.allclose(outputs["flip"], outputs["none"])
    assert not torch.allclose(outputs["flip"], outputs["only"])


def test_flipped_weights_reverse_channels():
    """Fig. 1(b): w~_i = w_{C-1-i}; with w = 1 on one channel the bottom sum picks its mirror."""
    conv = SlimConv(8, compression_ratio="4/3").eval()
    with torch.no_grad():
        conv.fc2.weight.zero_()
        conv.fc2.bias.fill_(-30.0)
        conv.fc2.bias[1] = 30.0  # w = e_1 (sigmoid saturates)
        x = torch.randn(1, 8, 4, 4)
        top, bottom = _pathway_inputs(conv, x)
    expected_top = torch.zeros_like(top).index_copy(1, torch.tensor([1]), x[:, 1:2])
    torch.testing.assert_close(top, expected_top, rtol=0, atol=1e-6)
    # flipped: weight 1 sits on channel C-1-1 = 6, which lands in chunk 2 at position 6 - 4 = 2
    torch.testing.assert_close(bottom, torch.zeros_like(bottom).index_copy(1, torch.tensor([2]),
                                                                          x[:, 6:7]),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# SE BatchNorm at batch size 1, inference folding, options
# ---------------------------------------------------------------------------------------------

def test_se_bn_batch_one_uses_running_stats_and_batch_two_is_plain_bn():
    conv = SlimConv(64).train()
    bn = conv.fc1_bn
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
    before = bn.running_mean.clone()
    x = torch.randn(1, 64, 5, 5)
    y = conv(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)  # not updated
    # batch 1 in train mode == the SE in eval mode (other BNs still use batch statistics)
    hid = conv.fc1(x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(bn(hid), F.batch_norm(hid, bn.running_mean, bn.running_var,
                                                     bn.weight, bn.bias, False, 0.0, bn.eps))
    # batch 2: exactly nn.BatchNorm2d, running statistics updated
    plain = nn.BatchNorm2d(bn.num_features)
    plain.load_state_dict(bn.state_dict())
    hid2 = torch.randn(2, bn.num_features, 1, 1)
    torch.testing.assert_close(bn(hid2), plain(hid2))
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("k, bias", [("4/3", False), ("8/3", True), ("1", True)])
def test_fuse_for_inference_is_exact(k, bias):
    conv = SlimConv(48, compression_ratio=k, stride=2, bias=bias)
    with torch.no_grad():
        _randomise_bn(conv)
        if bias:
            conv.bias.uniform_(-1, 1)
    conv.eval()
    x = torch.randn(2, 48, 9, 9)
    with torch.no_grad():
        expected = conv(x)
        conv.fuse_for_inference()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        conv.fuse_for_inference()  # idempotent
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_stride_dilation_groups_reach_both_spatial_convs():
    conv = SlimConv(64, stride=2, dilation=2, groups=4, kernel_size=5)
    for m in (conv.top_conv, conv.bottom_conv):
        assert m.stride == (2, 2) and m.dilation == (2, 2) and m.padding == (4, 4)
        assert m.groups == 4 and m.kernel_size == (5, 5)
    assert conv.bottom_reduce.stride == (1, 1)  # the bottom 1x1 runs before the stride
    assert conv(torch.randn(1, 64, 15, 15)).shape == (1, 48, 8, 8)


def test_channels_last_input():
    conv = SlimConv(32).eval()
    x = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last)), conv(x))


# ---------------------------------------------------------------------------------------------
# Invalid configurations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=64, out_channels=64), r"out_channels=64 .* outputs 48 .*out_channels=48"),
    (dict(in_channels=3), r"in_channels=3 must be at least 2r=4"),
    (dict(in_channels=15, compression_ratio="16/3"), r"in_channels=15 must be at least 2r=16"),
    (dict(in_channels=64, compression_ratio=1.5), r"compression_ratio .* got 1.5"),
    (dict(in_channels=64, compression_ratio=0), r"compression_ratio"),
    (dict(in_channels=64, compression_ratio="abc"), r"compression_ratio .* 'abc'"),
    (dict(in_channels=64, compression_ratio=2 / 3), r"compression_ratio"),
    (dict(in_channels=64, groups=3), r"top width C/r=32 must be divisible by groups=3"),
    (dict(in_channels=64, groups=32),
     r"bottom width C/\(2r\)=16 must be divisible by bottom_groups=32"),
    (dict(in_channels=64, bottom_groups=0), r"bottom_groups must be an integer >= 1"),
    (dict(in_channels=64, flipping="flipped"), r"flipping must be one of 'flip', 'none', 'only'"),
    (dict(in_channels=64, se_reduction=0), r"se_reduction"),
    (dict(in_channels=64, se_min_channels=0), r"se_min_channels"),
    (dict(in_channels=0), r"in_channels"),
])
def test_invalid_configurations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlimConv(**kwargs)


def test_natural_out_channels_validates():
    with pytest.raises(ValueError, match="in_channels=7 must be at least 2r=8"):
        SlimConv.natural_out_channels(7, compression_ratio="8/3")
    with pytest.raises(ValueError, match="compression_ratio"):
        conv_out_channels("slimconv", 64, None, compression_ratio=3)


def test_flipping_none_alias_and_export_of_variants():
    assert SlimConv(16, flipping=None).flipping == "none"  # the CLI parses "none" as None
    for k, flipping in (("8/3", "none"), ("1", "only")):
        conv = SlimConv(32, compression_ratio=k, flipping=flipping, stride=2).eval()
        x = torch.randn(2, 32, 9, 9)
        program = torch.export.export(conv, (x,))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_macs_of_the_module():
    """Conv MACs (the papers' FLOPs): SE 2Ch + top k^2 (C/2)^2 HW' + bottom (C/2)(C/4) HW
    + k^2 (C/4)^2 HW' at k = 4/3, with the bottom 1x1 at the input resolution (official)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, hw, hw_out = 64, 56 * 56, 28 * 28
    conv = SlimConv(c, stride=2).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        conv(torch.randn(1, c, 56, 56))
    macs = 2 * c * 2 + 9 * 32 * 32 * hw_out + 32 * 16 * hw + 9 * 16 * 16 * hw_out
    assert counter.get_total_flops() == 2 * macs


def test_cifar_resnet56_k1_matches_scconv_table2_params():
    """SCConv Table 2 "SlimConv-R56 (k=1)": 0.60M. k = 1 in the second 3x3 conv of each basic
    block (host BN kept), option-B projection shortcuts, 10 classes: 597,326 parameters."""
    total = 3 * 16 * 9 + 2 * 16 + 64 * 10 + 10
    inp = 16
    for w in (16, 32, 64):
        for _ in range(9):
            total += 9 * inp * w + 2 * w                                    # conv1 + bn1
            total += n_params(SlimConv(w, w, compression_ratio=1)) + 2 * w  # SlimConv + bn2
            if inp != w:
                total += inp * w + 2 * w                                    # projection
            inp = w
    assert total == 597_326
    assert round(total / 1e6, 2) == 0.60


# ---------------------------------------------------------------------------------------------
# C not divisible by 2r: floored widths (official code), leftover channels folded in, not dropped
# ---------------------------------------------------------------------------------------------

def _folded_reference(conv: SlimConv, x: torch.Tensor) -> torch.Tensor:
    """Eq. 2 with chunks of C//r: the official sum of the r full chunks plus the C mod r
    leftover channels added to the first channels (the official code drops them)."""
    t = conv.top_conv.in_channels
    w = torch.sigmoid(conv.fc2(F.relu(conv.fc1_bn(conv.fc1(x.mean((2, 3), keepdim=True))))))

    def fold(v):
        full = sum(torch.split(v[:, : conv.chunks * t], t, dim=1))
        rest = v[:, conv.chunks * t:]
        return full + F.pad(rest, (0, 0, 0, 0, 0, t - rest.shape[1]))

    top = conv.top_conv(fold(w * x))
    reduced = conv.bottom_reduce_bn(conv.bottom_reduce(fold(w.flip(1) * x)))
    bottom = conv.bottom_conv(F.relu(reduced))
    return conv.bn(torch.cat((top, bottom), 1))


@pytest.mark.parametrize("c, k, widths", [
    (64, 2, (21, 10, 31)),     # SlimConv Table 10, CIFAR ResNet-50 stage 1: r = 3
    (64, 4, (10, 5, 15)),      # r = 6
    (58, "4/3", (29, 14, 43)),  # ShuffleNetV2 stage-2 branch: divisible by r = 2, not by 4
])
def test_non_divisible_channels_fold_leftovers(c, k, widths):
    conv = SlimConv(c, compression_ratio=k, stride=2)
    assert (conv.top_conv.in_channels, conv.bottom_reduce.out_channels, conv.out_channels) == widths
    assert SlimConv.natural_out_channels(c, compression_ratio=k) == widths[2]
    with torch.no_grad():
        _randomise_bn(conv)
    conv.eval()
    x = torch.randn(2, c, 9, 9, requires_grad=True)
    y = conv(x)
    assert y.shape == (2, widths[2], 5, 5)
    torch.testing.assert_close(y, _folded_reference(conv, x), rtol=1e-5, atol=1e-5)
    # no information loss: every input channel (the leftovers too) reaches the output
    y.square().sum().backward()
    assert (x.grad.abs().sum((0, 2, 3)) > 0).all()


def test_table10_cifar_resnet50_k2_k4_counts():
    """SlimConv Table 10, CIFAR-100 ResNet-50: k=2 11.56M / 0.653G and k=4 9.08M / 0.519G
    (FLOPs counted as SlimConv's tables are: conv + linear + 2 per BN output element)."""
    from leanconv import create_model, profile

    for k, params, macs, counted in ((2, 11_561_690, 645_713_072, 652_319_996),
                                     (4, 9_079_622, 512_310_448, 518_589_500)):
        with torch.device("meta"):
            model = create_model("resnet50", conv="slimconv", stem="cifar", num_classes=100,
                                 compression_ratio=k)
        report = profile(model, (1, 3, 32, 32), counter="macs+bn")
        assert (report.params, report.macs, report.counted_macs) == (params, macs, counted)


@pytest.mark.parametrize("bias", [False, True])
def test_absorb_bn_folds_a_following_bn(bias):
    torch.manual_seed(0)
    conv = SlimConv(32, bias=bias)
    host = nn.BatchNorm2d(conv.out_channels)
    model = nn.Sequential(conv, host).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    if bias:
        conv.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        expected = model(x)
        assert conv.absorb_bn(host)
        out = conv(x)
    assert (out - expected).abs().max() / expected.abs().max() < 1e-5
    assert not conv.absorb_bn(nn.BatchNorm2d(conv.out_channels + 1))


@pytest.mark.parametrize("placement", [None, {"keep_bn": True}])
def test_prepared_resnet_matches(placement):
    from leanconv.inference import max_abs_diff, prepare_for_inference
    from leanconv.models import create_model

    torch.manual_seed(0)
    model = randomize_bns(create_model("resnet20", conv="slimconv", num_classes=10,
                                       placement=placement))
    model.eval()
    prepared = prepare_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert max_abs_diff(model, prepared, torch.randn(2, 3, 32, 32), relative=True) < 1e-5
