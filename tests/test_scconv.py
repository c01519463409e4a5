"""SCConv (CVPR 2023): SRU, CRU and SCConv against the paper's equations and Eq. 11."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from leanconv import CRU, SRU, SCConv, create_conv
from leanconv.layers.scconv import SpatialReconstruction


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def eq11(c1, c2, alpha, r, g, k=3):
    """Eq. 11 of the paper, in exact arithmetic."""
    a = Fraction(alpha)
    up, low = a * c1, (1 - a) * c1
    total = (up * up / r + k * k * up / (g * r) * Fraction(c2, g) * g + up / r * c2
             + low * low / r + low / r * (c2 - low / r))
    assert total.denominator == 1
    return int(total)


CONFIGS = [  # (C1, C2, alpha, r, g, k)
    (64, 64, Fraction(1, 2), 2, 2, 3),
    (128, 128, Fraction(1, 2), 2, 2, 3),
    (64, 128, Fraction(1, 2), 2, 2, 3),
    (256, 64, Fraction(3, 4), 2, 2, 3),
    (96, 48, Fraction(1, 4), 4, 2, 3),
    (64, 96, Fraction(1, 2), 2, 4, 5),
    (32, 64, Fraction(1, 2), 4, 1, 3),
    (128, 32, Fraction(1, 2), 2, 2, 3),  # C2 = l_s: DenseNet's 128 -> 32 conv, no PWC2
]


@pytest.mark.parametrize("c1,c2,alpha,r,g,k", CONFIGS)
def test_cru_params_equal_eq11(c1, c2, alpha, r, g, k):
    cru = CRU(c1, c2, k, split_ratio=float(alpha), squeeze_ratio=r, gwc_groups=g)
    assert n_params(cru) == eq11(c1, c2, alpha, r, g, k)
    # bias=True adds one bias per output channel (in the GWC)
    cru_b = CRU(c1, c2, k, bias=True, split_ratio=float(alpha), squeeze_ratio=r, gwc_groups=g)
    assert n_params(cru_b) == eq11(c1, c2, alpha, r, g, k) + c2


@pytest.mark.parametrize("c1,c2,alpha,r,g,k", CONFIGS)
@pytest.mark.parametrize("order", ["sc", "cs"])
def test_scconv_params_equal_eq11_plus_gn(c1, c2, alpha, r, g, k, order):
    conv = SCConv(c1, c2, k, split_ratio=float(alpha), squeeze_ratio=r, gwc_groups=g, order=order)
    gn_width = c1 if order == "sc" else c2
    assert n_params(conv) == eq11(c1, c2, alpha, r, g, k) + 2 * gn_width


def test_parallel_params_equal_sequential():
    # Table 1: C&S has the same Params as S+C
    assert n_params(SCConv(64, 64, order="parallel")) == n_params(SCConv(64, 64)) == 7616 - 64


@pytest.mark.parametrize("c,expected", [(64, 7_616), (128, 30_080), (256, 119_552)])
def test_reference_counts_from_notes(c, expected):
    # notes §3.1: GN affine (2C) + GWC bias (C) + 1.8125 C^2
    assert n_params(SCConv(c, c, bias=True)) == expected
    assert n_params(SCConv(c, c)) == expected - c == 1.8125 * c * c + 2 * c


def test_sru_params_are_conv_plus_gn():
    # Table 1 "ResNet50 + S": the 3x3 conv unchanged, GN affine added
    sru = SRU(64, 128, stride=2)
    assert n_params(sru) == 9 * 64 * 128 + 2 * 64
    assert sum(p.numel() for p in create_conv("sru", 64, 64).parameters()) == 9 * 64 * 64 + 128


def test_sru_in_resnet50_matches_table_1():
    # Table 1/2: "ResNet50 + S" 23.53M vs ResNet50 23.52M (CIFAR, 10 classes: 23,520,842 params)
    widths = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3          # the 16 bottleneck 3x3 convs
    extra = sum(n_params(SRU(w, w)) - 9 * w * w for w in widths)
    assert extra == 7_552
    assert round((23_520_842 + extra) / 1e6, 2) == 23.53


def test_sru_unit_matches_paper_equations():
    unit = SpatialReconstruction(8, gn_groups=2)
    with torch.no_grad():
        unit.gn.weight.copy_(torch.linspace(0.5, 2.0, 8))
        unit.gn.bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(2, 8, 5, 5)
    gamma = unit.gn.weight
    w_gamma = gamma / gamma.sum()                                    # Eq. 2
    reweight = torch.sigmoid(w_gamma.view(1, -1, 1, 1) * unit.gn(x))  # Eq. 3
    above = reweight > 0.5
    w1 = torch.where(above, torch.ones_like(reweight), reweight)
    w2 = torch.where(above, torch.zeros_like(reweight), reweight)
    x1, x2 = w1 * x, w2 * x                                          # Eq. 4
    x11, x12 = x1.chunk(2, dim=1)
    x21, x22 = x2.chunk(2, dim=1)
    expected = torch.cat([x11 + x22, x21 + x12], dim=1)
    torch.testing.assert_close(unit(x), expected, rtol=1e-6, atol=1e-6)


def test_hard_gate_binary_masks_and_frozen_gn():
    unit = SpatialReconstruction(8, gn_groups=4, gate="hard")
    assert not unit.gn.weight.requires_grad and not unit.gn.bias.requires_grad
    x = torch.randn(2, 8, 6, 6)
    w1 = (torch.sigmoid(unit.gn(x) / 8) > 0.5).float()   # gamma = 1 -> W_gamma = 1/C
    w2 = 1 - w1
    assert set(w1.unique().tolist()) == {0.0, 1.0}
    x1, x2 = w1 * x, w2 * x
    expected = torch.cat([x1[:, :4] + x2[:, 4:], x2[:, :4] + x1[:, 4:]], dim=1)
    torch.testing.assert_close(unit(x), expected, rtol=0, atol=0)
    # with binary masks every input element lands in exactly one part: the sum is preserved
    torch.testing.assert_close(unit(x).sum((1,)), x.sum((1,)), rtol=1e-5, atol=1e-5)


def test_hard_gate_trains_only_the_convs():
    conv = SCConv(16, 16, gate="hard")
    trainable = {n for n, p in conv.named_parameters() if p.requires_grad}
    assert "sru.gn.weight" not in trainable and "sru.gn.bias" not in trainable
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    assert conv.sru.gn.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in conv.named_parameters() if n in trainable)
    assert x.grad.abs().sum() > 0


def test_soft_gate_gives_gn_gradients():
    conv = SCConv(16, 32, stride=2)
    assert conv.sru.gn.weight.requires_grad
    y = conv(torch.randn(1, 16, 9, 9))
    (y * torch.randn_like(y)).sum().backward()
    assert conv.sru.gn.weight.grad.abs().sum() > 0
    assert conv.sru.gn.bias.grad.abs().sum() > 0


def test_cru_fuse_is_pairwise_softmax():
    cru = CRU(16, 24)
    x = torch.randn(3, 16, 7, 7)
    y1, y2 = cru.transform(x)
    assert y1.shape == y2.shape == (3, 24, 7, 7)
    s = torch.stack([y1.mean((2, 3)), y2.mean((2, 3))])              # Eq. 7
    beta = torch.softmax(s, dim=0)                                    # Eq. 8, per channel
    beta1, beta2 = cru.fuse_weights(y1, y2)
    torch.testing.assert_close(beta1.flatten(1), beta[0])
    torch.testing.assert_close(beta2.flatten(1), beta[1])
    torch.testing.assert_close(beta1 + beta2, torch.ones_like(beta1))
    expected = beta[0][..., None, None] * y1 + beta[1][..., None, None] * y2   # Eq. 9
    torch.testing.assert_close(cru(x), expected, rtol=1e-5, atol=1e-6)
    # ... and not the popular code's softmax over all 2C channels
    joint = torch.softmax(torch.cat([s[0], s[1]], dim=1), dim=1)[..., None, None]
    popular = joint[:, :24] * y1 + joint[:, 24:] * y2
    assert not torch.allclose(cru(x), popular, atol=1e-3)


def test_cru_stride_two_paths():
    cru = CRU(16, 24, stride=2)
    x = torch.randn(2, 16, 7, 7)
    y1, y2 = cru.transform(x)
    x_up, x_low = cru.split_squeeze(x)
    # the GWC carries the stride; PWC1 reads the ceil-mode average-pooled X_up (Eq. 5)
    torch.testing.assert_close(x_up, cru.squeeze_up(x[:, :8]))
    pooled_up = F.avg_pool2d(x_up, 2, 2, ceil_mode=True)
    torch.testing.assert_close(y1, cru.gwc(x_up) + cru.pwc1(pooled_up), rtol=1e-5, atol=1e-6)
    # the lower part is squeezed then pooled (pooling first is the same) and reused (Eq. 6)
    low = F.avg_pool2d(cru.squeeze_low(x[:, 8:]), 2, 2, ceil_mode=True)
    torch.testing.assert_close(x_low, low, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y2, torch.cat([cru.pwc2(low), low], 1), rtol=1e-5, atol=1e-6)
    assert y1.shape == y2.shape == (2, 24, 4, 4)


@pytest.mark.parametrize("order", ["sc", "cs", "parallel"])
@pytest.mark.parametrize("stride", [1, 2])
def test_order_variants_run(order, stride):
    out = 16 if order == "parallel" else 32
    conv = SCConv(16, out, stride=stride, order=order)
    x = torch.randn(2, 16, 7, 7)
    y = conv(x)
    assert y.shape == (2, out, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
    y.sum().backward()
    assert all(p.grad is not None for p in conv.parameters())


def test_merged_squeeze_equals_two_convs():
    cru = CRU(16, 24)
    x = torch.randn(2, 16, 7, 7)
    x_up, x_low = cru.split_squeeze(x)
    torch.testing.assert_close(x_up, cru.squeeze_up(x[:, :8]))
    torch.testing.assert_close(x_low, cru.squeeze_low(x[:, 8:]))


def test_orders_compose_the_units():
    x = torch.randn(2, 16, 8, 8)
    sc = SCConv(16, 16, order="sc")
    torch.testing.assert_close(sc(x), sc.cru(sc.sru(x)))
    cs = SCConv(16, 16, order="cs")
    torch.testing.assert_close(cs(x), cs.sru(cs.cru(x)))
    par = SCConv(16, 16, stride=2, order="parallel")
    torch.testing.assert_close(par(x), par.cru(x) + F.avg_pool2d(par.sru(x), 2, 2, ceil_mode=True))


def test_sru_is_unit_then_conv():
    sru = SRU(16, 24, kernel_size=5, stride=2, dilation=2, bias=True)
    x = torch.randn(2, 16, 11, 11)
    torch.testing.assert_close(sru(x), sru.conv(sru.sru(x)))
    assert sru.conv.kernel_size == (5, 5) and sru.conv.stride == (2, 2)
    assert sru.conv.dilation == (2, 2) and sru.conv.bias is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(cls=SRU, in_channels=15), "in_channels=15 must be even"),
    (dict(cls=SCConv, in_channels=18), "gn_groups"),
    (dict(cls=SCConv, in_channels=16, gn_groups=3), "gn_groups=3"),
    (dict(cls=SCConv, in_channels=16, out_channels=30, order="cs", gn_groups=4), "gn_groups"),
    (dict(cls=SCConv, in_channels=16, gate="binary"), "gate"),
    (dict(cls=SCConv, in_channels=16, gate_threshold=1.0), "gate_threshold"),
    (dict(cls=SCConv, in_channels=16, order="s+c"), "order"),
    (dict(cls=SCConv, in_channels=16, out_channels=32, order="parallel"), "parallel"),
    (dict(cls=CRU, in_channels=4, squeeze_ratio=4), "squeezed to 0"),
    (dict(cls=CRU, in_channels=16, split_ratio=1.0), "lower part"),
    (dict(cls=CRU, in_channels=16, split_ratio=0.0), "split_ratio"),
    (dict(cls=CRU, in_channels=12), "divisible by gwc_groups=2"),
    (dict(cls=CRU, in_channels=16, out_channels=33), "out_channels=33"),
    (dict(cls=CRU, in_channels=64, out_channels=16, split_ratio=0.25, gwc_groups=1),
     "must be at least the reused lower width 24"),
])
def test_invalid_configs_raise(kwargs, match):
    kwargs = dict(kwargs)
    cls = kwargs.pop("cls")
    c_in = kwargs.pop("in_channels")
    c_out = kwargs.pop("out_channels", c_in)
    with pytest.raises(ValueError, match=match):
        cls(c_in, c_out, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(bias=True, kernel_size=5),
    dict(dilation=2, split_ratio=0.75),
    dict(out_channels=24, gwc_groups=4),
])
def test_fuse_for_inference_is_exact(kwargs):
    kwargs = dict(kwargs)
    c_out = kwargs.pop("out_channels", 32)
    conv = SCConv(16, c_out, **kwargs).eval()
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        before = conv(x)
        conv.fuse_for_inference()
        after = conv(x)
    assert conv.cru.fused_upper is not None and not hasattr(conv.cru, "gwc")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    if kwargs:
        return
    exported = torch.export.export(conv, (x,))
    torch.testing.assert_close(exported.module()(x), before, rtol=1e-5, atol=1e-5)


def test_fuse_for_inference_is_noop_at_stride_two():
    cru = CRU(16, 32, stride=2).eval()
    x = torch.randn(1, 16, 7, 7)
    with torch.no_grad():
        before = cru(x)
        cru.fuse_for_inference()
        torch.testing.assert_close(cru(x), before, rtol=0, atol=0)
    assert cru.fused_upper is None


def test_registry_hparams():
    from leanconv.layers import conv_hparams

    assert conv_hparams("sru") == dict(gn_groups=4, gate_threshold=0.5, gate="soft")
    assert conv_hparams("cru") == dict(split_ratio=0.5, squeeze_ratio=2, gwc_groups=2)
    assert conv_hparams("scconv") == dict(split_ratio=0.5, squeeze_ratio=2, gwc_groups=2,
                                          gn_groups=4, gate_threshold=0.5, gate="soft", order="sc")


def test_cru_out_channels_equal_to_reused_lower_width():
    """C2 = l_s (DenseNet-121's 128 -> 32 bottleneck conv at alpha=1/2, r=2): PWC2 would have no
    output channel, so it is omitted and Y2 = X_low, the limit of Eq. 6."""
    cru = CRU(128, 32, stride=2).eval()
    assert cru.pwc2 is None
    # squeezes 64 -> 32 twice, GWC 9 * 16 * 32, PWC1 32 * 32, no PWC2
    assert n_params(cru) == 2 * 64 * 32 + 9 * 16 * 32 + 32 * 32 == eq11(128, 32, 0.5, 2, 2)
    x = torch.randn(2, 128, 9, 9, requires_grad=True)
    y1, y2 = cru.transform(x)
    x_low = cru.split_squeeze(x)[1]
    torch.testing.assert_close(y2, x_low)
    assert y1.shape == y2.shape == (2, 32, 5, 5)
    y = cru(x)
    torch.testing.assert_close(y, cru.fuse(y1, y2))
    cru.train()
    cru(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cru.parameters())


def test_densenet121_scconv_table2_counts():
    """SCConv Table 2 SCConv-D121 (CIFAR-10): 5.45M / 594.34M; here 5,397,258 params and
    599,345,152 ops counted as SCConv's tables are (conv + linear + 2 per BN output)."""
    from leanconv import create_model, profile

    with torch.device("meta"):
        model = create_model("densenet121", conv="scconv", num_classes=10)
    report = profile(model, (1, 3, 32, 32), counter="macs+bn")
    assert (report.params, report.macs, report.counted_macs) == (5_397_258, 589_637_632,
                                                                 599_345_152)


def _host_bn(channels):
    """An eval-mode BN with negative, zero, tiny and ordinary scales and non-trivial stats."""
    bn = torch.nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1.5, 1.5)
        bn.weight[:3] = torch.tensor([0.0, -1e-3, 1e-3])
        bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("make", [
    lambda: CRU(16, 32), lambda: CRU(16, 32, stride=2), lambda: CRU(16, 24, bias=True),
    lambda: CRU(128, 32, stride=2),  # no PWC2: Y2 is the reused X_low alone
    lambda: SCConv(16, 32), lambda: SCConv(16, 32, stride=2, gate="hard"),
], ids=["cru", "cru-stride2", "cru-bias", "cru-no-pwc2", "scconv", "scconv-stride2-hard"])
def test_absorb_bn_folds_the_host_bn_exactly(make):
    torch.manual_seed(0)
    conv = make().eval()
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_(0, 0.3)
    host = _host_bn(conv.out_channels if hasattr(conv, "out_channels") else conv.cru.out_channels)
    x = torch.randn(2, conv.cru.in_channels if isinstance(conv, SCConv) else conv.in_channels,
                    9, 9)
    second = _host_bn(host.num_features)
    with torch.no_grad():
        expected = host(conv(x))
        expected2 = second(expected)
        assert conv.absorb_bn(host)
        out = conv(x)
        assert conv.absorb_bn(second)  # a second BN composes with the first
        out2 = conv(x)
    assert (out - expected).abs().max() / expected.abs().max() < 1e-5
    assert (out2 - expected2).abs().max() / expected2.abs().max() < 1e-5


def test_absorb_bn_declines_what_it_cannot_fold():
    cru = CRU(16, 32).eval()
    assert not cru.absorb_bn(torch.nn.BatchNorm2d(16))                       # wrong width
    assert not cru.absorb_bn(torch.nn.BatchNorm2d(32, track_running_stats=False))
    assert not cru.absorb_bn(torch.nn.GroupNorm(4, 32))
    assert cru.fusion_scale is None and cru.fused_upper is None              # untouched
    for order in ("cs", "parallel"):                                         # SRU last
        assert not SCConv(16, 16, order=order).eval().absorb_bn(torch.nn.BatchNorm2d(16).eval())


@pytest.mark.parametrize("make", [
    lambda: CRU(16, 32), lambda: CRU(16, 32, stride=2), lambda: CRU(128, 32, stride=2),
], ids=["cru", "cru-stride2", "cru-no-pwc2"])
def test_transform_fuse_agree_with_forward_after_absorb_bn(make):
    """The public Eq. 5-9 steps see what absorb_bn set (reuse affine, logit scale): after it,
    ``fuse(*transform(x))`` is still ``forward(x)`` and ``fuse_weights`` its beta."""
    torch.manual_seed(0)
    cru = make().eval()
    with torch.no_grad():
        for p in cru.parameters():
            p.normal_(0, 0.3)
    host, second = _host_bn(cru.out_channels), _host_bn(cru.out_channels)
    x = torch.randn(2, cru.in_channels, 9, 9)
    with torch.no_grad():
        for bn in (host, second):  # one BN, then a second composed with it
            assert cru.absorb_bn(bn)
            y = cru(x)
            y1, y2 = cru.transform(x)
            assert (cru.fuse(y1, y2) - y).abs().max() / y.abs().max() < 1e-5
            beta1, beta2 = cru.fuse_weights(y1, y2)
            torch.testing.assert_close(beta1 + beta2, torch.ones_like(beta1))
            torch.testing.assert_close(beta1 * y1 + beta2 * y2, y, rtol=1e-4, atol=1e-4)
            # the reused X_low part of Y2 carries the host BN's affine
            c2 = 0 if cru.pwc2 is None else cru.pwc2.out_channels
            x_low = cru.split_squeeze(x)[1]
            torch.testing.assert_close(y2[:, c2:], cru.reuse_scale * x_low + cru.reuse_shift)


def test_scconv_absorb_bn_changes_nothing_when_the_cru_declines():
    """SCConv decides first: a BN the CRU cannot take leaves the SRU's GN trainable and
    unfolded (fuse_for_inference freezes the folded affine)."""
    conv = SCConv(16, 32).eval()
    for bn in (torch.nn.BatchNorm2d(16).eval(),                      # wrong width
               torch.nn.BatchNorm2d(32, track_running_stats=False),  # no running statistics
               torch.nn.GroupNorm(4, 32)):
        assert not conv.absorb_bn(bn)
        assert conv.sru.folded_weight is None and conv.sru.folded_bias is None
        assert conv.cru.fused_upper is None and conv.cru.fusion_scale is None
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():  # the GN affine still reaches the output
        before = conv(x)
        conv.sru.gn.weight.mul_(-1.7)
        assert not torch.allclose(conv(x), before)
    assert conv.absorb_bn(torch.nn.BatchNorm2d(32).eval())
    assert conv.sru.folded_weight is not None and conv.cru.fusion_scale is not None


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_soft_and_hard_gates_agree_at_the_threshold(training):
    """Both gates mark a position informative when sigmoid(z) > t, decided by one comparison
    (z > logit(t)): in float32, sigmoid(z) rounds to exactly 0.5 for 0 < z < 3e-8, where a
    comparison after the sigmoid called the position non-informative."""
    # GN(X) = +-1 exactly (X = +-3, mean 0); gamma = (1e-6, 1e-6, 1, 1) makes W_gamma * GN(X)
    # = gamma^2 / sum(gamma) * (+-1) + beta * gamma / sum(gamma): with these betas z is about
    # 1e-8 and 2e-8 (+- 5e-13) in the first two channels and 2 +- 0.5 in the others
    gamma, beta = torch.tensor([1e-6, 1e-6, 1.0, 1.0]), torch.tensor([0.02, 0.04, 4.0, 4.0])
    x = 3 * torch.tensor([1.0, -1.0, -1.0, 1.0]).view(1, 1, 2, 2).repeat(2, 4, 1, 1)
    outputs = []
    for gate in ("soft", "hard"):
        sru = SpatialReconstruction(4, gn_groups=1, gate=gate).train(training)
        with torch.no_grad():
            sru.gn.weight.copy_(gamma)
            sru.gn.bias.copy_(beta)
            weight, bias = sru.folded_affine()
            z = F.group_norm(x, 1, weight, bias, sru.gn.eps)
        assert (z > 0).all() and (z[:, :2] < 3e-8).all()
        assert (torch.sigmoid(z[:, :2]) == 0.5).all()  # float32 rounding
        outputs.append(sru(x.clone().requires_grad_(training)))
    # every position informative: W1 = 1, W2 = 0 in both gates, X^w = X exactly
    for out in outputs:
        torch.testing.assert_close(out, x, rtol=0, atol=0)
