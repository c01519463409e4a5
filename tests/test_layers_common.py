"""Behaviour every registered conv type promises as a drop-in ``nn.Conv2d`` (one harness)."""

import math

import pytest
import torch
from torch import nn

import leanconv
from leanconv.layers import available_convs, conv_out_channels, create_conv

CONVS = available_convs()


def build(name, in_channels=16, out_channels=32, **kwargs):
    hparams = {k: v for k, v in kwargs.items() if k not in ("stride", "dilation", "kernel_size")}
    width = conv_out_channels(name, in_channels, out_channels, **hparams)
    conv = create_conv(name, in_channels, width, **kwargs)
    return conv, width


def test_registry_names():
    assert CONVS[:8] == [
        "vanilla", "slimconv", "spconv", "sru", "cru", "scconv", "compconv", "ghost",
    ]
    for cls in ("SlimConv", "SPConv", "SRU", "CRU", "SCConv", "CompConv", "GhostConv"):
        assert hasattr(leanconv, cls)


def test_unknown_conv_lists_available():
    with pytest.raises(ValueError, match="available convs: vanilla, slimconv"):
        create_conv("octconv", 16, 16)


def test_unknown_hparam_is_named():
    with pytest.raises(ValueError, match="does not take bogus"):
        create_conv("spconv", 16, 16, bogus=1)


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 15, 16])
def test_shape_matches_conv2d(name, stride, size):
    conv, width = build(name, stride=stride)
    assert conv.out_channels == width
    x = torch.randn(2, 16, size, size)
    y = conv(x)
    expected = math.ceil(size / stride)
    assert y.shape == (2, width, expected, expected)


@pytest.mark.parametrize("name", CONVS)
def test_batch_one_train_and_all_params_get_grad(name):
    conv, _ = build(name, stride=2)
    conv.train()
    x = torch.randn(1, 16, 9, 9, requires_grad=True)
    y = conv(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    missing = [n for n, p in conv.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"{name}: parameters without gradient: {missing}"


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_train_matches_contiguous(name, stride):
    # Trainers and convs may hand channels_last tensors (and gradients) to a module. In float64
    # the two layouts must agree to rounding; a layout bug (a wrong view) shows as a large error.
    conv, _ = build(name, stride=stride)
    conv.train().double()
    x = torch.randn(4, 16, 9, 9, dtype=torch.float64)
    grad = None  # random: a constant gradient would hide a wrongly permuted backward
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.clone().to(memory_format=fmt).requires_grad_(True)
        y = conv(xi)
        grad = torch.randn_like(y) if grad is None else grad
        y.backward(grad.to(memory_format=fmt))
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in conv.parameters()]))
        conv.zero_grad(set_to_none=True)
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx1, gx0, rtol=1e-9, atol=1e-9)
    for a, b in zip(gp1, gp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CONVS)
def test_eval_is_deterministic(name):
    conv, _ = build(name)
    conv.eval()
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), conv(x), rtol=0, atol=0)
        # each sample is independent of the others in eval mode
        torch.testing.assert_close(conv(x[:1]), conv(x)[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONVS)
def test_torch_export(name):
    conv, _ = build(name, stride=2)
    conv.eval()
    x = torch.randn(2, 16, 10, 10)
    program = torch.export.export(conv, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONVS)
def test_dilation_reaches_every_spatial_conv(name):
    conv, width = build(name, dilation=2)
    spatial = [m for m in conv.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert spatial, f"{name} has no k x k conv"
    assert all(m.dilation == (2, 2) and m.padding == (2, 2) for m in spatial)
    assert conv(torch.randn(1, 16, 11, 11)).shape == (1, width, 11, 11)


@pytest.mark.parametrize("name", CONVS)
def test_kernel_size_five(name):
    conv, width = build(name, kernel_size=5, stride=2)
    spatial = [m for m in conv.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert any(m.kernel_size == (5, 5) for m in spatial)
    assert conv(torch.randn(1, 16, 11, 11)).shape == (1, width, 6, 6)


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("bad", [dict(stride=0), dict(kernel_size=4), dict(padding=3)])
def test_bad_conv_args_raise_at_construction(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build(name, **bad)


def test_convert_resnet_like():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    n3x3 = sum(1 for m in model.modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3))
    leanconv.convert_convs(model, "spconv", split_ratio=0.5)
    assert sum(isinstance(m, leanconv.SPConv) for m in model.modules()) == n3x3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
