"""The single registry of convolution types: ``create_conv(name, ...)`` and ``available_convs()``.

Every conv type is a class with an ``nn.Conv2d``-shaped constructor
``(in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1, ...,
**paper_hparams)``
and a truthful ``out_channels`` attribute. Models, the converter, the profiler and the CLI all go
through this module, so a hyperparameter keeps one name from the command line to the constructor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

__all__ = [
    "available_convs",
    "conv_class",
    "conv_hparams",
    "conv_out_channels",
    "create_conv",
    "register_conv",
]

_CONVS: dict[str, type[nn.Module]] = {}
# Arguments every conv takes that are not paper hyperparameters.
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "bias", "device", "dtype")


def register_conv(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a conv type under ``name``; a duplicate name is an error."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _CONVS and _CONVS[name] is not cls:
            raise ValueError(f"conv type {name!r} is already registered to {_CONVS[name].__name__}")
        _CONVS[name] = cls
        cls.conv_name = name
        return cls

    return wrap


# The order tables and studies list conv types in; types registered later follow.
_CANONICAL_ORDER = ("vanilla", "slimconv", "spconv", "sru", "cru", "scconv", "compconv", "ghost")


def available_convs() -> list[str]:
    """Names accepted by :func:`create_conv`: the papers' modules first, then any user additions."""
    known = [name for name in _CANONICAL_ORDER if name in _CONVS]
    return known + [name for name in _CONVS if name not in _CANONICAL_ORDER]


def conv_class(name: str) -> type[nn.Module]:
    try:
        return _CONVS[name]
    except KeyError:
        raise ValueError(
            f"unknown conv {name!r}; available convs: {', '.join(available_convs())}"
        ) from None


def conv_hparams(name: str) -> dict[str, object]:
    """The paper hyperparameters of conv ``name`` with their defaults."""
    params = inspect.signature(conv_class(name).__init__).parameters
    return {
        key: p.default
        for key, p in params.items()
        if key != "self" and key not in _CONV_ARGS and p.kind is not p.VAR_KEYWORD
    }


def _check_hparams(name: str, hparams: dict) -> None:
    allowed = conv_hparams(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"conv {name!r} does not take {', '.join(unknown)}; "
            f"its hyperparameters are: {', '.join(allowed) or '(none)'}"
        )


def conv_out_channels(name: str, in_channels: int, out_channels: int | None, **hparams) -> int:
    """Width the conv will produce (SlimConv's is ``in_channels / k``), known before building."""
    _check_hparams(name, hparams)
    cls = conv_class(name)
    natural = getattr(cls, "natural_out_channels", None)
    if natural is not None:
        return natural(in_channels, out_channels, **hparams)
    if out_channels is None:
        raise ValueError(f"conv {name!r} needs out_channels")
    return out_channels


def create_conv(
    name: str,
    in_channels: int,
    out_channels: int | None,
    kernel_size: int = 3,
    stride: int = 1,
    **kwargs,
) -> nn.Module:
    """Build conv ``name``; ``kwargs`` are ``nn.Conv2d`` extras (padding, dilation, ...) or hparams.

    >>> conv = create_conv("spconv", 64, 128, stride=2, split_ratio=0.5)
    >>> conv.out_channels
    128
    """
    cls = conv_class(name)
    _check_hparams(name, {k: v for k, v in kwargs.items() if k not in _CONV_ARGS})
    return cls(in_channels, out_channels, kernel_size=kernel_size, stride=stride, **kwargs)
