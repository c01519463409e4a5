"""leanconv.shapes: the generated shapes dataset and its metrics."""

import pytest
import torch

from leanconv.shapes import ShapesDataset, box_ap50, collate, mean_iou


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


def test_ap50_and_miou_values():
    tgt = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
            "labels": torch.tensor([1, 2])}]
    perfect = [{"boxes": tgt[0]["boxes"], "labels": tgt[0]["labels"],
                "scores": torch.tensor([0.9, 0.8])}]
    assert box_ap50(perfect, tgt) == pytest.approx(1.0)
    # Class 1 found (IoU 0.81), class 2 missed, plus a higher-scoring false positive of class 1:
    # class 1 AP = precision 1/2 at recall 1 -> 0.5; class 2 AP = 0.
    half = [{"boxes": torch.tensor([[0.0, 0, 9, 9], [50, 50, 60, 60]]),
             "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.5, 0.9])}]
    assert box_ap50(half, tgt) == pytest.approx(0.25)
    none = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "scores": torch.zeros(0)}]
    assert box_ap50(none, tgt) == 0.0
    t = torch.tensor([[0, 1], [2, 2]])
    assert mean_iou(t, t) == 1.0
    assert mean_iou(torch.tensor([[0, 1], [2, 0]]), t) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_images=0), "num_images must be an integer >= 1"),
    (dict(num_images=1, size=16), "size must be an integer >= 32"),
    (dict(num_images=1, split="val"), "split must be 'train' or 'test'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


@pytest.mark.parametrize("model", ["deeplabv3", "retinanet"])
def test_example_script_trains_and_scores(model, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "detection.py"
    monkeypatch.setattr("sys.argv", [str(script), "--model", model, "--conv", "ghost",
                                     "--steps", "2", "--size", "32", "--train-images", "8",
                                     "--test-images", "4", "--batch-size", "4"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 2/2" in out and ("test mIoU" in out or "test box AP50" in out)
