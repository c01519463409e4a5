"""Params and MACs of the detection backbones and detectors of the papers' COCO tables.

Each zoo ResNet-50 / ResNet-101 with the conv types the papers put in detectors (SPConv Table 3,
SlimConv Tables 5-6, SCConv Tables 4-5, CompConv Table 9; each conv's paper hyperparameters and
placement) is built on the meta device inside :func:`leanconv.detection.fasterrcnn` (81 classes,
COCO's 80 plus background) and :func:`leanconv.detection.retinanet` (80 classes) and counted by
:func:`leanconv.profile` at the detection input sizes, without running anything:

* ``trunk``: the ResNet without its classifier (``backbone.body``), what "backbone" means in
  SPConv's Table 3;
* ``backbone``: trunk + FPN (torchvision's ``BackboneWithFPN``; RetinaNet's FPN is on C3-C5 with
  P6/P7 from C5, Faster R-CNN's on C2-C5);
* ``detector``: the backbone, the dense heads on every FPN level (Faster R-CNN's RPN head,
  RetinaNet's classification and box heads) and, for Faster R-CNN, the box head and predictor
  on 1000 RoIs, as MMDetection's ``forward_dummy`` counts it (RoIAlign and NMS have no MACs).

    python benchmarks/detection_complexity.py --markdown benchmarks/results/detection-complexity.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from leanconv.detection import fasterrcnn, retinanet
from leanconv.profile import profile

# (backbone, conv, hyperparameters, label); defaults are the papers' (SPConv alpha 1/2 g 2,
# SlimConv k 4/3, SCConv alpha 1/2 r 2 g 2); CompConv's C0 names its Table 9 rows.
ROWS = [
    ("resnet50", "vanilla", {}, "ResNet-50"),
    ("resnet50", "spconv", {}, "SPConv-R50"),
    ("resnet50", "slimconv", {}, "SlimConv-R50"),
    ("resnet50", "scconv", {}, "SCConv-R50"),
    ("resnet50", "compconv", {"base_channels": 512}, "Comp512-R50"),
    ("resnet50", "compconv", {"base_channels": 128}, "Comp128-R50"),
    ("resnet101", "vanilla", {}, "ResNet-101"),
    ("resnet101", "slimconv", {}, "SlimConv-R101"),
    ("resnet101", "scconv", {}, "SCConv-R101"),
]
# (H, W): short side 800 / 600 with the long side at most 1333 / 1000, and (1280, 800), the
# default shape of MMDetection's get_flops.py, which CompConv's Table 9 counts match.
SIZES = ((800, 1333), (600, 1000), (1280, 800))
ROIS = 1000  # MMDetection's forward_dummy: the box head on 1000 proposals


class DenseDetector(nn.Module):
    """A detector's convolution and linear work on one image, without box decoding or NMS."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor):
        d = self.detector
        features = list(d.backbone(x).values())
        if hasattr(d, "rpn"):  # Faster R-CNN: RPN head, then the box head on ROIS RoIs
            rpn = d.rpn.head(features)
            rois = x.new_empty(ROIS, d.backbone.out_channels, 7, 7)  # RoIAlign's output
            return rpn, d.roi_heads.box_predictor(d.roi_heads.box_head(rois))
        return d.head(features)  # RetinaNet: classification and box heads on P3-P7


def count(backbone: str, conv: str, hparams: dict) -> dict:
    with torch.device("meta"):  # nothing allocated, nothing initialised
        rcnn = fasterrcnn(backbone, conv, num_classes=81, **hparams)
        retina = retinanet(backbone, conv, num_classes=80, **hparams)
    out = {"trunk_params": sum(p.numel() for p in rcnn.backbone.body.parameters()),
           "fasterrcnn_params": sum(p.numel() for p in rcnn.parameters()),
           "retinanet_params": sum(p.numel() for p in retina.parameters())}
    for h, w in SIZES:
        size = f"{h}x{w}"
        out[f"trunk_macs_{size}"] = profile(rcnn.backbone.body, (h, w)).macs
        out[f"fasterrcnn_backbone_macs_{size}"] = profile(rcnn.backbone, (h, w)).macs
        out[f"fasterrcnn_macs_{size}"] = profile(DenseDetector(rcnn), (h, w)).macs
        out[f"retinanet_backbone_macs_{size}"] = profile(retina.backbone, (h, w)).macs
        out[f"retinanet_macs_{size}"] = profile(DenseDetector(retina), (h, w)).macs
    return out


# The papers' detection tables as printed: (table, detector, row label, Params M, FLOPs G, the
# vanilla row of the same table). SPConv's figures are the backbone alone; SlimConv and SCConv
# print ImageNet-classifier-like Params; see docs/deployment.md for what each scope is.
PAPERS = [
    ("SPConv T3", "fasterrcnn", "ResNet-50", 23.51, 4.13, "ResNet-50"),
    ("SPConv T3", "fasterrcnn", "SPConv-R50", 16.29, 2.96, "ResNet-50"),
    ("SCConv T4, T5", "retinanet", "ResNet-50", 25.56, 63.09, "ResNet-50"),
    ("SCConv T4, T5", "retinanet", "SPConv-R50", 19.76, 49.23, "ResNet-50"),
    ("SCConv T4, T5", "retinanet", "SlimConv-R50", 18.81, 47.12, "ResNet-50"),
    ("SCConv T4, T5", "retinanet", "SCConv-R50", 16.78, 41.36, "ResNet-50"),
    ("SCConv T4", "retinanet", "ResNet-101", 44.55, 121.3, "ResNet-101"),
    ("SCConv T4", "retinanet", "SCConv-R101", 27.90, 75.26, "ResNet-101"),
    ("SlimConv T5", "fasterrcnn", "ResNet-101", 45.26, 148.93, "ResNet-101"),
    ("SlimConv T5", "fasterrcnn", "SlimConv-R101", 29.44, 98.16, "ResNet-101"),
    ("SlimConv T6", "fasterrcnn", "ResNet-101", 45.86, 153.59, "ResNet-101"),
    ("SlimConv T6", "fasterrcnn", "SlimConv-R101", 30.04, 101.36, "ResNet-101"),
    ("CompConv T9", "fasterrcnn", "ResNet-50", 41.5, 207.1, "ResNet-50"),
    ("CompConv T9", "fasterrcnn", "Comp512-R50", 31.5, 176.3, "ResNet-50"),
    ("CompConv T9", "fasterrcnn", "Comp128-R50", 30.1, 160.8, "ResNet-50"),
]
DETECTORS = {"fasterrcnn": "Faster R-CNN", "retinanet": "RetinaNet"}


def table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    rule = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", rule]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def counts_table(entries: list[dict]) -> str:
    """Params M and GMACs of every row at the detection input sizes."""
    cols = [("trunk params M", "trunk_params", 1e6),
            ("trunk GMACs 800x1333", "trunk_macs_800x1333", 1e9),
            ("trunk GMACs 600x1000", "trunk_macs_600x1000", 1e9),
            ("Faster R-CNN params M", "fasterrcnn_params", 1e6),
            ("Faster R-CNN GMACs 800x1333", "fasterrcnn_macs_800x1333", 1e9),
            ("Faster R-CNN GMACs 600x1000", "fasterrcnn_macs_600x1000", 1e9),
            ("Faster R-CNN GMACs 1280x800", "fasterrcnn_macs_1280x800", 1e9),
            ("RetinaNet params M", "retinanet_params", 1e6),
            ("RetinaNet GMACs 800x1333", "retinanet_macs_800x1333", 1e9)]
    return table(["backbone", *(c[0] for c in cols)],
                 [[e["label"], *(f"{e[key] / unit:.2f}" for _, key, unit in cols)]
                  for e in entries])


def _beside(entry: dict, vanilla: dict, params_key: str, macs_key: str) -> str:
    return (f"{entry[params_key] / 1e6:.2f} / {entry[macs_key] / 1e9:.2f} "
            f"({entry[params_key] / vanilla[params_key]:.2f} / "
            f"{entry[macs_key] / vanilla[macs_key]:.2f})")


def papers_table(entries: list[dict]) -> str:
    """The papers' figures beside leanconv's trunk and detector at 800x1333; in brackets each
    figure divided by the vanilla row of the same table."""
    by_label = {e["label"]: e for e in entries}
    printed = {(t, label): (params, flops) for t, _, label, params, flops, _ in PAPERS}
    rows = []
    for t, det, label, params, flops, vanilla in PAPERS:
        e, v = by_label[label], by_label[vanilla]
        p0, f0 = printed[(t, vanilla)]
        rows.append([t, DETECTORS[det], label,
                     f"{params:.2f} / {flops:.2f} ({params / p0:.2f} / {flops / f0:.2f})",
                     _beside(e, v, "trunk_params", "trunk_macs_800x1333"),
                     _beside(e, v, f"{det}_params", f"{det}_macs_800x1333")])
    return table(["paper table", "detector", "backbone", "paper: Params M / FLOPs G",
                  "leanconv trunk: params M / GMACs 800x1333",
                  "leanconv detector: params M / GMACs 800x1333"], rows, text_columns=3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path,
                   default=Path("benchmarks/results/detection-complexity.json"))
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown tables")
    args = p.parse_args()
    entries = [{"label": label, "backbone": backbone, "conv": conv, "hparams": hp,
                **count(backbone, conv, hp)} for backbone, conv, hp, label in ROWS]
    args.json.write_text(json.dumps(entries, indent=2) + "\n")
    text = counts_table(entries) + "\n" + papers_table(entries)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
