"""SPConv: parameter counts (Eq. 9, Tables 1 and 4), fusion maths (Eq. 4-6), ablation switches,
fuse_for_inference equivalence and argument validation."""

import math

import pytest
import torch
from torch import nn

from helpers import randomize_bns
from leanconv.layers import SPConv, create_conv


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def expected_params(L, M, k=3, alpha=0.5, g=2, representative="gwc+pwc", redundant=True,
                    bias=False):
    c3 = math.floor(alpha * L)
    c1 = L - c3 if redundant else 0
    rep = {
        "gwc+pwc": k * k * c3 * M // g + c3 * M,
        "gwc-then-pwc": k * k * c3 * M // g + M * M,
        "vanilla": k * k * c3 * M,
    }[representative]
    bns = 2 * M + (2 * M if c1 else 0)
    return rep + c1 * M + bns + (M if bias else 0)


@pytest.mark.parametrize("L,M", [(16, 32), (64, 64), (128, 96), (48, 256)])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("alpha", [1, 0.5, 0.25, 0.125])
def test_params_equal_eq9_plus_bn(L, M, k, alpha):
    conv = SPConv(L, M, k, split_ratio=alpha)
    # Eq. 9: (k*k*alpha/g + 1) * L * M, plus 2M per BN (one BN without a redundant part).
    eq9 = (k * k * alpha / 2 + 1) * L * M
    bns = 4 * M if alpha < 1 else 2 * M
    assert n_params(conv) == eq9 + bns
    assert n_params(conv) == expected_params(L, M, k, alpha)
    assert n_params(SPConv(L, M, k, split_ratio=alpha, bias=True)) == eq9 + bns + M


@pytest.mark.parametrize("C,official", [(64, 13_632), (128, 53_888), (256, 214_272)])
def test_params_against_official_reference(C, official):
    # The official SPConv_3x3 gives its redundant 1x1 conv a (redundant, pre-BN) bias; we don't.
    assert n_params(SPConv(C, C)) == official - C


@pytest.mark.parametrize("representative", ["gwc+pwc", "gwc-then-pwc", "vanilla"])
@pytest.mark.parametrize("redundant", [True, False])
@pytest.mark.parametrize("fusion", ["softmax", "sum"])
def test_ablation_switches_build_and_run(representative, redundant, fusion):
    conv = SPConv(24, 40, stride=2, split_ratio=0.25, representative=representative,
                  redundant=redundant, fusion=fusion)
    assert n_params(conv) == expected_params(24, 40, alpha=0.25, representative=representative,
                                             redundant=redundant)
    y = conv(torch.randn(2, 24, 15, 15))
    assert y.shape == (2, 40, 8, 8)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def _resnet20_params(shortcut_projection=True, **hparams):
    """ResNet-20 (16-32-64) with every block 3x3 replaced; stem, BNs, 1x1 shortcuts, FC vanilla."""
    total = 3 * 16 * 9 + 2 * 16 + 64 * 10 + 10
    inplanes = 16
    for width in (16, 32, 64):
        for block in range(3):
            stride = 2 if block == 0 and width > 16 else 1
            total += n_params(SPConv(inplanes, width, 3, stride, **hparams)) + 2 * width
            total += n_params(SPConv(width, width, 3, 1, **hparams)) + 2 * width
            if inplanes != width and shortcut_projection:
                total += inplanes * width + 2 * width
            inplanes = width
    return total


@pytest.mark.parametrize("hparams,paper_m", [
    ({}, 0.10),                                   # Table 1 / Table 4 row 1 (P1 P21 P3)
    ({"split_ratio": 0.25}, 0.071),               # Table 1, alpha 1/4
    ({"representative": "gwc-then-pwc"}, 0.12),   # Table 4 row 2 (P22)
    ({"representative": "vanilla"}, 0.15),        # Table 4 row 3 (P20)
    ({"fusion": "sum"}, 0.10),                    # Table 4 row 4 (no P3)
    ({"redundant": False}, 0.088),                # Table 4 row 5 (no P1)
])
def test_resnet20_tables_1_and_4(hparams, paper_m):
    # The paper's CIFAR ResNets come from kuangliu/pytorch-cifar (1x1 projection shortcuts,
    # notes 2.2); its 2-3 digit figures are truncated (P20 is 0.1564M, printed 0.15M).
    total = _resnet20_params(**hparams) / 1e6
    unit = 0.01 if paper_m >= 0.1 else 0.001
    assert paper_m <= total < paper_m + unit, total


def _branches(conv, x):
    """U3 and U1 recomputed from the submodules, following Eq. 2-3."""
    c3 = conv.rep_channels
    u3 = conv.bn_rep(conv.conv_kxk(x[:, :c3]) + conv.pwc(x[:, :c3]))
    u1 = conv.bn_red(conv.pwc_red(x[:, c3:]))
    return u3, u1


def test_softmax_fusion_matches_eq_4_to_6():
    conv = SPConv(16, 24).eval()
    randomize_bns(conv)
    x = torch.randn(3, 16, 9, 9)
    with torch.no_grad():
        u3, u1 = _branches(conv, x)
        s = torch.stack([u3.mean((2, 3)), u1.mean((2, 3))])  # Eq. 4
        beta, gamma = torch.softmax(s, dim=0)                 # Eq. 5, literally
        torch.testing.assert_close(beta + gamma, torch.ones_like(beta))
        expected = beta[..., None, None] * u3 + gamma[..., None, None] * u1  # Eq. 6
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        # the output is a per-channel convex combination: it lies between U1 and U3
        y = conv(x)
        assert (y <= torch.maximum(u3, u1) + 1e-5).all()
        assert (y >= torch.minimum(u3, u1) - 1e-5).all()


def test_sum_fusion_is_u3_plus_u1():
    conv = SPConv(16, 24, fusion="sum").eval()
    randomize_bns(conv)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        u3, u1 = _branches(conv, x)
        torch.testing.assert_close(conv(x), u3 + u1, rtol=1e-5, atol=1e-5)


def test_no_redundant_part_output_is_u3():
    for conv in (SPConv(16, 24, split_ratio=1), SPConv(16, 24, redundant=False)):
        assert conv.pwc_red is None
        conv.eval()
        x = torch.randn(2, 16, 8, 8)
        c3 = conv.rep_channels
        with torch.no_grad():
            expected = conv.bn_rep(conv.conv_kxk(x[:, :c3]) + conv.pwc(x[:, :c3]))
            torch.testing.assert_close(conv(x), expected)
    assert SPConv(16, 24, split_ratio=1).rep_channels == 16
    assert SPConv(16, 24, redundant=False).rep_channels == 8


def test_stride_two_side_paths_use_ceil_average_pool():
    conv = SPConv(8, 8, stride=2, fusion="sum").eval()
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        pooled = nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True)
        u3 = conv.bn_rep(conv.conv_kxk(x[:, :4]) + conv.pwc(pooled[:, :4]))
        u1 = conv.bn_red(conv.pwc_red(pooled[:, 4:]))
        torch.testing.assert_close(conv(x), u3 + u1)


def test_split_rounding_is_exact_floor():
    # int(0.29 * 100) is 28 in floats; the split uses the exact fraction 29/100.
    assert SPConv(100, 8, split_ratio=0.29, gwc_groups=1).rep_channels == 29
    assert SPConv(30, 8, split_ratio=1 / 3).rep_channels == 10
    assert SPConv(20, 8, split_ratio=0.3).rep_channels == 6
    conv = SPConv(36, 8, split_ratio=0.25, gwc_groups=1)
    assert (conv.rep_channels, conv.red_channels) == (9, 27)


FUSE_CASES = [
    dict(),
    dict(fusion="sum"),
    dict(split_ratio=0.25),
    dict(split_ratio=0.25, fusion="sum"),
    dict(split_ratio=1),
    dict(redundant=False),
    dict(representative="vanilla"),
    dict(representative="gwc-then-pwc"),
    dict(representative="vanilla", fusion="sum", split_ratio=0.75),
]


def _case_id(hparams):
    return ",".join(f"{k}={v}" for k, v in hparams.items()) or "default"


@pytest.mark.parametrize("hparams", FUSE_CASES, ids=_case_id)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_for_inference_is_exact(hparams, stride, bias):
    conv = SPConv(16, 24, stride=stride, bias=bias, **hparams).eval()
    randomize_bns(conv)
    if bias:
        conv.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 16, 11, 11)
    with torch.no_grad():
        before = conv(x)
        conv.fuse_for_inference()
        after = conv(x)
        assert conv.fuse_for_inference() is conv  # second call is a no-op
        torch.testing.assert_close(conv(x), after, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    gwc_pwc = hparams.get("representative", "gwc+pwc") == "gwc+pwc"
    # 16 * split_ratio representative channels in 2 groups: at most 8 per group densify.
    densifies = gwc_pwc and stride == 1 and conv.rep_channels // 2 <= 8
    assert (conv.pwc is None and conv.conv_kxk.groups == 1) == densifies or not gwc_pwc
    merges = (gwc_pwc and not densifies and hparams.get("fusion") == "sum"
              and hparams.get("redundant", True) and hparams.get("split_ratio", 0.5) < 1)
    assert (conv.pwc_merged is not None) == merges
    n_convs = sum(isinstance(m, nn.Conv2d) for m in conv.modules())
    if merges or (densifies and conv.red_channels == 0):
        assert n_convs == 2 if merges else n_convs == 1


def test_fused_module_exports():
    conv = SPConv(16, 32, stride=2).eval()
    randomize_bns(conv)
    conv.fuse_for_inference()
    x = torch.randn(2, 16, 10, 10)
    program = torch.export.export(conv, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_any_widths_and_kernel():
    cases = [(16, 48, 3, 2, 7), (48, 16, 5, 1, 6), (8, 2, 1, 2, 5), (8, 10, 3, 2, 1)]
    for L, M, k, stride, size in cases:
        conv = create_conv("spconv", L, M, k, stride)
        out = -(-size // stride)
        assert conv(torch.randn(2, L, size, size)).shape == (2, M, out, out)


@pytest.mark.parametrize("kwargs,match", [
    (dict(split_ratio=0), "split_ratio"),
    (dict(split_ratio=1.5), "split_ratio"),
    (dict(split_ratio=-0.5), "split_ratio"),
    (dict(split_ratio="half"), "split_ratio"),
    (dict(split_ratio=0.05), "split_ratio=0.05 leaves no representative"),
    (dict(in_channels=12, split_ratio=0.25), "gwc_groups=2 must divide .* = 3"),  # odd C3
    (dict(out_channels=15), "out_channels=15"),                                  # odd M
    (dict(gwc_groups=0), "gwc_groups"),
    (dict(gwc_groups=3), "gwc_groups=3"),
    (dict(representative="dense"), "representative"),
    (dict(fusion="max"), "fusion"),
    (dict(redundant="yes"), "redundant"),
    (dict(padding=0), "padding"),
])
def test_invalid_configs_raise(kwargs, match):
    args = dict(in_channels=16, out_channels=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SPConv(**args)


def test_vanilla_representative_allows_odd_channels():
    conv = SPConv(12, 15, split_ratio=0.25, representative="vanilla")
    assert conv(torch.randn(1, 12, 5, 5)).shape == (1, 15, 5, 5)


@pytest.mark.parametrize("hparams", FUSE_CASES, ids=_case_id)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_absorb_bn_folds_the_host_bn_exactly(hparams, stride, bias):
    # Host BN with negative, zero and positive scales: a * Y + b goes into both branches and
    # beta is kept by scaling S3 - S1 by 1/a (a = 0 channels output b whatever beta is).
    torch.manual_seed(0)
    conv = SPConv(16, 24, stride=stride, bias=bias, **hparams)
    host = nn.BatchNorm2d(24)
    model = nn.Sequential(conv, host).eval()
    randomize_bns(model)
    host.weight.data.uniform_(-1.5, 1.5)
    host.weight.data[:3] = torch.tensor([0.0, -1e-3, 1e-3])
    if bias:
        conv.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 16, 11, 11)
    with torch.no_grad():
        expected = model(x)
        assert conv.absorb_bn(host)
        out = conv(x)
    err = (out - expected).abs().max() / expected.abs().max()
    assert err < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    softmax = hparams.get("fusion", "softmax") == "softmax" and conv.red_channels > 0
    assert (conv.fusion_scale is not None) == softmax


def test_absorb_bn_declines_other_modules():
    conv = SPConv(16, 24).eval()
    assert not conv.absorb_bn(nn.BatchNorm2d(16))
    assert not conv.absorb_bn(nn.BatchNorm2d(24, track_running_stats=False))
    assert not conv.absorb_bn(nn.GroupNorm(4, 24))
    assert isinstance(conv.bn_rep, nn.BatchNorm2d)  # untouched


def test_prepared_resnet_folds_every_host_bn():
    from leanconv.inference import max_abs_diff, prepare_for_inference
    from leanconv.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", conv="spconv", num_classes=10)
    randomize_bns(model)
    model.eval()
    prepared = prepare_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert max_abs_diff(model, prepared, torch.randn(2, 3, 32, 32), relative=True) < 1e-5
