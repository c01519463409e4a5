"""Train detectors or segmenters with vanilla and leanconv backbones on generated shapes.

Faster R-CNN / RetinaNet (COCO box mAP) or DeepLabV3 (mIoU): torchvision's heads on a zoo ResNet
built with each conv type (:mod:`leanconv.detection`, :mod:`leanconv.segmentation`), trained from
scratch (nothing pretrained, nothing downloaded) on :class:`leanconv.shapes.ShapesDataset` for a
fixed number of steps, then scored on its test split by torchmetrics
(:func:`leanconv.shapes.detection_metric`, :func:`leanconv.shapes.segmentation_metric`):

    python examples/detection.py --model fasterrcnn --convs vanilla,spconv,scconv --out results
    python examples/detection.py --model deeplabv3 --convs vanilla,scconv --size 64 --steps 200

Every conv type trains with the same seed, the same batches and the same schedule. Prints a
markdown table; with ``--out DIR`` also writes ``DIR/<model>.md``, ``DIR/<model>.json`` and
``DIR/<model>.png`` (the first test images: ground truth, then each conv's predictions).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import leanconv
from leanconv.detection import fasterrcnn, retinanet
from leanconv.segmentation import deeplabv3
from leanconv.shapes import CLASSES, ShapesDataset, collate, detection_metric, segmentation_metric

BUILDERS = {"fasterrcnn": fasterrcnn, "retinanet": retinanet, "deeplabv3": deeplabv3}
# Half torchvision's anchor sizes per FPN level: the shapes span 15-50 % of the image side
# (14-48 px at the default 96), smaller than most of torchvision's 32-512 pixel anchors.
ANCHOR_BASES = (16, 32, 64, 128, 256)
# Faster R-CNN proposal and sampling budgets turned down from torchvision's (2000 / 1000
# proposals, 512 RoIs per image to the box head) for images with at most three objects: the box
# head's 12544 -> 1024 layer on 512 RoIs per image would cost more than the ResNet-18.
SMALL_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                  rpn_batch_size_per_image=64, box_batch_size_per_image=32)
SHOW_SCORE = 0.5  # predicted boxes drawn in the picture
COLOURS = ("white", "tab:red", "tab:green", "tab:blue")  # per class of CLASSES


def build(args, conv: str) -> torch.nn.Module:
    if args.model == "deeplabv3":
        return deeplabv3(args.backbone, conv=conv, num_classes=len(CLASSES))
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    ratios = ((0.5, 1.0, 2.0),) * len(ANCHOR_BASES)
    if args.model == "fasterrcnn":
        anchors = AnchorGenerator(tuple((b,) for b in ANCHOR_BASES), ratios)
        extra = dict(rpn_anchor_generator=anchors, **SMALL_RCNN)
    else:  # RetinaNet: three scales per level, as torchvision's default anchors
        sizes = tuple((b, round(b * 2 ** (1 / 3)), round(b * 2 ** (2 / 3))) for b in ANCHOR_BASES)
        extra = dict(anchor_generator=AnchorGenerator(sizes, ratios))
    return BUILDERS[args.model](args.backbone, conv=conv, num_classes=len(CLASSES),
                                min_size=args.size, max_size=args.size, **extra)


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The ResNet trunk of a detector (``backbone.body``, without FPN) or of DeepLabV3."""
    return model.backbone.body if hasattr(model.backbone, "body") else model.backbone


def loss_of(model, model_name: str, images, targets) -> torch.Tensor:
    if model_name == "deeplabv3":
        out = model(torch.stack(images))["out"]
        return F.cross_entropy(out, torch.stack([t["mask"] for t in targets]))
    boxes_only = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    return sum(model(images, boxes_only).values())


@torch.no_grad()
def evaluate(model, model_name: str, data, desc: str) -> tuple[dict, list]:
    """Metrics over the test split, and the predictions of its first batch (for the picture)."""
    model.eval()
    segment = model_name == "deeplabv3"
    metric = segmentation_metric() if segment else detection_metric()
    shown = None
    for images, targets in tqdm(data, desc=desc, unit="batch", leave=False):
        if segment:
            pred = model(torch.stack(images))["out"].argmax(1)
            metric.update(pred, torch.stack([t["mask"] for t in targets]))
        else:
            pred = model(images)
            metric.update(pred, targets)
        shown = pred if shown is None else shown
    if segment:
        return {"mIoU": float(metric.compute())}, list(shown)
    result = metric.compute()
    return {"mAP": float(result["map"]), "AP50": float(result["map_50"])}, shown


def train_and_score(args, conv: str, train_data, test_data) -> tuple[dict, list]:
    torch.manual_seed(args.seed)  # same initial-weight stream for every conv type
    model = build(args, conv)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    bar = tqdm(total=args.steps, desc=f"{conv:>9} train", unit="step")
    start, step = time.perf_counter(), 0
    while step < args.steps:
        for images, targets in train_data:
            model.train()
            loss = loss_of(model, args.model, images, targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)  # early from-scratch steps can spike
            opt.step()
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == args.steps:
                break
    bar.close()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics, shown = evaluate(model, args.model, test_data, f"{conv:>9} test")
    tqdm.write(f"{conv}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in metrics.items())
               + f", trained in {train_seconds:.0f} s")
    return {"conv": conv, "backbone_params": sum(q.numel() for q in trunk(model).parameters()),
            "params": sum(q.numel() for q in model.parameters()), **metrics,
            "train_seconds": round(train_seconds, 1),
            "test_seconds": round(time.perf_counter() - start, 1)}, shown


def markdown(args, runs: list[dict]) -> str:
    metrics = [k for k in runs[0] if k in ("mAP", "AP50", "mIoU")]
    names = {"mAP": "mAP@[.5:.95] %", "AP50": "AP50 %", "mIoU": "mIoU %"}
    lines = [f"{args.model}, {args.backbone} backbone from scratch, {args.size}x{args.size} "
             f"shapes, {args.steps} steps of batch {args.batch_size}, {args.test_images} test "
             f"images, seed {args.seed}; {args.threads} thread(s), "
             f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}", "",
             "| conv | backbone params M | " + " | ".join(names[m] for m in metrics)
             + " | train s |",
             "|---|---:|" + "---:|" * len(metrics) + "---:|"]
    for r in runs:
        lines.append(f"| {r['conv']} | {r['backbone_params'] / 1e6:.2f} | "
                     + " | ".join(f"{100 * r[m]:.1f}" for m in metrics)
                     + f" | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def picture(path: Path, model_name: str, test_set, shown: dict[str, list], count: int) -> None:
    """Columns: the first test images. Detection rows: ground-truth boxes, then each conv's
    boxes scoring >= SHOW_SCORE, drawn on the image. Segmentation rows: the image, the true
    class map, then each conv's predicted class map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from PIL import Image  # a matplotlib dependency

    segment = model_name == "deeplabv3"
    rows = {**({"image": None} if segment else {}), "truth": None, **shown}
    fig, axes = plt.subplots(len(rows), count, figsize=(1.5 * count, 1.5 * len(rows) + 0.3),
                             squeeze=False)
    for row, (name, preds) in zip(axes, rows.items(), strict=True):
        row[0].set_ylabel(name)
        for i, ax in enumerate(row):
            image, target = test_set[i]
            ax.set_xticks([])
            ax.set_yticks([])
            if segment and name != "image":
                mask = target["mask"] if preds is None else preds[i]
                ax.imshow(mask.numpy(), cmap=ListedColormap(COLOURS), vmin=0,
                          vmax=len(CLASSES) - 1, interpolation="nearest")
                continue
            ax.imshow(image.permute(1, 2, 0).numpy())
            if segment:
                continue
            found = target if preds is None else preds[i]
            keep = (torch.ones(len(found["labels"]), dtype=torch.bool) if preds is None
                    else found["scores"] >= SHOW_SCORE)
            for (x1, y1, x2, y2), label in zip(found["boxes"][keep].tolist(),
                                               found["labels"][keep].tolist(), strict=True):
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5,
                                           edgecolor=COLOURS[label]))
    legend = ", ".join(f"{c[4:]} {n}" for c, n in zip(COLOURS[1:], CLASSES[1:], strict=True))
    fig.suptitle(f"{model_name}: {legend}", fontsize=8)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # The noisy backgrounds make a true-colour PNG about 300 kB; 128 colours keep it near 100 kB.
    Image.open(buffer).convert("RGB").quantize(colors=128).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(BUILDERS), default="fasterrcnn")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--convs", default="vanilla,spconv,scconv",
                   help="comma-separated conv types, trained one after the other")
    p.add_argument("--size", type=int, default=96, help="image size (default 96)")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=4, help="test images in the picture")
    p.add_argument("--out", type=Path, default=None, help="directory for .md, .json, .png")
    args = p.parse_args()
    convs = args.convs.split(",")
    unknown = sorted(set(convs) - set(leanconv.available_convs()))
    if unknown:
        p.error(f"unknown conv type(s) {', '.join(unknown)}; "
                f"available: {', '.join(leanconv.available_convs())}")
    torch.set_num_threads(args.threads)

    train_set = ShapesDataset(args.train_images, args.size, seed=args.seed)
    test_set = ShapesDataset(args.test_images, args.size, split="test", seed=args.seed)
    runs, shown = [], {}
    for conv in convs:
        # A fresh loader generator per conv: every conv sees the same batches in the same order.
        train_data = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
            drop_last=True, generator=torch.Generator().manual_seed(args.seed))
        test_data = torch.utils.data.DataLoader(test_set, batch_size=max(args.batch_size,
                                                                         args.show),
                                                collate_fn=collate)
        run, shown[conv] = train_and_score(args, conv, train_data, test_data)
        runs.append(run)
    table = markdown(args, runs)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.model}.md").write_text(table)
        setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.out / f"{args.model}.json").write_text(json.dumps(
            {**setup, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "torch": torch.__version__, "machine": platform.machine(), "runs": runs},
            indent=2) + "\n")
        picture(args.out / f"{args.model}.png", args.model, test_set, shown,
                min(args.show, args.test_images))
        print(f"wrote {args.out}/{args.model}.md, .json and .png")


if __name__ == "__main__":
    main()
