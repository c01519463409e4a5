"""CompConv (Zhang et al. 2021): Eq. 5 C_prim, Eq. 6 depth, Eq. 8 cost, the recursion of Sec. 3.3
against an independent step-by-step reference, truncation, shuffle and identity options."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from helpers import randomize_bns
from leanconv.layers import CompConv, conv_hparams, create_conv
from leanconv.layers._utils import channel_shuffle
from leanconv.layers.compconv import adaptive_depth, compconv_layout


def eq5(out_channels, depth):
    return math.ceil(out_channels / (2 * (2**depth - 1)))


def eq8_per_pixel(cin, prim, depth, k, tail):
    """Eq. 8 divided by H W, with the tailing term at the width actually kept (= 2^(d-1) C_prim
    when C_out = 2 (2^d - 1) C_prim exactly)."""
    return k * k * (cin * prim + sum((2**i * prim) ** 2 for i in range(1, depth)) + tail)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def macs(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------- Eq. 5 and the even rounding
@pytest.mark.parametrize("out_channels, depth, ceil_value, even_value", [
    (64, 1, 32, 32), (64, 2, 11, 12), (64, 3, 5, 6), (128, 3, 10, 10), (256, 2, 43, 44),
    (256, 3, 19, 20), (512, 2, 86, 86), (512, 3, 37, 38), (512, 4, 18, 18), (120, 4, 4, 4),
])
def test_prim_channels_eq5(out_channels, depth, ceil_value, even_value):
    assert eq5(out_channels, depth) == ceil_value
    conv = CompConv(512, out_channels, depth=depth, even_prim=False)
    assert conv.prim_channels == ceil_value
    assert CompConv(512, out_channels, depth=depth).prim_channels == even_value


def test_even_rounding_keeps_some_tailing_channels():
    # C_out = 2, d = 1: an even C_prim of 2 would leave X_A0 empty, so Eq. 5's 1 is kept.
    conv = CompConv(8, 2, depth=1)
    assert conv.prim_channels == 1 and conv.tail_channels == 1
    # C_out = 1: Eq. 5 gives C_prim = 1 = C_out, so X_B0 alone fills the output, X_A0 is dropped.
    conv = CompConv(8, 1, depth=1)
    assert conv.tail_conv is None and conv(torch.randn(1, 8, 5, 5)).shape == (1, 1, 5, 5)


# ---------------------------------------------------------------- Eq. 8 parameters and MACs
@pytest.mark.parametrize("cin, cout, depth, k, stride", [
    (16, 32, 1, 3, 1),     # exact: 2 (2^1 - 1) * 16
    (48, 48, 2, 3, 1),     # exact: 6 * 8
    (56, 56, 3, 3, 2),     # exact: 14 * 4
    (120, 120, 4, 3, 1),   # exact: 30 * 4 (Table 3's d = 4)
    (40, 56, 3, 5, 1),     # exact, k = 5
    (512, 512, 3, 3, 1),   # truncated: 14 * 38 = 532 -> drop 20 of X_A0
    (256, 256, 2, 3, 2),   # truncated: 6 * 44 = 264 -> drop 8
    (37, 50, 2, 3, 1),     # odd widths
])
def test_params_and_macs_equal_eq8(cin, cout, depth, k, stride):
    conv = CompConv(cin, cout, k, stride, depth=depth)
    prim = conv.prim_channels
    excess = 2 * (2**depth - 1) * prim - cout
    assert conv.tail_channels == 2 ** (depth - 1) * prim - excess
    per_pixel = eq8_per_pixel(cin, prim, depth, k, conv.tail_channels)
    if excess == 0:  # Eq. 8 verbatim
        assert per_pixel == eq8_per_pixel(cin, prim, depth, k, 2 ** (depth - 1) * prim)
    assert n_params(conv) == per_pixel
    size = 12
    out = math.ceil(size / stride)
    assert macs(conv, torch.randn(1, cin, size, size)) == per_pixel * out * out


def test_conv_identity_and_bias_costs():
    conv = CompConv(512, 512, depth=3, identity="conv", bias=True)
    n_identity = (2**2 - 1) * 38
    assert conv.identity_channels == n_identity
    base = eq8_per_pixel(512, 38, 3, 3, conv.tail_channels)
    assert n_params(conv) == base + 512 * n_identity + 512
    assert macs(conv, torch.randn(1, 512, 4, 4)) == (base + 512 * n_identity) * 16


def test_vanilla_ratio_of_section_3_5():
    # "C_in = C_out and d = 3: CompConv only requires ~20% of the computation" (Sec. 3.5)
    conv = CompConv(256, 256, depth=3, even_prim=False)
    ratio = n_params(conv) / (9 * 256 * 256)
    assert 0.17 < ratio < 0.23


# ---------------------------------------------------------------- Eq. 6 adaptive depth
def test_adaptive_depth_eq6():
    # CompConv128 on VGG-16 widths: d = 1, 1, 2, 3, 3 (Sec. 4.2)
    assert [adaptive_depth(c, 128) for c in (64, 128, 256, 512, 1024)] == [1, 1, 2, 3, 3]
    assert [CompConv(c, c).depth for c in (64, 128, 256, 512)] == [1, 1, 2, 3]
    # log2 of a non-power-of-two ratio is rounded down
    assert [adaptive_depth(c, 128) for c in (3, 127, 192, 255, 384, 511)] == [1, 1, 1, 1, 2, 2]
    assert [adaptive_depth(c, 32) for c in (16, 32, 64, 128, 4096)] == [1, 1, 2, 3, 3]
    assert CompConv(512, 512, base_channels=512).depth == 1
    assert CompConv(512, 512, base_channels=256).depth == 2


def test_adaptive_depth_is_lowered_to_fit_and_given_depth_is_not():
    conv = CompConv(3, 64, base_channels=1)  # Eq. 6 says 2; 3 inputs cannot hold X_A1
    assert conv.depth == 1
    with pytest.raises(ValueError, match="in_channels=3 is too small for depth=2"):
        CompConv(3, 64, depth=2)
    assert CompConv(3, 64, depth=2, identity="conv").depth == 2  # a 1x1 conv needs no channels


def test_max_depth():
    assert CompConv.max_depth(3, 64) == 1
    assert CompConv.max_depth(64, 64) == 3  # d = 4 drops more than X_A0 holds
    assert CompConv.max_depth(512, 512) == 4
    assert CompConv.max_depth(3, 64, identity="conv") == 3


# ---------------------------------------------------------------- the recursion, step by step
def reference(conv, x):
    """Sec. 3.3 written out with the module's weights, without shuffle or bias."""
    k = conv.kernel_size
    pad = conv.dilation * (k - 1) // 2
    prim, depth = conv.prim_channels, conv.depth
    cin = x.shape[1]

    def kxk(t, weight, stride=1, groups=1):
        return F.conv2d(t, weight, None, stride, pad, conv.dilation, groups)

    n_id = (2 ** (depth - 1) - 1) * prim
    chosen = []
    if conv.identity == "fixed":
        chosen = list(range(n_id))
    elif conv.identity == "group":
        chosen = [i * cin // n_id for i in range(n_id)] if n_id else []
    elif conv.identity == "random":
        chosen = conv.identity_index.tolist() if n_id else []
    if conv.identity == "conv" and n_id:
        slab = F.conv2d(F.avg_pool2d(x, conv.stride, conv.stride, ceil_mode=True)
                        if conv.stride > 1 else x, conv.identity_conv.weight)
    else:
        slab = x[:, chosen]
        if conv.stride > 1:
            slab = F.avg_pool2d(slab, conv.stride, conv.stride, ceil_mode=True)
    result = kxk(x, conv.prim_conv.weight, conv.stride)            # X_B(d-1), C_prim channels
    assert result.shape[1] == prim
    units, start = [], 0
    for j in range(1, depth):
        a_j = slab[:, start:start + 2 ** (j - 1) * prim]           # identity part, 2^(j-1) P
        start += a_j.shape[1]
        unit = torch.cat([a_j, result], 1)                          # B_j, 2^j P
        units.append(unit)
        result = kxk(unit, conv.level_convs[j - 1].weight)
    x_b0 = result
    width = 2 ** (depth - 1) * prim
    full_a0 = torch.cat([x_b0[:, c:c + 1] for c in range(width)], 1)  # channel by channel
    if conv.tail_conv is not None:
        weight = torch.zeros(width, 1, k, k)
        weight[: conv.tail_channels] = conv.tail_conv.weight.detach()
        full_a0 = kxk(full_a0, weight, groups=width)                 # X_A0, depthwise
    full = torch.cat([full_a0, x_b0, *units], 1)                      # Eq. 4 channels
    assert full.shape[1] == 2 * (2**depth - 1) * prim
    excess = full.shape[1] - conv.out_channels
    return torch.cat([full[:, : width - excess], full[:, width:]], 1)  # drop X_A0's last ones


@pytest.mark.parametrize("identity", ["fixed", "group", "random", "conv"])
@pytest.mark.parametrize("cin, cout, depth, stride, dilation", [
    (16, 32, 1, 1, 1), (24, 40, 2, 2, 1), (40, 50, 3, 1, 2), (60, 64, 3, 2, 1), (64, 100, 4, 1, 1),
])
def test_forward_matches_step_by_step_reference(identity, cin, cout, depth, stride, dilation):
    conv = CompConv(cin, cout, stride=stride, dilation=dilation, depth=depth, identity=identity,
                    shuffle=False).eval()
    x = torch.randn(2, cin, 11, 11)
    with torch.no_grad():
        expected = reference(conv, x)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        shuffled = CompConv(cin, cout, stride=stride, dilation=dilation, depth=depth,
                            identity=identity).eval()
        shuffled.load_state_dict(conv.state_dict())
        y = shuffled(x)
    assert y.shape == (2, cout, math.ceil(11 / stride), math.ceil(11 / stride))
    if cout % 4 == 0:
        torch.testing.assert_close(y, channel_shuffle(expected, 4), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(y, expected[:, shuffle_order(cout)], rtol=1e-5, atol=1e-5)


def shuffle_order(channels, groups=4):
    size = -(-channels // groups)
    return [g * size + c for c in range(size) for g in range(groups) if g * size + c < channels]


def test_truncation_drops_last_channels_of_x_a0():
    conv = CompConv(512, 512, depth=3, shuffle=False).eval()
    assert (conv.prim_channels, conv.tail_channels) == (38, 152 - 20)
    x = torch.randn(1, 512, 4, 4)
    with torch.no_grad():
        y = conv(x)
        x_b0 = conv.level_convs[1](torch.cat([x[:, 38:114], conv.level_convs[0](
            torch.cat([x[:, :38], conv.prim_conv(x)], 1))], 1))
    assert y.shape[1] == 512
    torch.testing.assert_close(y[:, :132], conv.tail_conv(x_b0[:, :132]).detach())
    torch.testing.assert_close(y[:, 132:284], x_b0)
    torch.testing.assert_close(y[:, 284:284 + 38], x[:, :38])  # B_1 = X_A1 (+) P_0


def test_shuffle_order_is_shufflenet_and_general():
    assert shuffle_order(8) == [0, 2, 4, 6, 1, 3, 5, 7]
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == shuffle_order(8)
    assert shuffle_order(10) == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    conv = CompConv(16, 10, depth=1)
    assert conv.shuffle_index.tolist() == shuffle_order(10)
    assert CompConv(16, 12, depth=1).shuffle_index is None  # view/transpose path


def test_shuffle_off_is_plain_concatenation():
    on, off = CompConv(16, 32, depth=1), CompConv(16, 32, depth=1, shuffle=False)
    off.load_state_dict(on.state_dict())
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        plain = off(x)
        assert torch.equal(on(x), channel_shuffle(plain, 4))
        assert not torch.equal(on(x), plain)
        # d = 1: [X_A0 (16), X_B0 (16)], X_B0 = the level-0 conv
        torch.testing.assert_close(plain[:, 16:], off.prim_conv(x))


# ---------------------------------------------------------------- identity options
def test_fixed_identity_is_the_starting_channels_downsampled():
    conv = CompConv(48, 48, stride=2, depth=2, shuffle=False).eval()  # P = 8, A_1 = x[:, :8]
    x = torch.randn(1, 48, 7, 7)
    with torch.no_grad():
        y = conv(x)
    pooled = F.avg_pool2d(x[:, :8], 2, 2, ceil_mode=True)
    torch.testing.assert_close(y[:, 32:40], pooled)  # after X_A0 (16) and X_B0 (16)


def test_group_identity_picks_one_channel_per_group():
    conv = CompConv(48, 48, depth=2, identity="group", shuffle=False)  # 8 of 48: every 6th
    x = torch.randn(1, 48, 5, 5)
    assert torch.equal(conv(x)[:, 32:40], x[:, ::6])
    uneven = CompConv(44, 48, depth=2, identity="group")
    assert uneven.identity_index.tolist() == [i * 44 // 8 for i in range(8)]
    assert "identity_index" not in uneven.state_dict()  # derived, not state


def test_random_identity_is_seeded_stored_and_distinct():
    torch.manual_seed(3)
    a = CompConv(64, 64, depth=3, identity="random")
    torch.manual_seed(3)
    b = CompConv(64, 64, depth=3, identity="random")
    assert torch.equal(a.identity_index, b.identity_index)
    index = a.identity_index.tolist()
    assert len(index) == 3 * a.prim_channels == len(set(index))
    assert index != list(range(len(index)))
    assert "identity_index" in a.state_dict()
    c = CompConv(64, 64, depth=3, identity="random")
    assert not torch.equal(c.identity_index, a.identity_index)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.identity_index, a.identity_index)


def test_random_identity_exports():
    conv = CompConv(40, 50, stride=2, depth=2, identity="random").eval()
    x = torch.randn(2, 40, 9, 9)
    program = torch.export.export(conv, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), conv(x))


def test_conv_identity_is_a_1x1_conv():
    conv = CompConv(64, 64, depth=3, identity="conv")
    assert conv.identity_conv.kernel_size == (1, 1)
    assert conv.identity_conv.weight.shape == (3 * 6, 64, 1, 1)
    assert CompConv(64, 64, depth=1, identity="conv").identity_conv is None


def test_bias_is_per_output_channel_and_trained():
    conv = CompConv(16, 20, bias=True)
    assert conv.bias.shape == (20,)
    with torch.no_grad():
        conv.bias.fill_(1.0)
        plain = CompConv(16, 20)
        plain.load_state_dict({k: v for k, v in conv.state_dict().items() if k != "bias"})
        x = torch.randn(1, 16, 4, 4)
        torch.testing.assert_close(conv(x), plain(x) + 1)


# ---------------------------------------------------------------- registry and errors
def test_registry_hparams_and_attributes():
    assert conv_hparams("compconv") == {"depth": None, "base_channels": 128, "shuffle": True,
                                        "identity": "fixed", "even_prim": True}
    conv = create_conv("compconv", 64, 128, stride=2, depth=2)
    assert (conv.in_channels, conv.out_channels, conv.stride, conv.depth) == (64, 128, 2, 2)
    assert conv(torch.randn(1, 64, 7, 7)).shape == (1, 128, 4, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=0), "depth must be an integer >= 1, got 0"),
    (dict(depth=-2), "depth must be an integer >= 1"),
    (dict(depth=2.0), "depth must be an integer"),
    (dict(base_channels=0), "base_channels must be an integer >= 1"),
    (dict(identity="bogus"), "identity must be one of 'fixed', 'group', 'random', 'conv'"),
    (dict(shuffle="yes"), "shuffle must be True or False"),
    (dict(even_prim=None), "even_prim must be True or False"),
])
def test_bad_hparams_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompConv(64, 64, **kwargs)


def test_channels_too_small_for_depth_raise():
    with pytest.raises(ValueError, match="out_channels=8 is too small for depth=3"):
        CompConv(64, 8, depth=3)
    with pytest.raises(ValueError, match="out_channels=64 is too small for depth=4"):
        CompConv(64, 64, depth=4)
    with pytest.raises(ValueError, match="in_channels=16 is too small for depth=3"):
        CompConv(16, 128, depth=3)  # X_A1, X_A2 need 3 * 10 = 30 input channels
    with pytest.raises(ValueError, match="in_channels=16 is too small for depth=3"):
        compconv_layout(16, 128, 3, "random")
    # P = 10, slab 3P = 30, X_A0 = 40 - (140 - 128) = 28
    assert compconv_layout(16, 128, 3, "conv") == (10, 30, 28)


# ------------------------------------------------------- lean assembly and BN absorption (issue 6)
def old_forward(conv, x):
    """The module's forward before the lean rewrite: concatenate, then shuffle, then bias."""
    slab = conv._identity_parts(x) if conv.identity_channels else None
    result = conv.prim_conv(x)
    intermediate, start = [], 0
    for j, level in enumerate(conv.level_convs):
        width = conv.prim_channels << j
        unit = torch.cat([slab[:, start:start + width], result], dim=1)
        start += width
        intermediate.append(unit)
        result = level(unit)
    parts = [result, *intermediate]
    if conv.tail_conv is not None:
        parts.insert(0, conv.tail_conv(result[:, : conv.tail_channels]))
    out = torch.cat(parts, dim=1)
    if conv.shuffle:
        out = (channel_shuffle(out, 4) if conv.out_channels % 4 == 0
               else out[:, shuffle_order(conv.out_channels)])
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


LEAN_CASES = [  # (cin, cout, kwargs)
    (16, 16, dict()),                                   # d = 1, 4 aligned shuffle groups
    (16, 32, dict(stride=2, bias=True)),
    (64, 64, dict(depth=2)),                            # groups spanning two parts
    (40, 50, dict(depth=3, dilation=2)),                # index shuffle (50 % 4 != 0)
    (128, 128, dict(depth=3, identity="group")),
    (24, 40, dict(depth=2, stride=2, identity="conv", bias=True)),
    (16, 10, dict(shuffle=False)),
]


@pytest.mark.parametrize("cin,cout,kwargs", LEAN_CASES)
def test_lean_forward_and_gradients_equal_concat_then_shuffle(cin, cout, kwargs):
    torch.manual_seed(0)
    conv = CompConv(cin, cout, **kwargs).train()
    if conv.bias is not None:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, cin, 9, 9)
    g = torch.randn(2, cout, *conv(x).shape[2:])
    results = []
    for fn in (conv, lambda t: old_forward(conv, t)):
        xi = x.clone().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        y = fn(xi)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad for p in conv.parameters()]))
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp, gp_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_aligned_shuffle_is_one_stack_without_concatenation():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    conv, x = CompConv(16, 16).eval(), torch.randn(2, 16, 8, 8)
    with torch.no_grad(), Ops() as ops:
        conv(x)
    # before: 2 convs, alias, cat, view, transpose, clone, _unsafe_view (two full copies)
    assert sorted(ops.names) == sorted(["convolution"] * 2 + ["slice"] * 4 + ["stack", "view"])


def random_bn(channels):
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize("cin,cout,kwargs", LEAN_CASES)
def test_absorb_bn_is_exact(cin, cout, kwargs):
    torch.manual_seed(0)
    conv = CompConv(cin, cout, **kwargs).eval()
    if conv.bias is not None:
        torch.nn.init.normal_(conv.bias)
    bn = random_bn(cout)
    x = torch.randn(2, cin, 9, 9)
    with torch.no_grad():
        expected = bn(conv(x))
        assert conv.absorb_bn(bn)
        y = conv(x)
    assert conv.bias is None and conv.part_scale is not None
    scale = expected.abs().max()
    assert (y - expected).abs().max() <= 1e-5 * scale
    assert not conv.absorb_bn(bn)  # only once


def test_prepared_resnet_with_compconv_matches():
    import leanconv
    from leanconv.inference import max_abs_diff

    torch.manual_seed(0)
    model = leanconv.create_model("resnet20", conv="compconv", num_classes=10)
    randomize_bns(model)
    model.eval()
    fast = leanconv.prepare_for_inference(model)
    n_absorbed = sum(m.part_scale is not None for m in fast.modules() if isinstance(m, CompConv))
    assert n_absorbed == sum(isinstance(m, CompConv) for m in model.modules()) > 0
    x = torch.randn(2, 3, 32, 32)
    assert max_abs_diff(model, fast, x, relative=True) < 1e-5
