"""A generated detection / segmentation dataset of coloured shapes, and its metrics.

Nothing is downloaded: image ``i`` of split ``s`` is drawn from a generator seeded with
``(seed, s, i)``, so the data set is the same on every machine. Each image is ``size x size``
RGB, a noisy background with 1 to ``max_objects`` filled shapes of three classes (1 rectangle,
2 ellipse, 3 triangle; 0 is background), random colour, size and place; a later shape may
cover part of an earlier one. Targets follow torchvision's conventions: ``boxes`` (n, 4) in
``x1, y1, x2, y2`` pixels, ``labels`` (n,) int64, and a semantic ``mask`` (H, W) int64 of class
ids (the visible shape at each pixel).

Metrics: :func:`box_ap50` (mean over classes of the VOC-style all-point-interpolated average
precision at IoU 0.5, Everingham et al. 2010, *The PASCAL VOC Challenge*, IJCV) and
:func:`mean_iou` (per-class intersection over union averaged over the classes present).
"""

from __future__ import annotations

import torch

__all__ = ["CLASSES", "ShapesDataset", "box_ap50", "collate", "mean_iou"]

CLASSES = ("background", "rectangle", "ellipse", "triangle")


class ShapesDataset(torch.utils.data.Dataset):
    """``(image float (3, H, W) in [0, 1], {"boxes", "labels", "mask"})`` pairs.

    Args:
        num_images: length of the split.
        size: image height = width (>= 32).
        max_objects: at most this many shapes per image (>= 1).
        split: ``"train"`` or ``"test"`` (different images for the same index).
        seed: changes every image.
    """

    def __init__(self, num_images: int, size: int = 128, max_objects: int = 3,
                 split: str = "train", seed: int = 0) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ValueError(f"size must be an integer >= 32, got {size!r}")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise ValueError(f"max_objects must be an integer >= 1, got {max_objects!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.num_images, self.size, self.max_objects = num_images, size, max_objects
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + (self.split == "test") * 7_919 + index) % 2**63)
        s = self.size
        image = torch.rand(3, 1, 1, generator=g) * 0.5 + torch.rand(3, s, s, generator=g) * 0.1
        mask = torch.zeros(s, s, dtype=torch.int64)
        ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
        n = int(torch.randint(1, self.max_objects + 1, (1,), generator=g))
        labels, regions = [], []
        for _ in range(n):
            label = int(torch.randint(1, 4, (1,), generator=g))
            w, h = (torch.rand(2, generator=g) * 0.35 + 0.15) * s
            x1 = float(torch.rand(1, generator=g)) * (s - float(w))
            y1 = float(torch.rand(1, generator=g)) * (s - float(h))
            region = _shape(label, xs, ys, x1, y1, float(w), float(h))
            colour = torch.rand(3, 1, generator=g) * 0.6 + 0.4
            image[:, region] = colour
            mask[region] = label
            for r in regions:  # covered parts of earlier shapes are not theirs any more
                r &= ~region
            labels.append(label)
            regions.append(region)
        boxes, keep = [], []
        for label, region in zip(labels, regions, strict=True):
            if region.sum() < 16:  # (almost) fully covered: no object to find
                continue
            rows, cols = region.any(1).nonzero(), region.any(0).nonzero()
            boxes.append([float(cols.min()), float(rows.min()), float(cols.max()) + 1,
                          float(rows.max()) + 1])
            keep.append(label)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(keep, dtype=torch.int64), "mask": mask}
        return image.clamp_(0, 1), target


def _shape(label: int, xs, ys, x1: float, y1: float, w: float, h: float) -> torch.Tensor:
    if label == 1:  # rectangle
        return (xs >= x1) & (xs < x1 + w) & (ys >= y1) & (ys < y1 + h)
    if label == 2:  # ellipse inscribed in the box
        cx, cy = x1 + w / 2, y1 + h / 2
        return ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
    # isosceles triangle, apex at the top centre of the box
    t = (ys - y1) / h
    return (t >= 0) & (t <= 1) & ((xs - (x1 + w / 2)).abs() <= t * w / 2)


def collate(batch):
    """A list of images and a list of targets (torchvision's detection input format)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def box_ap50(predictions: list[dict], targets: list[dict], num_classes: int = 4) -> float:
    """Mean over foreground classes (those with ground truth) of the AP at IoU >= 0.5.

    ``predictions``: per image ``{"boxes", "labels", "scores"}``; ``targets``: per image
    ``{"boxes", "labels"}``. Each ground-truth box matches at most one prediction, highest
    score first (VOC protocol, no "difficult" flags).
    """
    aps = []
    for cls in range(1, num_classes):
        n_gt = sum(int((t["labels"] == cls).sum()) for t in targets)
        if n_gt == 0:
            continue
        scored = []  # (score, true positive?)
        for pred, tgt in zip(predictions, targets, strict=True):
            gt = tgt["boxes"][tgt["labels"] == cls]
            sel = pred["labels"] == cls
            boxes, scores = pred["boxes"][sel], pred["scores"][sel]
            order = scores.argsort(descending=True)
            used = torch.zeros(len(gt), dtype=torch.bool)
            ious = _iou(boxes[order], gt) if len(gt) and len(boxes) else None
            for rank, i in enumerate(order.tolist()):
                hit = False
                if ious is not None:
                    iou = ious[rank].masked_fill(used, -1)
                    best = int(iou.argmax())
                    if iou[best] >= 0.5:
                        used[best] = hit = True
                scored.append((float(scores[i]), hit))
        scored.sort(key=lambda p: -p[0])
        tp = torch.tensor([h for _, h in scored], dtype=torch.float64).cumsum(0)
        if len(tp) == 0:
            aps.append(0.0)
            continue
        precision = tp / torch.arange(1, len(tp) + 1, dtype=torch.float64)
        recall = tp / n_gt
        # all-point interpolation: precision made monotone, summed over recall steps
        precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
        steps = torch.cat([recall[:1], recall[1:] - recall[:-1]])
        aps.append(float((precision * steps).sum()))
    return sum(aps) / len(aps) if aps else 0.0


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 4) -> float:
    """Per-class IoU of integer label maps ``pred`` and ``target`` (same shape), averaged over
    the classes present in either."""
    ious = []
    for cls in range(num_classes):
        p, t = pred == cls, target == cls
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return sum(ious) / len(ious) if ious else 0.0
