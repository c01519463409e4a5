"""The single converter: swap the ``nn.Conv2d`` layers of any CNN for a registered conv type."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .registry import conv_out_channels, create_conv

__all__ = ["convert_convs"]


def _default_predicate(name: str, conv: nn.Conv2d) -> bool:
    # The papers replace the k x k convs of the body: not 1x1s, not grouped/depthwise convs, and not
    # the stem that reads the image (too few channels to split; every paper keeps it vanilla).
    square = conv.kernel_size[0] == conv.kernel_size[1] > 1
    return square and conv.groups == 1 and conv.in_channels > 4


def convert_convs(
    model: nn.Module,
    conv: str | None = None,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    *,
    plan=None,
    **hparams,
) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` of ``model`` chosen by ``predicate`` with ``conv``.

    ``predicate(qualified_name, module)`` defaults to "square k x k, k > 1, ungrouped, more than 4
    input channels". The replacement keeps the layer's in/out widths, stride, dilation and bias;
    a conv type that cannot produce the same width (SlimConv with k != 1) raises ``ValueError``
    naming the layer. Returns ``model``.

    ``plan`` (a :class:`leanconv.plan.Plan`, its dict or a plan JSON file) instead gives each
    planned layer its own conv type and hyperparameters (``conv``, ``predicate`` and ``hparams``
    must then be left out).

    >>> import torchvision
    >>> model = convert_convs(torchvision.models.resnet18(), "spconv", split_ratio=0.5)
    """
    if plan is not None:
        if conv is not None or predicate is not None or hparams:
            raise ValueError("convert_convs: give either plan= or conv (with predicate and "
                             "hyperparameters), not both")
        from ..plan import apply_plan  # the planner sits above the layers; imported when used

        return apply_plan(model, plan)
    if conv is None:
        raise ValueError("convert_convs needs conv (a registered conv type) or plan=")
    predicate = predicate or _default_predicate
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d and predicate(name, module)
    ]
    for name, old in targets:
        if old.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={old.padding_mode!r} is not supported")
        width = conv_out_channels(conv, old.in_channels, old.out_channels, **hparams)
        if width != old.out_channels:
            raise ValueError(
                f"{name}: {conv} with {hparams} produces {width} channels, the layer needs "
                f"{old.out_channels}; rewire the next layer (see leanconv.create_model) or pick "
                f"hyperparameters that keep the width"
            )
        extra = {"bias": True} if old.bias is not None else {}
        new = create_conv(
            conv,
            old.in_channels,
            old.out_channels,
            kernel_size=old.kernel_size[0],
            stride=old.stride[0],
            dilation=old.dilation[0],
            **extra,
            **hparams,
        ).to(device=old.weight.device, dtype=old.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
