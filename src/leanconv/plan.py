"""``leanconv plan``: choose the conv type of every layer from times measured on this machine.

The four papers choose a module by its MACs; what a user pays is time, and which module saves
time depends on the layer's shape and on the machine's kernels (docs/performance.md: on an
AVX-512 CPU every module is slower than vanilla at ResNet-56's 16-channel stage, several are
faster at its 64-channel stage). Following FBNet and Once-for-All (a per-operator latency
lookup table measured on the target device, network time = sum of its operators' times), the
planner

1. lists the replaceable convs of a vanilla model (:func:`replaceable_layers`: every ungrouped
   conv reading more than 4 channels, so not the stem) with the shape each one sees;
2. times every candidate (:func:`candidates`: vanilla, each registered conv type with its paper
   defaults, a few variants, and *width-aligned* variants whose inner widths are multiples of
   the CPU kernels' channel block) in its host context -- the conv plus the BatchNorm and ReLU
   that follow it -- for inference (eager and :func:`~leanconv.prepare_for_inference`, NCHW and
   channels_last inputs respectively) or training (forward, backward with a random upstream
   gradient, SGD step; contiguous and channels_last), in interleaved rounds, median of pooled
   times. Results go to a JSON cache (:class:`LatencyTable`) keyed by the machine
   (:func:`machine_key`), so a second plan on the same machine measures nothing new;
3. predicts the whole network's time as vanilla's measured whole-network time minus the vanilla
   layers' times plus the chosen layers' times (the rest of the network -- stem, shortcuts,
   pooling, classifier, layout changes -- is taken as measured), for each path (inference:
   eager / prepared; training: contiguous / channels_last);
4. chooses per layer (:func:`solve`, a multiple-choice knapsack by dynamic programming) the
   assignment of least predicted time under a MAC budget (``max_macs``, a fraction of vanilla's
   MACs, optionally above a floor ``min_macs``) or of least MACs under a time budget
   (``max_time``), and the path with the least predicted time;
5. checks the choice (:func:`check_plan`): builds the planned network and times it whole
   against vanilla in the same run, best of both paths each, and records predicted vs measured.

A :class:`Plan` is plain JSON (machine key, objective, budget, per layer its qualified name,
shape, chosen conv and hyperparameters, predicted time and MACs). It is applied by
``leanconv.create_model(name, plan=...)`` and ``leanconv.convert_convs(model, plan=...)``, which
replace each planned layer of the vanilla network (the host BN after it is kept).

Width-changing modules (SlimConv with k != 1) are not candidates: a plan replaces one conv by a
module of the same input and output width, so only SlimConv with k = 1 (where in = out) is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from .layers import available_convs, conv_class, create_conv
from .layers.convert import replaceable_geometry
from .models.placement import resolve_placement

__all__ = [
    "OBJECTIVES",
    "LatencyTable",
    "LayerShape",
    "Plan",
    "PlanError",
    "apply_plan",
    "candidates",
    "channel_block",
    "check_plan",
    "format_plan",
    "load_plan",
    "machine_key",
    "make_plan",
    "replaceable_layers",
    "solve",
]

PLAN_FORMAT = "leanconv-plan/1"
TABLE_FORMAT = "leanconv-latency/1"
OBJECTIVES = ("inference", "training")
PATHS = {"inference": ("eager", "prepared"), "training": ("contiguous", "channels_last")}
DEFAULT_CACHE = Path(os.environ.get("LEANCONV_CACHE", Path.home() / ".cache" / "leanconv"))


class PlanError(ValueError):
    """A plan cannot be made, read or applied; the message says why and what is allowed."""


# ----------------------------------------------------------------------------------------------
# The machine and its kernels
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device | str = "cpu", threads: int | None = None,
                batch: int = 1) -> dict:
    """Everything that changes a measured time: CPU model, ISA capability, device, torch
    version, intra-op threads and batch size."""
    device = torch.device(device)
    key = {
        "cpu": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "device": device.type,
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "batch": int(batch),
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def channel_block(capability: str | None = None) -> int:
    """Channels per vector block of oneDNN's blocked layouts: 16 on AVX-512, 8 otherwise
    (nChw16c / nChw8c; benchmarks/results/conv-scaling.md)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return 16 if "AVX512" in capability.upper() else 8


# ----------------------------------------------------------------------------------------------
# Layers and candidates
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """A replaceable conv as the planner sees it: its arguments and its input's spatial size."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    dilation: int
    bias: bool
    height: int
    width: int

    def tag(self) -> str:
        return (f"{self.in_channels}->{self.out_channels} k{self.kernel_size} s{self.stride}"
                + (f" d{self.dilation}" if self.dilation != 1 else "")
                + (" bias" if self.bias else "") + f" @{self.height}x{self.width}")


def _is_replaceable(conv: nn.Module) -> bool:
    # convert_convs' rule, 1x1s included (CompConv and Ghost replace them too).
    return (type(conv) in (nn.Conv2d, conv_class("vanilla")) and conv.padding_mode == "zeros"
            and replaceable_geometry(conv))


def replaceable_layers(model: nn.Module, input_shape: Sequence[int]) -> dict[str, LayerShape]:
    """Qualified name -> :class:`LayerShape` of every conv a plan may replace, in forward order.

    ``input_shape`` is one sample without batch, ``(C, H, W)``. The shapes come from one forward
    on the meta device (nothing is computed).
    """
    found: dict[str, LayerShape] = {}
    names = {m: n for n, m in model.named_modules() if _is_replaceable(m)}
    hooks = []

    def hook(module, args):
        x = args[0]
        name = names[module]
        found.setdefault(name, LayerShape(
            module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
            module.dilation[0], module.bias is not None, int(x.shape[-2]), int(x.shape[-1])))

    for m in names:
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        from torch.func import functional_call

        meta = {k: torch.empty_like(v, device="meta")
                for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}
                .items()}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            functional_call(model, meta, (torch.empty(1, *input_shape, device="meta"),))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return found


def _ratio_text(r: Fraction) -> float | str:
    return float(r) if Fraction(float(r)) == r else f"{r.numerator}/{r.denominator}"


def _aligned_split_ratios(channels: int, default: float, block: int) -> list:
    """Split ratios near 1/4, 1/2 and 3/4 whose split gives a multiple of ``block`` channels."""
    if channels < 2 * block:
        return []
    out = []
    for target in (0.25, 0.5, 0.75):
        m = round(target * channels / block)
        r = Fraction(m * block, channels)
        if 0 < r < 1 and r not in out and float(r) != default:
            out.append(r)
    return [_ratio_text(r) for r in out]


def candidates(shape: LayerShape, convs: Sequence[str] | None = None,
               block: int | None = None) -> list[tuple[str, dict]]:
    """``(conv, hparams)`` candidates for one layer: vanilla first, then each conv type of
    ``convs`` (default: every registered type) with its paper defaults, a few variants and
    width-aligned variants (inner widths a multiple of ``block``, default :func:`channel_block`).

    Only what builds at this shape and keeps the layer's width is returned; 1x1 layers get only
    the conv types whose paper replaces 1x1 convs (CompConv, Ghost).
    """
    block = block or channel_block()
    convs = list(convs) if convs is not None else available_convs()
    out: list[tuple[str, dict]] = [("vanilla", {})]
    c_in = shape.in_channels
    for conv in convs:
        if conv == "vanilla":
            continue
        if shape.kernel_size == 1 and not resolve_placement(conv, None).pointwise:
            continue
        variants: list[dict] = []
        if conv == "slimconv":
            variants = [{"compression_ratio": 1}]  # the only width-keeping SlimConv
        elif conv in ("spconv", "cru"):
            variants = [{}] + [{"split_ratio": r} for r in _aligned_split_ratios(c_in, 0.5, block)]
        elif conv == "compconv":
            variants = [{}, {"depth": 2}]
        elif conv == "ghost":
            variants = [{}, {"ratio": 4}]
        else:
            variants = [{}]
        for hp in variants:
            try:
                with torch.device("meta"):
                    m = _build_conv(shape, conv, hp)
            except (ValueError, TypeError):
                continue
            if getattr(m, "out_channels", shape.out_channels) == shape.out_channels \
                    and (conv, hp) not in out:
                out.append((conv, hp))
    return out


def _build_conv(shape: LayerShape, conv: str, hparams: dict) -> nn.Module:
    extra = {"dilation": shape.dilation} if shape.dilation != 1 else {}
    if shape.bias:
        extra["bias"] = True
    return create_conv(conv, shape.in_channels, shape.out_channels, shape.kernel_size,
                       shape.stride, **extra, **hparams)


def _conv_macs(shape: LayerShape, conv: str, hparams: dict) -> int:
    from .profile import profile

    module = _build_conv(shape, conv, hparams)
    return int(profile(module, (1, shape.in_channels, shape.height, shape.width)).macs)


# ----------------------------------------------------------------------------------------------
# The latency table
# ----------------------------------------------------------------------------------------------
def _entry_key(objective: str, path: str, shape: LayerShape, conv: str, hparams: dict) -> str:
    hp = json.dumps(hparams, sort_keys=True, default=str)
    return f"{objective}|{path}|{shape.tag()}|{conv}|{hp}"


def _network_key(objective: str, path: str, model: nn.Module, input_shape: Sequence[int]) -> str:
    # the module's printed structure identifies the network (two ResNets differ there)
    fingerprint = hashlib.sha1(repr(model).encode()).hexdigest()[:12]
    return f"{objective}|{path}|network|{type(model).__name__}-{fingerprint}|" + "x".join(
        map(str, input_shape))


class LatencyTable:
    """Measured seconds per candidate, cached as JSON under the machine's key.

    The file is ``<cache>/latency-<hash of key>.json`` and holds ``{"format", "key",
    "entries": {entry: {"median", "iqr", "n"}}}``; it is written atomically after each round of
    measurements, so an interrupted plan keeps what it measured.
    """

    def __init__(self, key: dict, cache_dir: str | os.PathLike | None = None) -> None:
        self.key = dict(key)
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.path = None if cache_dir is None else Path(cache_dir) / f"latency-{digest}.json"
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError:
                warnings.warn(f"latency table {self.path} is not valid JSON; measuring anew",
                              stacklevel=2)
                data = {}
            if data.get("format") == TABLE_FORMAT and data.get("key") == self.key:
                self.entries = dict(data.get("entries", {}))

    def __contains__(self, entry: str) -> bool:
        return entry in self.entries

    def __getitem__(self, entry: str) -> float:
        return self.entries[entry]["median"]

    def record(self, entry: str, times: Sequence[float]) -> None:
        from .bench import median_iqr

        median, iqr = median_iqr(times)
        self.entries[entry] = {"median": median, "iqr": iqr, "n": len(times)}

    def save(self) -> None:
        if self.path is None:
            return
        from .compare import _write_json

        _write_json(self.path, {"format": TABLE_FORMAT, "key": self.key,
                                "entries": self.entries})


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def _host(shape: LayerShape, conv: str, hparams: dict, device) -> nn.Module:
    """The candidate in its host context: conv, BatchNorm, ReLU (a ResNet's conv -> bn -> relu)."""
    return nn.Sequential(_build_conv(shape, conv, hparams),
                         nn.BatchNorm2d(shape.out_channels), nn.ReLU(inplace=True)).to(device)


class _Timed:
    """One thing to time repeatedly: ``run()`` once per call, set up lazily."""

    def __init__(self, setup: Callable[[], Callable[[], object]]) -> None:
        self.setup, self.fn, self.times = setup, None, []

    def measure(self, min_run_time: float, warmup: int, device) -> None:
        from .bench import _synchronize

        if self.fn is None:
            self.fn = self.setup()
            for _ in range(warmup):
                self.fn()
        _synchronize(device)
        start = time.perf_counter()
        n = 0
        while True:  # per-call times; at least 2 calls
            t0 = time.perf_counter()
            self.fn()
            _synchronize(device)
            self.times.append(time.perf_counter() - t0)
            n += 1
            if n >= 2 and time.perf_counter() - start >= min_run_time:
                break


def _inference_fn(module: nn.Module, x: torch.Tensor, path: str) -> Callable[[], object]:
    if path == "prepared":
        from .inference import prepare_for_inference

        module = prepare_for_inference(module)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        module = module.eval()

    def run():
        with torch.inference_mode():
            return module(x)

    return run


def _training_fn(module: nn.Module, x: torch.Tensor, path: str) -> Callable[[], object]:
    fmt = torch.channels_last if path == "channels_last" else torch.contiguous_format
    module = module.train().to(memory_format=fmt)
    x = x.detach().contiguous(memory_format=fmt).requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(module(x)).contiguous(memory_format=fmt)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)
        optimizer.step()

    return step


def _network_fn(build: Callable[[], nn.Module], input_shape, batch, num_classes, objective,
                path, device) -> Callable[[], Callable[[], object]]:
    def setup():
        torch.manual_seed(0)
        model = build().to(device)
        if objective == "inference":
            return _inference_fn(model, torch.randn(batch, *input_shape, device=device), path)
        from .bench import _MEMORY_FORMATS, _Trainer

        trainer = _Trainer(model, (batch, *input_shape), num_classes, torch.device(device),
                           memory_format=_MEMORY_FORMATS[path])
        return trainer.step

    return setup


def _measure(items: Mapping[str, _Timed], table: LatencyTable, rounds: int, min_run_time: float,
             warmup: int, threads: int, device, progress) -> None:
    """Time every item in ``rounds`` interleaved rounds; record each in ``table``."""
    from .bench import num_threads

    if not items:
        return
    total = rounds * len(items)
    done = 0
    with num_threads(threads):
        for _ in range(rounds):
            for name, item in items.items():
                item.measure(min_run_time, warmup, device)
                done += 1
                progress(done, total, name)
            for name, item in items.items():
                table.record(name, item.times)
            table.save()
    for item in items.values():
        item.fn = None  # free the models


# ----------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------
def solve(options: Sequence[Sequence[tuple[float, int]]], budget: float,
          resolution: int = 4000, floor: float = 0.0) -> list[int] | None:
    """Pick one option per layer minimising total cost under a budget on total weight.

    ``options[i]`` lists ``(cost, weight)`` pairs of layer ``i`` (here: time and MACs, or MACs
    and time). Returns the chosen option index per layer, or ``None`` when no choice has a
    total weight within ``[floor, budget]``. Weights are rounded *up* to
    ``budget / resolution`` units, so the result always meets the budget; it is exact when
    weights are multiples of that unit. A ``floor`` > 0 is met conservatively: the rounded
    total must exceed it by one unit per layer (the most the rounding can add), so a choice
    within that margin above the floor may be passed over.
    """
    if budget < 0 or floor > budget:
        return None
    unit = budget / resolution if budget > 0 else 1.0
    size = resolution + 1
    inf = float("inf")
    best = torch.full((size,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for layer in options:
        new = torch.full((size,), inf, dtype=torch.float64)
        arg = torch.full((size,), -1, dtype=torch.long)
        for j, (cost, weight) in enumerate(layer):
            w = math.ceil(weight / unit - 1e-9) if weight > 0 else 0
            if w >= size:
                continue
            shifted = torch.full((size,), inf, dtype=torch.float64)
            shifted[w:] = best[: size - w] + cost
            better = shifted < new
            new = torch.where(better, shifted, new)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        best = new
        choices.append(arg)
    if floor > 0:  # totals below the floor (with the rounding margin) are not allowed
        best[: min(size, math.ceil(floor / unit - 1e-9) + len(options))] = inf
    end = int(torch.argmin(best))
    if not math.isfinite(float(best[end])):
        return None
    picked = []
    for layer, arg in zip(reversed(options), reversed(choices), strict=True):
        j = int(arg[end])
        picked.append(j)
        weight = layer[j][1]
        end -= math.ceil(weight / unit - 1e-9) if weight > 0 else 0
    return picked[::-1]


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A per-layer choice of conv types for one model on one machine (JSON round trip)."""

    model: str
    input_shape: list
    batch: int
    objective: str
    budget: dict
    path: str
    machine: dict
    layers: list  # [{name, shape..., conv, hparams, time, vanilla_time, macs, vanilla_macs}]
    totals: dict
    model_kwargs: dict = field(default_factory=dict)
    check: dict | None = None
    format: str = PLAN_FORMAT

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "plan") -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source} is not a leanconv plan (expected format {PLAN_FORMAT!r})")
        try:
            plan = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
            required = ("name", "conv", "hparams", "in_channels", "out_channels",
                        "kernel_size", "stride")
            for layer in plan.layers:
                missing = [k for k in required if k not in layer]
                if missing:
                    raise KeyError(missing[0])
        except (TypeError, KeyError) as exc:
            raise PlanError(f"{source} is a corrupted leanconv plan: missing {exc}") from None
        return plan

    def save(self, path: str | os.PathLike) -> None:
        from .compare import _write_json

        _write_json(Path(path), self.to_dict())

    def convs(self) -> dict[str, int]:
        """How many layers got each conv type."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer["conv"]] = counts.get(layer["conv"], 0) + 1
        return counts


def load_plan(plan: Plan | Mapping | str | os.PathLike, *, warn_machine: bool = True) -> Plan:
    """A :class:`Plan` from a plan, its dict, or a JSON file; warns when it was made on another
    machine (naming the key that differs)."""
    if isinstance(plan, Plan):
        result = plan
    elif isinstance(plan, Mapping):
        result = Plan.from_dict(plan)
    else:
        path = Path(plan)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise PlanError(f"plan file {path} is not a leanconv plan: {exc}") from None
        result = Plan.from_dict(data, f"plan file {path}")
    if warn_machine:
        here = machine_key(result.machine.get("device", "cpu"), result.machine.get("threads"),
                           result.machine.get("batch", 1))
        differ = [k for k in ("cpu", "capability", "device", "torch")
                  if result.machine.get(k) != here.get(k)]
        if differ:
            warnings.warn(
                "plan made on another machine: " + "; ".join(
                    f"{k} {result.machine.get(k)!r} there, {here.get(k)!r} here" for k in differ)
                + " (its times may not hold here; run leanconv plan again)", stacklevel=2)
    return result


def apply_plan(model: nn.Module, plan: Plan | Mapping | str | os.PathLike,
               model_name: str | None = None) -> nn.Module:
    """Replace, in place, each planned layer of the vanilla ``model`` with its chosen conv.

    Every planned layer must exist in ``model`` as a plain conv of the planned shape; a plan for
    another model (``model_name`` differs, or a layer is missing or of another shape) is an
    error naming the first layer that does not fit. Returns ``model``.
    """
    plan = load_plan(plan)
    if model_name is not None and plan.model != model_name:
        raise PlanError(f"the plan was made for model {plan.model!r}, not {model_name!r}")
    modules = dict(model.named_modules())
    for layer in plan.layers:
        name = layer["name"]
        old = modules.get(name)
        if old is None or not _is_replaceable(old):
            raise PlanError(f"plan layer {name!r} is not a replaceable conv of this model "
                            f"(plan made for {plan.model!r})")
        got = (old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0])
        want = (layer["in_channels"], layer["out_channels"], layer["kernel_size"],
                layer["stride"])
        if got != want:
            raise PlanError(f"plan layer {name!r} is in/out/kernel/stride {want} in the plan, "
                            f"{got} in this model (plan made for {plan.model!r})")
    for layer in plan.layers:
        if layer["conv"] == "vanilla":
            continue
        old = modules[layer["name"]]
        shape = LayerShape(old.in_channels, old.out_channels, old.kernel_size[0],
                           old.stride[0], old.dilation[0], old.bias is not None, 0, 0)
        new = _build_conv(shape, layer["conv"], dict(layer["hparams"])).to(
            device=old.weight.device, dtype=old.weight.dtype)
        parent, _, child = layer["name"].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def make_plan(
    model: str | nn.Module,
    *,
    input_size: int = 32,
    batch: int = 128,
    num_classes: int = 10,
    in_channels: int = 3,
    objective: str = "inference",
    max_macs: float | None = None,
    max_time: float | None = None,
    min_macs: float | None = None,
    convs: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    threads: int | None = None,
    device: torch.device | str = "cpu",
    rounds: int = 3,
    min_run_time: float = 0.1,
    warmup: int = 2,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Measure (or read from the cache), choose and optionally check a plan for a model.

    ``model`` is a zoo name (built with ``create_model(model, conv="vanilla", num_classes=...,
    in_channels=...)``) or any vanilla ``nn.Module`` (e.g. a torchvision CNN; it is copied,
    never changed, and the plan applies to it with ``convert_convs(model, plan=...)``).

    ``max_macs`` is the MAC budget as a fraction of vanilla's (default 1.0: the fastest network
    that costs no more MACs than vanilla); ``max_time`` a time budget as a fraction of vanilla's
    predicted time (then MACs are minimised). ``min_macs`` (with the MAC budget only) is a
    floor, a fraction of vanilla's MACs the plan must keep: the time-optimal plan can remove far
    more than a network can lose without losing accuracy (0.30 of ResNet-50's MACs on an
    AVX-512 CPU). ``convs`` restricts the candidate conv types,
    ``paths`` the ways the network may run (inference: ``"eager"``, ``"prepared"``; training:
    ``"contiguous"``, ``"channels_last"``; default both, the faster is chosen).
    """
    from .models import available_models, create_model
    from .profile import profile

    custom = model if isinstance(model, nn.Module) else None
    if custom is None and model not in available_models():
        raise PlanError(f"unknown model {model!r}; available models: "
                        f"{', '.join(available_models())} (or pass an nn.Module)")
    if objective not in OBJECTIVES:
        raise PlanError(f"objective={objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if max_macs is not None and max_time is not None:
        raise PlanError("give one budget: --max-macs or --max-time, not both")
    for name, value in (("max_macs", max_macs), ("max_time", max_time)):
        if value is not None and not (value > 0):
            raise PlanError(f"{name}={value}; must be a positive fraction of vanilla's")
    if max_macs is None and max_time is None:
        max_macs = 1.0
    if min_macs is not None:
        if max_macs is None:
            raise PlanError("min_macs is a floor under the MAC budget: give it with --max-macs, "
                            "not --max-time")
        if not 0 <= min_macs < max_macs:
            raise PlanError(f"min_macs={min_macs}; must be >= 0 and below max_macs={max_macs}")
    for name, value in (("input_size", input_size), ("batch", batch), ("rounds", rounds)):
        if int(value) < 1:
            raise PlanError(f"{name}={value}; must be a positive integer")
    if convs is not None:
        unknown = [c for c in convs if c not in available_convs()]
        if unknown:
            raise PlanError(f"unknown conv {unknown[0]!r}; available convs: "
                            f"{', '.join(available_convs())}")
    allowed_paths = PATHS[objective]
    paths = tuple(paths) if paths is not None else allowed_paths
    bad = [p for p in paths if p not in allowed_paths]
    if bad or not paths:
        raise PlanError(f"paths={list(paths)}; allowed for {objective}: "
                        f"{', '.join(allowed_paths)}")
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    say = progress or (lambda msg: None)
    input_shape = (in_channels, input_size, input_size)
    model_kwargs = {"num_classes": num_classes, "in_channels": in_channels}

    if custom is not None:
        model, model_kwargs = type(custom).__name__, {}

    def build_vanilla():
        if custom is not None:
            return copy.deepcopy(custom)
        return create_model(model, conv="vanilla", **model_kwargs)

    vanilla = build_vanilla()
    layers = replaceable_layers(vanilla, input_shape)
    if not layers:
        raise PlanError(f"model {model!r} has no conv a plan can replace")
    vanilla_macs = int(profile(vanilla, (1, *input_shape)).macs)
    block = channel_block() if device.type == "cpu" else 8
    shapes = list(dict.fromkeys(layers.values()))
    cands = {s: candidates(s, convs, block) for s in shapes}
    macs = {(s, c, json.dumps(hp, sort_keys=True)): _conv_macs(s, c, hp)
            for s in shapes for c, hp in cands[s]}

    key = machine_key(device, threads, batch)
    table = LatencyTable(key, cache_dir)
    items: dict[str, _Timed] = {}
    inputs: dict[LayerShape, torch.Tensor] = {}
    for path in paths:
        nk = _network_key(objective, path, vanilla, input_shape)
        if nk not in table:
            items[nk] = _Timed(_network_fn(build_vanilla, input_shape, batch, num_classes,
                                           objective, path, device))
        for s in shapes:
            for conv, hp in cands[s]:
                ek = _entry_key(objective, path, s, conv, hp)
                if ek in table:
                    continue
                items[ek] = _Timed(_layer_setup(s, conv, hp, batch, objective, path, device,
                                                inputs))
    n_cached = sum(len(cands[s]) for s in shapes) * len(paths) + len(paths)
    say(f"plan {model} @{input_size} batch {batch}, {objective}: {len(layers)} replaceable "
        f"layers, {len(shapes)} shapes, {n_cached} table entries, {len(items)} to measure "
        f"({key['capability']}, {threads} thread(s); table {table.path})")
    if items:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds * len(items), desc="measuring", unit="run", leave=False,
                   disable=progress is None)

        def tick(done, total, name):
            bar.update(1)

        _measure(items, table, rounds, min_run_time, warmup, threads, device, tick)
        bar.close()

    # predicted time per path and the choice ---------------------------------------------------
    layer_names = list(layers)
    fixed_macs = vanilla_macs - sum(
        macs[(layers[n], "vanilla", "{}")] for n in layer_names)
    best = None
    for path in paths:
        net = table[_network_key(objective, path, vanilla, input_shape)]
        opts = []
        for n in layer_names:
            s = layers[n]
            opts.append([(table[_entry_key(objective, path, s, c, hp)],
                          macs[(s, c, json.dumps(hp, sort_keys=True))]) for c, hp in cands[s]])
        van_layers = sum(o[0][0] for o in opts)
        rest = net - van_layers
        if max_macs is not None:
            budget = max_macs * vanilla_macs - fixed_macs
            floor = (min_macs or 0.0) * vanilla_macs - fixed_macs
            picked = solve(opts, budget, floor=floor)
            if picked is None:
                smallest = fixed_macs + sum(min(w for _, w in o) for o in opts)
                if min_macs is not None and smallest <= max_macs * vanilla_macs:
                    raise PlanError(
                        f"min_macs={min_macs} and max_macs={max_macs} cannot both be met with "
                        "these candidates: no choice of convs lands between them; widen the "
                        "range")
                raise PlanError(
                    f"max_macs={max_macs} cannot be met with these candidates: the smallest "
                    f"achievable is {smallest / vanilla_macs:.3f} of vanilla's MACs")
        else:
            # least MACs under a time budget: the same knapsack with the roles swapped
            budget = max_time * net - rest
            picked = solve([[(w, t) for t, w in o] for o in opts], budget)
            if picked is None:
                fastest = rest + sum(min(t for t, _ in o) for o in opts)
                raise PlanError(
                    f"max_time={max_time} cannot be met with these candidates: the fastest "
                    f"predicted network takes {fastest / net:.3f} of vanilla's time")
        predicted = rest + sum(o[j][0] for o, j in zip(opts, picked, strict=True))
        total_macs = fixed_macs + sum(o[j][1] for o, j in zip(opts, picked, strict=True))
        if best is None or predicted < best[0]:
            best = (predicted, total_macs, path, picked, opts, net)
    predicted, total_macs, path, picked, opts, net = best

    rows = []
    for n, j, o in zip(layer_names, picked, opts, strict=True):
        s = layers[n]
        conv, hp = cands[s][j]
        rows.append({"name": n, **asdict(s), "conv": conv, "hparams": hp,
                     "time": o[j][0], "vanilla_time": o[0][0],
                     "macs": o[j][1], "vanilla_macs": o[0][1]})
    plan = Plan(
        model=model, input_shape=list(input_shape), batch=batch, objective=objective,
        budget=({"max_macs": max_macs} if max_macs is not None else {"max_time": max_time})
        | ({"min_macs": min_macs} if min_macs is not None else {}),
        path=path, machine=key, layers=rows, model_kwargs=model_kwargs,
        totals={"macs": total_macs, "vanilla_macs": vanilla_macs,
                "mac_fraction": total_macs / vanilla_macs, "predicted_time": predicted,
                "vanilla_time": net, "predicted_speedup": net / predicted,
                "unit": "seconds per batch" if objective == "inference" else
                "seconds per training step"})
    if check:
        say("checking: the planned network timed whole against vanilla")
        plan.check = check_plan(plan, rounds=rounds, min_run_time=max(0.5, min_run_time),
                                warmup=warmup, device=device, threads=threads, model=custom)
    return plan


def _layer_setup(shape: LayerShape, conv: str, hparams: dict, batch: int, objective: str,
                 path: str, device, inputs: dict) -> Callable[[], Callable[[], object]]:
    """``inputs`` holds one input per shape, shared by that shape's candidates (memory)."""

    def setup():
        torch.manual_seed(0)
        module = _host(shape, conv, hparams, device)
        x = inputs.get(shape)
        if x is None:
            x = inputs[shape] = torch.randn(batch, shape.in_channels, shape.height, shape.width,
                                            device=device)
        if objective == "inference":
            return _inference_fn(module, x, path)
        return _training_fn(module, x, path)

    return setup


def check_plan(plan: Plan, *, rounds: int = 3, min_run_time: float = 0.5, warmup: int = 2,
               device: torch.device | str = "cpu", threads: int | None = None,
               model: nn.Module | None = None) -> dict:
    """Time the planned network whole against vanilla, every path of the objective, in
    interleaved rounds; returns measured seconds per path, the best-vs-best speed-up and the
    error of the plan's prediction on its own path. ``model``: the vanilla module a plan for a
    non-zoo model was made from."""
    from .models import create_model

    plan = load_plan(plan, warn_machine=False)
    device = torch.device(device)
    threads = threads or plan.machine.get("threads") or torch.get_num_threads()
    kwargs = dict(plan.model_kwargs)
    num_classes = kwargs.get("num_classes", 10)
    table = LatencyTable(plan.machine, None)
    if model is not None:
        builds = {"vanilla": lambda: copy.deepcopy(model),
                  "planned": lambda: apply_plan(copy.deepcopy(model), plan)}
    else:
        builds = {"vanilla": lambda: create_model(plan.model, conv="vanilla", **kwargs),
                  "planned": lambda: create_model(plan.model, plan=plan, **kwargs)}
    items = {}
    for which, build in builds.items():
        for path in PATHS[plan.objective]:
            items[f"{which}|{path}"] = _Timed(_network_fn(
                build, plan.input_shape, plan.batch, num_classes, plan.objective, path, device))
    _measure(items, table, rounds, min_run_time, warmup, threads, device,
             lambda *a: None)
    measured = {k: table[k] for k in items}
    van = min(measured[f"vanilla|{p}"] for p in PATHS[plan.objective])
    planned = min(measured[f"planned|{p}"] for p in PATHS[plan.objective])
    own = measured[f"planned|{plan.path}"]
    return {
        "measured": measured,
        "vanilla_best": van,
        "planned_best": planned,
        "speedup": van / planned,
        "planned_on_path": own,
        "vanilla_on_path": measured[f"vanilla|{plan.path}"],
        # predicted / measured time of the planned network on the plan's path
        "prediction_error": plan.totals["predicted_time"] / own - 1.0,
        # the same with both times taken relative to vanilla's (the plan's measurement of
        # vanilla, and this run's): machine drift between planning and checking cancels
        "relative_prediction_error": (plan.totals["predicted_time"] / plan.totals["vanilla_time"])
        / (own / measured[f"vanilla|{plan.path}"]) - 1.0,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "rounds": rounds,
    }


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------
def _hp_text(hp: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in hp.items())


def format_plan(plan: Plan) -> str:
    """The per-layer table (layer, shape, chosen conv, time and MACs vs vanilla) and totals."""
    unit, m = 1e3, plan.machine
    lines = [
        f"## plan: {plan.model} @{plan.input_shape[-1]}, batch {plan.batch}, {plan.objective}, "
        + ", ".join(f"{k} {v}" for k, v in plan.budget.items()),
        "",
        f"{m.get('cpu')} ({m.get('capability')}), {m.get('device')}, torch {m.get('torch')}, "
        f"{m.get('threads')} threads; path {plan.path}; times are medians of each layer "
        "(conv + BN + ReLU) measured alone",
        "",
        "| layer | shape | conv | time ms | vs vanilla | MACs | vs vanilla |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in plan.layers:
        shape = LayerShape(*(layer[k] for k in LayerShape.__dataclass_fields__)).tag()
        conv = layer["conv"] + (f" ({_hp_text(layer['hparams'])})" if layer["hparams"] else "")
        lines.append(
            f"| {layer['name']} | {shape} | {conv} | {layer['time'] * unit:.3f} | "
            f"{layer['time'] / layer['vanilla_time']:.2f}x | {layer['macs'] / 1e6:.2f}M | "
            f"{layer['macs'] / layer['vanilla_macs']:.2f}x |")
    t = plan.totals
    lines += [
        "",
        f"convs: {', '.join(f'{c} x{n}' for c, n in plan.convs().items())}",
        f"MACs: {t['macs'] / 1e6:.1f}M = {t['mac_fraction']:.3f} of vanilla's "
        f"{t['vanilla_macs'] / 1e6:.1f}M (per image)",
        f"predicted: {t['predicted_time'] * unit:.2f} ms vs vanilla {t['vanilla_time'] * unit:.2f} "
        f"ms per {'batch' if plan.objective == 'inference' else 'step'} "
        f"= {t['predicted_speedup']:.2f}x vanilla's speed",
    ]
    if plan.check:
        c = plan.check
        meas = ", ".join(f"{k} {v * unit:.2f} ms" for k, v in c["measured"].items())
        lines += [
            f"measured whole ({c['capability']}, {c['threads']} threads): {meas}",
            f"best planned vs best vanilla: {c['speedup']:.2f}x vanilla's speed; prediction "
            f"error on path {plan.path}: {c['prediction_error']:+.1%} in time, "
            f"{c.get('relative_prediction_error', float('nan')):+.1%} relative to vanilla "
            f"(vanilla measured {c.get('vanilla_on_path', float('nan')) * unit:.2f} ms here, "
            f"{t['vanilla_time'] * unit:.2f} ms when planning)",
        ]
    return "\n".join(lines)
