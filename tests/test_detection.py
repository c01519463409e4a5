"""leanconv.detection / leanconv.segmentation: torchvision heads on leanconv ResNet backbones."""

import math

import pytest
import torch
import torch.nn.functional as F

import leanconv

pytest.importorskip("torchvision")
from leanconv.detection import fasterrcnn, retinanet
from leanconv.layers.ghost import GhostConv
from leanconv.segmentation import check_dilation, deeplabv3

SIZE = 64  # images and the detectors' resize target: tiny, so a step takes about a second
DETECTOR = dict(min_size=SIZE, max_size=SIZE)
# Faster R-CNN's own knobs, turned down for 64x64 images (2.5x faster steps).
SMALL_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                  rpn_batch_size_per_image=64, box_batch_size_per_image=64)


def images(n=2):
    return [torch.rand(3, SIZE, SIZE) for _ in range(n)]


def targets(n=2):
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
             "labels": torch.tensor([1, 2])} for _ in range(n)]


def train_step(model, batch, target, opt):
    losses = model(batch, target)
    loss = sum(losses.values()) if isinstance(losses, dict) else losses
    opt.zero_grad()
    loss.backward()
    opt.step()
    return losses, loss.item()


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                           momentum=0.9)


@pytest.mark.parametrize("conv", leanconv.available_convs())
@pytest.mark.parametrize("builder, loss_names", [
    (fasterrcnn, {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}),
    (retinanet, {"classification", "bbox_regression"}),
])
def test_detector_trains_a_step_and_predicts(builder, loss_names, conv):
    extra = SMALL_RCNN if builder is fasterrcnn else {}
    model = builder("resnet18", conv=conv, num_classes=3, **DETECTOR, **extra)
    # The backbone really is the leanconv ResNet with this conv type, inside torchvision's FPN.
    body = model.backbone.body
    assert type(body["layer1"][0]).__module__ == "leanconv.models.resnet"
    if conv != "vanilla":
        assert any(getattr(m, "conv_name", None) == conv for m in body.modules())
    assert model.backbone.out_channels == 256
    losses, total = train_step(model.train(), images(), targets(), sgd(model))
    assert set(losses) == loss_names and math.isfinite(total) and total > 0
    model.eval()
    with torch.no_grad():
        out = model(images(3))
    assert len(out) == 3
    for det in out:
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == det["labels"].shape == (n,)
        if n:
            assert det["labels"].min() >= 1 if builder is fasterrcnn else det["labels"].min() >= 0
            assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
            assert det["boxes"].max() <= SIZE


@pytest.mark.parametrize("conv", leanconv.available_convs())
def test_deeplabv3_dilated_trains_a_step_and_predicts(conv):
    model = deeplabv3("resnet18", conv=conv, num_classes=4, aux=True)
    # Output stride 8: layer3 and layer4 dilated, not strided.
    feats = model.backbone(torch.rand(1, 3, SIZE, SIZE))
    assert feats["out"].shape == (1, 512, SIZE // 8, SIZE // 8)
    assert feats["aux"].shape == (1, 256, SIZE // 8, SIZE // 8)
    dilations = {getattr(m, "dilation", None) for m in model.backbone["layer4"][1].modules()}
    assert 4 in dilations or (4, 4) in dilations
    x, y = torch.rand(2, 3, SIZE, SIZE), torch.randint(0, 4, (2, SIZE, SIZE))
    opt = sgd(model)
    losses = []
    for _ in range(3):  # same batch: the loss must fall
        out = model.train()(x)
        loss = F.cross_entropy(out["out"], y) + 0.5 * F.cross_entropy(out["aux"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    with torch.no_grad():
        pred = model.eval()(torch.rand(1, 3, SIZE + 8, SIZE))
    assert pred["out"].shape == (1, 4, SIZE + 8, SIZE) and pred["aux"].shape == pred["out"].shape


def test_retinanet_loss_falls_on_a_repeated_batch():
    model = retinanet("resnet18", conv="scconv", num_classes=3, **DETECTOR).train()
    batch, target, opt = images(), targets(), sgd(model)
    totals = [train_step(model, batch, target, opt)[1] for _ in range(3)]
    assert totals[-1] < totals[0]


def test_resnet50_backbone_channels_and_output_stride_16():
    det = fasterrcnn("resnet50", conv="spconv", num_classes=2, split_ratio=0.5, **DETECTOR)
    assert [b[0].in_channels for b in det.backbone.fpn.inner_blocks] == [256, 512, 1024, 2048]
    assert det.backbone.body["layer2"][0].conv2.split_ratio == 0.5
    seg = deeplabv3("resnet50", conv="compconv", num_classes=3, output_stride=16)
    out = seg.backbone(torch.rand(1, 3, SIZE, SIZE))["out"]
    assert out.shape == (1, 2048, SIZE // 16, SIZE // 16)


def test_conv_that_does_not_dilate_is_named():
    body = leanconv.create_model("resnet18", conv="ghost",
                                 replace_stride_with_dilation=[False, True, True])
    check_dilation(body, [False, True, True])  # honoured: no error
    body.layer4[1].conv2.dilation = 1  # pretend this module ignored the dilation it was given
    with pytest.raises(ValueError, match=r"GhostConv at layer4\.1\.conv2 runs with dilation 1"):
        check_dilation(body, [False, True, True])


def test_conv_that_refuses_dilation_is_named(monkeypatch):
    original = GhostConv.__init__

    def refuse(self, *args, dilation=1, **kwargs):
        if dilation != 1:
            raise ValueError(f"dilation must be 1 for this module, got {dilation}")
        original(self, *args, dilation=dilation, **kwargs)

    monkeypatch.setattr(GhostConv, "__init__", refuse)
    with pytest.raises(ValueError, match="conv 'ghost' cannot be dilated as output stride 8"):
        deeplabv3("resnet18", conv="ghost", num_classes=3)


@pytest.mark.parametrize("call, match", [
    (lambda: fasterrcnn("vgg16", conv="vanilla"), "backbone must be a zoo ResNet"),
    (lambda: fasterrcnn("resnet18", conv="nope"), "unknown conv 'nope'"),
    (lambda: fasterrcnn("resnet18", conv="spconv", flipping="none"),
     "does not take flipping; conv hyperparameters: "),
    (lambda: retinanet("resnet18", num_classes=0), "num_classes must be an integer >= 1"),
    (lambda: fasterrcnn("resnet18", trainable_layers=6), "trainable_layers must be"),
    (lambda: deeplabv3("resnet18", output_stride=4), "output_stride must be one of 8, 16, 32"),
    (lambda: deeplabv3("resnet18", conv="spconv", groups=2), "does not take groups"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
