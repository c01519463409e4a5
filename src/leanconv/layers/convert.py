"""The single converter: swap the ``nn.Conv2d`` layers of any CNN for a registered conv type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._utils import same_padding
from .registry import _check_hparams, conv_out_channels, create_conv
from .rewire import Rewiring, plan_rewiring

__all__ = ["convert_convs"]


def _has_same_padding(conv: nn.Conv2d) -> bool:
    pad = same_padding(conv.kernel_size[0], conv.dilation[0])
    return conv.padding == "same" or conv.padding == (pad, pad)


def replaceable_geometry(conv: nn.Conv2d) -> bool:
    """Whether the conv types can rebuild ``conv`` as it is: an ungrouped conv with an odd square
    kernel, same padding, equal strides and dilations, more than 4 input channels (not the stem
    that reads the image). Other convs are kept, not silently given another kernel or padding."""
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and conv.groups == 1
            and conv.in_channels > 4 and conv.stride[0] == conv.stride[1]
            and conv.dilation[0] == conv.dilation[1] and _has_same_padding(conv))


def _default_predicate(name: str, conv: nn.Conv2d) -> bool:
    # The papers replace the k x k convs of the body (not 1x1s, not grouped/depthwise convs, not
    # the stem: too few channels to split; every paper keeps it vanilla).
    return conv.kernel_size[0] > 1 and replaceable_geometry(conv)


@dataclass
class _Conversion:
    """What ``convert_convs`` does to a model; shared with its dry run (``conversion_report``)."""

    selected: list[tuple[str, nn.Conv2d]]  # chosen by the predicate, in model order
    errors: dict[str, str]  # selected layer -> why it cannot be replaced
    rewiring: Rewiring  # the rebuilds around layers whose width changes (empty if none)


def _build(conv: str, old: nn.Conv2d, in_channels: int, hparams: dict) -> nn.Module:
    """The replacement of ``old`` reading ``in_channels`` channels (its width is the conv's)."""
    return create_conv(
        conv,
        in_channels,
        conv_out_channels(conv, in_channels, old.out_channels, **hparams),
        kernel_size=old.kernel_size[0],
        stride=old.stride[0],
        padding=old.padding,
        dilation=old.dilation[0],
        **({"bias": True} if old.bias is not None else {}),
        **hparams,
    )


def _plan_conversion(model: nn.Module, conv: str, predicate, hparams: dict) -> _Conversion:
    """Select the convs, check each replacement (on the meta device) and plan any rewiring."""
    _check_hparams(conv, hparams)  # unknown conv or hyperparameter: ValueError, not per layer
    predicate = predicate or _default_predicate
    selected = [(name, m) for name, m in model.named_modules()
                if type(m) is nn.Conv2d and predicate(name, m)]
    errors: dict[str, str] = {}
    width_changes = False
    for name, old in selected:
        if old.padding_mode != "zeros":
            errors[name] = f"padding_mode={old.padding_mode!r} is not supported"
            continue
        try:
            with torch.device("meta"):
                new = _build(conv, old, old.in_channels, hparams)
        except (ValueError, NotImplementedError) as e:
            errors[name] = str(e).splitlines()[0]
            continue
        width_changes |= new.out_channels != old.out_channels
    rewiring = Rewiring()
    if width_changes:  # only then is torch.fx needed
        modules = dict(selected)
        rewiring = plan_rewiring(
            model, [name for name, _ in selected if name not in errors],
            lambda name, width: conv_out_channels(conv, width, modules[name].out_channels,
                                                  **hparams))
        errors.update(rewiring.errors)
    return _Conversion(selected, errors, rewiring)


def convert_convs(
    model: nn.Module,
    conv: str | None = None,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    *,
    dry_run: bool = False,
    input_size=None,
    plan=None,
    **hparams,
):
    """Replace, in place, every ``nn.Conv2d`` of ``model`` chosen by ``predicate`` with ``conv``.

    ``predicate(qualified_name, module)`` defaults to "odd square k x k, k > 1, same padding,
    ungrouped, more than 4 input channels". The replacement keeps the layer's stride, dilation,
    padding and bias, and its width when the conv type can. A conv type that changes the width
    (SlimConv with k != 1 gives ``C_in / k``) has the layers after it rewired through
    ``torch.fx`` (:mod:`leanconv.layers.rewire`: BatchNorm2d rebuilt, the next ungrouped conv
    given the new ``in_channels``); a layer whose output reaches anything else (a residual add,
    a concatenation, a grouped conv, the model's output, an untraceable model) raises
    ``ValueError`` naming the layer and that op, before anything is changed. Returns ``model``.

    ``dry_run=True`` changes nothing and returns the
    :class:`~leanconv.layers.conversion_report.ConversionReport` of this call instead: every
    conv replaced, kept or failing, with the reason, and parameters (and, with ``input_size``
    as for :func:`leanconv.profile`, MACs) before and after.

    ``plan`` (a :class:`leanconv.plan.Plan`, its dict or a plan JSON file) instead gives each
    planned layer its own conv type and hyperparameters (``conv``, ``predicate`` and ``hparams``
    must then be left out).

    >>> import torchvision
    >>> model = convert_convs(torchvision.models.resnet18(), "spconv", split_ratio=0.5)
    >>> print(convert_convs(torchvision.models.resnet50(), "slimconv", dry_run=True).table())
    """
    if plan is not None:
        if conv is not None or predicate is not None or hparams or dry_run:
            raise ValueError("convert_convs: give either plan= or conv (with predicate, "
                             "hyperparameters or dry_run), not both")
        from ..plan import apply_plan  # the planner sits above the layers; imported when used

        return apply_plan(model, plan)
    if conv is None:
        raise ValueError("convert_convs needs conv (a registered conv type) or plan=")
    if dry_run:
        from .conversion_report import conversion_report  # the report calls convert_convs

        return conversion_report(model, conv, predicate, input_size=input_size, **hparams)
    if input_size is not None:
        raise ValueError("convert_convs: input_size sizes the MACs of the dry run; "
                         "pass it with dry_run=True")
    conversion = _plan_conversion(model, conv, predicate, hparams)
    for name, _ in conversion.selected:
        if name in conversion.errors:
            raise ValueError(f"{name}: cannot replace it with {conv}: {conversion.errors[name]} "
                             f"(convert_convs(..., dry_run=True) lists every layer)")
    for name, old in conversion.selected:
        in_channels = conversion.rewiring.in_channels.get(name, old.in_channels)
        new = _build(conv, old, in_channels, hparams).to(device=old.weight.device,
                                                          dtype=old.weight.dtype)
        model.set_submodule(name, new)
    conversion.rewiring.rebuild(model, replaced=dict(conversion.selected))
    return model
