"""convert_convs on torchvision and timm CNNs: every conv type converts, runs, shrinks and trains.

Models are built without weights (nothing is downloaded), with 10 classes, at 64x64, batch 2.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanconv
from leanconv import convert_convs
from leanconv.layers import conv_class

tv = pytest.importorskip("torchvision").models
timm = pytest.importorskip("timm")

# Every registered type but vanilla (a plain conv again: nothing falls).
CONVS = [c for c in leanconv.available_convs() if c != "vanilla"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def same_width_3x3(name, m):
    # SlimConv keeps a layer's width only at k = 1 and C_in == C_out.
    return m.kernel_size == (3, 3) and m.groups == 1 and m.in_channels == m.out_channels > 4


# model -> (builder, convs the default predicate replaces)
REPLACING = {
    "resnet18": (lambda: tv.resnet18(num_classes=10), 16),
    "resnet50": (lambda: tv.resnet50(num_classes=10), 16),
    "vgg16_bn": (lambda: tv.vgg16_bn(num_classes=10), 12),
    "densenet121": (lambda: tv.densenet121(num_classes=10), 58),
    # zero_init_last=False: timm zeroes each block's last BN, so nothing before it would learn
    # in a single step
    "timm_resnet26d": (lambda: timm.create_model("resnet26d", pretrained=False, num_classes=10,
                                                 zero_init_last=False), 10),
}
# SlimConv gives C_in / k channels. Bottlenecks absorb that (the 1x1 after it is rewired, the
# paper's Fig. 3); a basic block's residual add and VGG's flatten do not, so there only the
# C_in == C_out layers are replaced at k = 1; DenseNet concatenates every 3x3 output (no case).
SLIMCONV = {
    "resnet18": ({"compression_ratio": 1}, same_width_3x3, 13),
    "resnet50": ({}, None, 16),
    "vgg16_bn": ({"compression_ratio": 1}, same_width_3x3, 9),
    "timm_resnet26d": ({}, None, 10),
}
# model -> (builder, why the default predicate keeps each conv: nothing is replaced)
NOTHING_TO_REPLACE = {
    "resnext50_32x4d": (tv.resnext50_32x4d, {"stem": 1, "1x1 (pointwise)": 36,
                                             "grouped / depthwise (groups > 1)": 16}),
    "mobilenet_v2": (tv.mobilenet_v2, {"stem": 1, "1x1 (pointwise)": 34,
                                       "grouped / depthwise (groups > 1)": 17}),
    "shufflenet_v2_x1_0": (tv.shufflenet_v2_x1_0, {"stem": 1, "1x1 (pointwise)": 36,
                                                   "grouped / depthwise (groups > 1)": 19}),
    # 4x4/4 stem, 7x7 depthwise convs, 2x2/2 downsampling convs (even: no same padding)
    "convnext_tiny": (tv.convnext_tiny, {"stem": 1, "grouped / depthwise (groups > 1)": 18,
                                         "even kernel": 3}),
}


def reasons(report):
    return {reason.split(":")[0]: len(items) for (_, reason), items in report.by_reason().items()}


@pytest.mark.parametrize("model_name, conv", [
    (model, conv) for model in REPLACING for conv in CONVS
    if conv != "slimconv" or model in SLIMCONV])
def test_convert_forward_and_one_training_step(model_name, conv):
    build, replaced = REPLACING[model_name]
    hparams, predicate = {}, None
    if conv == "slimconv":
        hparams, predicate, replaced = SLIMCONV[model_name]
    model = build()
    before = n_params(model)
    report = convert_convs(model, conv, predicate, dry_run=True, **hparams)
    assert report.ok and [d.action for d in report.decisions].count("replace") == replaced
    convert_convs(model, conv, predicate, **hparams)
    new = [m for m in model.modules() if isinstance(m, conv_class(conv))]
    assert len(new) == replaced
    assert n_params(model) == report.params_after
    if conv == "sru":  # the SRU keeps the k x k conv and adds its GroupNorm's 2 C_in affine
        assert n_params(model) - before == sum(2 * m.in_channels for m in new)
    else:
        assert n_params(model) < before

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    loss = F.cross_entropy(out, torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    for m in new:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    weight = next(new[0].parameters())
    old = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight, old)


@pytest.mark.parametrize("model_name", list(NOTHING_TO_REPLACE))
def test_models_the_default_predicate_leaves_alone(model_name):
    build, kept = NOTHING_TO_REPLACE[model_name]
    with torch.device("meta"):
        model = build(num_classes=10)
    for conv in CONVS:
        report = convert_convs(model, conv, dry_run=True)
        assert report.ok and reasons(report) == kept
        assert report.params_after == report.params_before == n_params(model)
    convert_convs(model, "scconv")
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))


def test_slimconv_width_changes_on_torchvision_models():
    with torch.device("meta"):
        resnet50 = tv.resnet50()
        ours = leanconv.create_model("resnet50", conv="slimconv", num_classes=1000)
        resnet18, densenet = tv.resnet18(), tv.densenet121()
    # Bottlenecks: k = 4/3 narrows each 3x3 to 3C/4 and conv3 reads it. This is leanconv's own
    # SlimConv ResNet-50 (the paper's 16.76M) plus the host bn2 it drops and torchvision keeps.
    report = convert_convs(resnet50, "slimconv", dry_run=True, input_size=224)
    assert report.ok and report.decisions[2].detail == (
        "48 channels; rewired: layer1.0.bn2, layer1.0.conv3")
    kept_bn2 = 2 * (48 * 3 + 96 * 4 + 192 * 6 + 384 * 3)
    assert report.params_after == n_params(ours) + kept_bn2 == 16_764_404
    assert report.macs_after == leanconv.profile(ours, 224).macs
    # A basic block adds the narrowed output to its input; DenseNet concatenates it.
    with pytest.raises(ValueError, match=r"^layer1\.0\.conv2: cannot replace it with slimconv: "
                       r"the replacement gives 36 channels where the layer gave 64, and its "
                       r"output reaches \+ in layer1\.0 \(BasicBlock\), which needs 64"):
        convert_convs(resnet18, "slimconv")
    with pytest.raises(ValueError, match=r"^features\.denseblock1\.denselayer1\.conv2: .* "
                       r"reaches torch\.cat in features\.denseblock1\.denselayer2 \(_DenseLayer\)"):
        convert_convs(densenet, "slimconv")


@pytest.mark.parametrize("model_name, conv", [("resnet50", "slimconv"),
                                              ("timm_resnet26d", "scconv")])
def test_a_state_dict_loads_into_the_same_conversion(model_name, conv):
    build, _ = REPLACING[model_name]
    first, second = convert_convs(build(), conv), convert_convs(build(), conv)
    saved, fresh = first.state_dict(), second.state_dict()
    assert list(saved) == list(fresh)
    assert all(saved[k].shape == fresh[k].shape for k in saved)
    assert not all(torch.equal(saved[k], fresh[k]) for k in saved)  # two random inits
    second.load_state_dict(saved, strict=True)
    x = torch.randn(2, 3, 64, 64)
    first.eval(), second.eval()
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    with pytest.raises(RuntimeError):  # the unconverted model's state does not fit
        second.load_state_dict(build().state_dict())
