"""The command line as a user meets it: defaults that follow the model, and a bad argument of any
subcommand ends in one line naming it (no traceback) with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanconv import cli, create_model, profile
from leanconv.models import available_models, default_input_size

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _usage_error(argv, capsys, prog=None) -> str:
    """Run ``leanconv ARGV`` in-process; it must exit with 2 and one line on stderr."""
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog or 'leanconv ' + argv[0]}: error: ")
    return lines[0]


def test_default_input_size_follows_the_model():
    cifar_only = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg15", "vgg16",
                  "densenet121", "resnext29", "wrn28_10"}
    assert cifar_only <= set(available_models())
    for name in available_models():
        assert default_input_size(name) == (32 if name in cifar_only else 224), name
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        default_input_size("nope")


def test_profile_without_input_uses_the_models_size(capsys):
    # resnet20 is CIFAR-only: no --input must mean 32x32, not the ImageNet stem
    assert cli.main(["profile", "resnet20"]) == 0
    with torch.device("meta"):
        expected = profile(create_model("resnet20"), 32)
        imagenet = profile(create_model("resnet18", stem="imagenet"), 224)
    assert f"{expected.params:,}" in capsys.readouterr().out
    assert cli.main(["profile", "resnet18"]) == 0  # has both builds: ImageNet's 224 by default
    assert f"{imagenet.macs:,}" in capsys.readouterr().out


def test_profile_bad_arguments(capsys):
    msg = _usage_error(["profile", "resnet20", "--conv", "spconv", "--split-ratio", "2"], capsys)
    assert "split_ratio" in msg and "(0.0, 1.0]" in msg
    assert "--input" in _usage_error(["profile", "resnet20", "--input", "0"], capsys)
    assert "--input" in _usage_error(["profile", "resnet20", "--input", "abc"], capsys)
    msg = _usage_error(["profile", "vgg16", "--input", "8"], capsys)  # 5 pools: 8 -> 0
    assert "--input 8x8" in msg and "vgg16" in msg
    msg = _usage_error(["profile", "nosuch"], capsys)
    assert "argument model" in msg and "resnet20" in msg
    assert "--classes" in _usage_error(["profile", "resnet20", "--classes", "0"], capsys)
    msg = _usage_error(["profile", "resnet20", "--gate-threshold", "0.3"], capsys)
    assert "--gate-threshold does not apply to conv 'vanilla'" in msg
    msg = _usage_error(["profile", "resnet20", "--counter", "flops"], capsys)
    assert "--counter" in msg and "macs+bn" in msg


def test_tables_bad_arguments(tmp_path, capsys):
    msg = _usage_error(["tables", "--targets", str(tmp_path / "missing.csv")], capsys)
    assert "--targets" in msg and "missing.csv" in msg
    assert "--rows" in _usage_error(["tables", "--rows", "x"], capsys)
    assert "--rows" in _usage_error(["tables", "--rows", "0"], capsys)
    msg = _usage_error(["tables", "--rows", "67"], capsys)
    assert "rows must be between 1 and 66" in msg
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    msg = _usage_error(["tables", "--targets", str(bad)], capsys)
    assert "needs the columns" in msg and "model" in msg


def test_bench_bad_arguments(capsys):
    assert "argument model" in _usage_error(["bench", "nosuch"], capsys)
    msg = _usage_error(["bench", "resnet20", "--convs", "vanilla,nope"], capsys)
    assert "unknown conv 'nope'" in msg and "spconv" in msg
    assert "--threads" in _usage_error(["bench", "resnet20", "--threads", "0"], capsys)
    assert "--batch" in _usage_error(["bench", "resnet20", "--batch", "0"], capsys)


def test_train_bad_arguments(tmp_path, capsys):
    assert "argument model" in _usage_error(["train", "nosuch"], capsys)
    msg = _usage_error(["train", "resnet20", "--data", "nope", "--out", str(tmp_path)], capsys)
    assert "unknown dataset 'nope'" in msg and "cifar10" in msg
    msg = _usage_error(["train", "resnet20", "--recipe", "nope", "--out", str(tmp_path)], capsys)
    assert "unknown recipe 'nope'" in msg and "cifar" in msg
    assert "--epochs" in _usage_error(["train", "resnet20", "--epochs", "0"], capsys)
    assert "--resume needs --out" in _usage_error(["train", "resnet20", "--resume"], capsys)
    msg = _usage_error(["train", "resnet20", "--conv", "spconv", "--flipping", "none"], capsys)
    assert "--flipping does not apply to conv 'spconv'" in msg
    msg = _usage_error(["train", "resnet20", "--conv", "spconv", "--split-ratio", "2", "--data",
                        "synthetic", "--out", str(tmp_path / "run")], capsys)
    assert "split_ratio must be in (0.0, 1.0], got 2.0" in msg
    assert not list(tmp_path.iterdir())


def test_eval_bad_arguments(tmp_path, capsys):
    msg = _usage_error(["eval", str(tmp_path / "missing.pt")], capsys)
    assert "argument checkpoint" in msg and "missing.pt" in msg
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"")
    assert "--batch-size" in _usage_error(["eval", str(ckpt), "--batch-size", "0"], capsys)


def test_compare_bad_arguments(tmp_path, capsys):
    out = tmp_path / "c"
    assert "--model" in _usage_error(["compare", "--model", "nope", "--out", str(out)], capsys)
    msg = _usage_error(["compare", "--convs", "nope", "--out", str(out)], capsys)
    assert "unknown conv 'nope'" in msg
    msg = _usage_error(["compare", "--data", "nope", "--out", str(out)], capsys)
    assert "unknown dataset 'nope'" in msg
    assert "--seeds" in _usage_error(["compare", "--seeds", "0", "--out", str(out)], capsys)
    assert not out.exists()


def test_convs_bad_arguments(capsys):
    # extra arguments are found by the top-level parser
    assert "--nope" in _usage_error(["convs", "--nope"], capsys, prog="leanconv")


def test_a_real_process_prints_one_line_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "leanconv.cli", "profile", "resnet20", "--conv", "spconv",
         "--split-ratio", "2"], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "leanconv profile: error: split_ratio must be in (0.0, 1.0], got 2.0 "
        "(see leanconv profile --help)"]
