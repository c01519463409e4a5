"""leanconv.bench: structure of the measurements and exact arithmetic of ratios and memory.

No test asserts on wall-clock time (the machine is shared): latency and throughput are only
checked for shape and internal consistency; memory held for backward is checked exactly on
layers whose saved tensors are known by hand.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from leanconv import cli
from leanconv.bench import (
    BenchReport,
    ConvResult,
    LatencyResult,
    SavedTensors,
    TrainResult,
    bench_convs,
    format_table,
    measure_latency,
    measure_training,
    median_iqr,
    num_threads,
    realised_speedup,
    report_json,
    saved_tensor_bytes,
    with_ratios,
)
from leanconv.layers import create_conv
from leanconv.models import registry as model_registry

F32 = 4  # bytes


# ---------------------------------------------------------------------------------------------
# Statistics and ratios from given numbers
# ---------------------------------------------------------------------------------------------
def test_median_iqr_linear_interpolation():
    assert median_iqr([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, 2.0)  # p25 = 2, p75 = 4
    median, iqr = median_iqr([1.0, 2.0, 3.0, 4.0])
    assert median == 2.5 and iqr == pytest.approx(1.5)  # p25 = 1.75, p75 = 3.25
    assert median_iqr([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        median_iqr([])


def test_realised_speedup_formula():
    # 2x faster with 4x fewer MACs realises half of the MAC reduction.
    assert realised_speedup(0.2, 0.1, 4_000, 1_000) == pytest.approx(0.5)
    # Slower with fewer MACs: 0.67x speed with 2.75x fewer MACs (the SPConv figure).
    assert realised_speedup(208, 309, 275, 100) == pytest.approx((208 / 309) / 2.75)


def _result(conv, macs, lat, ips=None, saved=None, params=100, error=None):
    return ConvResult(
        conv, params=params, macs=macs,
        latency={b: LatencyResult(t, t / 10, 2) for b, t in lat.items()},
        train=TrainResult(ips, 64 / ips, 0.0, 64, 2) if ips else None,
        backward=SavedTensors(saved, 1, 1) if saved else None, error=error,
    )


def test_with_ratios_against_vanilla():
    results = [
        _result("vanilla", 1_000, {1: 0.010, 32: 0.200}, ips=200.0, saved=1_000, params=400),
        _result("spconv", 250, {1: 0.008, 32: 0.100}, ips=180.0, saved=1_500, params=100),
    ]
    rows = {r["conv"]: r for r in with_ratios(results)}
    v, s = rows["vanilla"], rows["spconv"]
    assert v["latency"][1]["ratio"] == 1.0 and v["latency"][32]["realised"] == 1.0
    assert v["mac_reduction"] == 1.0 and v["train_ratio"] == 1.0 and v["memory_ratio"] == 1.0
    assert s["mac_reduction"] == 4.0 and s["params_ratio"] == 0.25
    assert s["latency"][32]["ratio"] == pytest.approx(0.5)
    assert s["latency"][32]["speedup"] == pytest.approx(2.0)
    assert s["latency"][32]["realised"] == pytest.approx(0.5)
    assert s["latency"][1]["realised"] == pytest.approx((0.010 / 0.008) / 4)
    assert s["train_ratio"] == pytest.approx(0.9)
    assert s["memory_ratio"] == pytest.approx(1.5)
    assert s["backward_bytes"] == 1_500 and s["train_images_per_s"] == 180.0
    json.dumps(rows)  # plain data


def test_with_ratios_without_baseline_gives_none():
    rows = with_ratios([_result("vanilla", 1, {}, error="broken"), _result("ghost", 1, {1: 1.0})])
    ghost = rows[1]
    assert ghost["latency"][1]["ratio"] is None and ghost["mac_reduction"] is None
    assert rows[0]["error"] == "broken"


def test_num_threads_restores():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------
# Memory held for backward, computable by hand
# ---------------------------------------------------------------------------------------------
def test_saved_bytes_linear():
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    # addmm saves its input (5 x 8) for the weight's gradient; the input needs no gradient, so
    # the weight is not saved.
    got = saved_tensor_bytes(layer, x)
    assert got.bytes == 5 * 8 * F32 and got.storages == 1 and got.saved == 1
    # With an input that needs a gradient the weight is saved too; it is a parameter, counted
    # only on request.
    x.requires_grad_()
    assert saved_tensor_bytes(layer, x).bytes == 5 * 8 * F32
    with_params = saved_tensor_bytes(layer, x, include_parameters=True)
    assert with_params.bytes == (5 * 8 + 4 * 8) * F32 and with_params.storages == 2


def test_saved_bytes_conv_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    # conv saves its input; ReLU saves its output.
    expected = (2 * 3 * 8 * 8 + 2 * 4 * 8 * 8) * F32
    assert saved_tensor_bytes(model, x).bytes == expected
    # In-place ReLU saves the conv output itself: the same bytes, one storage each.
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True))
    got = saved_tensor_bytes(inplace, x)
    assert got.bytes == expected and got.storages == 2


def test_saved_bytes_view_counts_whole_storage_once():
    class TwoSlices(nn.Module):
        def forward(self, x):  # both sigmoids save their outputs; x itself is not saved
            y = torch.sigmoid(x)
            return (y[:, :2] * y[:, 2:]).sum()  # mul saves both views of y's storage

    x = torch.randn(3, 4, requires_grad=True)
    got = saved_tensor_bytes(TwoSlices(), x, backward=False)
    assert got.bytes == 3 * 4 * F32 and got.storages == 1 and got.saved == 3


def test_saved_bytes_restores_mode_and_leaves_no_grads():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    saved_tensor_bytes(model, torch.randn(2, 3, 5, 5))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Latency and training: structure only
# ---------------------------------------------------------------------------------------------
def _tiny(conv="vanilla", classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        create_conv(conv, 8, 8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def test_measure_latency_structure():
    lat = measure_latency(_tiny().eval(), torch.randn(2, 3, 8, 8), threads=1, min_run_time=0.01)
    assert lat.threads == 1 and len(lat.times) >= 1
    assert lat.median > 0 and lat.iqr >= 0
    assert (lat.median, lat.iqr) == median_iqr(lat.times)
    with pytest.raises(ValueError, match="method"):
        measure_latency(_tiny().eval(), torch.randn(1, 3, 8, 8), method="fast")


def test_measure_training_structure_and_updates_weights():
    model = _tiny()
    before = model[-1].weight.detach().clone()
    res = measure_training(model, (4, 3, 8, 8), 10, threads=1, steps=3, warmup=1)
    assert len(res.times) == 3 and res.batch == 4
    assert res.images_per_s == pytest.approx(4 / res.step_median)
    assert not torch.equal(before, model[-1].weight)


def _builder(conv):
    if conv == "broken":
        raise NotImplementedError("not written yet")
    return _tiny(conv)


def test_bench_convs_side_by_side():
    report = bench_convs(
        _builder, ["ghost", "broken"], (3, 8, 8), batches=(1, 2), threads=1, train=True,
        rounds=2, min_run_time=0.01, train_steps=1, train_warmup=1, title="tiny",
    )
    assert [r.conv for r in report.results] == ["vanilla", "ghost", "broken"]  # baseline added
    rows = {r["conv"]: r for r in report.rows()}
    assert rows["broken"]["error"].startswith("NotImplementedError")
    assert rows["broken"]["latency"] == {}
    van, ghost = rows["vanilla"], rows["ghost"]
    assert set(van["latency"]) == {1, 2}
    assert van["latency"][2]["ratio"] == 1.0
    assert ghost["macs"] < van["macs"]
    lat = report.results[1].latency[2]
    assert ghost["latency"][2]["ratio"] == pytest.approx(
        lat.median / report.results[0].latency[2].median)
    # Two rounds pooled: more than one block of times per (conv, batch).
    assert len(lat.times) >= 2
    # Training at the largest batch; memory: the first conv's input (2 x 3 x 8 x 8) at least.
    assert report.results[1].train.batch == 2
    assert van["backward_bytes"] >= 2 * 3 * 8 * 8 * F32
    assert report.settings["train_batch"] == 2 and report.env["threads"] == 1

    table = format_table(report)
    assert "allocator: " in table and "threads 1" in table
    assert "| broken | skipped: NotImplementedError" in table
    assert "| ghost |" in table and "train img/s b2" in table
    data = json.loads(json.dumps(report_json(report)))
    assert data["rows"][0]["conv"] == "vanilla"


def test_bench_convs_prepared_path_reports_diff():
    report = bench_convs(_builder, ["vanilla"], (3, 8, 8), batches=(1,), rounds=1,
                         min_run_time=0.01, inference_path="prepared")
    assert report.results[0].max_abs_diff is not None
    assert report.results[0].max_abs_diff < 1e-4
    assert 0 <= report.results[0].max_rel_diff < 1e-4
    assert "max abs diff (rel.)" in format_table(report)
    with pytest.raises(ValueError, match="inference_path"):
        bench_convs(_builder, ["vanilla"], (3, 8, 8), inference_path="onnx")


def test_format_table_from_given_numbers():
    results = [_result("vanilla", 1_000_000, {1: 0.010}), _result("spconv", 500_000, {1: 0.008})]
    report = BenchReport("given", {"torch": "x", "device": "cpu", "threads": 2, "cpu_count": 2,
                                   "load_average": None, "allocator": "glibc malloc defaults"},
                         {"batches": [1], "train": False, "inference_path": "eager",
                          "rounds": 1}, results)
    table = format_table(report)
    line = next(ln for ln in table.splitlines() if ln.startswith("| spconv"))
    assert "2.00x" in line  # MAC reduction
    assert "0.80x" in line  # time ratio 8 / 10
    assert "62%" in line  # realised (10 / 8) / 2 = 0.625


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_bench(monkeypatch, tmp_path, capsys):
    def tinynet(*, conv="vanilla", num_classes=10, **hparams):
        return _tiny(conv, num_classes)

    monkeypatch.setitem(model_registry._MODELS, "tinynet", tinynet)
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "tinynet", "--convs", "vanilla,ghost", "--batch", "1,2",
                     "--threads", "1", "--train", "--input", "8", "--rounds", "1",
                     "--min-run-time", "0.01", "--train-steps", "1", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "threads 1" in text and "| ghost |" in text and "train ratio" in text
    data = json.loads(out.read_text())
    assert [r["conv"] for r in data["rows"]] == ["vanilla", "ghost"]
    assert data["settings"]["batches"] == [1, 2] and data["settings"]["input_shape"] == [3, 8, 8]


def test_bench_model_unknown_name():
    from leanconv.bench import bench_model

    with pytest.raises(ValueError, match="unknown model 'nonet'"):
        bench_model("nonet", ["vanilla"])


def test_cli_bench_rejects_bad_batch():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "x", "--batch", "0"])


# ---------------------------------------------------------------------------------------------
# benchmarks/speed.py: the issue 6 bars from given numbers
# ---------------------------------------------------------------------------------------------
def _load_script(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_speed_bars_from_given_numbers():
    speed = _load_script("speed")

    def rows(lat, macs, ips=None, mem=None):
        results = [
            _result(conv, macs[conv], {8: lat[conv]}, ips=ips and ips[conv],
                    saved=mem and mem[conv]) for conv in lat
        ]
        return with_ratios(results)

    macs = {"vanilla": 1000, "spconv": 400, "ghost": 500}
    data = {
        # spconv: 0.9x time (1.11x speed of 2.5x fewer MACs: 44% realised) eager; prepared 0.5x
        # time (2x speed, 80% realised). ghost: 1.1x time eager, 1.05x prepared -> FAIL.
        "cifar-inference-eager": rows({"vanilla": 1.0, "spconv": 0.9, "ghost": 1.1}, macs),
        "cifar-inference-prepared": rows({"vanilla": 1.0, "spconv": 0.5, "ghost": 1.05}, macs),
        "imagenet-inference-eager": rows({"vanilla": 1.0, "spconv": 0.6, "ghost": 0.9}, macs),
        "imagenet-inference-prepared": rows({"vanilla": 1.0, "spconv": 0.7, "ghost": 0.8}, macs),
        "cifar-train-contiguous": rows({"vanilla": 1.0, "spconv": 1.0, "ghost": 1.0}, macs,
                                       ips={"vanilla": 100.0, "spconv": 95.0, "ghost": 80.0},
                                       mem={"vanilla": 100, "spconv": 160, "ghost": 120}),
        # channels_last: ghost passes there (0.95x, 1.2x memory), spconv is slower (0.7x)
        "cifar-train-channels_last": rows({"vanilla": 1.0, "spconv": 1.0, "ghost": 1.0}, macs,
                                          ips={"vanilla": 100.0, "spconv": 70.0, "ghost": 95.0},
                                          mem={"vanilla": 100, "spconv": 160, "ghost": 120}),
    }
    verdicts = {v["conv"]: v for v in speed.evaluate_bars(
        data, ["eager", "prepared"], ("contiguous", "channels_last"))}
    assert set(verdicts) == {"spconv", "ghost"}
    sp, gh = verdicts["spconv"], verdicts["ghost"]
    assert sp["inference"] is True
    assert sp["realised"] is True  # best path: cifar 80%, imagenet (1/0.6)/2.5 = 67%
    assert sp["cifar_eager_realised"] == pytest.approx((1 / 0.9) / 2.5)
    assert sp["train_ratio"] == pytest.approx(0.95) and sp["train_layout"] == "contiguous"
    assert sp["training"] is False  # memory 1.6x > 1.5x in both layouts
    assert gh["inference"] is False and gh["realised"] == "n/a"
    assert gh["training"] is True and gh["train_layout"] == "channels_last"  # 0.8x contiguous
    assert gh["train_ratio"] == pytest.approx(0.95)
    table = speed.bars_table(list(verdicts.values()), ["eager", "prepared"])
    assert "| spconv | 0.90 (44%) | 0.50 (80%) |" in table
    # A module that was not measured is reported as such, not as a failure.
    missing = speed.evaluate_bars(
        {"cifar-train-contiguous": data["cifar-train-contiguous"]}, ["eager"])
    assert {v["conv"]: v["inference"] for v in missing} == {"spconv": None, "ghost": None}


def test_layers_script_quick(capsys):
    layers = _load_script("layers")
    args = layers.build_parser().parse_args(
        ["--quick", "--convs", "vanilla,ghost", "--batch", "1", "--min-run-time", "0.005"])
    table = layers.run(args)
    assert [(r["shape"], r["conv"]) for r in table] == [
        ("16@14", "vanilla"), ("16@14", "ghost"), ("32@7", "vanilla"), ("32@7", "ghost")]
    # Vanilla unit = 3x3 conv (C*C*9) + BN (2C) parameters; MACs = C*C*9*H*W.
    assert table[0]["params"] == 16 * 16 * 9 + 2 * 16
    assert table[0]["macs"] == 16 * 16 * 9 * 14 * 14
    assert table[0]["latency"][1]["ratio"] == 1.0
    assert table[1]["latency"][1]["ratio"] is not None
    out = capsys.readouterr().out
    assert "conv + host BN" in out and "| 32@7 | ghost |" in out


def test_where_time_goes_script_splits_conv_time(capsys):
    where = _load_script("where_time_goes")
    args = where.build_parser().parse_args(
        ["--convs", "vanilla,ghost", "--model", "resnet20", "--input", "8", "--batch", "2",
         "--threads", "1", "--calls", "1", "--no-tune-allocator"])
    rows = where.run(args)
    assert [r["conv"] for r in rows] == ["vanilla", "ghost"]
    for r in rows:
        assert r["conv_ms"] > 0 and r["other_ms"] > 0  # convolutions found, and the rest
        assert all(op not in where.CONV_OPS for op, _ in r["top_other"])
    assert "| ghost |" in capsys.readouterr().out


def test_conv_scaling_script_times_each_shape_against_the_base_conv(capsys):
    scaling = _load_script("conv_scaling")
    args = scaling.build_parser().parse_args(
        ["--batch", "2", "--size", "8", "--min-run-time", "0.005", "--threads", "1",
         "--no-tune-allocator"])
    rows = scaling.run(args)
    # MACs per output pixel over the 16 -> 16 3x3 conv's 16 * 16 * 9
    expected = {"16 -> 16 3x3": 1.0, "16 -> 8 3x3": 0.5, "8 -> 16 3x3": 0.5, "8 -> 8 3x3": 0.25,
                "4 -> 4 3x3": 1 / 16, "4 -> 16 3x3": 0.25, "8 -> 8 3x3 depthwise": 1 / 32,
                "8 -> 16 1x1": 8 * 16 / (16 * 16 * 9)}
    assert {r["conv"]: r["macs_ratio"] for r in rows} == pytest.approx(expected)
    keys = [(2, layout, mode) for layout in ("NCHW", "channels_last")
            for mode in ("fwd", "fwd+bwd")]
    for r in rows:
        assert list(r["times"]) == keys and all(t > 0 for t, _ in r["times"].values())
    assert all(ratio == 1.0 for _, ratio in rows[0]["times"].values())
    print(scaling.format_table(rows, args))
    assert "| 8 -> 8 3x3 depthwise | 0.03 |" in capsys.readouterr().out
