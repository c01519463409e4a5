"""leanconv.shapes: the generated shapes dataset and its metrics."""

import sys

import pytest
import torch

from leanconv.shapes import ShapesDataset, collate, detection_metric, segmentation_metric


def test_images_are_deterministic_and_targets_consistent():
    ds = ShapesDataset(20, size=64, max_objects=3)
    for i in range(len(ds)):
        image, target = ds[i]
        again, target2 = ds[i]
        assert image.shape == (3, 64, 64) and torch.equal(image, again)
        assert torch.equal(target["boxes"], target2["boxes"])
        assert image.min() >= 0 and image.max() <= 1
        boxes, labels, mask = target["boxes"], target["labels"], target["mask"]
        assert 1 <= len(labels) <= 3 and boxes.shape == (len(labels), 4)
        assert set(labels.tolist()) <= {1, 2, 3} and set(mask.unique().tolist()) <= {0, 1, 2, 3}
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 64
        for box, label in zip(boxes.long(), labels, strict=True):  # the box holds its shape
            x1, y1, x2, y2 = box.tolist()
            assert (mask[y1:y2, x1:x2] == label).any()
    assert not torch.equal(ds[0][0], ShapesDataset(20, size=64, split="test")[0][0])
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def _coco_map(predictions, targets) -> dict:
    metric = detection_metric()
    metric.update(predictions, targets)
    return {k: float(v) for k, v in metric.compute().items() if k in ("map", "map_50")}


def test_detection_metric_is_coco_map():
    pytest.importorskip("pycocotools")
    tgt = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
            "labels": torch.tensor([1, 2]), "mask": torch.zeros(32, 32, dtype=torch.long)}]
    scores = torch.tensor([0.9, 0.8])
    perfect = [{"boxes": tgt[0]["boxes"], "labels": tgt[0]["labels"], "scores": scores}]
    assert _coco_map(perfect, tgt) == pytest.approx({"map": 1.0, "map_50": 1.0})
    # The class-1 box shrunk to 9x9 has IoU 0.81: a hit at the IoU thresholds .50 to .80 (7 of
    # COCO's 10), a miss at .85 to .95, so class 1 AP = 0.7, class 2 AP = 1, mAP = 0.85.
    shifted = [{"boxes": torch.tensor([[0.0, 0, 9, 9], [20, 20, 30, 30]]),
                "labels": tgt[0]["labels"], "scores": scores}]
    assert _coco_map(shifted, tgt) == pytest.approx({"map": 0.85, "map_50": 1.0})
    none = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "scores": torch.zeros(0)}]
    assert _coco_map(none, tgt) == {"map": 0.0, "map_50": 0.0}


def test_segmentation_metric_is_mean_iou():
    target = torch.tensor([[0, 1], [2, 2]])
    metric = segmentation_metric()
    metric.update(target, target)
    assert float(metric.compute()) == 1.0
    # IoU background 1/2, rectangle 1, ellipse 1/2; triangle (in neither map) is left out.
    metric = segmentation_metric()
    metric.update(torch.tensor([[0, 1], [2, 0]]), target)
    assert float(metric.compute()) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # Accumulated over updates: intersections and unions are summed before dividing.
    metric.update(target, target)
    assert float(metric.compute()) == pytest.approx((2 / 3 + 1 + 3 / 4) / 3)


@pytest.mark.parametrize("factory, module", [(detection_metric, "torchmetrics.detection"),
                                             (segmentation_metric,
                                              "torchmetrics.classification")])
def test_metrics_name_the_extra_when_torchmetrics_is_missing(factory, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ImportError, match=r"leanconv\[detection\]"):
        factory()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_images=0), "num_images must be an integer >= 1"),
    (dict(num_images=1, size=16), "size must be an integer >= 32"),
    (dict(num_images=1, split="val"), "split must be 'train' or 'test'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


@pytest.mark.parametrize("model, metrics", [("deeplabv3", {"mIoU"}),
                                            ("fasterrcnn", {"mAP", "AP50"})])
def test_example_script_trains_scores_and_writes(model, metrics, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("matplotlib")
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "detection.py"
    monkeypatch.setattr("sys.argv", [str(script), "--model", model, "--convs", "vanilla,ghost",
                                     "--steps", "2", "--size", "32", "--train-images", "8",
                                     "--test-images", "4", "--batch-size", "4", "--show", "2",
                                     "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "| vanilla | 11.18 |" in out and "| ghost |" in out
    runs = json.loads((tmp_path / f"{model}.json").read_text())["runs"]
    assert [r["conv"] for r in runs] == ["vanilla", "ghost"]
    for r in runs:
        assert metrics <= set(r) and all(0 <= r[m] <= 1 for m in metrics)
        assert r["train_seconds"] > 0 and r["backbone_params"] < r["params"]
    assert (tmp_path / f"{model}.md").read_text().count("\n|") == 4  # header, rule, 2 rows
    assert (tmp_path / f"{model}.png").read_bytes()[:4] == b"\x89PNG"
