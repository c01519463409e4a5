"""GhostConv: structure (GhostNet Eq. 2-3), parameter counts, the Ghost-ResNet-50 target count,
equivalence with the reference compute-then-truncate formulation, and argument validation."""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import randomize_bns
from leanconv.layers import GhostConv, create_conv


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cin,cout,k,s,d", [
    (16, 32, 3, 2, 3), (64, 64, 1, 2, 3), (32, 33, 3, 2, 3), (16, 30, 3, 3, 3), (16, 32, 5, 4, 5),
    (16, 31, 3, 3, 3), (8, 2, 3, 2, 1),
])
def test_param_count(cin, cout, k, s, d):
    conv = GhostConv(cin, cout, k, ratio=s, dw_kernel_size=d)
    m = math.ceil(cout / s)
    ghost_filters = math.ceil((cout - m) / (s - 1)) * (s - 1)  # = cout - m when s - 1 divides it
    assert conv.intrinsic_channels == m
    assert n_params(conv) == k * k * cin * m + d * d * ghost_filters
    assert n_params(GhostConv(cin, cout, k, ratio=s, dw_kernel_size=d, bias=True)) == (
        n_params(conv) + cout)


def test_ratio_two_halves_a_conv():
    # s = 2, even width: k*k*C*C/2 + d*d*C/2, the compression ratio ~ s of GhostNet Eq. 5.
    conv = GhostConv(64, 64)
    assert n_params(conv) == 9 * 64 * 32 + 9 * 32 == 18_720
    vanilla = n_params(nn.Conv2d(64, 64, 3, bias=False))
    assert vanilla / n_params(conv) == pytest.approx(1.97, abs=0.01)


@pytest.mark.parametrize("cout,s", [(32, 2), (33, 2), (30, 3), (31, 3), (17, 4)])
def test_structure_identity_then_ghosts(cout, s):
    conv = GhostConv(8, cout, ratio=s, dilation=2).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        y = conv(x)
        intrinsic = conv.primary(x)
        m = conv.intrinsic_channels
        torch.testing.assert_close(y[:, :m], intrinsic)             # Eq. 2, the identity map
        # Eq. 3: ghost j of intrinsic map i is a depthwise conv of map i alone.
        w = conv.cheap.weight
        for j in range(cout - m):
            i = j // (s - 1)
            ghost = nn.functional.conv2d(intrinsic[:, i:i + 1], w[j:j + 1], padding=2, dilation=2)
            torch.testing.assert_close(y[:, m + j:m + j + 1], ghost, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cout,s", [(32, 2), (33, 2), (31, 3), (17, 4)])
def test_equals_reference_compute_then_truncate(cout, s):
    # The reference GhostModule makes m*(s-1) ghosts from all m intrinsic maps and slices the
    # concatenation to out_channels; we skip the ghosts it throws away.
    conv = GhostConv(8, cout, ratio=s, stride=2).eval()
    m = conv.intrinsic_channels
    full = nn.Conv2d(m, m * (s - 1), 3, padding=1, groups=m, bias=False)
    with torch.no_grad():
        full.weight[: conv.cheap.out_channels] = conv.cheap.weight
        x = torch.randn(2, 8, 11, 11)
        intrinsic = conv.primary(x)
        reference = torch.cat([intrinsic, full(intrinsic)], 1)[:, :cout]
        torch.testing.assert_close(conv(x), reference)


def _ghost_resnet50_counts():
    """ResNet-50 (224x224) with every conv but the 7x7 stem a GhostConv (s=2, d=3), host BNs kept.

    Returns (parameters, MACs); MACs are measured with FlopCounterMode (FLOPs / 2) per module.
    """
    params = 3 * 64 * 49 + 2 * 64 + 2048 * 1000 + 1000
    macs = 3 * 64 * 49 * 112 * 112 + 2048 * 1000

    def add(cin, cout, k, stride, size):
        nonlocal params, macs
        conv = GhostConv(cin, cout, k, stride, device="meta")  # shapes only, no compute
        params += n_params(conv) + 2 * cout  # + the host BN
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            conv(torch.zeros(1, cin, size, size, device="meta"))
        macs += counter.get_total_flops() // 2

    inplanes, size = 64, 56
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        add(inplanes, width, 1, 1, size)                # conv1
        add(width, width, 3, stride, size)              # conv2 (strided)
        add(inplanes, 4 * width, 1, stride, size)       # downsample projection
        size //= stride
        add(width, 4 * width, 1, 1, size)               # conv3
        for _ in range(blocks - 1):
            add(4 * width, width, 1, 1, size)
            add(width, width, 3, 1, size)
            add(width, 4 * width, 1, 1, size)
        inplanes = 4 * width
    return params, macs


def test_ghost_resnet50_matches_published_count():
    # SlimConv README / SCConv Table 3: Ghost-ResNet-50 (s=2) 13.95M params, 2.15 GMACs.
    params, macs = _ghost_resnet50_counts()
    assert params == 13_953_512
    assert round(params / 1e6, 2) == 13.95
    assert round(macs / 1e9, 2) == 2.15


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [1, 7, 8])
def test_any_widths_and_sizes(stride, size):
    for cin, cout, k in [(3, 2, 3), (16, 7, 1), (5, 64, 5)]:
        conv = create_conv("ghost", cin, cout, k, stride)
        out = -(-size // stride)
        assert conv(torch.randn(1, cin, size, size)).shape == (1, cout, out, out)


def test_dilation_reaches_both_convs():
    conv = GhostConv(8, 16, 5, dilation=3, dw_kernel_size=3)
    assert conv.primary.dilation == (3, 3) and conv.primary.padding == (6, 6)
    assert conv.cheap.dilation == (3, 3) and conv.cheap.padding == (3, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1), "ratio"),
    (dict(ratio=0), "ratio"),
    (dict(ratio=2.5), "ratio"),
    (dict(dw_kernel_size=2), "dw_kernel_size"),
    (dict(dw_kernel_size=0), "dw_kernel_size"),
    (dict(out_channels=1), "out_channels=1"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(padding=5), "padding"),
])
def test_invalid_configs_raise(kwargs, match):
    args = dict(in_channels=16, out_channels=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GhostConv(**args)


# ---------------------------------------------------------------- BN absorption (issue 6)
@pytest.mark.parametrize("cin,cout,kwargs", [
    (16, 16, dict()),
    (16, 32, dict(stride=2, bias=True)),
    (8, 17, dict(ratio=3, dw_kernel_size=5)),   # truncation: discarded ghosts, odd widths
    (16, 24, dict(ratio=4, dilation=2)),
])
def test_absorb_bn_is_exact(cin, cout, kwargs):
    torch.manual_seed(0)
    conv = GhostConv(cin, cout, **kwargs).eval()
    if conv.bias is not None:
        torch.nn.init.normal_(conv.bias)
    bn = torch.nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.weight[0] = 0.0  # zero-initialised residual BNs have scale 0: still exact
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, cin, 9, 9)
    with torch.no_grad():
        expected = bn(conv(x))
        assert conv.absorb_bn(bn)
        y = conv(x)
    assert conv.bias is None and conv.cheap.bias is not None
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not conv.absorb_bn(bn)


def test_prepared_resnet_with_ghost_matches():
    import leanconv
    from leanconv.inference import max_abs_diff

    torch.manual_seed(0)
    model = leanconv.create_model("resnet20", conv="ghost", num_classes=10)
    randomize_bns(model)
    model.eval()
    fast = leanconv.prepare_for_inference(model)
    ghosts = [m for m in fast.modules() if isinstance(m, GhostConv)]
    assert ghosts and all(m.intrinsic_scale is not None for m in ghosts)
    x = torch.randn(2, 3, 32, 32)
    assert max_abs_diff(model, fast, x, relative=True) < 1e-5


def test_no_slice_when_every_intrinsic_map_feeds_a_ghost():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    conv, x = GhostConv(16, 16), torch.randn(1, 16, 8, 8)
    with torch.no_grad(), Ops() as ops:
        conv(x)
    assert sorted(ops.names) == ["cat", "convolution", "convolution"]
