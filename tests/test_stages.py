"""The ``stages`` model argument (targets README's ``stages`` token) on every zoo family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanconv import available_models, create_model, profile
from leanconv import tables as T
from leanconv.layers import conv_class
from leanconv.models import model_stages, register_model

_MOBILENET_SEQUENCES = (1, 2, 3, 4, 3, 3, 1)  # n of each row of Sandler et al. Tab. 2


def _stage_of(name: str, module_name: str) -> int:
    """Stage number of the module ``module_name`` of model ``name`` (docs/placement.md)."""
    head, _, rest = module_name.partition(".")
    if name.startswith(("vgg", "mobilenet")):
        index = int(rest.partition(".")[0])
        model = _meta(name, "vanilla")
        if name.startswith("vgg"):  # stage = 1 + max pools before this layer
            return 1 + sum(isinstance(m, nn.MaxPool2d) for m in model.features[:index])
        bounds = [1 + sum(_MOBILENET_SEQUENCES[:i]) for i in range(len(_MOBILENET_SEQUENCES))]
        return max(i for i, b in enumerate(bounds, 1) if index >= b)
    for prefix in ("layer", "dense", "stage", "level"):
        if head.startswith(prefix):
            return int(head[len(prefix):])
    raise AssertionError(f"{module_name} of {name} is in no stage")


def _meta(name: str, conv: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, conv=conv, **kwargs)


def _replaced(model: nn.Module, conv: str) -> list[str]:
    cls = conv_class(conv)
    names = [n for n, m in model.named_modules() if isinstance(m, cls)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


# one model per family; Ghost takes every width (ShuffleNetV2's 58-channel stage 2 too)
REPRESENTATIVES = ["resnet50", "resnext50_32x4d", "resnet20", "wrn28_10", "resnext29", "vgg16",
                   "densenet121", "mobilenet_v2", "shufflenet_v2_x1_0"]
REPRESENTATIVES += [n for n in ("se_resnet50", "densenet161", "dla46_c")
                    if n in available_models()]


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_each_stage_replaces_only_its_own_convs(name):
    stages = model_stages(name)
    assert stages
    every = _replaced(_meta(name, "ghost"), "ghost")
    per_stage = []
    for stage in stages:
        names = _replaced(_meta(name, "ghost", stages=(stage,)), "ghost")
        assert names, (name, stage)
        assert {_stage_of(name, n) for n in names} == {stage}, (name, stage)
        per_stage += names
    assert sorted(per_stage) == sorted(every)  # the stages partition the default build
    assert _replaced(_meta(name, "ghost", stages=stages), "ghost") == every


def test_every_zoo_model_declares_its_stages():
    from leanconv.models.registry import _MODELS

    zoo = [name for name in available_models()  # not the models other tests register
           if _MODELS[name].__module__.startswith("leanconv.models.")]
    assert "resnet50" in zoo and "resnet20" in zoo
    for name in zoo:
        assert model_stages(name), name


def test_stages_errors_name_the_model_and_its_stages():
    with pytest.raises(ValueError, match=r"model .resnet50. has no stage 5.*stages: 1, 2, 3, 4"):
        _meta("resnet50", "spconv", stages=(4, 5))
    with pytest.raises(ValueError, match=r"model 'shufflenet_v2_x1_0' has no stage 1.*2, 3, 4"):
        _meta("shufflenet_v2_x1_0", "slimconv", stages=1)
    with pytest.raises(ValueError, match="unknown model"):
        model_stages("nope")

    if "tiny_stageless_net" not in available_models():
        @register_model
        def tiny_stageless_net(*, conv="vanilla", num_classes=10, **_):
            return nn.Linear(4, num_classes)

    assert model_stages("tiny_stageless_net") == ()
    with pytest.raises(ValueError, match="model 'tiny_stageless_net' has no stages"):
        create_model("tiny_stageless_net", stages=(1,))


def test_compconv_vgg16_per_stage_rows():
    """CompConv Tab. 4: Comp-VGG16-1s (stage 1: 295M / 289M / 287M at d = 1, 2, 3, 14.7M) and
    Comp-VGG16-5s, which is the 512-channel convs, stages 4 and 5 here (8.2M / 253M, 5.5M / 228M,
    4.3M / 216M; stage 5 alone would be 11.19M / 299M at d = 1)."""
    def count(stages, d):
        report = profile(_meta("vgg16", "compconv", stages=stages, depth=d, num_classes=10), 32)
        return round(report.params / 1e6, 2), round(report.macs / 1e6)

    assert [count((1,), d) for d in (1, 2, 3)] == [(14.71, 295), (14.70, 288), (14.70, 286)]
    assert [count((4, 5), d) for d in (1, 2, 3)] == [(8.25, 252), (5.53, 227), (4.28, 215)]


def test_tables_rows_take_stages():
    row = {"paper": "CompConv", "table": "4", "input": "cifar 32x32", "classes": "10",
           "model": "vgg16", "conv": "compconv", "hparams": "d=1 stages=4,5",
           "params_M": "8.2", "macs_G": "0.253"}
    result = T.evaluate_row(row)
    assert result.error is None and result.ok
    bad = T.evaluate_row({**row, "model": "resnet20", "hparams": "d=1 stages=4,5"})
    assert "model 'resnet20' has no stage 4" in bad.error and "1, 2, 3" in bad.error
