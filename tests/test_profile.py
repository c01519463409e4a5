"""leanconv.profile: exact MACs / params by formula, grouped convs, meta device, elementwise ops."""

import json

import pytest
import torch
from torch import nn

import leanconv
from leanconv.profile import profile


def _toy():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


# conv1: 8x8 out, 8 ch, 3*9 taps; conv2: 4x4 out, 16 ch, 8*9 taps; linear 16 -> 10
TOY_MACS = 8 * 8 * 8 * 3 * 9 + 4 * 4 * 16 * 8 * 9 + 16 * 10
TOY_PARAMS = 3 * 8 * 9 + 2 * 8 + (16 * 8 * 9 + 16) + (16 * 10 + 10)


def test_hand_computed_model():
    model = _toy()
    report = profile(model, (1, 3, 8, 8))
    assert report.macs == TOY_MACS == 32416
    assert report.params == TOY_PARAMS == 1570
    assert report.trainable_params == TOY_PARAMS
    assert report.flops == 2 * TOY_MACS
    assert report.output_shape == (1, 10)
    assert report.elementwise is None
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["0"].macs == 8 * 8 * 8 * 3 * 9
    assert by_name["3"].output_shape == (1, 16, 4, 4)
    assert by_name["3"].params == 16 * 8 * 9 + 16
    assert sum(layer.macs for layer in report.layers) == report.macs
    assert sum(layer.params for layer in report.layers) == report.params


def test_input_size_forms_and_batch():
    model = _toy()
    assert profile(model, 8).input_size == (1, 3, 8, 8)  # C from the first conv
    assert profile(model, (8, 8)).macs == TOY_MACS
    assert profile(model, (3, 8, 8)).macs == TOY_MACS
    assert profile(model, (2, 3, 8, 8)).macs == 2 * TOY_MACS
    with pytest.raises(ValueError, match="input_size"):
        profile(model, (1, 1, 3, 8, 8))


def test_grouped_and_frozen():
    model = nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False)
    model.weight.requires_grad_(False)
    report = profile(model, (1, 16, 8, 8))
    assert report.macs == 8 * 8 * 32 * (16 // 4) * 9
    assert report.params == 32 * 4 * 9
    assert report.trainable_params == 0


def test_meta_does_not_touch_the_model_and_matches_cpu():
    model = _toy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = profile(model, (2, 3, 8, 8))
    cpu = profile(model, (2, 3, 8, 8), device="cpu")
    assert (meta.macs, meta.params) == (cpu.macs, cpu.params)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k])


def test_model_built_on_meta():
    with torch.device("meta"):
        model = _toy()
    assert profile(model, (1, 3, 8, 8)).macs == TOY_MACS


def test_unregistered_tensor_falls_back_to_a_meta_copy():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.scale = torch.ones(1, 4, 1, 1)  # plain attribute, not a buffer

        def forward(self, x):
            return self.conv(x) * self.scale

    model = Odd()
    report = profile(model, (1, 3, 5, 5))
    assert report.macs == 25 * 4 * 3
    assert model.scale.device.type == "cpu"


def test_count_elementwise():
    model = _toy()
    report = profile(model, (1, 3, 8, 8), count_elementwise=True)
    assert report.macs == TOY_MACS  # never mixed into MACs
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["1"].elementwise == 8 * 8 * 8  # BN: one per output element
    assert by_name["2"].elementwise == 8 * 8 * 8  # ReLU
    assert by_name["4"].elementwise == 16 * 4 * 4  # global pool: one per input element
    assert report.elementwise == sum(layer.elementwise for layer in report.layers) > 0


def test_table_and_dict():
    report = profile(_toy(), (1, 3, 8, 8), count_elementwise=True)
    text = report.table()
    assert "total" in text and f"{TOY_MACS:,}" in text and "elementwise" in text
    assert "total" in report.table(layers=False) and str(report)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["macs"] == TOY_MACS and data["params"] == TOY_PARAMS
    assert data["layers"][0]["output_shape"] == [1, 8, 8, 8]


def test_reexport_and_resnet101_speed():
    import time

    assert leanconv.profile is profile
    with torch.device("meta"):
        model = leanconv.create_model("resnet101", num_classes=1000)
    start = time.perf_counter()
    report = leanconv.profile(model, 224)
    assert time.perf_counter() - start < 10
    assert report.params == 44_549_160 and report.macs == 7_801_405_440  # torchvision's counts


def test_counting_conventions_on_toy():
    """counter=: conv+linear MACs plus one documented rule; ``macs`` itself never changes."""
    model = _toy()
    bn_out = 8 * 8 * 8  # BatchNorm2d(8) on 8x8
    pool_in = 16 * 4 * 4  # AdaptiveAvgPool2d reads conv2's output
    bias_out = 16 * 4 * 4 + 10  # conv2 (bias=True) output + linear output; conv1 has no bias
    expected = {
        "macs": TOY_MACS,
        "macs+bn": TOY_MACS + 2 * bn_out,
        "macs+bn4+pool+bias": TOY_MACS + 4 * bn_out + pool_in + bias_out,
    }
    for counter, total in expected.items():
        for device in ("meta", "cpu"):
            report = profile(model, (1, 3, 8, 8), counter=counter, device=device)
            assert report.macs == TOY_MACS and report.counter == counter
            assert report.counted_macs == total, (counter, device)
    report = profile(model, (1, 3, 8, 8), counter="macs+bn4+pool+bias")
    assert report.counter_ops == {"bn": 4 * bn_out, "pool": pool_in, "bias": bias_out}
    assert report.elementwise is None and "counted under" in report.table()
    assert profile(model, (2, 3, 8, 8), counter="macs+bn").counted_macs == 2 * expected["macs+bn"]
    with pytest.raises(ValueError, match="counter"):
        profile(model, 8, counter="flops")
