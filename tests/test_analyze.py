"""leanconv analyze: the numbers on tiny models with known weights, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leanconv
import leanconv.train as T
from leanconv.analyze import (
    AnalysisError,
    block_entropy,
    block_redundancy,
    cam_maps,
    channel_correlation,
    find_blocks,
    map_entropy,
    pca_fraction,
    resolve_layer,
    slimconv_gates,
    sru_maps,
)
from leanconv.cli import main
from leanconv.layers import SlimConv

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Entropy
# ----------------------------------------------------------------------------------------------
def test_entropy_known_values():
    x = torch.zeros(2, 3, 8, 8)
    x[:, 0] = 3.7  # constant map: 0 bits
    x[:, 1, :4] = 1.0  # two values, half each: 1 bit
    x[:, 2] = torch.arange(64.0).view(8, 8)  # 64 values evenly over 32 bins: 2 per bin, 5 bits
    h = map_entropy(x, bins=32)
    assert h.shape == (2, 3)
    torch.testing.assert_close(h, torch.tensor([[0.0, 1.0, 5.0]] * 2))
    # Scale and shift do not change it (binning between each map's own min and max).
    torch.testing.assert_close(map_entropy(10 * x - 4), h)


def test_block_entropy_of_constant_output_is_zero():
    # A conv with zero weights and a bias outputs constant maps: every block entropy is 0.
    conv = nn.Conv2d(1, 4, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.constant_(conv.bias, 0.3)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    res = block_entropy(model, torch.randn(5, 1, 8, 8))
    assert list(res) == ["0"] and res["0"]["mean"] == 0.0 and res["0"]["per_channel"] == [0.0] * 4


# ----------------------------------------------------------------------------------------------
# Redundancy
# ----------------------------------------------------------------------------------------------
def test_identical_channels_have_correlation_one_and_one_component():
    a = torch.randn(3, 1, 6, 6)
    x = torch.cat([a, a, -2 * a + 1], 1)  # identical, and an affine copy with the opposite sign
    torch.testing.assert_close(channel_correlation(x), torch.ones(3))
    cov = torch.cov(x.transpose(0, 1).flatten(1))
    assert pca_fraction(cov) == (1, pytest.approx(1 / 3))
    # A constant (dead) channel is left out, not counted as uncorrelated.
    dead = torch.cat([a, a, torch.zeros_like(a)], 1)
    torch.testing.assert_close(channel_correlation(dead), torch.ones(3))


def test_independent_channels_need_all_components():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 16, 16, generator=g)
    assert channel_correlation(x).mean() < 0.1
    assert pca_fraction(torch.cov(x.transpose(0, 1).flatten(1)))[0] == 4
    # Standardised PCA: one loud channel does not make the other three look redundant.
    x[:, 0] *= 1000
    assert pca_fraction(torch.cov(x.transpose(0, 1).flatten(1))) == (4, 1.0)


def test_block_redundancy_through_hooks():
    # Two output channels with the same filter: correlation 1, half the channels for 95 %.
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0]
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    res = block_redundancy(model, torch.randn(4, 1, 8, 8))["0"]
    assert res["mean_abs_corr"] == pytest.approx(1.0)
    assert (res["channels"], res["pca_channels"], res["pca_fraction"]) == (2, 1, 0.5)


# ----------------------------------------------------------------------------------------------
# SlimConv gates and SRU masks
# ----------------------------------------------------------------------------------------------
def test_gates_of_hand_set_se_equal_their_sigmoid():
    slim = SlimConv(8, compression_ratio=1)
    bias = torch.tensor([-4.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.5, 4.0])
    with torch.no_grad():  # w = sigmoid(fc2(...)) = sigmoid(bias) whatever the input
        slim.fc2.weight.zero_()
        slim.fc2.bias.copy_(bias)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), slim)
    g = slimconv_gates(model, torch.randn(6, 1, 8, 8))["1"]
    torch.testing.assert_close(torch.tensor(g["w_mean"]), torch.sigmoid(bias))
    torch.testing.assert_close(torch.tensor(g["w_flipped_mean"]), torch.sigmoid(bias).flip(0))
    assert max(g["w_std"]) == pytest.approx(0.0, abs=1e-7)
    # sigmoid(-4) = 0.018 < 0.05; sigmoid(4) = 0.982 > 0.95; sigmoid(3.5) = 0.971 > 0.95
    assert (g["near0"], g["near1"], g["flipping"]) == (1 / 8, 2 / 8, "flip")
    assert slimconv_gates(nn.Sequential(nn.Conv2d(1, 8, 3)), torch.randn(2, 1, 8, 8)) == {}


def test_sru_maps_reconstruct_the_module_output():
    model = leanconv.create_model("resnet20", conv="scconv", num_classes=10, in_channels=1)
    for m in model.modules():  # a trained-looking GN: the gate is not 0.5 everywhere
        if isinstance(m, nn.GroupNorm):
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    s = sru_maps(model, torch.randn(1, 28, 28), "layer1.0")
    assert s["module"] == "layer1.0.conv2.sru" and s["gate"] == "soft"
    x, c = s["input"], s["input"].shape[0]
    # Eq. 4: X^w = W1 X + roll(W2 X, C/2), with the hooked output of the module itself
    torch.testing.assert_close(s["output"], s["w1"] * x + (s["w2"] * x).roll(c // 2, 0))
    assert 0.05 < s["mask"].mean() < 0.95
    assert sru_maps(model, torch.randn(1, 28, 28), "layer1.0.conv1") is None


# ----------------------------------------------------------------------------------------------
# Class activation maps (pytorch_grad_cam)
# ----------------------------------------------------------------------------------------------
class _HalfSighted(nn.Module):
    """Sees only one half of the image: zeroes the other half, then conv, ReLU, GAP, linear."""

    def __init__(self, side: str) -> None:
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.uniform_(0.1, 1)
            self.fc.weight.uniform_(0.1, 1)

    def forward(self, x):
        keep = torch.zeros_like(x)
        half = x.shape[3] // 2
        if self.side == "left":
            keep[..., :half] = 1
        else:
            keep[..., half:] = 1
        return self.fc(self.relu(self.conv(x * keep)).mean((2, 3)))


@pytest.mark.parametrize("side", ["left", "right"])
def test_cam_lights_the_half_the_model_sees(side):
    model = _HalfSighted(side)
    images = torch.rand(2, 1, 16, 16) + 0.5
    cams = cam_maps(model, images, torch.tensor([0, 1]))
    assert set(cams) == {"gradcam", "gradcam++"}
    for cam in cams.values():
        cam = torch.as_tensor(cam)
        seen, unseen = (cam[..., :8], cam[..., 9:]) if side == "left" else (cam[..., 8:],
                                                                            cam[..., :7])
        assert cam.shape == (2, 16, 16)
        assert seen.mean() > 0.3 and unseen.max() < 1e-6  # the 3x3 conv leaks one column only


# ----------------------------------------------------------------------------------------------
# Blocks and layers
# ----------------------------------------------------------------------------------------------
def test_blocks_and_layer_errors():
    model = leanconv.create_model("resnet20", conv="spconv", num_classes=10, in_channels=1)
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert find_blocks(model) == blocks
    assert resolve_layer(model, None) == "layer3.2"
    assert resolve_layer(model, None, "first") == "layer1.0"
    assert resolve_layer(model, "layer2.1.conv1") == "layer2.1.conv1"
    with pytest.raises(AnalysisError, match=r"unknown layer 'layer4'; allowed: layer1\.0, "):
        resolve_layer(model, "layer4")



def test_blocks_of_a_converted_torchvision_model():
    torchvision = pytest.importorskip("torchvision")
    model = leanconv.convert_convs(torchvision.models.resnet18(num_classes=10), "spconv")
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert find_blocks(model) == blocks
    res = block_entropy(model, torch.randn(2, 3, 64, 64))
    assert list(res) == blocks and all(0 < r["mean"] <= 5 for r in res.values())

# ----------------------------------------------------------------------------------------------
# End to end: checkpoints from a few training steps, the CLI, one-line errors
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """best.pt of ResNet-20 vanilla and SlimConv (k=1) after 2 steps on the synthetic set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analyze")
    paths = {}
    for conv, hp in (("vanilla", {}), ("slimconv", {"compression_ratio": 1})):
        config = T.resolve_config(model="resnet20", conv=conv, hparams=hp, data="synthetic",
                                  out=str(root / conv), epochs=1, batch_size=32,
                                  eval_batch_size=64, train_subset=64, test_subset=64)
        T.train(config)
        paths[conv] = str(root / conv / "best.pt")
    torch.set_num_threads(threads)
    return paths


@pytest.mark.parametrize("what", ["gradcam", "gates", "entropy", "features", "redundancy"])
def test_cli_writes_png_and_json(checkpoints, tmp_path, capsys, what):
    ckpts = [checkpoints["slimconv"]] if what == "gates" else [checkpoints["vanilla"],
                                                               checkpoints["slimconv"]]
    out = tmp_path / "out"
    assert main(["analyze", *ckpts, "--what", what, "--out", str(out), "--images", "2",
                 "--samples", "32"]) == 0
    data = json.loads((out / f"{what}.json").read_text())
    assert data["what"] == what and data["data"] == "synthetic"
    assert [c["label"] for c in data["checkpoints"]] == (
        ["slimconv"] if what == "gates" else ["vanilla", "slimconv"])
    assert data["pictures"]
    for picture in data["pictures"]:
        with open(picture, "rb") as f:
            assert f.read(8) == PNG
    assert capsys.readouterr().out.split() == [*data["pictures"], f"{out}/{what}.json"]
    res = data["results"]
    if what in ("entropy", "redundancy"):
        for blocks in res.values():
            assert list(blocks) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
            for b in blocks.values():
                if what == "entropy":
                    assert 0 < b["mean"] <= 5
                else:
                    assert 0 < b["mean_abs_corr"] <= 1 and 0 < b["pca_fraction"] <= 1
    elif what == "gates":
        gates = res["slimconv"]
        assert len(gates) == 9 and all(0 <= v <= 1 for g in gates.values() for v in g["w_mean"])
    elif what == "gradcam":
        cams = res["vanilla"]["cams"]["gradcam"]
        assert len(cams) == 2 and len(cams[0]) == 32 and max(map(max, cams[0])) == 1.0
    else:
        assert res["slimconv"]["layer"] == "layer1.0" and res["slimconv"]["shape"][1:] == [32, 32]


@pytest.mark.parametrize(("args", "message"), [
    (["--what", "gates"], "needs SlimConv modules; checkpoint {v} (conv 'vanilla') has none; "
                          "allowed: checkpoints with conv slimconv"),
    (["--what", "features", "--layer", "layer9"], "unknown layer 'layer9'; allowed: layer1.0, "),
    (["--what", "entropy", "--data", "fashion-mnist"],
     "--data fashion-mnist (10 classes, 1 input channel) does not fit checkpoint {v} "
     "(10 classes, 3 input channels); allowed: cifar10, synthetic"),
    (["--what", "pictures"], "unknown analysis 'pictures'; allowed: gradcam, gates, entropy, "
                             "features, redundancy"),
    (["--what", "entropy", "--data", "mnist"], "unknown dataset 'mnist'; available datasets: "),
    (["--what", "gradcam", "--layer", "fc"], "layer 'fc' does not output feature maps (N, C, H, "
                                             "W) in the forward pass; allowed: layer1.0, "),
    (["missing.pt", "--what", "entropy"], "checkpoint missing.pt does not exist"),
])
def test_cli_errors_are_one_line(checkpoints, tmp_path, capsys, args, message):
    v = checkpoints["vanilla"]
    with pytest.raises(SystemExit) as exc:
        main(["analyze", v, *args, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("leanconv analyze: error: ")
    assert message.format(v=v) in err
