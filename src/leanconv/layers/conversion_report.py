"""A dry run of :func:`~leanconv.layers.convert.convert_convs`: what it would replace, and why.

``conversion_report(model, conv, predicate=None, **hparams)`` changes nothing. For every
``nn.Conv2d`` of ``model`` it records whether ``convert_convs`` with the same arguments would
replace it, keep it (and the reason: 1x1, grouped/depthwise, the stem, too few channels,
non-square kernel, excluded by a custom predicate) or fail on it (padding mode, a width the
conv type cannot keep, hyperparameters the layer cannot take), with the parameters of the layer
before and after; with ``input_size`` the MACs of each layer and of the whole model before and
after too (counted by :func:`leanconv.profile` on the meta device: nothing is allocated).

>>> rep = conversion_report(torchvision.models.resnet18(), "spconv", input_size=224)
>>> print(rep.table())
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .convert import _default_predicate, convert_convs
from .registry import conv_hparams, conv_out_channels, create_conv

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
        hp = "".join(f" {k}={v}" for k, v in self.hparams.items())
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
                    lines.append(f"    {d.name:<32s} {d.shape:<22s} params {d.params_before:,} "
                                 f"-> {d.params_after:,}{macs}")
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
    return "excluded by the default predicate"


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
    Unknown hyperparameters raise ``ValueError`` as ``convert_convs`` would.
    """
    conv_hparams(conv)  # unknown conv: ValueError listing the available ones
    report = ConversionReport(conv, dict(hparams))
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    first = convs[0][0] if convs else None
    for name, m in convs:
        before = _n_params(m)
        chosen = predicate(name, m) if predicate is not None else _default_predicate(name, m)
        if not chosen:
            reason = ("excluded by the predicate" if predicate is not None
                      else _why_kept(m, name == first))
            report.decisions.append(ConvDecision(name, _shape(m), KEEP, reason, before, before))
            continue
        if m.padding_mode != "zeros":
            report.decisions.append(ConvDecision(
                name, _shape(m), ERROR, f"padding_mode={m.padding_mode!r} is not supported",
                before, before))
            continue
        try:
            width = conv_out_channels(conv, m.in_channels, m.out_channels, **hparams)
            if width != m.out_channels:
                raise ValueError(f"{conv} produces {width} channels, the layer needs "
                                 f"{m.out_channels}")
            with torch.device("meta"):
                new = create_conv(conv, m.in_channels, m.out_channels,
                                  kernel_size=m.kernel_size[0], stride=m.stride[0],
                                  dilation=m.dilation[0],
                                  **({"bias": True} if m.bias is not None else {}), **hparams)
        except (ValueError, NotImplementedError) as e:
            if "does not take" in str(e):
                raise
            report.decisions.append(ConvDecision(name, _shape(m), ERROR,
                                                 str(e).splitlines()[0], before, before))
            continue
        report.decisions.append(ConvDecision(name, _shape(m), REPLACE, f"replaced by {conv}",
                                             before, _n_params(new)))
    report.params_before = _n_params(model)
    report.params_after = report.params_before + sum(
        d.params_after - d.params_before for d in report.decisions)
    if input_size is not None:
        _add_macs(report, model, conv, predicate, input_size, hparams)
    return report


def _layer_macs(profile_report, name: str) -> int:
    return sum(layer.macs for layer in profile_report.layers
               if layer.name == name or layer.name.startswith(name + "."))


def _add_macs(report: ConversionReport, model: nn.Module, conv: str, predicate, input_size,
              hparams: dict) -> None:
    from ..profile import profile

    before = profile(model, input_size)
    report.macs_before = before.macs
    for d in report.decisions:
        d.macs_before = d.macs_after = _layer_macs(before, d.name)
    if not report.ok:
        return
    # Convert a copy on the meta device (no memory, no compute) and count it the same way.
    converted = convert_convs(copy.deepcopy(model).to("meta"), conv, predicate, **hparams)
    after = profile(converted, input_size)
    report.macs_after = after.macs
    for d in report.decisions:
        if d.action == REPLACE:
            d.macs_after = _layer_macs(after, d.name)
