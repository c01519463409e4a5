"""leanconv.layers.rewire: SlimConv (k != 1) changes a width; torch.fx rewires what reads it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanconv import SlimConv, conversion_report, convert_convs


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def head(channels):
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]


def chain():
    # stem, then two 3x3 convs in a row (SlimConv widths chain: 32 -> 24 -> 18), then a 1x1
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),           # 0-2 stem
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # 3-5
        nn.Dropout2d(0.1), nn.MaxPool2d(2),                                      # 6-7
        nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.SiLU(),  # 8-10
        nn.Conv2d(48, 64, 1), nn.BatchNorm2d(64), nn.ReLU(), *head(64),          # 11-16
    )


def test_chained_width_changes_are_rewired():
    model = chain()
    before = n_params(model)
    rep = conversion_report(model, "slimconv", input_size=(3, 16, 16))
    d3, d8, d11 = rep.decisions[1], rep.decisions[2], rep.decisions[3]
    assert d3.action == "replace"
    assert d3.reason == "replaced by slimconv, the layers after it rewired"
    assert d3.detail == "24 channels; rewired: 4, 8"
    assert d8.detail == "18 channels; rewired: 9, 11"  # reads 24, gives 24 / (4/3)
    assert (d11.action, d11.detail) == ("keep", "in_channels rewired to 18")
    convert_convs(model, "slimconv")
    assert isinstance(model[3], SlimConv) and (model[3].in_channels, model[3].out_channels) == (
        32, 24)
    assert (model[8].in_channels, model[8].out_channels, model[8].stride) == (24, 18, 2)
    assert model[4].num_features == 24 and model[9].num_features == 18
    assert type(model[11]) is nn.Conv2d and model[11].in_channels == 18
    assert model[11].out_channels == 64 and model[11].bias is not None
    assert model[0].out_channels == 32 and model[1].num_features == 32  # the stem is untouched
    assert n_params(model) == rep.params_after < before
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model[11].weight.grad.shape == (64, 18, 1, 1)


class Functional(nn.Module):
    """A model written with torch.nn.functional calls and tensor methods (traced through)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)
        x = torch.sigmoid(self.bn(self.body(x))).contiguous()
        x = F.max_pool2d(x.relu(), 2)
        return F.adaptive_avg_pool2d(self.out(x), 1).flatten(1)


def test_functional_ops_pass_the_width_through():
    model = Functional()
    convert_convs(model, "slimconv")
    assert (model.body.out_channels, model.bn.num_features, model.out.in_channels) == (12, 12, 12)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return x + self.bn(self.conv(x))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y  # data-dependent branch: fx cannot trace it


@pytest.mark.parametrize("model, layer, blocker", [
    (lambda: Residual(), "conv", "reaches +, which needs 8"),
    (lambda: Concat(), "conv", "reaches torch.cat, which needs 8"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1, groups=8)),
     "0", "reaches 2 (Conv2d groups=8), which needs 8"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), *head(8)),
     "0", "reaches 3 (Flatten), which needs 8"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)),
     "0", "reaches 1 (GroupNorm), which needs 8"),
    (lambda: Untraceable(), "conv", "torch.fx cannot trace the model to rewire the layers after "
                                    "it (TraceError: symbolically traced variables cannot"),
])
def test_a_width_change_nothing_can_absorb_is_a_clear_error(model, layer, blocker):
    model = model()
    state = copy.deepcopy(model.state_dict())
    rep = conversion_report(model, "slimconv")
    (error,) = [d for d in rep.decisions if d.action == "error"]
    assert error.name == layer and blocker in error.reason
    assert error.reason.startswith("the replacement gives 6 channels")
    with pytest.raises(ValueError) as info:
        convert_convs(model, "slimconv")
    assert str(info.value).startswith(f"{layer}: cannot replace it with slimconv: {error.reason}")
    # Nothing was changed before the error.
    assert all(type(m) is not SlimConv for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(v.shape == state[k].shape for k, v in model.state_dict().items())


def test_width_kept_needs_no_trace_and_chains_too_thin_fail():
    # k = 1 with C_in == C_out keeps the width: an untraceable model converts as before.
    model = Untraceable()
    convert_convs(model, "slimconv", compression_ratio=1)
    assert isinstance(model.conv, SlimConv) and model.conv.out_channels == 8
    # Chained k = 2 (r = 3) narrows 12 -> 6 -> 3 < 2r: the second layer says why.
    model = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1),
                          nn.Conv2d(12, 12, 3, padding=1), nn.Conv2d(12, 4, 1))
    rep = conversion_report(model, "slimconv", compression_ratio=2)
    assert [d.action for d in rep.decisions] == ["replace", "replace", "error", "keep"]
    assert rep.decisions[2].reason.startswith(
        "reads 3 channels after the rewiring before it: in_channels=3 must be at least 2r=6")
