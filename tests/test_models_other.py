"""VGG, DenseNet, MobileNetV2 and ShuffleNetV2 with every conv type; pinned counts."""

import pytest
import torch

import leanconv
from leanconv import available_convs, create_model, profile

# (builder, extra kwargs, input size): small inputs to stay fast.
FAMILIES = [
    ("vgg16", {}, 32),
    ("vgg15", {}, 32),
    ("densenet121", {}, 8),
    ("mobilenet_v2", {"stem": "cifar"}, 8),
    ("shufflenet_v2_x1_0", {"stem": "cifar"}, 8),
]

@pytest.mark.parametrize("conv", available_convs())
@pytest.mark.parametrize(("name", "kwargs", "size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_forward_backward(name, kwargs, size, conv):
    model = create_model(name, conv=conv, num_classes=7, **kwargs)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x1_0"])
@pytest.mark.parametrize("conv", ["vanilla", "slimconv"])
def test_imagenet_stem(name, conv):
    model = create_model(name, conv=conv, num_classes=5).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_in_channels():
    model = create_model("vgg16", num_classes=10, in_channels=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def _count(name, conv="vanilla", size=32, **kwargs):
    with torch.device("meta"):
        model = create_model(name, conv=conv, **kwargs)
    report = profile(model, size)
    return report.params, report.macs


def test_pinned_counts():
    # CompConv Tab. 3 VGG-16 14.7M / 314M
    assert _count("vgg16", num_classes=10) == (14_724_042, 313_201_664)
    # SPConv Tab. 1 SPConv-VGG alpha=1/2: 5.6M (exact with the 512-wide 2-FC head)
    assert _count("vgg15", "spconv", num_classes=10, split_ratio=0.5)[0] == 5_607_114
    # SCConv Tab. 2 DenseNet-121 7.05M / 898M
    assert _count("densenet121", num_classes=10) == (6_956_298, 888_350_720)
    # SlimConv Tab. 3: MobileNetV2 3.51M, Sc-MobileNetV2 (k=8/3, r=24, L=6) 3.38M
    assert _count("mobilenet_v2", size=224, num_classes=1000) == (3_504_872, 300_774_272)
    assert _count("mobilenet_v2", "slimconv", size=224, num_classes=1000, compression_ratio="8/3",
                  se_reduction=24, se_min_channels=6)[0] == 3_381_052
    # SlimConv Tab. 8 (CIFAR-100): 2.41M and Sc 2.19M
    assert _count("mobilenet_v2", num_classes=100, stem="cifar")[0] == 2_412_212
    assert _count("mobilenet_v2", "slimconv", num_classes=100, stem="cifar")[0] == 2_193_318
    # SlimConv Tab. 3: ShuffleNetV2 2.28M / 0.151G, Sc 2.25M / 0.147G
    assert _count("shufflenet_v2_x1_0", size=224, num_classes=1000) == (2_278_604, 144_907_992)
    assert _count("shufflenet_v2_x1_0", "slimconv", size=224, num_classes=1000) == (
        2_254_580, 142_436_960)


def test_torchvision_layout():
    torchvision = pytest.importorskip("torchvision")
    for name in ("mobilenet_v2", "shufflenet_v2_x1_0"):
        ours = create_model(name, num_classes=1000).state_dict()
        ref = getattr(torchvision.models, name)().state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_registered():
    for name in ("vgg16", "vgg15", "densenet121", "mobilenet_v2", "shufflenet_v2_x1_0"):
        assert name in leanconv.available_models()
