"""Issue 12's bar for the builders: each trains 20 steps on the generated shapes with every
conv type (the loss falls) and predicts in eval mode. About 5 minutes on 2 cores, so it is
marked ``slow`` (run with ``pytest -m slow``); tests/test_detection.py covers one step each in
the default suite."""

import math

import pytest
import torch
import torch.nn.functional as F

import leanconv

pytest.importorskip("torchvision")
from leanconv.detection import fasterrcnn, retinanet
from leanconv.segmentation import deeplabv3
from leanconv.shapes import ShapesDataset, collate

pytestmark = pytest.mark.slow

SIZE, STEPS, BATCH = 64, 20, 4
SMALL_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                  rpn_batch_size_per_image=64, box_batch_size_per_image=64)
BUILDERS = {
    "fasterrcnn": lambda conv: fasterrcnn("resnet18", conv=conv, num_classes=4, min_size=SIZE,
                                          max_size=SIZE, **SMALL_RCNN),
    "retinanet": lambda conv: retinanet("resnet18", conv=conv, num_classes=4, min_size=SIZE,
                                        max_size=SIZE),
    "deeplabv3": lambda conv: deeplabv3("resnet18", conv=conv, num_classes=4),
}


def loss_of(name, model, images, targets):
    if name == "deeplabv3":
        out = model(torch.stack(images))["out"]
        return F.cross_entropy(out, torch.stack([t["mask"] for t in targets]))
    boxes = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    return sum(model(images, boxes).values())


@pytest.mark.parametrize("conv", leanconv.available_convs())
@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_learns_the_shapes_in_20_steps(name, conv):
    torch.manual_seed(0)
    data = ShapesDataset(STEPS * BATCH, SIZE, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=collate)
    model = BUILDERS[name](conv).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    # examples/detection.py's schedule: one-cycle, a short warm-up (RetinaNet's focal loss
    # jumps under the full rate at step 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=STEPS, pct_start=0.1)
    losses = []
    for images, targets in loader:
        loss = loss_of(name, model, images, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name} {conv}: loss {first:.3f} -> {last:.3f}"
    model.eval()
    images, targets = collate([data[i] for i in range(2)])
    with torch.no_grad():
        out = model(list(images)) if name != "deeplabv3" else model(torch.stack(images))
    if name == "deeplabv3":
        assert out["out"].shape == (2, 4, SIZE, SIZE)
    else:
        assert len(out) == 2 and all(d["boxes"].shape[1:] == (4,) for d in out)
