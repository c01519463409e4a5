"""Complexity profiler: parameters, MACs (the papers' "FLOPs") and a per-layer breakdown.

Built on :class:`torch.utils.flop_counter.FlopCounterMode`, which works at the dispatcher level and
so sees every conv and matmul, including functional calls inside custom modules. FlopCounterMode
counts hardware FLOPs (2 per multiply-accumulate); the papers' "FLOPs" are multiply-accumulates
(He et al. 2016, §3.3: "3.6 billion FLOPs (multiply-adds)"), so ``macs = flops // 2``.

What is counted:

* ``params``: every parameter of the model (trainable and frozen), each shared tensor once, i.e.
  ``sum(p.numel() for p in model.parameters())``. Buffers (BN running statistics, fixed masks)
  are not parameters and are not counted. ``trainable_params`` counts only ``requires_grad``.
* ``macs``: multiply-accumulates of convolutions (grouped convs counted with ``C_in / groups``
  inputs per output, every kernel tap at every output position, border padding included) and
  of linear layers / matmuls. Biases, norms, activations, pooling and elementwise ops are not
  MACs, which is the convention of every table reproduced in docs/reproduction.md.
* ``elementwise`` (only with ``count_elementwise=True``): one op per output element of each
  normalisation, activation, elementwise arithmetic, softmax and upsampling op; one op per
  *input* element of pooling and reductions (mean, sum, adaptive/avg/max pool), since those read
  every input once. Reported separately, never added to ``macs``.
* ``counted_macs`` under a counting convention ``counter=`` (:data:`COUNTERS`): the papers' FLOPs
  counters do not all stop at conv + linear. ``"macs"`` (the default) is ``macs`` itself;
  ``"macs+bn"`` adds 2 ops per BatchNorm output element (scale and shift of a folded BN);
  ``"macs+bn4+pool+bias"`` adds 4 ops per BatchNorm output element, 1 per *input* element of
  every pooling op (max / average / adaptive pooling and ``mean``, which is how global average
  pooling runs) and 1 per output element of a conv or linear layer that has a bias. Each
  convention is one rule applied to the whole model; the evidence that a paper used it is in
  docs/reproduction.md. ``macs`` is never changed by ``counter``; ``counter_ops`` gives the
  added ops per component.

The model runs once, in eval mode, on the meta device by default: parameters and buffers are
replaced by meta tensors through :func:`torch.func.functional_call`, so nothing is allocated or
computed and the caller's model is not modified (ResNet-101 at 224x224 profiles in well under a
second). A model whose forward uses unregistered tensors (plain attributes, not buffers) cannot
run on meta; it falls back to one real forward where the model lives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["COUNTERS", "LayerProfile", "ProfileReport", "profile"]

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------
# Elementwise op counting (optional): FlopCounterMode custom_mapping, keys are OpOverloadPackets
# (overloads such as aten.mul.Tensor are silently ignored by FlopCounterMode).
# ----------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _per_output(*args, out_shape=None, **kwargs) -> int:
    """One op per output element (first output when the op returns several)."""
    while isinstance(out_shape, (tuple, list)) and out_shape and not isinstance(out_shape[0], int):
        out_shape = out_shape[0]  # several outputs (e.g. native_batch_norm): the first one
    if not isinstance(out_shape, (tuple, list)):
        return 0
    return _numel(out_shape)


def _per_input(x_shape, *args, out_shape=None, **kwargs) -> int:
    """One op per input element (pooling and reductions read every input once)."""
    if isinstance(x_shape, (tuple, list)) and all(isinstance(s, int) for s in x_shape):
        return _numel(x_shape)
    return _per_output(out_shape=out_shape)


def _packets(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


_PER_OUTPUT_OPS = _packets(
    # elementwise arithmetic
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "neg", "exp", "log",
    "pow", "sqrt", "rsqrt", "abs", "clamp", "clamp_", "clamp_min", "clamp_min_", "where",
    "maximum", "minimum",
    # activations
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "hardsigmoid",
    "hardsigmoid_", "hardswish", "hardswish_", "silu", "silu_", "gelu", "tanh", "tanh_",
    "leaky_relu", "leaky_relu_", "elu", "softplus",
    # softmax
    "_softmax", "_log_softmax", "softmax",
    # normalisation
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "native_group_norm", "native_layer_norm",
    # resampling
    "upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact2d",
)
_PER_INPUT_OPS = _packets(
    "mean", "sum", "amax", "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d",
    "max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d",
)
_ELEMENTWISE_MAPPING = {
    **{op: _per_output for op in _PER_OUTPUT_OPS},
    **{op: _per_input for op in _PER_INPUT_OPS},
}

# ----------------------------------------------------------------------------------------------
# Counting conventions: name -> {component: ops per counted element}; see the module docstring.
# ----------------------------------------------------------------------------------------------
_BN_OPS = frozenset(_packets(
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional"))
_POOL_OPS = frozenset(_packets(
    "mean", "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "max_pool2d",
    "max_pool2d_with_indices", "adaptive_max_pool2d"))

#: Counting conventions for ``profile(..., counter=NAME)``: component -> ops per element.
#: ``bn``: per BatchNorm output element; ``pool``: per pooling input element; ``bias``: per
#: output element of a conv / linear with a bias.
COUNTERS: dict[str, dict[str, int]] = {
    "macs": {},
    "macs+bn": {"bn": 2},
    "macs+bn4+pool+bias": {"bn": 4, "pool": 1, "bias": 1},
}


def _check_counter(counter: str) -> dict[str, int]:
    if counter not in COUNTERS:
        raise ValueError(f"counter={counter!r} is not a counting convention; "
                         f"allowed: {', '.join(COUNTERS)}")
    return COUNTERS[counter]


def _bias_mapping(record: list) -> dict:
    """conv / addmm formulas that count as usual and record bias adds (1 per output element)."""
    registry = torch.utils.flop_counter.flop_registry
    raw_conv = registry[aten.convolution].__wrapped__
    raw_addmm = registry[aten.addmm].__wrapped__

    def conv(x_shape, w_shape, bias, *args, out_shape=None, **kwargs):
        if bias is not None:
            record.append(_numel(out_shape))
        return raw_conv(x_shape, w_shape, bias, *args, out_shape=out_shape, **kwargs)

    def addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        record.append(_numel(out_shape))  # addmm = bias + mat1 @ mat2
        return raw_addmm(self_shape, a_shape, b_shape, *args, out_shape=out_shape, **kwargs)

    return {aten.convolution: conv, aten._convolution: conv, aten.addmm: addmm}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerProfile:
    """One module of the breakdown.

    ``params`` are the module's own parameters (``recurse=False``) and ``macs`` / ``elementwise``
    the ops executed in its own ``forward`` outside any child module, so the column sums equal
    the model totals. ``output_shape`` is the shape of its (first) tensor output.
    """

    name: str
    type: str
    params: int
    macs: int
    elementwise: int | None = None
    output_shape: tuple[int, ...] | None = None


@dataclass
class ProfileReport:
    """Result of :func:`profile`: ``params``, ``macs`` (= paper FLOPs) and ``layers``.

    ``counted_macs`` is ``macs`` plus the ops the ``counter`` convention adds (``counter_ops``,
    per component); with the default ``counter="macs"`` it equals ``macs``.
    """

    params: int
    macs: int
    trainable_params: int
    input_size: tuple[int, ...]
    output_shape: tuple[int, ...] | None = None
    elementwise: int | None = None
    layers: list[LayerProfile] = field(default_factory=list)
    counter: str = "macs"
    counted_macs: int | None = None
    counter_ops: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """Hardware FLOPs (2 per MAC), the unit FlopCounterMode reports."""
        return 2 * self.macs

    def to_dict(self) -> dict:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        out["output_shape"] = list(self.output_shape) if self.output_shape else None
        for layer in out["layers"]:
            if layer["output_shape"] is not None:
                layer["output_shape"] = list(layer["output_shape"])
        return out

    def summary(self) -> str:
        text = (f"params {self.params:,} ({self.params / 1e6:.3f} M)   "
                f"MACs {self.macs:,} ({self.macs / 1e9:.4f} G)   input {tuple(self.input_size)}")
        if self.elementwise is not None:
            text += f"   elementwise ops {self.elementwise:,}"
        if self.counter != "macs":
            text += f"   counted ({self.counter}) {self.counted_macs:,}"
        return text

    def table(self, layers: bool = True, max_name: int = 48) -> str:
        """A printable table: one line per layer (when ``layers``) and the totals."""
        with_ew = self.elementwise is not None
        head = ["layer", "type", "output", "params", "MACs"] + (["elementwise"] if with_ew else [])
        rows = []
        if layers:
            for layer in self.layers:
                name = layer.name or "(root)"
                if len(name) > max_name:
                    name = "…" + name[-(max_name - 1):]
                shape = "x".join(map(str, layer.output_shape)) if layer.output_shape else ""
                row = [name, layer.type, shape, f"{layer.params:,}", f"{layer.macs:,}"]
                if with_ew:
                    row.append(f"{layer.elementwise or 0:,}")
                rows.append(row)
        total = ["total", "", "x".join(map(str, self.output_shape or ())),
                 f"{self.params:,}", f"{self.macs:,}"]
        if with_ew:
            total.append(f"{self.elementwise:,}")
        widths = [max(len(str(r[i])) for r in [head, total, *rows]) for i in range(len(head))]

        def fmt(row):
            cells = [str(c).ljust(w) if i < 3 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [fmt(head), rule, *(fmt(r) for r in rows)]
        if rows:
            lines.append(rule)
        lines.append(fmt(total))
        lines.append(f"params {self.params / 1e6:.3f} M, MACs {self.macs / 1e9:.4f} G "
                     "(MACs = multiply-accumulates of conv + linear = the papers' FLOPs)")
        if self.counter != "macs":
            added = ", ".join(f"{k} {v:,}" for k, v in self.counter_ops.items())
            lines.append(f"counted under {self.counter!r}: {self.counted_macs / 1e9:.4f} G "
                         f"(conv + linear MACs + {added or 'nothing'})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table(layers=False)


# ----------------------------------------------------------------------------------------------
# profile()
# ----------------------------------------------------------------------------------------------
def _infer_in_channels(model: nn.Module) -> int:
    for module in model.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int):
            return channels
    return 3


def _resolve_input_size(model: nn.Module, input_size) -> tuple[int, ...]:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (1, _infer_in_channels(model), *size)
    if len(size) == 3:
        return (1, *size)
    if len(size) == 4:
        return size
    raise ValueError(f"input_size must be H, (H, W), (C, H, W) or (N, C, H, W), got {input_size!r}")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(out, dict):
        for item in out.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _run(model: nn.Module, x: torch.Tensor, state: dict | None, mapping: dict):
    """One forward under FlopCounterMode, recording each module's output shape."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(module, args, out):
        t = _first_tensor(out)
        if t is not None:
            shapes[module] = tuple(t.shape)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        with torch.no_grad(), counter:
            if state is None:
                out = model(x)
            else:
                out = torch.func.functional_call(model, state, (x,), tie_weights=True, strict=False)
    finally:
        for h in handles:
            h.remove()
    return out, shapes, counter.get_flop_counts()


def profile(
    model: nn.Module,
    input_size: int | Sequence[int],
    *,
    count_elementwise: bool = False,
    counter: str = "macs",
    device: str | torch.device | None = "meta",
) -> ProfileReport:
    """Count parameters and MACs of ``model`` for one input of ``input_size``.

    Args:
        model: any ``nn.Module`` taking one image tensor. It is not modified.
        input_size: ``(N, C, H, W)``; ``(C, H, W)`` or ``(H, W)`` or ``H`` imply ``N = 1`` (the
            papers' per-image numbers) and, when ``C`` is missing, the ``in_channels`` of the
            first conv. MACs are for the whole batch ``N``.
        count_elementwise: also count norm / activation / elementwise / pooling / softmax ops
            (see the module docstring), reported as ``report.elementwise``.
        counter: counting convention for ``report.counted_macs`` (a name of :data:`COUNTERS`):
            ``"macs"`` (conv + linear only, default), ``"macs+bn"``, ``"macs+bn4+pool+bias"``.
            ``report.macs`` is conv + linear under every convention.
        device: ``"meta"`` (default) runs without allocating memory or computing anything;
            any other device runs a real forward with the model where it is and a random input
            on ``device`` (``None``: the device of the model's first parameter).

    Returns:
        :class:`ProfileReport` with integer ``params``, ``macs``, ``trainable_params``, the
        per-module ``layers`` breakdown, and ``table()`` / ``to_dict()``.

    >>> from leanconv import create_model, profile
    >>> profile(create_model("resnet50", num_classes=1000), 224).macs  # doctest: +SKIP
    4089184256
    """
    size = _resolve_input_size(model, input_size)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rule = _check_counter(counter)
    elementwise_mapping = _ELEMENTWISE_MAPPING if (count_elementwise or rule) else {}
    bias_record: list[int] = []
    mapping = {**elementwise_mapping, **(_bias_mapping(bias_record) if "bias" in rule else {})}

    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        if device is not None and torch.device(device).type == "meta":
            x = torch.empty(size, device="meta")
            on_meta = all(t.device.type == "meta"
                          for t in [*model.parameters(), *model.buffers()])
            if on_meta:
                runner, state = model, None
            else:
                runner = model
                state = {n: torch.empty_like(t, device="meta")
                         for n, t in [*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False)]}
            try:
                out, shapes, counts = _run(runner, x, state, mapping)
            except (RuntimeError, NotImplementedError, TypeError):
                if state is None:
                    raise
                # A forward that mixes in unregistered (non-buffer) tensors cannot run on meta:
                # count with one real forward where the model lives instead (same counts).
                first = next(iter(model.parameters()), None)
                x = torch.randn(size, device=first.device if first is not None else "cpu")
                bias_record.clear()
                out, shapes, counts = _run(model, x, None, mapping)
        else:
            if device is None:
                first = next(iter(model.parameters()), None)
                device = first.device if first is not None else "cpu"
            x = torch.randn(size, device=device)
            out, shapes, counts = _run(model, x, None, mapping)
    finally:
        for m, mode in was_training.items():
            m.train(mode)

    mac_ops = set(counts.get("Global", {})) - set(elementwise_mapping)

    def split(op_counts: dict) -> tuple[int, int]:
        flops = sum(v for k, v in op_counts.items() if k in mac_ops)
        ew = sum(v for k, v in op_counts.items() if k not in mac_ops)
        return flops // 2, ew

    root_name = type(model).__name__
    inclusive: dict[str, tuple[int, int]] = {}
    for name, _ in model.named_modules():
        key = root_name + ("." + name if name else "")
        inclusive[name] = split(counts.get(key, {}))
    total_macs, total_ew = split(counts.get("Global", {}))

    glob = counts.get("Global", {})
    component_counts = {
        "bn": sum(v for k, v in glob.items() if k in _BN_OPS),
        "pool": sum(v for k, v in glob.items() if k in _POOL_OPS),
        "bias": sum(bias_record),
    }
    counter_ops = {name: per * component_counts[name] for name, per in rule.items()}

    layers = []
    for name, module in model.named_modules():
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        macs, ew = inclusive[name]
        for child_name, _ in module.named_children():
            cm, ce = inclusive[f"{name}.{child_name}" if name else child_name]
            macs, ew = macs - cm, ew - ce
        is_leaf = next(iter(module.children()), None) is None
        if not (is_leaf or own_params or macs or ew):
            continue
        layers.append(LayerProfile(
            name=name, type=type(module).__name__, params=own_params, macs=macs,
            elementwise=ew if count_elementwise else None, output_shape=shapes.get(module),
        ))

    out_t = _first_tensor(out)
    return ProfileReport(
        params=params, macs=total_macs, trainable_params=trainable, input_size=size,
        output_shape=tuple(out_t.shape) if out_t is not None else None,
        elementwise=total_ew if count_elementwise else None, layers=layers,
        counter=counter, counted_macs=total_macs + sum(counter_ops.values()),
        counter_ops=counter_ops,
    )
