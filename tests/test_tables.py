"""leanconv tables: hparam vocabulary, row evaluation, JSON / markdown outputs, CLI."""

import json
import math

import pytest

from leanconv import cli
from leanconv import tables as T
from leanconv.models import model_stages
from leanconv.tables import parse_hparams, parse_input, read_targets, run_tables

CSV = """paper,table,input,classes,model,conv,hparams,params_M,macs_G,note
CompConv,3,cifar 32x32,10,vgg16,vanilla,,14.7,0.314,pinned
SlimConv,3,imagenet 224x224,1000,mobilenet_v2,slimconv,k=8/3 r=24 L=6,3.38,0.256,
SlimConv,3,imagenet 224x224,1000,shufflenet_v2_x1_0,vanilla,,2.28,0.151,
X,1,cifar 32x32,10,no_such_model,vanilla,,1.0,0.1,cannot be built
X,1,cifar 32x32,10,vgg16,vanilla,zz=3,1.0,0.1,unknown key
"""


def test_parse_hparams_maps_to_constructor_names():
    assert parse_hparams("alpha=1/2 g=2", "spconv") == (
        {"split_ratio": 0.5, "gwc_groups": 2}, {})
    assert parse_hparams("alpha=1/2 r=2 g=2", "scconv")[0] == {
        "split_ratio": 0.5, "squeeze_ratio": 2, "gwc_groups": 2}
    conv, _ = parse_hparams("k=8/3 r=24 L=6", "slimconv")
    assert conv["se_reduction"] == 24 and conv["se_min_channels"] == 6
    assert conv["compression_ratio"] == pytest.approx(8 / 3)
    assert parse_hparams("variant=P22", "spconv")[0] == {"representative": "gwc-then-pwc"}
    assert parse_hparams("variant=no-P3", "spconv")[0] == {"fusion": "sum"}
    assert parse_hparams("s=2", "ghost")[0] == {"ratio": 2}
    assert parse_hparams("stages=3,4", "vanilla") == ({}, {"stages": (3, 4)})
    with pytest.raises(ValueError, match="unknown hparams key"):
        parse_hparams("zz=1", "spconv")
    with pytest.raises(ValueError, match="does not apply"):
        parse_hparams("k=2", "spconv")


def test_parse_input():
    assert parse_input("cifar 32x32") == ("cifar", (32, 32))
    assert parse_input("imagenet 224x224") == ("imagenet", (224, 224))
    assert parse_input("224") == ("imagenet", (224, 224))
    assert parse_input("32") == ("cifar", (32, 32))


def test_tables_json_and_markdown(tmp_path, capsys):
    targets = tmp_path / "t.csv"
    targets.write_text(CSV)
    out_json, out_md = tmp_path / "o.json", tmp_path / "o.md"
    results = run_tables(str(targets), markdown=str(out_md), json_path=str(out_json))
    assert len(results) == len(read_targets(str(targets))) == 5
    rows = json.loads(out_json.read_text())
    assert len(rows) == 5
    columns = ["paper", "table", "input", "classes", "model", "conv", "hparams", "params_M",
               "macs_G", "note"]
    for row in rows:
        assert all(c in row for c in columns)
        assert "measured_params_M" in row and "measured_macs_G" in row and "error" in row
    vgg, sc_mobile, shuffle, missing, badkey = rows
    assert vgg["measured_params"] == 14_724_042 and vgg["measured_macs"] == 313_201_664
    assert vgg["measured_params_M"] == pytest.approx(14.724042)
    assert vgg["within_tolerance"] is True and vgg["error"] is None
    assert sc_mobile["measured_params"] == 3_381_052 and sc_mobile["builder"] == "mobilenet_v2"
    assert shuffle["measured_params"] == 2_278_604
    # SlimConv's counting convention: conv + linear + 2 per BatchNorm output element
    assert shuffle["counter"] == "macs+bn" and vgg["counter"] == "macs"
    assert shuffle["measured_macs_convlinear"] == 144_907_992
    assert shuffle["measured_macs"] == 144_907_992 + 2 * 1_950_200
    assert vgg["measured_macs_convlinear"] == vgg["measured_macs"]
    for bad in (missing, badkey):
        assert bad["measured_params_M"] is None and bad["measured_macs_G"] is None
        assert bad["error"] and bad["within_tolerance"] is False
    assert "unknown model" in missing["error"] and "zz" in badkey["error"]
    md = out_md.read_text()
    assert md.startswith("| # | paper") and "ERROR" in md and "3/5 rows" in md
    assert "conv+lin MACs G" in md and "2/5 with plain conv+linear MACs" in md
    assert "3/5 rows" in capsys.readouterr().out


def test_cli_tables_and_profile(tmp_path, capsys):
    targets = tmp_path / "t.csv"
    targets.write_text(CSV)
    assert cli.main(["tables", "--targets", str(targets), "--rows", "1",
                     "--json", str(tmp_path / "o.json")]) == 0
    assert len(json.loads((tmp_path / "o.json").read_text())) == 1
    assert cli.main(["profile", "vgg16", "--input", "32", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "313,201,664" in out and "features.0" in out
    assert cli.main(["profile", "mobilenet_v2", "--conv", "slimconv", "--compression-ratio",
                     "8/3", "--se-reduction", "24", "--se-min-channels", "6", "--input", "224",
                     "--elementwise", "--json", str(tmp_path / "p.json")]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["params"] == 3_381_052 and data["elementwise"] > 0


def test_cli_counter_forces_one_convention(tmp_path):
    targets = tmp_path / "t.csv"
    targets.write_text(CSV)
    out = tmp_path / "o.json"
    assert cli.main(["tables", "--targets", str(targets), "--rows", "3", "--counter", "macs",
                     "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["counter"] == "macs" and row["measured_macs"] == 144_907_992


def test_tables_default_is_the_packaged_csv(monkeypatch, capsys):
    from importlib import resources

    packaged = T.packaged_targets()
    assert packaged == resources.files("leanconv") / "targets" / "complexity.csv"
    assert packaged.is_file()
    rows = T.read_targets()  # no path: the packaged file
    assert len(rows) == 66 and {r["paper"] for r in rows} == {
        "SPConv", "SlimConv", "SCConv", "CompConv"}
    # `leanconv tables` with no arguments evaluates every packaged row (stubbed: no building)
    seen = []

    def fake_evaluate(row, index, counter=None):
        seen.append((index, row["model"]))
        return T.RowResult(row=row, index=index)

    monkeypatch.setattr(T, "evaluate_row", fake_evaluate)
    assert cli.main(["tables"]) == 0
    assert seen == [(i, r["model"]) for i, r in enumerate(rows, 1)]
    assert "0/66 rows" in capsys.readouterr().out


def test_tables_reads_the_packaged_csv_for_real(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert cli.main(["tables", "--rows", "1,37", "--json", str(out)]) == 0

    first, resnet56 = json.loads(out.read_text())
    rows = T.read_targets()
    for got, row in ((first, rows[0]), (resnet56, rows[36])):
        expected = T.evaluate_row(row)
        assert got["model"] == row["model"] and got["measured_params"] == expected.params
        assert got["measured_macs"] == expected.macs and got["error"] is None
    assert first["model"] == "resnet20" and resnet56["model"] == "resnet56"


def _paper_rows(paper, model):
    return [(i, r) for i, r in enumerate(T.read_targets(), 1)
            if r["paper"] == paper and r["model"] == model]


def test_spconv_resnet20_params_fit_truncation_not_rounding():
    """docs/reproduction.md rows 2, 13, 15: SPConv prints its six ResNet-20 params truncated."""
    rows = _paper_rows("SPConv", "resnet20")
    assert [i for i, _ in rows] == [1, 2, 3, 13, 14, 15]
    rounded_ok = []
    for i, row in rows:
        result = T.evaluate_row(row, i)
        digits = len(row["params_M"].split(".")[1])
        measured = result.params / 1e6
        assert math.floor(measured * 10**digits) / 10**digits == float(row["params_M"]), i
        rounded_ok.append(round(measured, digits) == float(row["params_M"]))
    assert rounded_ok == [True, True, True, False, True, True]  # row 13: 0.156 -> 0.16


def test_spconv_vgg_baseline_row_is_spconv_at_alpha_one():
    """docs/reproduction.md row 4: the "Baseline" 16.62M / 349.51M is SPConv at alpha=1, g=1."""
    (index, row), *_ = _paper_rows("SPConv", "vgg15")
    assert index == 4 and row["conv"] == "vanilla"
    vanilla = T.evaluate_row(row, index)
    spconv = T.evaluate_row({**row, "conv": "spconv", "hparams": "alpha=1 g=1"}, index)
    assert not vanilla.ok and vanilla.params_diff < -0.09  # the vanilla build is 10 % below
    assert abs(spconv.params_diff) < 0.001 and abs(spconv.macs_diff) < 0.002


def test_spconv_vgg_alpha_sweep_is_affine_except_the_printed_row_8():
    """docs/reproduction.md row 8: MACs are affine in alpha; rows 5-7 predict 50.14M, not 55.14M."""
    rows = _paper_rows("SPConv", "vgg15")[1:]
    assert [r["hparams"] for _, r in rows] == [f"alpha=1/{n} g=2" for n in (2, 4, 8, 16)]
    paper = [float(r["macs_G"]) * 1e3 for _, r in rows]
    measured = [T.evaluate_row(r, i).macs / 1e6 for i, r in rows]
    step = paper[0] - paper[1]                      # alpha 1/2 -> 1/4
    assert paper[2] == pytest.approx(paper[1] - step / 2, abs=0.01)
    predicted = paper[1] - step / 2 - step / 4      # from rows 5-6 alone
    assert round(predicted, 2) == 50.14 and paper[3] - predicted == pytest.approx(5, abs=0.01)
    m_step = measured[0] - measured[1]
    for a, b, k in zip(measured, measured[1:], (1, 2, 4), strict=False):
        assert a - b == pytest.approx(m_step / k, rel=1e-3)
    assert abs(measured[3] / predicted - 1) < 0.01


def test_ablation_variants_of_the_papers_tables():
    assert parse_hparams("variant=no-P1 variant=no-P3", "spconv")[0] == {
        "redundant": False, "fusion": "sum"}
    assert parse_hparams("variant=C&S", "scconv")[0] == {"order": "parallel"}
    assert parse_hparams("variant=C+S", "scconv")[0] == {"order": "cs"}
    assert parse_hparams("variant=only-flipping", "slimconv")[0] == {"flipping": "only"}
    assert parse_hparams("variant=no-shuffle", "compconv")[0] == {"shuffle": False}
    assert parse_hparams("variant=identity-conv", "compconv")[0] == {"identity": "conv"}
    with pytest.raises(ValueError, match="needs argument 'order'"):
        parse_hparams("variant=C+S", "cru")
    # SPConv Tab. 4, fifth row (P21 only: no redundant part, no P3): 0.088M / 14.47M
    row = {"paper": "SPConv", "table": "4", "input": "cifar 32x32", "classes": "10",
           "model": "resnet20", "conv": "spconv",
           "hparams": "alpha=1/2 g=2 variant=no-P1 variant=no-P3", "params_M": "0.088",
           "macs_G": "0.01447"}
    result = T.evaluate_row(row)
    assert result.ok and result.params_m == pytest.approx(0.088, abs=5e-4)


def test_printed_precision():
    assert T._printed_equal(0.5555, "0.6") and T._printed_equal(0.10441, "0.10")
    assert not T._printed_equal(0.156378, "0.15") and not T._printed_equal(1.0, "n/a")
    row = {"params_M": "11.2", "macs_G": "0.6"}  # CompConv Tab. 7 ResNet-18: 0.5555 G is 7 % off
    result = T.RowResult(row=row, index=61, params=11_220_132, macs=555_500_000)
    assert not result.ok and result.ok_or_printed
    assert not T.RowResult(row={**row, "params_M": "12"}, index=1, params=11_220_132,
                           macs=555_500_000).ok_or_printed
    assert T.RowResult(row=row, index=1).ok_or_printed is False  # not built


def test_other_rows_csv_speaks_the_vocabulary():
    """docs/other_rows.csv (the papers' rows beyond the targets) parses and names zoo models."""
    from pathlib import Path

    rows = read_targets(Path(__file__).parents[1] / "docs" / "other_rows.csv")
    assert len(rows) >= 60
    for row in rows:
        _, model_kwargs = parse_hparams(row["hparams"], row["conv"])
        dataset, _ = parse_input(row["input"])
        name = T.resolve_model_name(row["model"], dataset)
        assert set(model_kwargs.get("stages", ())) <= set(model_stages(name))
