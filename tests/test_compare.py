"""``leanconv compare``: outputs, columns, reuse of finished entries, resume, study defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from leanconv import compare
from leanconv.cli import main
from leanconv.compare import (
    BUDGETS,
    JSON_COLUMNS,
    md_columns,
    resolve_compare_config,
    run_compare,
    study_hparams,
)

CONVS = ["vanilla", "ghost"]
BATCHES = [1, 2]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One real tiny study through the CLI (synthetic data, 2 conv types, real training)."""
    out = tmp_path_factory.mktemp("compare") / "study"
    main(["compare", "--budget", "tiny", "--data", "synthetic", "--convs", ",".join(CONVS),
          "--batch", ",".join(map(str, BATCHES)), "--out", str(out)])
    return out


def _fake_result(top1: float = 0.5):
    row = {"test_top1": top1, "test_top5": 0.9, "time": 1.0, "images_per_s": 10.0}
    return SimpleNamespace(history=[row])


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "entries").glob("*.json"))}


def test_every_output_file(study):
    for name in ("config.json", "config.yaml", "results.json", "results.md", "pareto.png",
                 "entries/speed.json", "entries/train-vanilla-seed0.json",
                 "entries/train-ghost-seed0.json"):
        assert (study / name).is_file(), name
    png = (study / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    config = json.loads((study / "config.json").read_text())
    assert config["convs"] == CONVS and config["budget"] == "tiny"
    assert config["batches"] == BATCHES and config["seeds"] == [0]
    assert config["train_subset"] == 64 and config["epochs"] == 1 and config["batch_size"] == 16
    # every training run directory holds its own run (checkpoints + metrics)
    runs = sorted((study / "runs").iterdir())
    assert [r.name.split("-seed")[0] for r in runs] == sorted(CONVS)
    for run in runs:
        assert (run / "last.pt").is_file() and (run / "metrics.csv").is_file()


def test_results_json_columns(study):
    results = json.loads((study / "results.json").read_text())
    rows = results["rows"]
    assert [r["conv"] for r in rows] == CONVS
    latency_cols = [f"latency_b{b}_{s}" for b in BATCHES for s in ("ms", "iqr_ms", "ratio")]
    for row in rows:
        assert set(row) == set(JSON_COLUMNS) | set(latency_cols), row.keys()
        assert row["error"] is None
        for key in ("params", "macs", "mac_reduction", "train_images_per_s", "train_ratio",
                    "backward_bytes", "memory_ratio", "top1_mean", "train_time_s", *latency_cols):
            assert row[key] is not None and row[key] >= 0, key
        assert 0.0 <= row["top1_mean"] <= 1.0
        assert row["top1_runs"] == [row["top1_mean"]] and row["seeds"] == [0]
        assert row["top1_std"] is None  # one seed: no spread
        assert row["epochs"] == 1
    vanilla, ghost = rows
    # ratios are to vanilla measured in the same run
    for key in ("mac_reduction", "train_ratio", "memory_ratio", "params_ratio",
                *(f"latency_b{b}_ratio" for b in BATCHES)):
        assert vanilla[key] == pytest.approx(1.0), key
    assert ghost["latency_b1_ratio"] == pytest.approx(
        ghost["latency_b1_ms"] / vanilla["latency_b1_ms"])
    assert ghost["mac_reduction"] == pytest.approx(vanilla["macs"] / ghost["macs"])
    # resnet20, 10 classes, 3 x 32 x 32: vanilla's count is the CIFAR ResNet-20 of the tables
    assert vanilla["params"] == 272_474
    assert ghost["params"] < vanilla["params"] and ghost["macs"] < vanilla["macs"]
    # the top-1 is the last epoch of the run's own metrics
    entry = json.loads((study / "entries" / "train-ghost-seed0.json").read_text())
    metrics = [json.loads(line) for line in
               (Path(entry["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert ghost["top1_mean"] == metrics[-1]["test_top1"]
    env = results["env"]
    assert env["latency_threads"] == 1 and env["training_threads"] >= 1
    assert results["speed_settings"]["threads"] == 1
    assert results["speed_settings"]["batches"] == BATCHES


def test_results_md_columns(study):
    text = (study / "results.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == md_columns(BATCHES)
    assert "latency b2" in header and "top-1 %" in header and "bwd memory" in header
    body = lines[2:]
    assert [row.split("|")[1].strip() for row in body] == CONVS
    for row in body:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(header)
        assert all(c and c != "-" for c in cells), row
        assert cells[header.index("top-1 %")].endswith("(n=1)")
    assert "1 thread(s)" in text  # threads are stated


def test_rerun_reuses_every_entry(study, monkeypatch, capsys):
    before = _mtimes(study)
    results_before = json.loads((study / "results.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training run was recomputed")

    def no_speed(*args, **kwargs):
        raise AssertionError("the speed entry was recomputed")

    monkeypatch.setattr(compare, "_measure_speed", no_speed)
    config = resolve_compare_config("tiny", convs=CONVS, data="synthetic", batches=BATCHES,
                                    out=str(study))
    results = run_compare(config, trainer=no_training)
    assert results["computed"] == []
    assert sorted(results["reused"]) == ["speed", "train-ghost-seed0", "train-vanilla-seed0"]
    assert _mtimes(study) == before
    assert results["rows"] == results_before["rows"]
    assert "| ghost |" in capsys.readouterr().out  # the table is printed


def test_changed_config_recomputes_only_what_changed(study, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(study, out)
    calls = []

    def fake_train(tc, resume=False):
        calls.append((tc.conv, tc.seed, tc.hparams, resume))
        return _fake_result(0.25)

    measured = []
    monkeypatch.setattr(compare, "_measure_speed",
                        lambda c, info, say: measured.append(c.hparams) or json.loads(
                            (study / "entries" / "speed.json").read_text())["report"])
    # a second seed: seed 0 entries and the speed entry are reused, seed 1 trains
    config = resolve_compare_config("tiny", convs=CONVS, data="synthetic", batches=BATCHES,
                                    seeds=2, out=str(out))
    log = []
    results = run_compare(config, trainer=fake_train, progress=log.append)
    assert [(c, s) for c, s, _, _ in calls] == [("vanilla", 1), ("ghost", 1)]
    # progress names the stage, the conv, the seed and the study's ETA
    starts = [m for m in log if m.startswith("[train ")]
    assert starts[0].startswith("[train 1/2] vanilla seed 1") and "study ETA" in starts[0]
    assert starts[1].startswith("[train 2/2] ghost seed 1")
    assert any("reusing 2 finished run(s)" in m for m in log)
    assert measured == []
    ghost = results["rows"][1]
    assert ghost["seeds"] == [0, 1] and ghost["top1_runs"][1] == 0.25
    assert ghost["top1_std"] == pytest.approx(abs(ghost["top1_runs"][0] - 0.25) / 2 ** 0.5)
    # a ghost hyperparameter: ghost's runs and the speed entry are redone, vanilla's reused
    calls.clear()
    config = resolve_compare_config("tiny", convs=CONVS, data="synthetic", batches=BATCHES,
                                    seeds=2, hparams={"ghost": {"ratio": 4}}, out=str(out))
    results = run_compare(config, trainer=fake_train)
    assert [(c, s, h) for c, s, h, _ in calls] == [("ghost", 0, {"ratio": 4}),
                                                   ("ghost", 1, {"ratio": 4})]
    assert measured == [{"vanilla": {}, "ghost": {"ratio": 4}}]
    assert json.loads((out / "config.json").read_text())["hparams"]["ghost"] == {"ratio": 4}


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    speed = {"rows": [{"conv": "vanilla", "params": 1, "macs": 1, "latency": {}}],
             "env": {}, "settings": {}}
    monkeypatch.setattr(compare, "_measure_speed", lambda c, info, say: speed)

    def killed(tc, resume=False):
        Path(tc.out).mkdir(parents=True)
        (Path(tc.out) / "last.pt").write_bytes(b"epoch 1 of 2")
        raise KeyboardInterrupt

    config = resolve_compare_config("tiny", convs=["vanilla"], data="synthetic", epochs=2,
                                    out=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_compare(config, trainer=killed)
    assert not (tmp_path / "entries" / "train-vanilla-seed0.json").exists()
    seen = []

    def finish(tc, resume=False):
        seen.append(resume)
        return _fake_result()

    run_compare(config, trainer=finish)
    assert seen == [True]  # continued from last.pt, not restarted
    assert (tmp_path / "entries" / "train-vanilla-seed0.json").is_file()


def test_failing_conv_does_not_sink_the_study(tmp_path, monkeypatch):
    speed = {"rows": [{"conv": c, "params": 1, "macs": 1, "latency": {}} for c in CONVS],
             "env": {}, "settings": {}}
    monkeypatch.setattr(compare, "_measure_speed", lambda c, info, say: speed)

    def train(tc, resume=False):
        if tc.conv == "ghost":
            raise ValueError("boom")
        return _fake_result()

    config = resolve_compare_config("tiny", convs=CONVS, data="synthetic", out=str(tmp_path))
    results = run_compare(config, trainer=train)
    assert results["rows"][0]["top1_mean"] == 0.5 and results["rows"][0]["error"] is None
    assert results["rows"][1]["top1_mean"] is None and "boom" in results["rows"][1]["error"]
    assert "ghost: seed 0: ValueError: boom" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "entries" / "train-ghost-seed0.json").exists()  # retried next time


def test_budgets_and_study_defaults():
    quick = resolve_compare_config("quick")
    assert quick.convs == ["vanilla", "spconv", "slimconv", "scconv", "compconv", "ghost"]
    assert (quick.model, quick.data, quick.seeds, quick.epochs) == (
        "resnet20", "fashion-mnist", [0], 1)
    assert quick.train_subset == 20_000 and quick.test_subset is None
    assert quick.batches == [1, 32] and quick.threads == 1 and quick.train_batch == 128
    # standard = the training benchmark: full train set, the fashion-mnist recipe, SlimConv k=1
    std = resolve_compare_config("standard")
    assert (std.recipe, std.epochs, std.train_subset, std.test_subset) == (
        "fashion-mnist", 8, None, None)
    assert std.hparams["slimconv"] == {"compression_ratio": 1}
    assert std.hparams["spconv"] == {} and std.hparams["vanilla"] == {}
    full = resolve_compare_config("full")
    assert full.seeds == [0, 1, 2] and full.epochs == 16
    assert resolve_compare_config("quick", seeds=3).seeds == [0, 1, 2]
    # vanilla, the baseline, is always measured
    assert resolve_compare_config("tiny", convs="ghost").convs == ["vanilla", "ghost"]
    # flags reach only the convs that take them
    hp = resolve_compare_config("tiny", convs="spconv,ghost",
                                hparams={"spconv": {"split_ratio": 0.25, "ratio": 4},
                                         "ghost": {"ratio": 4}}).hparams
    assert hp == {"vanilla": {}, "spconv": {"split_ratio": 0.25}, "ghost": {"ratio": 4}}
    assert set(BUDGETS) == {"tiny", "quick", "standard", "full"}
    with pytest.raises(ValueError, match="budget"):
        resolve_compare_config("huge")
    with pytest.raises(ValueError, match="unknown conv"):
        resolve_compare_config("tiny", convs="vanila")


def test_slimconv_keeps_block_width_on_basic_blocks():
    assert study_hparams("resnet20", "slimconv", {}) == {"compression_ratio": 1}
    assert study_hparams("resnet18", "slimconv", {}) == {"compression_ratio": 1}
    assert study_hparams("resnet50", "slimconv", {}) == {}  # bottleneck: the paper's k = 4/3
    assert study_hparams("resnet20", "slimconv", {"compression_ratio": 2}) == {
        "compression_ratio": 2}
    assert study_hparams("resnet20", "spconv", {}) == {}


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["compare", "--convs", "nope", "--out", str(tmp_path)])
    assert err.value.code == 2 and "unknown conv 'nope'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_planned_row_is_planned_measured_and_trained(tmp_path, monkeypatch):
    """--plan-max-macs adds a 'planned' row: a training plan among the study's convs (NCHW, the
    study's layout), measured in the same speed run and trained under the same protocol."""
    from leanconv import plan as P

    monkeypatch.setattr(P, "DEFAULT_CACHE", tmp_path / "cache")
    trained = []

    def fake_train(tc, resume=False):
        trained.append((tc.conv, tc.plan is not None, tc.train_subset))
        return _fake_result(0.5)

    config = resolve_compare_config("tiny", convs=CONVS, data="synthetic", batches=[2],
                                    plan_max_macs=0.9, out=str(tmp_path / "study"))
    log = []
    results = run_compare(config, trainer=fake_train, progress=log.append, print_table=False)
    plan = results["plan"]
    assert plan["objective"] == "training" and plan["path"] == "contiguous"
    assert plan["batch"] == config.train_batch and plan["budget"] == {"max_macs": 0.9}
    assert {layer["conv"] for layer in plan["layers"]} <= {"vanilla", "ghost"}
    assert [r["conv"] for r in results["rows"]] == [*CONVS, "planned"]
    planned = results["rows"][-1]
    assert planned["macs"] / results["rows"][0]["macs"] <= 0.9
    assert planned["train_images_per_s"] > 0 and planned["top1_mean"] == 0.5
    assert planned["hparams"]["plan"].startswith(("vanilla x", "ghost x"))
    assert trained[-1] == ("vanilla", True, 64)  # the planned model: vanilla + plan
    assert "planned = the vanilla network" in (tmp_path / "study" / "results.md").read_text()
    assert any(m.startswith("[plan] ") for m in log)
    # the rerun reuses the plan, the speed entry and the training entries
    log.clear()
    run_compare(config, trainer=fake_train, progress=log.append, print_table=False)
    assert "[plan] reusing entries/plan.json" in log and len(trained) == 3


def test_quick_budget_sizes_the_subset_from_measured_throughput(tmp_path, monkeypatch):
    """The subset is what fits the time budget given a calibration run and the speed stage's
    throughputs; the same for every conv, kept for a resumed study, stated in results.md."""
    import time as _time

    speed = {"rows": [{"conv": "vanilla", "params": 1, "macs": 2, "latency": {},
                       "train_images_per_s": 100.0},
                      {"conv": "ghost", "params": 1, "macs": 1, "latency": {},
                       "train_images_per_s": 50.0}], "env": {}, "settings": {}}
    monkeypatch.setattr(compare, "_measure_speed", lambda c, info, say: speed)
    trained = []
    cost = 1e-3  # seconds per vanilla training image in the calibration run

    def fake_train(tc, resume=False):
        if "calibration" in tc.out:
            _time.sleep(cost * (tc.train_subset + tc.test_subset / 3))
        trained.append((tc.conv, tc.train_subset))
        return _fake_result()

    assert resolve_compare_config("quick", train_subset=5000).time_budget is None  # user-sized
    config = resolve_compare_config("quick", convs=CONVS, data="synthetic", time_budget=60.0,
                                    out=str(tmp_path / "q"))
    assert config.train_subset == 20_000  # the cap
    config.plan_max_macs = None  # (what --no-plan does)
    log = []
    results = run_compare(config, trainer=fake_train, progress=log.append, print_table=False)
    sizing = json.loads((tmp_path / "q" / "entries" / "sizing.json").read_text())
    n = sizing["train_subset"]
    # ghost trains at half vanilla's speed: 3 units of vanilla's cost per image, ~0.001 s each
    per_vanilla = sizing["seconds_per_image"]["vanilla"]
    assert sizing["seconds_per_image"]["ghost"] == pytest.approx(2 * per_vanilla)
    assert per_vanilla == pytest.approx(cost, rel=0.5)
    def fits(left):  # the largest multiple of 128 whose predicted training takes ``left``
        return (left / (3 * per_vanilla) - 256 / 3) // 128 * 128

    left = 60.0 - compare._BUDGET_MARGIN  # minus what the study spent before sizing (< 5 s)
    assert fits(left - 5) <= n <= fits(left)
    assert [t for t in trained if t[0] != "vanilla" or t[1] != 1024] == [
        ("vanilla", n), ("ghost", n)]
    assert results["config"]["train_subset"] == n
    assert f"fixed random subset of {n} train images (the same for every conv; the largest" in (
        tmp_path / "q" / "results.md").read_text()
    assert any(m.startswith("[sizing] ") and str(n) in m for m in log)


def test_compare_takes_a_plan_file(tmp_path, monkeypatch):
    """--plan FILE: the planned row is that plan (no planning), a plan for another model is a
    one-line usage error."""
    from leanconv import plan as P

    def no_planning(*args, **kwargs):
        raise AssertionError("compare planned although a plan file was given")

    plan = P.Plan(model="resnet20", input_shape=[3, 32, 32], batch=16, objective="training",
                  budget={"max_macs": 1.0}, path="contiguous", machine=P.machine_key(),
                  layers=[{"name": "layer3.0.conv2", "in_channels": 64, "out_channels": 64,
                           "kernel_size": 3, "stride": 1, "conv": "ghost", "hparams": {}}],
                  totals={"predicted_speedup": 1.0})
    path = tmp_path / "plan.json"
    plan.save(path)
    monkeypatch.setattr(compare, "_make_plan", no_planning)
    trained = []

    def fake_train(tc, resume=False):
        trained.append(tc.plan is not None)
        return _fake_result()

    config = resolve_compare_config("tiny", convs=CONVS, data="synthetic", batches=[2],
                                    plan_file=str(path), out=str(tmp_path / "study"))
    results = run_compare(config, trainer=fake_train, print_table=False)
    assert [r["conv"] for r in results["rows"]] == [*CONVS, "planned"]
    assert results["rows"][-1]["hparams"] == {"plan": "ghost x1"} and trained[-1]
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--budget", "tiny", "--data", "synthetic", "--model", "resnet32",
              "--plan", str(path), "--out", str(tmp_path / "other")])
    assert exc.value.code == 2


def test_paired_difference_and_verdict():
    from leanconv.compare import accuracy_verdict, paired_difference

    ref = {0: 0.91, 1: 0.93, 2: 0.93}
    mean, half, n = paired_difference({0: 0.90, 1: 0.92, 2: 0.91, 5: 0.5}, ref)  # seed 5 unpaired
    assert n == 3
    assert mean == pytest.approx(-0.04 / 3)
    # t(0.975, 2 dof) = 4.303, sample std of (-0.01, -0.01, -0.02) = 0.005774
    assert half == pytest.approx(4.303 * 0.0057735 / 3 ** 0.5, rel=1e-4)
    row = {"conv": "spconv", "top1_diff": mean, "top1_diff_ci95": half, "top1_pairs": n,
           "mac_reduction": 2.0}
    assert accuracy_verdict(row).startswith(
        "spconv: matches vanilla within seed noise at 2.00x fewer MACs")
    # the same loss on every seed: a zero-width interval that excludes 0
    mean, half, n = paired_difference({0: 0.90, 1: 0.92}, {0: 0.91, 1: 0.93})
    assert (mean, half, n) == (pytest.approx(-0.01), pytest.approx(0.0), 2)
    row.update(top1_diff=mean, top1_diff_ci95=half, top1_pairs=n)
    assert accuracy_verdict(row).startswith("spconv: loses 1.00 points at 2.00x fewer MACs")
    assert paired_difference({3: 0.9}, ref) is None
    mean, half, n = paired_difference({0: 0.95}, ref)
    assert half is None and "one seed" in accuracy_verdict(
        {**row, "top1_diff": mean, "top1_diff_ci95": half, "top1_pairs": n})
