"""leanconv.layers.conversion_report: a dry run of convert_convs that agrees with it."""

import copy

import pytest
import torch
from torch import nn

import leanconv
from leanconv import ConversionReport, conversion_report, convert_convs, profile


def toy():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),                       # 0: stem
        nn.Conv2d(4, 4, 3, padding=1),                       # 1: too few channels
        nn.Conv2d(4, 16, 1),                                 # 2: 1x1
        nn.Conv2d(16, 16, 3, padding=1, groups=16),          # 3: depthwise
        nn.Conv2d(16, 32, 3, stride=2, padding=1),           # 4: replaced
        nn.Conv2d(32, 32, (1, 3), padding=(0, 1)),           # 5: non-square
        nn.Conv2d(32, 32, 3, padding=1, bias=False),         # 6: replaced
    )


def test_reasons_params_and_macs_match_the_real_conversion():
    model = toy()
    rep = conversion_report(model, "spconv", input_size=(3, 16, 16), split_ratio=0.5)
    reasons = {d.name: (d.action, d.reason.split(":")[0]) for d in rep.decisions}
    assert reasons == {
        "0": ("keep", "stem"), "1": ("keep", "too few channels (<= 4 input channels)"),
        "2": ("keep", "1x1 (pointwise)"), "3": ("keep", "grouped / depthwise (groups > 1)"),
        "4": ("replace", "replaced by spconv"), "5": ("keep", "non-square kernel"),
        "6": ("replace", "replaced by spconv"),
    }
    assert rep.ok and len(rep.by_reason()) == 6
    converted = convert_convs(copy.deepcopy(model), "spconv", split_ratio=0.5)
    assert rep.params_after == sum(p.numel() for p in converted.parameters())
    assert rep.params_before == sum(p.numel() for p in model.parameters())
    assert rep.params_after < rep.params_before
    assert rep.macs_after == profile(converted, (3, 16, 16)).macs < rep.macs_before
    # Per layer: the replaced one shrinks, a kept one is unchanged.
    d4, d2 = rep.decisions[4], rep.decisions[2]
    assert d4.params_after == sum(p.numel() for p in converted[4].parameters())
    assert d4.macs_after < d4.macs_before and d2.macs_after == d2.macs_before > 0
    # The model was not touched.
    assert all(type(m) is nn.Conv2d for m in model)
    text = rep.table()
    assert "2 replaced, 5 kept, 0 errors" in text and "MACs" in text


def test_failures_are_reported_not_raised():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(8, 16, 3, padding=1))
    rep = conversion_report(model, "slimconv", input_size=(8, 8, 8))  # SlimConv narrows
    actions = [(d.action, d.reason) for d in rep.decisions]
    assert actions[0] == ("error", "padding_mode='reflect' is not supported")
    assert actions[1][0] == "error" and actions[1][1].startswith(
        "the replacement gives 6 channels where the layer gave 16, and its output reaches "
        "the model's output, which needs 16")
    assert not rep.ok and rep.macs_after is None and rep.params_after == rep.params_before
    assert "n/a (the conversion fails)" in rep.table()
    with pytest.raises(ValueError):  # and convert_convs does fail on it
        convert_convs(copy.deepcopy(model), "slimconv")


def test_custom_predicate_and_bad_arguments():
    rep = conversion_report(toy(), "ghost", predicate=lambda name, m: name == "6")
    assert [d.action for d in rep.decisions].count("replace") == 1
    assert rep.decisions[4].reason == "excluded by the predicate" and rep.macs_before is None
    with pytest.raises(ValueError, match="does not take flipping"):
        conversion_report(toy(), "spconv", flipping="none")
    with pytest.raises(ValueError, match="unknown conv 'nope'"):
        conversion_report(toy(), "nope")


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    rep = conversion_report(torchvision.models.resnet18(), "scconv", input_size=64)
    groups = {k: len(v) for k, v in rep.by_reason().items()}
    assert groups[("replace", "replaced by scconv")] == 16
    assert groups[("keep", "1x1 (pointwise): nothing spatial to slim")] == 3
    assert rep.macs_after < rep.macs_before and rep.params_after < rep.params_before


def test_dry_run_is_the_report_and_changes_nothing():
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = convert_convs(model, "spconv", dry_run=True, input_size=(3, 16, 16), split_ratio=0.5)
    assert isinstance(rep, ConversionReport) and leanconv.conversion_report is conversion_report
    same = conversion_report(model, "spconv", input_size=(3, 16, 16), split_ratio=0.5)
    assert rep.table() == same.table()
    assert (rep.params_after, rep.macs_after) == (same.params_after, same.macs_after)
    assert all(type(m) is nn.Conv2d for m in model)
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())
    with pytest.raises(ValueError, match="pass it with dry_run=True"):
        convert_convs(model, "spconv", input_size=16)
    with pytest.raises(ValueError, match="either plan= or conv"):
        convert_convs(model, plan={"layers": []}, dry_run=True)


def test_kernels_and_paddings_the_conv_types_cannot_build():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                       # 0: stem
        nn.Conv2d(8, 8, 2, stride=2),                        # 1: even kernel (ConvNeXt-like)
        nn.Conv2d(8, 8, 3),                                  # 2: padding 0, not same
        nn.Conv2d(8, 8, 3, stride=(2, 1), padding=1),        # 3: non-square stride
        nn.Conv2d(8, 8, 3, padding="same"),                  # 4: replaced
        nn.Conv2d(8, 8, 5, padding=2, bias=True),            # 5: replaced, keeps its bias
    )
    rep = conversion_report(model, "ghost")
    assert [(d.action, d.reason.split(":")[0]) for d in rep.decisions] == [
        ("keep", "stem"), ("keep", "even kernel"),
        ("keep", "padding (0, 0) is not the same padding dilation*(k-1)/2 the conv types use"),
        ("keep", "non-square stride or dilation"),
        ("replace", "replaced by ghost"), ("replace", "replaced by ghost")]
    converted = convert_convs(copy.deepcopy(model), "ghost")
    assert converted[5].primary.kernel_size == (5, 5) and converted[5].out_channels == 8
    x = torch.randn(1, 3, 16, 16)
    assert converted(x).shape == model(x).shape == (1, 8, 3, 6)
    # A custom predicate choosing them gets an error naming the layer, not a silent re-padding.
    everything = conversion_report(model, "ghost", predicate=lambda n, m: n in ("1", "2"))
    assert [d.action for d in everything.decisions[1:3]] == ["error", "error"]
    assert everything.decisions[1].reason == "kernel_size must be odd (1, 3, 5, ...), got 2"
    assert everything.decisions[2].reason.startswith("padding must be None, 'same' or")
    with pytest.raises(ValueError, match=r"^1: cannot replace it with ghost: kernel_size must"):
        convert_convs(model, "ghost", predicate=lambda n, m: n in ("1", "2"))
    assert all(type(m) is nn.Conv2d for m in model)
