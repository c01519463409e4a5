"""A dry run of :func:`~leanconv.layers.convert.convert_convs`: what it would replace, and why.

``conversion_report(model, conv, predicate=None, **hparams)``, also reached as
``convert_convs(model, conv, dry_run=True)``, changes nothing. For every ``nn.Conv2d`` of
``model`` it records whether ``convert_convs`` with the same arguments would replace it (naming
the layers rewired after a width change), keep it (and the reason: 1x1, grouped/depthwise, the
stem, too few channels, non-square or even kernel, other padding, excluded by a custom
predicate) or fail on it (padding mode, a width change the graph cannot absorb, hyperparameters
the layer cannot take), with the parameters of the layer before and after; with ``input_size``
the MACs of each layer and of the whole model before and after too (counted by
:func:`leanconv.profile` on the meta device: nothing is allocated).

>>> rep = conversion_report(torchvision.models.resnet18(), "spconv", input_size=224)
>>> print(rep.table())"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .convert import _build, _has_same_padding, _plan_conversion, convert_convs
from .registry import conv_out_channels

__all__ = ["ConvDecision", "ConversionReport", "conversion_report"]

REPLACE, KEEP, ERROR = "replace", "keep", "error"


@dataclass
class ConvDecision:
    """One ``nn.Conv2d`` of the model and what the conversion does with it."""

    name: str
    shape: str  # "64->128 3x3/2" (+ " g=32", " d=2")
    action: str  # "replace" | "keep" | "error"
    reason: str
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    detail: str = ""  # per layer, outside the grouped reason: the widths rewired around it


@dataclass
class ConversionReport:
    """Every decision plus whole-model totals (MACs only when an ``input_size`` was given)."""

    conv: str
    hparams: dict
    decisions: list[ConvDecision] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None

    def by_reason(self) -> dict[tuple[str, str], list[ConvDecision]]:
        """Decisions grouped by ``(action, reason)``, in order of first appearance."""
        groups: dict[tuple[str, str], list[ConvDecision]] = {}
        for d in self.decisions:
            groups.setdefault((d.action, d.reason), []).append(d)
        return groups

    @property
    def ok(self) -> bool:
        """``convert_convs`` with these arguments would succeed."""
        return all(d.action != ERROR for d in self.decisions)

    def table(self, layers: bool = True) -> str:
        hp = "".join(f", {k}={v}" for k, v in self.hparams.items())
        lines = [f"convert_convs(model, {self.conv!r}{hp}): "
                 f"{sum(d.action == REPLACE for d in self.decisions)} replaced, "
                 f"{sum(d.action == KEEP for d in self.decisions)} kept, "
                 f"{sum(d.action == ERROR for d in self.decisions)} errors"]
        for (action, reason), items in self.by_reason().items():
            lines.append(f"{action} ({len(items)}): {reason}")
            if layers:
                for d in items:
                    macs = "" if d.macs_before is None else (
                        f"  MACs {d.macs_before:,} -> {d.macs_after:,}")
                    detail = f"  ({d.detail})" if d.detail else ""
                    lines.append(f"    {d.name:<32s} {d.shape:<22s} params {d.params_before:,} "
                                 f"-> {d.params_after:,}{macs}{detail}")
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} "
                     f"({_ratio(self.params_after, self.params_before)})")
        if self.macs_before is not None:
            after = "n/a (the conversion fails)" if self.macs_after is None else (
                f"{self.macs_after:,} ({_ratio(self.macs_after, self.macs_before)})")
            lines.append(f"MACs {self.macs_before:,} -> {after}")
        return "\n".join(lines)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.2f}x" if before else "-"


def _shape(m: nn.Conv2d) -> str:
    k = "x".join(map(str, m.kernel_size))
    text = f"{m.in_channels}->{m.out_channels} {k}/{m.stride[0]}"
    if m.groups > 1:
        text += f" g={m.groups}"
    if m.dilation[0] > 1:
        text += f" d={m.dilation[0]}"
    return text


def _why_kept(m: nn.Conv2d, is_first: bool) -> str:
    """The reason the default predicate rejects ``m`` (see ``convert._default_predicate``)."""
    if m.kernel_size == (1, 1):
        return "1x1 (pointwise): nothing spatial to slim"
    if m.kernel_size[0] != m.kernel_size[1]:
        return "non-square kernel"
    if m.groups > 1:
        return "grouped / depthwise (groups > 1)"
    if m.in_channels <= 4:
        return ("stem: reads the image (<= 4 input channels; every paper keeps it vanilla)"
                if is_first else "too few channels (<= 4 input channels)")
    if m.kernel_size[0] % 2 == 0:
        return "even kernel: the conv types build odd k x k kernels with same padding"
    if m.stride[0] != m.stride[1] or m.dilation[0] != m.dilation[1]:
        return "non-square stride or dilation"
    if not _has_same_padding(m):
        return (f"padding {m.padding} is not the same padding dilation*(k-1)/2 the conv types "
                f"use")
    return "excluded by the default predicate"


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, made without copying any tensor's data."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conversion_report(
    model: nn.Module,
    conv: str,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    *,
    input_size=None,
    **hparams,
) -> ConversionReport:
    """What ``convert_convs(model, conv, predicate, **hparams)`` would do, without doing it.

    ``input_size`` (as for :func:`leanconv.profile`: ``224``, ``(3, 224, 224)``, ...) adds MACs.
    Unknown hyperparameters raise ``ValueError`` as ``convert_convs`` would. A layer whose width
    changes (SlimConv, k != 1) is replaced with the layers rewired after it named in its reason,
    or an error naming the op that needs the old width (:mod:`leanconv.layers.rewire`).
    """
    conversion = _plan_conversion(model, conv, predicate, hparams)
    report = ConversionReport(conv, dict(hparams))
    chosen = dict(conversion.selected)
    rewiring = conversion.rewiring
    # The real conversion of a meta-device copy (nothing allocated) gives the exact sizes after,
    # rewired layers included; a conversion that fails is estimated layer by layer instead.
    converted = None
    if not conversion.errors:
        converted = convert_convs(_meta_copy(model), conv, predicate, **hparams)
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    first = convs[0][0] if convs else None
    for name, m in convs:
        before = _n_params(m)
        if converted is not None:
            after = _n_params(converted.get_submodule(name))
        elif name in chosen and name not in conversion.errors:
            with torch.device("meta"):
                after = _n_params(_build(conv, m, rewiring.in_channels.get(name, m.in_channels),
                                         hparams))
        else:
            after = before
        detail = ""
        if name not in chosen:
            action = KEEP
            reason = ("excluded by the predicate" if predicate is not None
                      else _why_kept(m, name == first))
            if rewiring.in_channels.get(name, m.in_channels) != m.in_channels:
                detail = f"in_channels rewired to {rewiring.in_channels[name]}"
        elif name in conversion.errors:
            action, reason = ERROR, conversion.errors[name]
        elif name in rewiring.rewired:
            action, reason = REPLACE, f"replaced by {conv}, the layers after it rewired"
            width = conv_out_channels(conv, rewiring.in_channels[name], m.out_channels, **hparams)
            detail = f"{width} channels; rewired: {', '.join(rewiring.rewired[name])}"
        else:
            action, reason = REPLACE, f"replaced by {conv}"
        report.decisions.append(
            ConvDecision(name, _shape(m), action, reason, before, after, detail=detail))
    report.params_before = _n_params(model)
    report.params_after = (_n_params(converted) if converted is not None else
                           report.params_before + sum(d.params_after - d.params_before
                                                      for d in report.decisions))
    if input_size is not None:
        _add_macs(report, model, converted, input_size)
    return report


def _layer_macs(profile_report, name: str) -> int:
    return sum(layer.macs for layer in profile_report.layers
               if layer.name == name or layer.name.startswith(name + "."))


def _add_macs(report: ConversionReport, model: nn.Module, converted: nn.Module | None,
              input_size) -> None:
    from ..profile import profile

    before = profile(model, input_size)
    report.macs_before = before.macs
    for d in report.decisions:
        d.macs_before = d.macs_after = _layer_macs(before, d.name)
    if converted is None:  # the conversion fails
        return
    after = profile(converted, input_size)
    report.macs_after = after.macs
    for d in report.decisions:
        d.macs_after = _layer_macs(after, d.name)
