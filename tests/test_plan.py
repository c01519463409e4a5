"""leanconv.plan: latency table cache, the choice, plan files, and their use everywhere."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import leanconv
from leanconv import plan as P
from leanconv.cli import main
from leanconv.layers import GhostConv, SPConv, VanillaConv


def _count_measurements(monkeypatch) -> list:
    calls = []
    original = P._Timed.measure

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(P._Timed, "measure", counting)
    return calls


FAST = dict(input_size=32, batch=2, rounds=1, min_run_time=0.0, warmup=0, check=False)


# ----------------------------------------------------------------------------------------------
# The latency table and its key
# ----------------------------------------------------------------------------------------------
def test_machine_key_names_everything_that_changes_a_time():
    key = P.machine_key("cpu", threads=2, batch=64)
    assert key["capability"] == torch.backends.cpu.get_cpu_capability()
    assert (key["device"], key["threads"], key["batch"], key["torch"]) == (
        "cpu", 2, 64, torch.__version__)
    assert key["cpu"]
    assert P.channel_block("AVX512") == 16 and P.channel_block("AVX2") == 8


def test_second_plan_on_the_same_machine_measures_nothing(tmp_path, monkeypatch):
    calls = _count_measurements(monkeypatch)
    first = P.make_plan("resnet20", convs=["ghost"], cache_dir=tmp_path, **FAST)
    n_first = len(calls)
    # 7 shapes of resnet20; 3x3 and 1x1 candidates vanilla, ghost, ghost ratio 4; x 2 paths,
    # plus vanilla's whole network per path
    assert n_first > 20
    tables = list(tmp_path.glob("latency-*.json"))
    assert len(tables) == 1
    data = json.loads(tables[0].read_text())
    assert data["key"] == P.machine_key("cpu", torch.get_num_threads(), 2)
    assert len(data["entries"]) == n_first
    second = P.make_plan("resnet20", convs=["ghost"], cache_dir=tmp_path, **FAST)
    assert len(calls) == n_first  # nothing new measured
    assert [layer["conv"] for layer in second.layers] == [layer["conv"] for layer in first.layers]
    # another batch is another key: a new table
    P.make_plan("resnet20", convs=["ghost"], cache_dir=tmp_path, **{**FAST, "batch": 3})
    assert len(list(tmp_path.glob("latency-*.json"))) == 2
    assert len(calls) == 2 * n_first


# ----------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------
def _brute_force(options, budget):
    best = None
    for picks in itertools.product(*(range(len(o)) for o in options)):
        weight = sum(options[i][j][1] for i, j in enumerate(picks))
        cost = sum(options[i][j][0] for i, j in enumerate(picks))
        if weight <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, picks)
    return best


def test_solve_matches_brute_force_on_random_tables():
    rng = random.Random(0)
    for _ in range(40):
        options = [[(rng.uniform(0.1, 2.0), rng.randint(1, 20)) for _ in range(rng.randint(1, 4))]
                   for _ in range(rng.randint(1, 5))]
        budget = rng.randint(5, 60)
        expected = _brute_force(options, budget)
        got = P.solve(options, budget, resolution=budget)  # unit = 1: exact
        if expected is None:
            assert got is None
            continue
        cost = sum(options[i][j][0] for i, j in enumerate(got))
        assert sum(options[i][j][1] for i, j in enumerate(got)) <= budget
        assert cost == pytest.approx(expected[0])


def test_solve_never_exceeds_the_budget_when_rounding():
    options = [[(1.0, 10), (0.5, 7)], [(1.0, 10), (0.2, 3)]]
    picks = P.solve(options, 13.5, resolution=7)  # unit 1.93: weights round up
    assert sum(options[i][j][1] for i, j in enumerate(picks)) <= 13.5
    assert P.solve(options, 9.0) is None  # lightest is 10


def test_solve_keeps_the_floor():
    def total(options, picks, k):
        return sum(o[j][k] for o, j in zip(options, picks, strict=True))

    rng = random.Random(1)
    for _ in range(40):
        options = [[(rng.uniform(0.1, 2.0), rng.randint(1, 20)) for _ in range(rng.randint(1, 4))]
                   for _ in range(rng.randint(1, 5))]
        budget = rng.randint(5, 60)
        floor = rng.randint(0, budget)
        got = P.solve(options, budget, resolution=budget * 8, floor=floor)  # unit 1/8
        feasible = [picks for picks in itertools.product(*(range(len(o)) for o in options))
                    if floor <= total(options, picks, 1) <= budget]
        if got is None:  # only where the rounding margin (one unit per layer) rules all out
            assert all(8 * total(options, p, 1) < 8 * floor + len(options) for p in feasible)
            continue
        assert floor <= total(options, got, 1) <= budget
        # least cost among the choices the margin admits
        admitted = [p for p in feasible if 8 * total(options, p, 1) >= 8 * floor + len(options)]
        assert total(options, got, 0) == pytest.approx(min(total(options, p, 0) for p in admitted))
    # without the floor the cheapest choice is the lightest; the floor forces a heavier one
    options = [[(1.0, 10), (0.1, 2)], [(1.0, 10), (0.1, 2)]]
    assert P.solve(options, 20, resolution=20) == [1, 1]
    picks = P.solve(options, 20, resolution=200, floor=11)  # 12 >= 11 + the 0.2 margin
    assert sorted(picks) == [0, 1]
    assert P.solve(options, 20, floor=21) is None


def _synthetic_table(tmp_path, model="resnet20", batch=8, fast_at=64):
    """A cached table where Ghost is twice as fast as vanilla at ``fast_at`` input channels and
    three times slower elsewhere, every other candidate 5x slower: the answer is known."""
    vanilla = leanconv.create_model(model, num_classes=10)
    layers = P.replaceable_layers(vanilla, (3, 32, 32))
    key = P.machine_key("cpu", torch.get_num_threads(), batch)
    table = P.LatencyTable(key, tmp_path)
    for path in P.PATHS["inference"]:
        table.entries[P._network_key("inference", path, vanilla, (3, 32, 32))] = {
            "median": 100.0 if path == "prepared" else 110.0, "iqr": 0.0, "n": 1}
        for shape in set(layers.values()):
            for conv, hp in P.candidates(shape, ["ghost", "spconv"]):
                t = 1.0
                if conv == "ghost" and not hp:
                    t = 0.5 if shape.in_channels == fast_at else 3.0
                elif conv != "vanilla":
                    t = 5.0
                t *= 1.0 if path == "prepared" else 1.1  # prepared is the faster path
                table.entries[P._entry_key("inference", path, shape, conv, hp)] = {
                    "median": t, "iqr": 0.0, "n": 1}
    table.save()
    return layers


def test_plan_on_a_synthetic_table_has_the_known_answer(tmp_path, monkeypatch):
    calls = _count_measurements(monkeypatch)
    layers = _synthetic_table(tmp_path)
    plan = P.make_plan("resnet20", convs=["ghost", "spconv"], cache_dir=tmp_path,
                       **{**FAST, "batch": 8})
    assert calls == []
    assert plan.path == "prepared"
    chosen = {layer["name"]: (layer["conv"], layer["hparams"]) for layer in plan.layers}
    assert list(chosen) == list(layers)
    for name, shape in layers.items():
        expected = "ghost" if shape.in_channels == 64 else "vanilla"
        assert chosen[name] == (expected, {}), name
    n_fast = sum(s.in_channels == 64 for s in layers.values())
    assert plan.totals["predicted_time"] == pytest.approx(100.0 - 0.5 * n_fast)
    # a tighter MAC budget forces slower replacements: least time among those that fit
    tight = P.make_plan("resnet20", convs=["ghost", "spconv"], cache_dir=tmp_path,
                        max_macs=0.6, **{**FAST, "batch": 8})
    assert tight.totals["mac_fraction"] <= 0.6
    assert tight.totals["predicted_time"] > plan.totals["predicted_time"]
    # the time budget: least MACs within 1.0 x vanilla's predicted time
    lean = P.make_plan("resnet20", convs=["ghost", "spconv"], cache_dir=tmp_path,
                       max_time=1.0, **{**FAST, "batch": 8})
    assert lean.totals["predicted_time"] <= 100.0 + 1e-9
    assert lean.totals["macs"] < plan.totals["macs"]
    # a MAC floor above the fastest plan's MACs keeps vanilla at some layers it replaced
    floor = (plan.totals["mac_fraction"] + 1.0) / 2
    kept = P.make_plan("resnet20", convs=["ghost", "spconv"], cache_dir=tmp_path,
                       min_macs=floor, **{**FAST, "batch": 8})
    assert floor <= kept.totals["mac_fraction"] <= 1.0
    assert kept.totals["predicted_time"] > plan.totals["predicted_time"]
    assert kept.budget == {"max_macs": 1.0, "min_macs": floor}


def test_width_aligned_variants_give_multiples_of_the_block():
    shape = P.LayerShape(64, 64, 3, 1, 1, False, 8, 8)
    cands = P.candidates(shape, ["spconv", "cru"], block=16)
    ratios = {hp["split_ratio"] for c, hp in cands if c == "spconv" and hp}
    assert ratios == {0.25, 0.75}  # 16 and 48 representative channels; 0.5 is the default
    for r in ratios:
        conv = leanconv.create_conv("spconv", 64, 64, split_ratio=r)
        assert conv.rep_channels % 16 == 0
    # 16 channels: no split leaves a multiple of 16 on both sides
    small = P.candidates(P.LayerShape(16, 16, 3, 1, 1, False, 32, 32), ["spconv"], block=16)
    assert small == [("vanilla", {}), ("spconv", {})]
    # 1x1 layers only get the convs whose papers replace 1x1s
    pw = P.candidates(P.LayerShape(64, 256, 1, 1, 1, False, 8, 8), ["spconv", "ghost"], block=16)
    assert {c for c, _ in pw} == {"vanilla", "ghost"}
    # SlimConv only where it keeps the width (k = 1, in = out)
    assert ("slimconv", {"compression_ratio": 1}) in P.candidates(shape, ["slimconv"])
    wide = P.LayerShape(16, 32, 3, 2, 1, False, 32, 32)
    assert [c for c, _ in P.candidates(wide, ["slimconv"])] == ["vanilla"]


# ----------------------------------------------------------------------------------------------
# Plan files: create_model, convert_convs, train, eval
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def synthetic_plan(tmp_path):
    _synthetic_table(tmp_path)
    plan = P.make_plan("resnet20", convs=["ghost", "spconv"], cache_dir=tmp_path,
                       **{**FAST, "batch": 8})
    path = tmp_path / "plan.json"
    plan.save(path)
    return plan, path


def test_plan_file_round_trip_through_create_model_and_convert_convs(synthetic_plan):
    plan, path = synthetic_plan
    loaded = P.load_plan(path)
    assert loaded.to_dict() == plan.to_dict()
    for source in (plan, path, str(path), plan.to_dict()):
        model = leanconv.create_model("resnet20", num_classes=10, plan=source)
        modules = dict(model.named_modules())
        for layer in plan.layers:
            expected = GhostConv if layer["conv"] == "ghost" else VanillaConv
            assert type(modules[layer["name"]]) is expected
        assert leanconv.profile(model, (1, 3, 32, 32)).macs == plan.totals["macs"]
    converted = leanconv.convert_convs(leanconv.create_model("resnet20", num_classes=10),
                                       plan=path)
    planned = leanconv.create_model("resnet20", num_classes=10, plan=path)
    assert [type(m) for m in converted.modules()] == [type(m) for m in planned.modules()]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    planned.load_state_dict(converted.state_dict())
    torch.testing.assert_close(planned.eval()(x), converted.eval()(x))


def test_train_with_a_plan_and_eval_rebuilds_it(synthetic_plan, tmp_path, capsys):
    plan, path = synthetic_plan
    out = tmp_path / "run"
    assert main(["train", "resnet20", "--data", "synthetic", "--out", str(out), "--epochs", "1",
                 "--batch-size", "32", "--train-subset", "64", "--test-subset", "64",
                 "--plan", str(path)]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["plan"]["layers"] == plan.to_dict()["layers"]
    rebuilt = leanconv.checkpoint.build_model_from_checkpoint(ckpt)
    n_ghost = sum(isinstance(m, GhostConv) for m in rebuilt.modules())
    assert n_ghost == plan.convs()["ghost"] > 0
    capsys.readouterr()
    assert main(["eval", str(out / "last.pt"), "--json", str(tmp_path / "ev.json")]) == 0
    top1 = json.loads((tmp_path / "ev.json").read_text())["top1"]
    assert top1 == pytest.approx(ckpt["metrics"]["test_top1"])


def test_bench_plan_adds_a_planned_row(synthetic_plan):
    from leanconv.bench import bench_model

    plan, _ = synthetic_plan
    report = bench_model("resnet20", ["vanilla"], plan=plan, batches=(2,), rounds=1,
                         min_run_time=0.01)
    rows = {r["conv"]: r for r in report.rows()}
    assert rows["planned"]["macs"] == plan.totals["macs"]
    assert rows["planned"]["latency"][2]["ratio"] > 0


def test_check_plan_times_both_networks(synthetic_plan):
    plan, _ = synthetic_plan
    check = P.check_plan(plan, rounds=1, min_run_time=0.01, warmup=0)
    assert set(check["measured"]) == {f"{w}|{p}" for w in ("vanilla", "planned")
                                      for p in ("eager", "prepared")}
    assert check["speedup"] == pytest.approx(check["vanilla_best"] / check["planned_best"])
    assert check["prediction_error"] == pytest.approx(
        plan.totals["predicted_time"] / check["planned_on_path"] - 1)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_bad_input_gets_one_clear_error(synthetic_plan, tmp_path, capsys):
    plan, path = synthetic_plan
    with pytest.raises(P.PlanError, match="unknown model 'resnet21'; available models"):
        P.make_plan("resnet21", cache_dir=tmp_path, **FAST)
    with pytest.raises(P.PlanError, match="unknown conv 'slim'; available convs: vanilla"):
        P.make_plan("resnet20", convs=["slim"], cache_dir=tmp_path, **FAST)
    with pytest.raises(P.PlanError, match="objective='speed'; allowed: inference, training"):
        P.make_plan("resnet20", objective="speed", cache_dir=tmp_path, **FAST)
    with pytest.raises(P.PlanError, match=r"min_macs=0\.9; must be >= 0 and below max_macs=0\.8"):
        P.make_plan("resnet20", max_macs=0.8, min_macs=0.9, cache_dir=tmp_path, **FAST)
    with pytest.raises(P.PlanError, match="give it with --max-macs"):
        P.make_plan("resnet20", max_time=0.8, min_macs=0.5, cache_dir=tmp_path, **FAST)
    with pytest.raises(P.PlanError, match=r"max_macs=0.1 cannot be met .* smallest achievable "
                       r"is 0\.\d+ of vanilla's MACs"):
        P.make_plan("resnet20", convs=["ghost", "spconv"], max_macs=0.1, cache_dir=tmp_path,
                    **{**FAST, "batch": 8})
    with pytest.raises(ValueError, match="made for model 'resnet20', not 'resnet32'"):
        leanconv.create_model("resnet32", plan=path)
    with pytest.raises(ValueError, match="plan chooses each layer's conv"):
        leanconv.create_model("resnet20", conv="spconv", plan=path)
    # a model with other layers (same name, other widths) is refused naming the layer
    data = plan.to_dict()
    data["layers"][0]["out_channels"] = 99
    with pytest.raises(P.PlanError, match=r"plan layer 'layer1\.0\.conv1' is in/out/kernel/stride"):
        leanconv.create_model("resnet20", plan=data)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(P.PlanError, match="is not a leanconv plan"):
        P.load_plan(bad)
    bad.write_text(json.dumps({"format": P.PLAN_FORMAT, "model": "resnet20"}))
    with pytest.raises(P.PlanError, match="corrupted leanconv plan: missing"):
        P.load_plan(bad)
    with pytest.raises(P.PlanError, match="does not exist"):
        P.load_plan(tmp_path / "none.json")
    other = plan.to_dict()
    other["machine"] = {**other["machine"], "cpu": "Some Other CPU"}
    with pytest.warns(UserWarning, match="plan made on another machine: cpu 'Some Other CPU'"):
        P.load_plan(other)
    # the CLI: one line naming the problem, no traceback, exit 2
    for argv, message in (
            (["plan", "resnet20", "--max-macs", "0.1", "--convs", "ghost,spconv", "--batch", "8",
              "--cache", str(tmp_path), "--no-check", "--out", str(tmp_path / "p.json")],
             "smallest achievable is 0."),
            (["plan", "resnet20", "--convs", "slim", "--cache", str(tmp_path)],
             "unknown conv 'slim'; available convs"),
            (["plan", "resnet20", "--max-macs", "-1"], "--max-macs"),
            (["plan", "resnet20", "--max-time", "0.9", "--min-macs", "0.5", "--cache",
              str(tmp_path)], "min_macs is a floor under the MAC budget"),
            (["plan", "resnet20", "--min-macs", "-0.5"], "--min-macs"),
            (["train", "resnet32", "--data", "synthetic", "--plan", str(path),
              "--out", str(tmp_path / "r")], "made for model 'resnet20', not 'resnet32'"),
            (["bench", "resnet20", "--plan", str(bad)], "corrupted leanconv plan")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and message in err[-1], (argv, err)
        assert not any("Traceback" in line for line in err)


def test_plan_cli_writes_the_file_and_prints_the_table(tmp_path, capsys):
    _synthetic_table(tmp_path)
    out = tmp_path / "p.json"
    assert main(["plan", "resnet20", "--convs", "ghost,spconv", "--batch", "8", "--cache",
                 str(tmp_path), "--no-check", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| layer3.0.conv2 | 64->64 k3 s1 @8x8 | ghost |" in text
    assert "predicted:" in text
    assert P.load_plan(out).model == "resnet20"


def test_spconv_candidates_are_real_modules():
    shape = P.LayerShape(64, 64, 3, 1, 1, False, 8, 8)
    for conv, hp in P.candidates(shape, ["spconv"], block=16):
        module = P._build_conv(shape, conv, hp)
        assert isinstance(module, SPConv if conv == "spconv" else VanillaConv)
        assert module(torch.randn(1, 64, 8, 8)).shape == (1, 64, 8, 8)


def test_plan_for_any_cnn_applies_with_convert_convs(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    plan = P.make_plan(net, convs=["ghost"], cache_dir=tmp_path, **FAST)
    assert plan.model == "ResNet" and len(plan.layers) == 19  # 16 3x3 + 3 projections
    assert all(type(m) is not GhostConv for m in net.modules())  # the given model is untouched
    converted = leanconv.convert_convs(torchvision.models.resnet18(num_classes=10), plan=plan)
    modules = dict(converted.named_modules())
    for layer in plan.layers:
        assert (type(modules[layer["name"]]) is GhostConv) == (layer["conv"] == "ghost")
    assert converted(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    check = P.check_plan(plan, model=net, rounds=1, min_run_time=0.0, warmup=0)
    assert check["planned_best"] > 0


def test_network_key_tells_two_models_of_one_class_apart():
    a = leanconv.create_model("resnet20", num_classes=10)
    b = leanconv.create_model("resnet32", num_classes=10)
    c = leanconv.create_model("resnet20", num_classes=100)
    keys = {P._network_key("inference", "eager", m, (3, 32, 32)) for m in (a, b, c)}
    assert len(keys) == 3
    assert P._network_key("inference", "eager", a, (3, 32, 32)) == P._network_key(
        "inference", "eager", leanconv.create_model("resnet20", num_classes=10), (3, 32, 32))


def test_replaceable_layers_follow_convert_convs_rule():
    from torch import nn

    from leanconv.plan import replaceable_layers

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),              # the stem: kept
        nn.Conv2d(8, 8, 3, padding=0),              # not same-padded: a rebuild would re-pad it
        nn.Conv2d(8, 8, 3, padding=1),              # replaceable
        nn.Conv2d(8, 8, 1),                         # 1x1: replaceable (CompConv, Ghost)
        nn.Conv2d(8, 8, 3, padding=1, groups=2),    # grouped: kept
        nn.Conv2d(8, 8, 2, padding=1),              # even kernel: kept
    )
    assert list(replaceable_layers(model, (3, 16, 16))) == ["2", "3"]
