"""Training loop, recipes, checkpoints, resume, eval and the train/eval CLI.

Models here are tiny (registered below) so that each test takes a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import leanconv.train as T
from leanconv import create_conv
from leanconv.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from leanconv.cli import main
from leanconv.data import FASHION_MNIST_DIR
from leanconv.models import available_models, register_model

TIMING = ("time", "images_per_s")


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-exact comparisons and speed on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(conv, num_classes, in_channels, width, hp):
    return nn.Sequential(
        create_conv(conv, in_channels, width, 3, stride=2, **hp), nn.BatchNorm2d(width),
        nn.ReLU(), create_conv(conv, width, 2 * width, 3, stride=2, **hp),
        nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.1), nn.Linear(8 * width, num_classes))


if "tiny_train_cnn" not in available_models():

    @register_model
    def tiny_train_cnn(*, conv="vanilla", num_classes=10, in_channels=3, **hp):
        """Two strided convs, BN, dropout: exercises every piece of state a resume restores."""
        return _tiny(conv, num_classes, in_channels, 8, hp)

    @register_model
    def tiny_fashion_cnn(*, conv="vanilla", num_classes=10, in_channels=1, **hp):
        return nn.Sequential(
            create_conv(conv, in_channels, 16, 3, **hp), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2), create_conv(conv, 16, 32, 3, **hp), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, num_classes))

    class _NaNAfter(nn.Module):
        """Finite logits for the first ``n`` training forwards, then NaN."""

        def __init__(self, num_classes, in_channels, n):
            super().__init__()
            self.body = _tiny("vanilla", num_classes, in_channels, 4, {})
            self.n, self.calls = n, 0

        def forward(self, x):
            out = self.body(x)
            if self.training:
                self.calls += 1
                if self.calls > self.n:
                    out = out * float("nan")
            return out

    @register_model
    def nan_after_20(*, conv="vanilla", num_classes=10, in_channels=3):
        return _NaNAfter(num_classes, in_channels, 20)


def _config(tmp_path, name="run", **kw):
    values = dict(model="tiny_train_cnn", data="synthetic", out=str(tmp_path / name), epochs=2,
                  batch_size=32, eval_batch_size=64, train_subset=256)
    values.update(kw)
    return T.resolve_config("fashion-mnist", **values)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ----------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------
def test_recipes_ship_the_papers_settings():
    assert {"cifar", "cifar-compconv", "fashion-mnist", "imagenet", "imagenet-cosine"} <= set(
        T.available_recipes())
    c = T.resolve_config("cifar")
    assert (c.data, c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (
        "cifar10", 200, 128, 0.1, 0.9, 5e-4)
    assert (c.schedule, c.milestones, c.gamma) == ("step", [100, 150], 0.1)
    c = T.resolve_config("imagenet")
    assert (c.data, c.epochs, c.batch_size, c.lr, c.weight_decay, c.milestones) == (
        "imagefolder", 100, 256, 0.1, 1e-4, [30, 60, 90])
    assert T.resolve_config("imagenet-cosine").schedule == "cosine"
    c = T.resolve_config("fashion-mnist")
    assert (c.epochs, c.lr, c.nesterov, c.weight_decay, c.label_smoothing, c.schedule) == (
        8, 0.2, True, 5e-4, 0.1, "onecycle")


def test_recipe_defaults_follow_the_dataset_and_flags_override():
    assert T.resolve_config(data="cifar100").recipe == "cifar"
    assert T.resolve_config(data="fashion-mnist").recipe == "fashion-mnist"
    c = T.resolve_config("cifar", lr=0.05, epochs=3, batch_size=None)
    assert (c.lr, c.epochs, c.batch_size) == (0.05, 3, 128)
    with pytest.raises(T.TrainError, match=r"unknown recipe 'nope'.*cifar"):
        T.resolve_config("nope")
    with pytest.raises(T.TrainError, match="schedule='linear'"):
        T.resolve_config("cifar", schedule="linear")


def test_recipe_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data: synthetic\nepochs: 3\nlr: 0.01\nschedule: cosine\n")
    c = T.resolve_config(str(path))
    assert (c.data, c.epochs, c.lr, c.schedule) == ("synthetic", 3, 0.01, "cosine")
    path.write_text("epochz: 3\n")
    with pytest.raises(T.TrainError, match="unknown keys: epochz"):
        T.resolve_config(str(path))


@pytest.mark.parametrize("schedule,expected", [
    ("step", [0.1, 0.1, 0.01, 0.01, 0.001]),
    ("constant", [0.1] * 5),
])
def test_step_schedules(schedule, expected):
    c = T.TrainConfig(lr=0.1, epochs=5, schedule=schedule, milestones=[2, 4], gamma=0.1)
    opt = T.build_optimizer(nn.Linear(2, 2), c)
    sched = T.build_scheduler(opt, c, steps_per_epoch=3)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        for _ in range(3):
            opt.step()
            sched.step()
    assert seen == pytest.approx(expected)


def test_cosine_and_onecycle_schedules():
    c = T.TrainConfig(lr=0.1, epochs=4, schedule="cosine")
    opt = T.build_optimizer(nn.Linear(2, 2), c)
    sched = T.build_scheduler(opt, c, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    c = T.resolve_config("fashion-mnist", epochs=2)
    opt = T.build_optimizer(nn.Linear(2, 2), c)
    assert opt.defaults["nesterov"] is True
    sched = T.build_scheduler(opt, c, steps_per_epoch=50)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2 / 25)
    assert max(lrs) == pytest.approx(0.2, rel=1e-3) and lrs.index(max(lrs)) in (29, 30)
    assert lrs[-1] < 1e-4


# ----------------------------------------------------------------------------------------------
# A run: outputs, checkpoints, resume
# ----------------------------------------------------------------------------------------------
def test_run_writes_config_metrics_and_checkpoints(tmp_path):
    result = T.train(_config(tmp_path))
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == {"config.yaml", "config.json", "metrics.csv",
                                              "metrics.jsonl", "last.pt", "best.pt"}
    rows = _rows(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows == result.history
    assert list(rows[0]) == list(T.METRIC_FIELDS)
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(T.METRIC_FIELDS) and len(csv_lines) == 3
    assert rows[1]["test_top1"] > 0.5  # the synthetic set is learnable
    assert json.loads((out / "config.json").read_text())["model"] == "tiny_train_cnn"
    # weights_only-loadable, self-describing
    raw = torch.load(out / "last.pt", weights_only=True)
    assert (raw["model"], raw["conv"], raw["hparams"], raw["num_classes"], raw["in_channels"],
            raw["epoch"]) == ("tiny_train_cnn", "vanilla", {}, 10, 3, 2)
    best = load_checkpoint(out / "best.pt")
    assert best["metrics"]["test_top1"] == max(r["test_top1"] for r in rows)
    # no temporary files left behind; a second fresh run into the same folder is refused
    with pytest.raises(T.TrainError, match="already holds a run"):
        T.train(_config(tmp_path))


def test_same_seed_same_run_and_different_seed_differs(tmp_path):
    a = T.train(_config(tmp_path, "a", epochs=1))
    b = T.train(_config(tmp_path, "b", epochs=1))
    c = T.train(_config(tmp_path, "c", epochs=1, seed=1))
    assert _strip(a.history) == _strip(b.history)
    assert _strip(a.history) != _strip(c.history)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    straight = T.train(_config(tmp_path, "straight", epochs=3))

    real_save = T.save_checkpoint

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["epoch"] == 1:
            raise KeyboardInterrupt  # killed after the checkpoint, before the metrics rows

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.train(_config(tmp_path, "killed", epochs=3))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    assert _rows(tmp_path / "killed" / "metrics.jsonl") == []
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1

    resumed = T.train(_config(tmp_path, "killed", epochs=3), resume=True)
    assert _strip(resumed.history) == _strip(straight.history)
    assert _strip(_rows(tmp_path / "killed" / "metrics.jsonl")) == _strip(straight.history)
    for (k, a), b in zip(straight.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    sa = load_checkpoint(tmp_path / "straight" / "last.pt")
    sb = load_checkpoint(tmp_path / "killed" / "last.pt")
    for ka, kb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(ka["momentum_buffer"], kb["momentum_buffer"])
    assert sa["scheduler"] == sb["scheduler"]
    assert torch.equal(sa["rng"][0]["data"], sb["rng"][0]["data"])


def test_resume_refuses_a_changed_run(tmp_path):
    T.train(_config(tmp_path, epochs=1))
    with pytest.raises(CheckpointError, match=r"trained with lr=0\.2, not 0\.05"):
        T.train(_config(tmp_path, epochs=1, lr=0.05), resume=True)
    with pytest.raises(SystemExit) as err:
        main(["train", "tiny_train_cnn", "--out", str(tmp_path / "run"), "--resume",
              "--seed", "3"])
    assert str(err.value) == (f"error: checkpoint {tmp_path / 'run' / 'last.pt'} was trained "
                              "with seed=0, not 3; resume with the same settings or start a "
                              "new --out")


def test_cli_resume_takes_the_saved_settings(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["train", "tiny_train_cnn", "--data", "synthetic", "--out", out, "--epochs", "1",
            "--batch-size", "64", "--train-subset", "128", "--schedule", "step"]
    assert main(args) == 0
    # a step schedule may be extended; everything else comes from the checkpoint
    assert main(["train", "tiny_train_cnn", "--out", out, "--resume", "--epochs", "2"]) == 0
    rows = _rows(Path(out) / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert load_checkpoint(Path(out) / "last.pt")["config"]["batch_size"] == 64


# ----------------------------------------------------------------------------------------------
# Bad checkpoints, NaN, eval
# ----------------------------------------------------------------------------------------------
def _one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def test_corrupt_and_mismatched_checkpoints_give_one_line_errors(tmp_path):
    T.train(_config(tmp_path, epochs=1))
    good = tmp_path / "run" / "last.pt"
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _one_line_exit(["eval", str(truncated)])

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    assert "garbage.pt" in _one_line_exit(["eval", str(garbage)])

    with pytest.raises(SystemExit) as err:  # a missing file is a usage error (exit 2)
        main(["eval", str(tmp_path / "missing.pt")])
    assert err.value.code == 2

    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    assert "not a leanconv checkpoint" in _one_line_exit(["eval", str(plain)])

    ckpt = load_checkpoint(good)
    ckpt["state_dict"]["9.weight"] = torch.zeros(10, 99)  # another classifier width
    del ckpt["format"], ckpt["version"]
    save_checkpoint(ckpt, tmp_path / "mismatch.pt")
    msg = _one_line_exit(["eval", str(tmp_path / "mismatch.pt")])
    assert "does not match the model" in msg and "9.weight" in msg

    msg = _one_line_exit(["eval", str(good), "--data", "fashion-mnist"]) if (
        FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() else "input channels"
    assert "input channels" in msg

    # resuming from a corrupt last.pt
    good.write_bytes(data[:100])
    msg = _one_line_exit(["train", "tiny_train_cnn", "--data", "synthetic", "--out",
                          str(tmp_path / "run"), "--resume"])
    assert "corrupt or truncated" in msg


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"x": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_nan_loss_stops_with_the_last_good_state(tmp_path):
    # 256 images / batch 32 = 8 steps per epoch: the NaN appears in epoch 3, step 5.
    config = _config(tmp_path, model="nan_after_20", epochs=4)
    with pytest.raises(T.NonFiniteLossError, match=r"loss became nan at epoch 3, step 5/8"):
        T.train(config)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2
    weights = [v for v in last["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    assert len(_rows(tmp_path / "run" / "metrics.jsonl")) == 2
    msg = _one_line_exit(["train", "nan_after_20", "--data", "synthetic", "--out",
                          str(tmp_path / "cli"), "--train-subset", "256", "--batch-size", "32",
                          "--epochs", "4"])
    assert "loss became nan" in msg and "last.pt" in msg


def test_eval_reproduces_the_reported_accuracy(tmp_path):
    out = tmp_path / "ev"
    assert main(["train", "tiny_train_cnn", "--data", "synthetic", "--out", str(out),
                 "--epochs", "2", "--batch-size", "32", "--train-subset", "256",
                 "--test-subset", "200"]) == 0
    rows = _rows(out / "metrics.jsonl")
    for name, row in (("last.pt", rows[-1]), ("best.pt", max(rows, key=lambda r: r["test_top1"]))):
        assert main(["eval", str(out / name), "--json", str(tmp_path / "ev.json")]) == 0
        got = json.loads((tmp_path / "ev.json").read_text())
        assert set(got) == {"top1", "top5", "loss"}
        assert (got["top1"], got["top5"], got["loss"]) == (
            row["test_top1"], row["test_top5"], row["test_loss"])


def test_channels_last_trains_the_same_model(tmp_path):
    plain = T.train(_config(tmp_path, "plain", epochs=1)).history[0]
    cl = T.train(_config(tmp_path, "cl", epochs=1, channels_last=True)).history[0]
    assert json.loads((tmp_path / "cl" / "config.json").read_text())["channels_last"] is True
    # same maths in another layout: the run agrees up to float rounding
    assert cl["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)
    assert cl["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-3)
    with pytest.raises(CheckpointError, match="channels_last=True, not False"):
        T.train(_config(tmp_path, "cl", epochs=1), resume=True)  # part of the run's identity


def test_bf16_autocast_trains(tmp_path):
    result = T.train(_config(tmp_path, epochs=1, amp="bf16"))
    assert math.isfinite(result.history[0]["train_loss"])
    assert T.evaluate_checkpoint(tmp_path / "run" / "last.pt")["top1"] == (
        result.history[0]["test_top1"])


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_learns_on_real_fashion_mnist(tmp_path):
    """A small CNN, 4000 training images, one epoch of the recipe's one-cycle schedule: it
    measured 84% on 2000 test images; a broken trainer (labels, normalisation, optimizer,
    schedule) stays far below 75%."""
    config = T.resolve_config("fashion-mnist", model="tiny_fashion_cnn", out=str(tmp_path / "f"),
                              epochs=1, batch_size=32, lr=0.05, augment=False, train_subset=4000,
                              test_subset=2000)
    result = T.train(config)
    row = result.history[0]
    assert row["test_top1"] > 0.75, row
    assert row["test_top5"] > 0.95, row


def test_imagefolder_run_and_fraction_hparams(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    for part in ("train", "val"):
        for cls in ("a", "b", "c"):
            (tmp_path / "img" / part / cls).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (18, 20, 3), dtype=torch.uint8, generator=gen)
                Image.fromarray(pixels.numpy()).save(tmp_path / "img" / part / cls / f"{i}.png")
    config = T.resolve_config("imagenet", model="tiny_train_cnn", data="imagefolder",
                              data_dir=str(tmp_path / "img"), image_size=16, batch_size=4,
                              eval_batch_size=4, epochs=1, out=str(tmp_path / "run"))
    result = T.train(config)
    assert result.model[-1].out_features == 3
    assert T.evaluate_checkpoint(tmp_path / "run" / "last.pt")["count"] == 12
    from fractions import Fraction

    c = T.resolve_config("cifar", hparams={"compression_ratio": Fraction(4, 3)})
    assert c.hparams == {"compression_ratio": "4/3"}  # weights_only-safe in checkpoints
