"""Train a detector or a segmenter with a leanconv backbone on the generated shapes data set.

Faster R-CNN / RetinaNet (box AP at IoU 0.5) or DeepLabV3 (mIoU), torchvision's heads on a zoo
ResNet with any conv type (:mod:`leanconv.detection`, :mod:`leanconv.segmentation`), trained
from scratch (nothing pretrained, nothing downloaded) on :class:`leanconv.shapes.ShapesDataset`
for a fixed number of steps, then scored on its test split:

    python examples/detection.py --model retinanet --conv scconv --steps 150
    python examples/detection.py --model deeplabv3 --conv spconv --steps 100 --size 64
    python examples/detection.py --model fasterrcnn --conv vanilla --backbone resnet50

Prints one line per ``--log-every`` steps and the final metric.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import leanconv
from leanconv.detection import fasterrcnn, retinanet
from leanconv.segmentation import deeplabv3
from leanconv.shapes import ShapesDataset, box_ap50, collate, mean_iou

BUILDERS = {"fasterrcnn": fasterrcnn, "retinanet": retinanet, "deeplabv3": deeplabv3}


def build(args) -> torch.nn.Module:
    if args.model == "deeplabv3":
        return deeplabv3(args.backbone, conv=args.conv, num_classes=4)
    size = dict(min_size=args.size, max_size=args.size)
    return BUILDERS[args.model](args.backbone, conv=args.conv, num_classes=4, **size)


def loss_of(model, model_name: str, images, targets) -> torch.Tensor:
    if model_name == "deeplabv3":
        out = model(torch.stack(images))["out"]
        return F.cross_entropy(out, torch.stack([t["mask"] for t in targets]))
    boxes_only = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    return sum(model(images, boxes_only).values())


@torch.no_grad()
def evaluate(model, model_name: str, data) -> float:
    model.eval()
    if model_name == "deeplabv3":
        scores = []
        for images, targets in data:
            pred = model(torch.stack(images))["out"].argmax(1)
            scores += [mean_iou(p, t["mask"]) for p, t in zip(pred, targets, strict=True)]
        return sum(scores) / len(scores)
    predictions, truth = [], []
    for images, targets in data:
        predictions += model(images)
        truth += targets
    return box_ap50(predictions, truth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(BUILDERS), default="retinanet")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--conv", default="scconv", choices=leanconv.available_convs())
    p.add_argument("--size", type=int, default=96, help="image size (default 96)")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train = torch.utils.data.DataLoader(
        ShapesDataset(args.train_images, args.size, seed=args.seed), batch_size=args.batch_size,
        shuffle=True, collate_fn=collate, drop_last=True)
    test = torch.utils.data.DataLoader(
        ShapesDataset(args.test_images, args.size, split="test", seed=args.seed),
        batch_size=args.batch_size, collate_fn=collate)
    model = build(args)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    step, start, running = 0, time.time(), []
    while step < args.steps:
        for images, targets in train:
            model.train()
            loss = loss_of(model, args.model, images, targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            step += 1
            running.append(loss.item())
            if step % args.log_every == 0 or step == args.steps:
                print(f"step {step}/{args.steps}  loss {sum(running) / len(running):.4f}  "
                      f"{time.time() - start:.0f}s", flush=True)
                running = []
            if step == args.steps:
                break
    metric = evaluate(model, args.model, test)
    name = "mIoU" if args.model == "deeplabv3" else "box AP50"
    print(f"{args.model} {args.backbone} conv={args.conv} size={args.size} steps={args.steps}: "
          f"test {name} {100 * metric:.1f}% ({args.test_images} images, "
          f"{time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
