"""Rewiring the layers after a replacement that changes a conv's width, through ``torch.fx``.

SlimConv with ``k != 1`` gives ``C_in / k`` channels whatever the layer gave (§3.2), so every
layer reading its output must take that width (the paper's Fig. 3: the bottleneck's last 1x1
conv takes ``C/k``). :func:`plan_rewiring` traces the model with ``torch.fx`` and follows each
narrowed output forward through the graph:

* ``nn.BatchNorm2d`` is per channel: rebuilt fresh at the new width (the replaced layer is fresh
  too, so there are no statistics worth slicing), and followed further;
* activations, dropout, pooling and ``nn.Identity`` act per channel and are followed further;
* an ungrouped ``nn.Conv2d`` reading it is rebuilt with the new ``in_channels`` (or, when it is
  replaced as well, its replacement is built from the new width, so SlimConv widths chain);
* anything else -- a residual add, a concatenation, a grouped or depthwise conv, a reshape, a
  Linear, the model's output -- needs the old width: the layer gets an error naming that op.

A model ``torch.fx`` cannot trace (data-dependent control flow) is an error for every layer whose
width changes; layers that keep their width never need the trace.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .registry import available_convs, conv_class

__all__ = ["Rewiring", "plan_rewiring"]

# Exact types: a subclass may mix channels (e.g. a norm+act module with its own semantics).
_PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PER_CHANNEL_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.dropout,
    F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous"}


@dataclass
class Rewiring:
    """What changes around the layers whose width changes, by qualified module name."""

    in_channels: dict[str, int] = field(default_factory=dict)  # replaced convs and their readers
    norms: dict[str, int] = field(default_factory=dict)  # BatchNorm2d -> its new width
    rewired: dict[str, list[str]] = field(default_factory=dict)  # narrowed layer -> rebuilt ones
    errors: dict[str, str] = field(default_factory=dict)  # narrowed layer -> why it cannot be

    def rebuild(self, model: nn.Module, replaced: Collection[str]) -> None:
        """Swap, in place, each planned BatchNorm2d and reading ``nn.Conv2d`` for a fresh one of
        the new width; the convs in ``replaced`` are the caller's to build."""
        for name, width in self.norms.items():
            old = model.get_submodule(name)
            ref = next(old.parameters(), None)  # affine=False: its running stats, if any
            ref = next(old.buffers(), None) if ref is None else ref
            model.set_submodule(name, nn.BatchNorm2d(
                width, old.eps, old.momentum, old.affine, old.track_running_stats,
                device=None if ref is None else ref.device,
                dtype=None if ref is None else ref.dtype,
                **({"bias": False} if old.affine and old.bias is None else {})))
        for name, width in self.in_channels.items():
            old = model.get_submodule(name)
            if name in replaced or width == old.in_channels:
                continue
            model.set_submodule(name, nn.Conv2d(
                width, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                bias=old.bias is not None, padding_mode=old.padding_mode,
                device=old.weight.device, dtype=old.weight.dtype))


class _BlockedError(Exception):
    """A narrowed output reaches an op that needs the old width (the message names it)."""


class _Tracer(fx.Tracer):
    # Registered conv modules (a model converted before) are single ops, not traced into.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        convs = tuple(conv_class(name) for name in available_convs())
        return isinstance(m, convs) or super().is_leaf_module(m, qualname)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        m = modules[node.target]
        extra = f" groups={m.groups}" if isinstance(m, nn.Conv2d) and m.groups > 1 else ""
        return f"{node.target} ({type(m).__name__}{extra})"
    if node.op == "call_method":
        what = f".{node.target}()"
    elif node.op == "call_function":
        fn = node.target
        what = {operator.add: "+", operator.iadd: "+=", operator.mul: "*"}.get(fn) or (
            f"{getattr(fn, '__module__', None) or 'torch'}.{getattr(fn, '__name__', fn)}")
    else:
        what = node.op
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return f"{what} in {path} ({getattr(cls, '__name__', cls)})"
    return what


def _per_channel(node: fx.Node, module: nn.Module | None) -> bool:
    """``node`` maps each channel of its first argument on its own (any width passes through)."""
    if node.op == "call_module":
        return type(module) in _PER_CHANNEL_MODULES
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS
    return node.op == "call_method" and node.target in _PER_CHANNEL_METHODS


def _follow(start: fx.Node, width: int, modules: dict[str, nn.Module]
            ) -> tuple[dict[str, int], dict[str, int]]:
    """(BatchNorm2d -> width, reading conv -> in_channels) reached from ``start``'s output."""
    norms: dict[str, int] = {}
    readers: dict[str, int] = {}
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            reads_it = bool(user.args) and user.args[0] is node  # not e.g. as a size argument
            if reads_it and type(module) is nn.Conv2d and module.groups == 1:
                readers[user.target] = width
                continue  # a conv's output has its own width: stop here
            if reads_it and type(module) is nn.BatchNorm2d:
                norms[user.target] = width
            elif not (reads_it and _per_channel(user, module)):
                raise _BlockedError(_describe(user, modules))
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return norms, readers


def plan_rewiring(model: nn.Module, targets: Collection[str],
                  out_channels: Callable[[str, int], int]) -> Rewiring:
    """Plan the rebuilds that let the convs named in ``targets`` change width.

    ``out_channels(name, in_channels)`` is the width the replacement of conv ``name`` gives when
    it reads ``in_channels`` channels (it may raise ``ValueError``: that layer's error). Returns
    a :class:`Rewiring`; a layer that cannot be rewired is in ``errors`` (with the op blocking
    it), never raised, so a dry run can list every one.
    """
    modules = dict(model.named_modules())
    rewiring = Rewiring()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... on data-dependent control flow
        reason = (f"torch.fx cannot trace the model to rewire the layers after it "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        for name in targets:
            _unfollowable(rewiring, name, modules[name], out_channels, f"; {reason}")
        return rewiring
    targets = set(targets)
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in targets:
            continue
        name, old = node.target, modules[node.target]
        in_width = rewiring.in_channels.setdefault(name, old.in_channels)
        try:
            width = out_channels(name, in_width)
        except ValueError as err:
            after = "" if in_width == old.in_channels else (
                f"reads {in_width} channels after the rewiring before it: ")
            rewiring.errors[name] = after + str(err).splitlines()[0]
            continue
        if width == old.out_channels:
            continue
        try:
            norms, readers = _follow(node, width, modules)
        except _BlockedError as blocked:
            rewiring.errors[name] = (
                f"the replacement gives {width} channels where the layer gave {old.out_channels}, "
                f"and its output reaches {blocked}, which needs {old.out_channels} (only "
                f"BatchNorm2d, activations, dropout and pooling may lie between it and the "
                f"ungrouped nn.Conv2d layers reading it); keep the width (SlimConv: "
                f"compression_ratio=1) or leave the layer out with a predicate")
            continue
        # A module called at several places may be reached with two widths: no single rebuild.
        clash = [other for table, new in ((rewiring.norms, norms), (rewiring.in_channels, readers))
                 for other, w in new.items() if table.get(other, w) != w]
        if clash:
            rewiring.errors[name] = (f"the replacement gives {width} channels, but {clash[0]} "
                                     f"(called at several places) also reads another width")
            continue
        rewiring.norms.update(norms)
        rewiring.in_channels.update(readers)
        rewiring.rewired.setdefault(name, []).extend(
            other for other in (*norms, *readers) if other not in rewiring.rewired.get(name, ()))
    # A target inside a module fx keeps whole, or never called, cannot be followed.
    for name in targets - {n.target for n in graph.nodes if n.op == "call_module"}:
        _unfollowable(rewiring, name, modules[name], out_channels,
                      ", and the torch.fx graph of the model does not call the layer")
    return rewiring


def _unfollowable(rewiring: Rewiring, name: str, old: nn.Conv2d, out_channels, reason: str
                  ) -> None:
    """Record why target ``name``, whose output cannot be followed, fails if its width changes."""
    try:
        width = out_channels(name, old.in_channels)
    except ValueError as err:
        rewiring.errors[name] = str(err).splitlines()[0]
        return
    if width != old.out_channels:
        rewiring.errors[name] = (f"the replacement gives {width} channels, not "
                                 f"{old.out_channels}{reason}")
