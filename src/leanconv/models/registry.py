"""The model registry: ``create_model(name, conv=..., num_classes=..., **conv_hparams)``.

Each architecture file decorates thin public builders with ``@register_model`` (or
``@register_model(input_size=32)`` for a model built only for 32x32 inputs). A builder has the
signature ``builder(*, conv="vanilla", num_classes=..., in_channels=3, **conv_hparams)`` and asks
the layer registry (:func:`leanconv.layers.create_conv`) for every conv it places, following the
placement rules of the paper that introduced ``conv`` (see docs/placement.md).

A builder registered with ``stages=(...)`` takes ``stages=``, the stages whose convs the conv type
may replace (:func:`model_stages`; the numbers each family uses are in docs/placement.md);
:func:`create_model` checks the values, naming the model and its stages.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from ..layers import conv_hparams

__all__ = ["available_models", "create_model", "default_input_size", "model_stages",
           "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# name -> input height = width the model is built for, when not the ImageNet 224
_INPUT_SIZES: dict[str, int] = {}
_DEFAULT_INPUT_SIZE = 224
# name -> the stage numbers its ``stages=`` argument accepts (models without stages: absent)
_STAGES: dict[str, tuple[int, ...]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *,
                   input_size: int = _DEFAULT_INPUT_SIZE, stages: tuple[int, ...] = ()):
    """Register a builder under its function name; a duplicate name is an error.

    ``input_size`` is the input height = width the model is meant for by default (what
    :func:`default_input_size` returns): 32 for the CIFAR-only models, 224 (the default) for
    models whose default build is ImageNet's. ``stages``: the stage numbers the builder's
    ``stages=`` argument accepts (empty: the model has no stages). Use as ``@register_model`` or
    ``@register_model(input_size=32, stages=(1, 2, 3))``.
    """
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    stages = tuple(stages)

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _MODELS and _MODELS[name] is not builder:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        if input_size != _DEFAULT_INPUT_SIZE:
            _INPUT_SIZES[name] = input_size
        if stages:
            _STAGES[name] = stages
        return builder

    return register if fn is None else register(fn)


def model_stages(name: str) -> tuple[int, ...]:
    """The stage numbers ``create_model(name, stages=...)`` accepts; ``()`` for a model without
    stages (e.g. ``resnet50``: ``(1, 2, 3, 4)``, its ``layer1..layer4``)."""
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return _STAGES.get(name, ())


def _check_stages(name: str, stages) -> tuple[int, ...]:
    allowed = _STAGES.get(name, ())
    if not allowed:
        raise ValueError(f"model {name!r} has no stages: 'stages' does not apply to it")
    values = (stages,) if isinstance(stages, int) else tuple(stages)
    bad = [v for v in values if isinstance(v, bool) or v not in allowed]
    if bad or not values:
        raise ValueError(f"model {name!r} has no stage {bad[0] if bad else '(none given)'!r} "
                         f"in stages={stages!r}; its stages: {', '.join(map(str, allowed))}")
    return values


def default_input_size(name: str) -> int:
    """The input height = width model ``name`` is built for by default: 32 for CIFAR-only
    models (ResNet-20..110, VGG, DenseNet-121, ResNeXt-29, WRN-28-10), else 224."""
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return _INPUT_SIZES.get(name, _DEFAULT_INPUT_SIZE)


def available_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the fnmatch ``pattern``, sorted."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def create_model(name: str, conv: str = "vanilla", *, plan=None, **kwargs) -> nn.Module:
    """Build model ``name`` with conv type ``conv``; ``None``-valued kwargs are dropped.

    ``plan`` (a :class:`leanconv.plan.Plan`, its dict or a plan JSON file from ``leanconv
    plan``) builds the vanilla network and gives each planned layer its chosen conv; ``conv``
    must then be ``"vanilla"``.

    >>> model = create_model("resnet20", conv="spconv", num_classes=10, split_ratio=0.5)
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        ) from None
    conv_hparams(conv)  # unknown conv -> ValueError listing the available ones
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "stages" in kwargs:
        kwargs["stages"] = _check_stages(name, kwargs["stages"])
    if plan is None:
        return builder(conv=conv, **kwargs)
    if conv != "vanilla":
        raise ValueError(f"conv={conv!r} with a plan: the plan chooses each layer's conv; "
                         f"leave conv='vanilla'")
    from ..plan import apply_plan  # the planner sits above the zoo; imported only when used

    return apply_plan(builder(conv="vanilla", **kwargs), plan, model_name=name)
