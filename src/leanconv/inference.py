"""The one-call inference path: ``prepare_for_inference(model)``.

A network trained with leanconv modules carries training-time structure that inference does not
need: BatchNorm layers after convolutions (an affine map per channel that folds into the conv's
weight and bias) and, inside some modules, parallel linear branches whose sum is one convolution.
:func:`prepare_for_inference` removes that structure and returns a model that computes the same
function (up to float rounding) faster:

1. copy the model (unless ``inplace=True``), put it in eval mode and turn off ``requires_grad``;
2. call ``fuse_for_inference()`` on every submodule that defines it, innermost first -- a conv
   module folds its own normalisations / merges its own branches there, seeing them untouched;
3. fold every BatchNorm that *directly and only* consumes a convolution's output into that
   convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``), replacing the BN by ``nn.Identity``.
   Pairs are found by tracing each module's own ``forward`` one level deep with ``torch.fx``
   (children kept as leaves), so ``nn.Sequential(conv, bn)`` and ResNet's ``bn1(conv1(x))``
   fold, while a pre-activation ``conv1(relu(bn1(x)))`` or a conv output that also feeds a
   shortcut does not. Modules whose forward cannot be traced are left as they are (their
   children are still visited). A module that is not an ``nn.Conv2d`` but can take a following
   BN into its own weights may define ``absorb_bn(bn) -> bool``; it is called for such pairs and
   the BN is dropped when it returns ``True``;
4. convert the weights to ``memory_format`` (default ``torch.channels_last``) and convert 4-D
   inputs to it on entry (a forward pre-hook), so every convolution runs in that layout;
5. optionally ``torch.compile`` the result (``compile=True``: inductor with ``freezing`` --
   weights become constants, conv+BN/element-wise fusion and weight prepacking -- and static
   shapes; or a dict of ``torch.compile`` keyword arguments); compilation happens at the first
   call. Submodules with ``compile_eager = True`` (measured slower compiled, e.g. SCConv's CRU)
   run eagerly inside the compiled model.

Why channels_last by default: on the CPU of ``docs/performance.md`` (oneDNN, AVX-512) it made
every model faster at inference, vanilla included (CIFAR ResNet-56 b128 157 -> 127 ms, ResNet-50
224 b8 371 -> 281 ms), and the NCHW kernels are pathological for the slim modules' small
channel groups (a 2-group 3x3 conv 8 -> 16 channels at 32x32 takes 6.8 ms in NCHW, 1.8 ms in
NHWC). Pass ``memory_format=None`` to keep the model's layout.

Check the result with :func:`max_abs_diff` (or pass ``example_input=`` to have it logged).
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_conv_bn", "max_abs_diff", "prepare_for_inference"]

_logger = logging.getLogger(__name__)

_BN_FORWARDS = (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward)


def _foldable_conv(m: nn.Module) -> bool:
    # A subclass that overrides forward (weight standardisation, ...) may use its weight
    # differently, so only the plain convolution forward qualifies.
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _foldable_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and type(m).forward in _BN_FORWARDS
        and m.running_mean is not None
        and m.running_var is not None
    )


class _OneLevelTracer(fx.Tracer):
    """Trace a module's own forward with every submodule kept as an opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv_child, bn_child)`` names where ``bn_child`` directly and only consumes
    ``conv_child``'s output in ``module.forward``; ``[]`` if the forward cannot be traced."""
    children = dict(module.named_children())
    if not children:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _OneLevelTracer().trace(module)
    except Exception:  # data-dependent control flow, shape unpacking, ...: leave it alone
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in children or len(node.users) != 1:
            continue
        (user,) = node.users
        if (
            user.op == "call_module"
            and user.target in children
            and user.args == (node,)
            and not user.kwargs
            and calls[node.target] == 1
            and calls[user.target] == 1
            and _foldable_bn(children[user.target])
        ):
            pairs.append((node.target, user.target))
    return pairs


def fold_conv_bn(model: nn.Module) -> int:
    """Fold, in place, every eval-mode BN that directly follows a conv; return how many.

    ``model`` must be in eval mode (the running statistics are what gets folded).
    """
    if model.training:
        raise ValueError("fold_conv_bn needs an eval-mode model (call model.eval() first)")
    # A module registered under two names (shared weights) must not be rewritten for one use.
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if counts[id(conv)] != 1 or counts[id(bn)] != 1:
                continue
            if _foldable_conv(conv):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            elif not (callable(getattr(conv, "absorb_bn", None)) and conv.absorb_bn(bn)):
                continue
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def max_abs_diff(a: nn.Module, b: nn.Module, input: torch.Tensor, *,
                 relative: bool = False) -> float:
    """Largest absolute difference between the outputs of ``a`` and ``b`` on ``input``.

    Both run in eval mode without gradients (their previous modes are restored); outputs may be
    tensors or nested tuples/lists/dicts of tensors with matching structure. With ``relative``
    the difference is divided by the largest ``|output of a|`` (untrained deep networks can
    produce outputs of 1e12, where an absolute difference says little).
    """
    from torch.utils._pytree import tree_leaves

    outs = []
    for model in (a, b):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outs.append([t for t in tree_leaves(model(input)) if isinstance(t, torch.Tensor)])
        finally:
            model.train(was_training)
    if len(outs[0]) != len(outs[1]):
        raise ValueError(f"outputs differ in structure: {len(outs[0])} vs {len(outs[1])} tensors")
    diff = scale = 0.0
    for x, y in zip(*outs, strict=True):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel():
            diff = max(diff, (x.float() - y.float()).abs().max().item())
            scale = max(scale, x.float().abs().max().item())
    if relative:
        return diff / scale if scale > 0 else diff
    return diff


_MEMORY_FORMATS = (torch.channels_last, torch.contiguous_format, None)


def _to_memory_format(memory_format: torch.memory_format):
    def hook(module, args):
        return tuple(a.contiguous(memory_format=memory_format)
                     if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
    return hook


def prepare_for_inference(
    model: nn.Module,
    *,
    compile: bool | dict = False,
    memory_format: torch.memory_format | None = torch.channels_last,
    inplace: bool = False,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Return an inference-only version of ``model`` computing the same function, faster.

    By default the model is deep-copied, so the training-form model stays usable (to keep
    training it, or to compare against it); ``inplace=True`` rewrites ``model`` itself and
    saves the copy's memory. The result is in eval mode with ``requires_grad`` off, BN layers
    folded into the convolutions before them, and every submodule's ``fuse_for_inference()``
    applied (see the module docstring for the exact rules), its weights and 4-D inputs in
    ``memory_format`` (``None``: left as they are). ``compile=True`` wraps it with
    ``torch.compile(dynamic=False, options={"freezing": True})``, a dict replaces those
    ``torch.compile`` kwargs.

    With ``example_input`` the largest output difference to the training-form model (in eval
    mode) is logged, and a warning is raised if it exceeds 1e-3 of the largest output.

    >>> fast = prepare_for_inference(model)
    >>> max_abs_diff(model, fast, torch.randn(1, 3, 32, 32))  # ~1e-6
    """
    if memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be torch.channels_last, torch.contiguous_format "
                         f"or None, got {memory_format!r}")
    if not isinstance(compile, (bool, dict)):
        raise ValueError(f"compile must be True, False or a dict of torch.compile keyword "
                         f"arguments, got {compile!r}")
    prepared = model if inplace else copy.deepcopy(model)
    prepared.eval()
    prepared.requires_grad_(False)
    for module in reversed(list(prepared.modules())):  # innermost first
        fuse = getattr(module, "fuse_for_inference", None)
        if callable(fuse):
            fuse()
    folded = fold_conv_bn(prepared)
    _logger.info("prepare_for_inference: folded %d conv+BN pairs", folded)
    if memory_format is not None:
        prepared.to(memory_format=memory_format)
        prepared.register_forward_pre_hook(_to_memory_format(memory_format))
    if example_input is not None and not inplace:
        diff = max_abs_diff(model, prepared, example_input)
        rel = max_abs_diff(model, prepared, example_input, relative=True)
        _logger.info("prepare_for_inference: max abs diff vs training form %.3g "
                     "(%.3g of the largest output)", diff, rel)
        if rel > 1e-3:
            warnings.warn(f"prepared model differs from the original by up to {diff:.3g} "
                          f"({rel:.3g} of the largest output)", stacklevel=2)
    if compile:
        # A module whose compiled code was measured slower than its eager forward says so with
        # ``compile_eager = True``; it runs eagerly inside the compiled model (a graph break).
        for module in prepared.modules():
            if getattr(module, "compile_eager", False):
                module.forward = torch.compiler.disable(module.forward)
        # Freezing folds the (now constant) weights into the graph: conv + element-wise fusion
        # and oneDNN weight prepacking. Static shapes: one specialised graph per input shape.
        options = compile if isinstance(compile, dict) else {
            "dynamic": False, "options": {"freezing": True}}
        prepared = torch.compile(prepared, **options)
    return prepared
