"""A generated detection / segmentation dataset of coloured shapes, and its metrics.

Nothing is downloaded: image ``i`` of split ``s`` is drawn from a generator seeded with
``(seed, s, i)``, so the data set is the same on every machine. Each image is ``size x size``
RGB, a noisy background with 1 to ``max_objects`` filled shapes of three classes (1 rectangle,
2 ellipse, 3 triangle; 0 is background), random colour, size and place; a later shape may
cover part of an earlier one. Targets follow torchvision's conventions: ``boxes`` (n, 4) in
``x1, y1, x2, y2`` pixels, ``labels`` (n,) int64, and a semantic ``mask`` (H, W) int64 of class
ids (the visible shape at each pixel).

Metrics come from torchmetrics (``pip install 'leanconv[detection]'``), not from hand-written
matching: :func:`detection_metric` is COCO box mAP (``MeanAveragePrecision`` on pycocotools, the
reference COCO evaluator) and :func:`segmentation_metric` the mean IoU over classes
(``MulticlassJaccardIndex``), both accumulated over a whole split with ``update`` / ``compute``.
"""

from __future__ import annotations

import torch

__all__ = ["CLASSES", "ShapesDataset", "collate", "detection_metric", "segmentation_metric"]

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


def detection_metric():
    """COCO box mAP: torchmetrics' ``MeanAveragePrecision(iou_type="bbox")`` on pycocotools.

    ``update(predictions, targets)`` takes torchvision's per-image dicts (predictions ``boxes``,
    ``scores``, ``labels``; targets ``boxes``, ``labels``, extra keys ignored); ``compute()``
    returns ``map`` (mAP@[.5:.95]), ``map_50``, ``map_75``, ... as tensors.
    """
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise ImportError("leanconv.shapes.detection_metric needs torchmetrics and pycocotools: "
                          "pip install 'leanconv[detection]'") from None
    return MeanAveragePrecision(iou_type="bbox", backend="pycocotools")


def segmentation_metric(num_classes: int = len(CLASSES)):
    """Mean IoU: torchmetrics' ``MulticlassJaccardIndex`` (macro average over ``num_classes``,
    background included; a class in neither prediction nor target is left out).

    ``update(pred, target)`` takes integer label maps of the same shape; ``compute()`` the
    dataset-level mIoU (intersections and unions summed over every update, then divided).
    """
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError:
        raise ImportError("leanconv.shapes.segmentation_metric needs torchmetrics: "
                          "pip install 'leanconv[detection]'") from None
    return MulticlassJaccardIndex(num_classes=num_classes, average="macro")
