"""leanconv.export: every conv type exports (ONNX, ExportedProgram) and matches PyTorch."""

import pytest
import torch
from torch import nn

import leanconv
from helpers import randomize_bns
from leanconv.checkpoint import save_checkpoint
from leanconv.cli import main
from leanconv.export import ExportError, export_model, load_runtime, rounding_floor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def resnet20(conv: str) -> nn.Module:
    return randomize_bns(leanconv.create_model("resnet20", conv=conv, num_classes=10))


@pytest.mark.parametrize("conv", leanconv.available_convs())
def test_every_conv_resnet20_exports_to_onnx_with_dynamic_batch(conv, tmp_path):
    model = resnet20(conv)
    # optimize=False halves the export time; the CLI test and benchmarks/export.py cover the
    # optimised graph.
    report = export_model(model, torch.randn(1, 3, 32, 32), format="onnx",
                          out=tmp_path / "m.onnx", batches=(1, 3), optimize=False)
    assert [p.batch for p in report.parity] == [1, 3]  # traced at 2: the batch is dynamic
    assert report.max_rel <= 1e-4, report.summary()
    assert report.size_bytes == (tmp_path / "m.onnx").stat().st_size > 10_000
    assert not (tmp_path / "m.onnx.data").exists()  # one self-contained file
    # The file alone, in ONNX Runtime, gives the model's logits at yet another batch size.
    x = torch.randn(5, 3, 32, 32)
    (out,) = load_runtime(tmp_path / "m.onnx", "onnx")(x)
    with torch.no_grad():
        ref = model.eval()(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_exported_program_round_trip(tmp_path):
    model = resnet20("scconv").train()
    report = export_model(model, torch.randn(2, 3, 32, 32), format="exported-program",
                          out=tmp_path / "m.pt2", latency_batches=(2,), min_run_time=0.05)
    assert report.runtime == "ExportedProgram" and report.max_rel <= 1e-5
    # The model given is untouched: back in training mode, BNs in place.
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report.latency[2][0] > 0 and report.latency[2][1] > 0
    loaded = torch.export.load(str(tmp_path / "m.pt2"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (loaded.module()(x) - model.eval()(x)).abs().max().item()
    assert diff <= 1e-4 * model(x).abs().max().item()
    # BN folded before export: the program carries no batch-norm op.
    ops = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops) and any("conv" in op for op in ops)


@torch.library.custom_op("leanconv_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


class NoOnnx(nn.Module):
    def forward(self, x):
        return _double(x)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("bad, op", [
    (NoOnnx(), "op leanconv_test.double.default has no ONNX translation"),
    (DataDependent(), "data-dependent control flow at `return x if x.sum() > 0 else -x`"),
])
def test_an_op_that_cannot_export_is_named_with_its_module(bad, op, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), bad))
    with pytest.raises(ExportError, match=r"module 1\.1 ") as info:
        export_model(model, torch.randn(1, 3, 8, 8), out=tmp_path / "m.onnx")
    assert info.value.module == "1.1" and type(bad).__name__ in str(info.value)
    assert op in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(format="tflite"), "format must be one of onnx, exported-program"),
    (dict(batches=(0,)), "batches must be positive integers"),
    (dict(threads=0), "threads must be an integer >= 1"),
])
def test_bad_arguments_raise(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        export_model(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), out=tmp_path / "m", **kwargs)


def test_cli_exports_a_checkpoint_and_checks_it_on_its_test_images(tmp_path, capsys):
    model = randomize_bns(leanconv.create_model("resnet20", conv="spconv", num_classes=10,
                                                in_channels=1))
    save_checkpoint({"model": "resnet20", "conv": "spconv", "hparams": {}, "num_classes": 10,
                     "in_channels": 1, "data": "fashion-mnist", "config": {}, "epoch": 1,
                     "state_dict": model.state_dict()}, tmp_path / "best.pt")
    rc = main(["export", str(tmp_path / "best.pt"), "--out", str(tmp_path / "m.onnx"),
               "--no-latency"])
    out = capsys.readouterr().out
    assert rc == 0 and "parity OK" in out and "random b3" in out
    if "no real inputs" not in out:  # the embedded Fashion-MNIST is installed
        assert "fashion-mnist test b64" in out
    assert (tmp_path / "m.onnx").stat().st_size > 10_000


@pytest.mark.parametrize("argv, match", [
    (["nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["runs/none/best.pt"], "checkpoint runs/none/best.pt does not exist"),
    (["resnet20", "--format", "tflite"], "invalid choice: 'tflite'"),
    (["resnet20", "--conv", "spconv", "--flipping", "none"], "--flipping does not apply"),
    (["resnet20", "--input", "big"], "cannot read an input size"),
])
def test_cli_bad_arguments_are_one_line_exit_2(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", *argv, "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and match in err


def test_cli_parity_failure_exits_1_and_shows_the_rounding_floor(tmp_path, capsys):
    rc = main(["export", "resnet20", "--input", "32", "--out", str(tmp_path / "m.onnx"),
               "--no-latency", "--tolerance", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "parity FAILED: max relative difference" in err
    assert "PyTorch's own float32 output differs from float64 by" in err


def test_rounding_floor_of_a_continuous_network_is_tiny():
    model = resnet20("spconv")
    floor = rounding_floor(model, torch.randn(2, 3, 32, 32))
    assert 0 < floor < 1e-5 and model.training  # mode restored
