"""leanconv.prepare_for_inference: same outputs, BNs folded only where that is exact."""

import pytest
import torch
from torch import nn

import leanconv
from leanconv.inference import fold_conv_bn, max_abs_diff, prepare_for_inference
from leanconv.layers import available_convs, conv_out_channels, create_conv

TOL = 1e-4


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding is really tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def n_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class BasicBlock(nn.Module):
    """ResNet's block: conv1/bn1 attribute pairs and a Sequential(conv, bn) shortcut."""

    def __init__(self, cin, cout, stride=1, conv="vanilla"):
        super().__init__()
        self.conv1 = create_conv(conv, cin, cout, stride=stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = create_conv(conv, cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnetish(conv="vanilla"):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16, conv=conv), BasicBlock(16, 32, stride=2, conv=conv),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_folds_every_pair_of_a_resnet_and_keeps_outputs():
    model = randomize_bn(resnetish())
    x = torch.randn(2, 3, 15, 15)
    prepared = prepare_for_inference(model)
    assert n_bn(model) == 6 and n_bn(prepared) == 0
    assert max_abs_diff(model, prepared, x) < TOL
    # The original is untouched (deep copy): still training form, still has gradients on.
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())
    # The folded conv carries the BN's shift as a bias.
    assert prepared[0].bias is not None and model[0].bias is None


def test_inplace_rewrites_the_model():
    model = randomize_bn(resnetish())
    reference = randomize_bn(resnetish())
    reference.load_state_dict(model.state_dict())
    prepared = prepare_for_inference(model, inplace=True)
    assert prepared is model and n_bn(model) == 0
    assert max_abs_diff(reference, prepared, torch.randn(1, 3, 8, 8)) < TOL


class PreAct(nn.Module):
    """BN before the conv: must not be folded into it."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv1(torch.relu(self.bn1(x)))


class SharedOutput(nn.Module):
    """The conv output also feeds the shortcut: folding the BN would change the shortcut."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; it is left alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


class CustomForwardConv(nn.Conv2d):
    """A conv subclass that uses its weight differently: not a plain conv, not folded."""

    def forward(self, x):
        w = self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize("make, bns_left", [
    (PreAct, 1),
    (SharedOutput, 1),
    (Untraceable, 1),
    (lambda: nn.Sequential(CustomForwardConv(8, 8, 3, padding=1), nn.BatchNorm2d(8)), 1),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)), 0),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                           nn.BatchNorm2d(8, track_running_stats=False)), 1),
])
def test_only_exact_pairs_are_folded(make, bns_left):
    model = randomize_bn(make())
    prepared = prepare_for_inference(model)
    assert n_bn(prepared) == bns_left
    assert max_abs_diff(model, prepared, torch.randn(2, 8, 7, 7)) < TOL


def test_shared_module_is_not_folded():
    conv, bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    model = randomize_bn(nn.Sequential(nn.Sequential(conv, bn), nn.ReLU(), nn.Sequential(conv, bn)))
    prepared = prepare_for_inference(model)
    assert n_bn(prepared) == 1  # the one (shared) BN survives
    assert max_abs_diff(model, prepared, torch.randn(1, 8, 6, 6)) < TOL


def test_fold_conv_bn_needs_eval():
    with pytest.raises(ValueError, match="eval"):
        fold_conv_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


class Reparam(nn.Module):
    """A module with its own inference form: two parallel 3x3 convs whose sum is one conv,
    and a host BN it can absorb."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fused = False

    def forward(self, x):
        return self.a(x) if self.fused else self.a(x) + self.b(x)

    def fuse_for_inference(self):
        with torch.no_grad():
            self.a.weight += self.b.weight
        del self.b
        self.fused = True

    def absorb_bn(self, bn):
        if not self.fused:
            return False
        self.a = torch.nn.utils.fusion.fuse_conv_bn_eval(self.a, bn)
        return True


def test_fuse_for_inference_and_absorb_bn_hooks():
    model = randomize_bn(nn.Sequential(Reparam(), nn.BatchNorm2d(4), nn.ReLU()))
    prepared = prepare_for_inference(model)
    assert prepared[0].fused and not hasattr(prepared[0], "b")
    assert isinstance(prepared[1], nn.Identity)
    assert not model[0].fused and hasattr(model[0], "b")
    assert max_abs_diff(model, prepared, torch.randn(2, 4, 9, 9)) < TOL


def test_max_abs_diff_value_and_structures():
    class Shift(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.d = d

        def forward(self, x):
            return {"a": x, "b": (x + self.d, x * 2)}

    x = torch.zeros(2, 3)
    assert max_abs_diff(Shift(0.0), Shift(0.5), x) == pytest.approx(0.5)
    # Relative to the largest |output| of the first model: 2 * 2 = 4.
    x = torch.full((2, 3), 2.0)
    assert max_abs_diff(Shift(0.0), Shift(0.5), x, relative=True) == pytest.approx(0.5 / 4)
    with pytest.raises(ValueError, match="shapes"):
        max_abs_diff(nn.Identity(), nn.Flatten(0), torch.zeros(2, 3))


def test_example_input_logs_the_diff(caplog):
    model = randomize_bn(resnetish())
    with caplog.at_level("INFO", logger="leanconv.inference"):
        prepare_for_inference(model, example_input=torch.randn(1, 3, 8, 8))
    assert "max abs diff" in caplog.text and "folded 6" in caplog.text


def test_compiled_path_same_outputs():
    model = randomize_bn(resnetish())
    compiled = prepare_for_inference(model, compile={"backend": "eager"})
    assert max_abs_diff(model, compiled, torch.randn(2, 3, 8, 8)) < TOL


def test_default_compile_inductor_freezing_same_outputs():
    # compile=True: inductor with freezing (weights as constants) on a network with slim modules
    model = randomize_bn(resnetish("spconv"))
    x = torch.randn(2, 3, 8, 8)
    compiled = prepare_for_inference(model, compile=True)
    with torch.inference_mode():
        out = compiled(x)
    assert max_abs_diff(model, compiled, x, relative=True) < TOL
    assert out.shape == (2, 10)


def test_compile_leaves_compile_eager_modules_eager():
    from leanconv.layers.scconv import CRU

    model = randomize_bn(resnetish("scconv"))
    x = torch.randn(2, 3, 8, 8)
    compiled = prepare_for_inference(model, compile={"backend": "eager"})
    crus = [m for m in compiled.modules() if isinstance(m, CRU)]
    assert crus and all(getattr(m.forward, "_torchdynamo_disable", False) for m in crus)
    assert max_abs_diff(model, compiled, x, relative=True) < TOL
    plain = prepare_for_inference(model)  # not compiled: forwards untouched
    assert not any("forward" in vars(m) for m in plain.modules())


def test_channels_last_by_default_and_optional():
    model = randomize_bn(resnetish())
    x = torch.randn(2, 3, 8, 8)  # NCHW input: converted on entry
    fast = prepare_for_inference(model)
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    assert max_abs_diff(model, fast, x) < TOL
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and seen[0].stride(1) == 1
    plain = prepare_for_inference(model, memory_format=None)
    conv = next(m for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous() and conv.weight.stride(1) != 1
    assert max_abs_diff(model, plain, x) < TOL


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_format="nhwc"), "memory_format must be torch.channels_last"),
    (dict(compile="yes"), "compile must be True, False or a dict"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_for_inference(resnetish(), **kwargs)


def test_reexported():
    assert leanconv.prepare_for_inference is prepare_for_inference


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    prepared = prepare_for_inference(model)
    assert n_bn(prepared) == 0
    assert max_abs_diff(model, prepared, torch.randn(1, 3, 32, 32)) < TOL


def _buildable(name):
    try:
        width = conv_out_channels(name, 16, 16)
        create_conv(name, 16, width)
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("name", available_convs())
def test_every_conv_module_prepared_equals_training_form(name):
    if not _buildable(name):
        pytest.skip(f"{name} is not written yet")
    torch.manual_seed(0)
    width = conv_out_channels(name, 16, 16)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        create_conv(name, 16, width), nn.BatchNorm2d(width), nn.ReLU(),
        create_conv(name, width, conv_out_channels(name, width, width), stride=2),
    )
    # Non-trivial statistics in every BN, including those inside the module (GN untouched).
    randomize_bn(model)
    x = torch.randn(2, 3, 15, 15)
    prepared = prepare_for_inference(model)
    assert max_abs_diff(model, prepared, x) < TOL
    assert n_bn(prepared) <= n_bn(model) - 1  # at least the stem's BN folded


@pytest.mark.parametrize("name", available_convs())
def test_zoo_resnet20_prepared_equals_training_form(name):
    if "resnet20" not in leanconv.available_models():
        pytest.skip("model zoo not registered yet")
    try:
        model = leanconv.create_model("resnet20", conv=name, num_classes=10)
    except (NotImplementedError, ValueError) as exc:
        pytest.skip(f"resnet20 with {name} cannot be built yet: {exc}")
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    prepared = prepare_for_inference(model)
    assert max_abs_diff(model, prepared, x, relative=True) < 1e-5
    if name == "vanilla":
        assert n_bn(model) > 0 and n_bn(prepared) == 0  # every BN of a plain ResNet folds
