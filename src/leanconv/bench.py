"""Timing and memory, measured side by side: latency, training throughput, memory held for backward.

Everything here compares conv types *within one run*: a table of absolute milliseconds from a
shared machine means little, a ratio to vanilla measured seconds earlier under the same load
means much more. The building blocks are usable alone:

- :func:`measure_latency` -- inference latency with ``torch.utils.benchmark.Timer`` (explicit
  thread count, warm-up, median and interquartile range).
- :func:`measure_training` -- images/s of forward + backward + SGD step (median of timed steps).
- :func:`saved_tensor_bytes` -- bytes of the tensors autograd keeps for backward during one
  forward, counted with ``torch.autograd.graph.saved_tensors_hooks`` over unique storages:
  deterministic and independent of the allocator.
- :func:`bench_convs` -- all of the above for a list of conv types on one architecture, with
  rounds interleaved across conv types so that drift in machine load hits every type alike.
- :func:`with_ratios` / :func:`realised_speedup` -- ratios to the baseline (vanilla) row.
- :func:`format_table` -- the markdown table printed by ``leanconv bench``.

Ratios follow one convention everywhere: ``latency_ratio = t_module / t_vanilla`` (<= 1 is
faster), ``speedup = t_vanilla / t_module``, ``mac_reduction = MACs_vanilla / MACs_module``,
``realised = speedup / mac_reduction`` (1.0 = time falls exactly as MACs do),
``train_ratio = ips_module / ips_vanilla`` and ``memory_ratio = bytes_module / bytes_vanilla``.

The numbers only mean something when nothing else runs on the measured cores (see
docs/performance.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .runtime import allocator_setup

# torch.utils.benchmark imports cpp_extension, which logs "No CUDA runtime is found" on a machine
# with a CUDA build of torch and no GPU; irrelevant to timing, so it is silenced for the import.
_cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_extension_log.level
_cpp_extension_log.setLevel(logging.ERROR)
try:
    from torch.utils import benchmark
finally:
    _cpp_extension_log.setLevel(_level)

__all__ = [
    "BenchReport",
    "ConvResult",
    "LatencyResult",
    "SavedTensors",
    "TrainResult",
    "bench_convs",
    "bench_model",
    "complexity",
    "environment",
    "format_table",
    "measure_latency",
    "measure_training",
    "median_iqr",
    "num_threads",
    "realised_speedup",
    "report_json",
    "saved_tensor_bytes",
    "with_ratios",
]

_logger = logging.getLogger(__name__)

INFERENCE_PATHS = ("eager", "prepared", "compiled")
# Layouts for the training measurement (the prepared/compiled inference paths choose their own).
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
def median_iqr(times: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (p75 - p25, linear interpolation) of ``times``."""
    if not times:
        raise ValueError("median_iqr needs at least one value")
    t = torch.tensor(list(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[1]), float(q[2] - q[0])


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous value."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize()


def complexity(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """``(params, MACs)`` of ``model`` for one input of ``input_size`` (batch included).

    Goes through the project's one profiler, :func:`leanconv.profile` (MACs = FLOPs // 2).
    """
    from .profile import profile

    report = profile(model, tuple(input_size))
    return int(report.params), int(report.macs)


# ----------------------------------------------------------------------------------------------
# Inference latency
# ----------------------------------------------------------------------------------------------
@dataclass
class LatencyResult:
    """Seconds per forward call; ``times`` are the per-call times of every measured block."""

    median: float
    iqr: float
    threads: int
    times: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_times(cls, times: Sequence[float], threads: int) -> LatencyResult:
        median, iqr = median_iqr(times)
        return cls(median, iqr, threads, list(times))


def _forward_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def measure_latency(
    model: nn.Module,
    x: torch.Tensor,
    *,
    threads: int = 1,
    min_run_time: float = 1.0,
    method: str = "blocked",
    max_run_time: float = 10.0,
    warmup: int = 2,
    label: str = "latency",
    sub_label: str = "",
    description: str | None = None,
) -> LatencyResult:
    """Inference latency of ``model(x)`` under ``torch.inference_mode`` with ``threads`` threads.

    ``method="blocked"`` uses ``Timer.blocked_autorange(min_run_time)``; ``"adaptive"`` uses
    ``Timer.adaptive_autorange(min_run_time=..., max_run_time=...)`` (runs until IQR/median <
    10 %). ``warmup`` untimed calls come first (a compiled model compiles there). The model is
    used as given: call ``model.eval()`` or :func:`leanconv.prepare_for_inference` before.
    """
    fn = _forward_fn(model, x)
    with num_threads(threads):
        for _ in range(warmup):
            fn()
    timer = benchmark.Timer(
        stmt="fn()",
        globals={"fn": fn},
        num_threads=threads,
        label=label,
        sub_label=sub_label,
        # Compare() raises on a None description (torch 2.14.1), so always set one.
        description=description or f"{threads} thread{'s' if threads != 1 else ''}",
    )
    if method == "blocked":
        m = timer.blocked_autorange(min_run_time=min_run_time)
    elif method == "adaptive":
        m = timer.adaptive_autorange(min_run_time=min_run_time, max_run_time=max_run_time)
    else:
        raise ValueError(f"method must be 'blocked' or 'adaptive', got {method!r}")
    return LatencyResult.from_times(m.times, threads)


# ----------------------------------------------------------------------------------------------
# Training throughput
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Throughput of full training steps (forward, cross-entropy, backward, SGD step)."""

    images_per_s: float
    step_median: float
    step_iqr: float
    batch: int
    threads: int
    times: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_times(cls, times: Sequence[float], batch: int, threads: int) -> TrainResult:
        median, iqr = median_iqr(times)
        return cls(batch / median, median, iqr, batch, threads, list(times))


class _Trainer:
    """One model + optimizer + fixed batch, so that steps can be timed in interleaved rounds."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], num_classes: int,
                 device: torch.device, lr: float = 0.01,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.model = model.train().to(memory_format=memory_format)
        self.device = device
        self.x = torch.randn(*input_shape, device=device).contiguous(memory_format=memory_format)
        self.y = torch.randint(0, num_classes, (input_shape[0],), device=device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def timed_steps(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            _synchronize(self.device)
            start = time.perf_counter()
            self.step()
            _synchronize(self.device)
            times.append(time.perf_counter() - start)
        return times


def measure_training(
    model: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    threads: int = 1,
    steps: int = 10,
    warmup: int = 3,
) -> TrainResult:
    """Images/s of ``model`` trained on a fixed random batch of ``input_shape`` (median step).

    The model is updated in place (use a copy if its weights matter).
    """
    device = next(model.parameters()).device
    trainer = _Trainer(model, input_shape, num_classes, device)
    with num_threads(threads):
        for _ in range(warmup):
            trainer.step()
        times = trainer.timed_steps(steps)
    return TrainResult.from_times(times, int(input_shape[0]), threads)


# ----------------------------------------------------------------------------------------------
# Memory held for backward
# ----------------------------------------------------------------------------------------------
@dataclass
class SavedTensors:
    """What autograd keeps between one training forward and its backward."""

    bytes: int  # unique storages, parameters and buffers excluded
    storages: int  # number of unique storages counted
    saved: int  # number of saved-tensor slots (a storage saved twice counts twice here)
    peak_bytes: int | None = None  # accelerator peak allocation during forward+backward


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()


def saved_tensor_bytes(
    model: nn.Module,
    x: torch.Tensor,
    *,
    include_parameters: bool = False,
    backward: bool = True,
) -> SavedTensors:
    """Bytes of tensors saved for backward during one train-mode forward of ``model(x)``.

    Every tensor autograd packs (``saved_tensors_hooks``) is attributed to its storage; each
    storage counts once with its full size (a saved view keeps its whole base alive). Storages of
    parameters and buffers are left out by default: they exist whether or not one trains, so the
    count is the activation memory that training adds. Tensors a custom ``autograd.Function``
    stores as plain ``ctx`` attributes bypass the hooks and are not seen.

    On an accelerator ``peak_bytes`` is also filled: peak allocated memory over forward+backward
    minus the memory allocated before (allocator dependent, unlike ``bytes``).
    """
    excluded = set()
    if not include_parameters:
        for t in list(model.parameters()) + list(model.buffers()):
            excluded.add(_storage_key(t)[0])
    seen: dict[tuple, int] = {}
    slots = 0

    def pack(t: torch.Tensor):
        nonlocal slots
        slots += 1
        try:
            key, nbytes = _storage_key(t)
        except (RuntimeError, NotImplementedError):  # tensor without a storage (e.g. subclass)
            return t
        if key not in excluded:
            seen[key] = nbytes
        return t

    device = x.device
    on_accel = device.type == "cuda"
    if on_accel:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        if backward:
            loss = sum(o.float().sum() for o in _tensor_leaves(out) if o.requires_grad)
            if isinstance(loss, torch.Tensor):
                loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    peak = None
    if on_accel:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return SavedTensors(sum(seen.values()), len(seen), slots, peak)


def _tensor_leaves(out) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------------------------
# Side by side
# ----------------------------------------------------------------------------------------------
@dataclass
class ConvResult:
    """All measurements of one conv type on one architecture (``None`` = not measured)."""

    conv: str
    params: int | None = None
    macs: int | None = None
    latency: dict[int, LatencyResult] = field(default_factory=dict)  # batch -> latency
    train: TrainResult | None = None
    backward: SavedTensors | None = None
    max_abs_diff: float | None = None  # prepared/compiled model vs training form
    max_rel_diff: float | None = None  # the same / largest |output| of the training form
    error: str | None = None  # why this conv could not be measured


@dataclass
class BenchReport:
    title: str
    env: dict
    settings: dict
    results: list[ConvResult]
    baseline: str = "vanilla"

    def rows(self) -> list[dict]:
        return with_ratios(self.results, self.baseline)

    def to_dict(self) -> dict:
        return {"title": self.title, "env": self.env, "settings": self.settings,
                "baseline": self.baseline, "rows": self.rows()}


def realised_speedup(t_base: float, t_module: float, macs_base: int, macs_module: int) -> float:
    """Share of the MAC reduction that shows up as speed.

    ``(t_base / t_module) / (MACs_base / MACs_module)``: 1.0 when time falls exactly as MACs do.
    """
    return (t_base / t_module) / (macs_base / macs_module)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def with_ratios(results: Sequence[ConvResult], baseline: str = "vanilla") -> list[dict]:
    """One plain dict per conv with its raw numbers and every ratio to the ``baseline`` row.

    Keys: conv, params, macs, params_ratio, mac_reduction, latency {batch: {median, iqr,
    ratio, speedup, realised}}, train_images_per_s, train_ratio, backward_bytes, memory_ratio,
    peak_bytes, max_abs_diff, error. Ratios are ``None`` when the baseline is missing or failed.
    """
    base = next((r for r in results if r.conv == baseline and r.error is None), None)
    rows = []
    for r in results:
        row = {
            "conv": r.conv,
            "params": r.params,
            "macs": r.macs,
            "params_ratio": _ratio(r.params, base.params) if base else None,
            "mac_reduction": _ratio(base.macs, r.macs) if base else None,
            "latency": {},
            "train_images_per_s": r.train.images_per_s if r.train else None,
            "train_step_iqr": r.train.step_iqr if r.train else None,
            "train_ratio": None,
            "backward_bytes": r.backward.bytes if r.backward else None,
            "memory_ratio": None,
            "peak_bytes": r.backward.peak_bytes if r.backward else None,
            "max_abs_diff": r.max_abs_diff,
            "max_rel_diff": r.max_rel_diff,
            "error": r.error,
        }
        for batch, lat in r.latency.items():
            entry = {"median": lat.median, "iqr": lat.iqr, "threads": lat.threads,
                     "ratio": None, "speedup": None, "realised": None}
            blat = base.latency.get(batch) if base else None
            if blat is not None:
                entry["ratio"] = lat.median / blat.median
                entry["speedup"] = blat.median / lat.median
                if base.macs and r.macs:
                    entry["realised"] = realised_speedup(blat.median, lat.median, base.macs, r.macs)
            row["latency"][batch] = entry
        if base and r.train and base.train:
            row["train_ratio"] = r.train.images_per_s / base.train.images_per_s
        if base and r.backward and base.backward:
            row["memory_ratio"] = _ratio(r.backward.bytes, base.backward.bytes)
        rows.append(row)
    return rows


def environment(threads: int, device: torch.device | str = "cpu") -> dict:
    """What a reader needs to judge the numbers: versions, threads, allocator, load."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "allocator": allocator_setup(),
    }


def _prepare(model: nn.Module, path: str, sample: torch.Tensor):
    """(inference model, max abs diff, max relative diff) for the chosen inference path."""
    if path == "eager":
        return model.eval(), None, None
    from .inference import max_abs_diff, prepare_for_inference

    # compile=True: static shapes (a dynamic-shape graph, what torch.compile switches to when it
    # sees a second batch size, would be timed instead of the specialised one) and freezing.
    prepared = prepare_for_inference(model, compile=path == "compiled")
    return (prepared, max_abs_diff(model, prepared, sample),
            max_abs_diff(model, prepared, sample, relative=True))


def bench_convs(
    build: Callable[[str], nn.Module],
    convs: Sequence[str],
    input_shape: Sequence[int],
    *,
    batches: Sequence[int] = (1,),
    threads: int = 1,
    inference_path: str = "eager",
    train: bool = False,
    train_batch: int | None = None,
    num_classes: int | None = None,
    rounds: int = 3,
    min_run_time: float = 0.5,
    method: str = "blocked",
    train_steps: int = 5,
    train_warmup: int = 3,
    train_memory_format: str = "contiguous",
    device: torch.device | str = "cpu",
    baseline: str = "vanilla",
    title: str = "",
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every conv type in ``convs`` on the model ``build(conv)`` side by side.

    ``input_shape`` is one sample without batch (``(3, 32, 32)``). Latency at each batch size in
    ``batches``; with ``train``, training images/s (and memory held for backward) at
    ``train_batch`` (default: the largest batch) with ``num_classes`` random labels (default: the
    model output width). Each measurement is repeated ``rounds`` times, cycling through the conv
    types, and the per-call times of all rounds are pooled before taking median and IQR. A conv
    whose model cannot be built or run gets ``error`` set instead of numbers. Training runs in
    ``train_memory_format`` ("contiguous" or "channels_last": model and batch converted).
    """
    if inference_path not in INFERENCE_PATHS:
        raise ValueError(f"inference_path must be one of {INFERENCE_PATHS}, got {inference_path!r}")
    if train_memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"train_memory_format must be one of {tuple(_MEMORY_FORMATS)}, got "
                         f"{train_memory_format!r}")
    if train and not (train_batch or batches):
        raise ValueError("training needs train_batch when no latency batches are given")
    device = torch.device(device)
    env = environment(threads, device)  # load average before the run starts
    say = progress or (lambda msg: _logger.info(msg))
    convs = list(convs)
    if baseline not in convs:
        convs.insert(0, baseline)
    results = {c: ConvResult(c) for c in convs}
    models: dict[str, nn.Module] = {}
    infer: dict[str, nn.Module] = {}
    sample = torch.randn(1, *input_shape, device=device)
    for c in convs:
        try:
            torch.manual_seed(0)
            model = build(c).to(device)
            results[c].params, results[c].macs = complexity(model, (1, *input_shape))
            infer[c], results[c].max_abs_diff, results[c].max_rel_diff = _prepare(
                model, inference_path, sample)
            if train:  # the training-form model is only kept when it will be trained
                models[c] = model
        except Exception as exc:  # a module still being written must not sink the whole table
            results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            say(f"{c}: skipped ({results[c].error})")
    alive = [c for c in convs if results[c].error is None]

    for batch in batches:
        x = torch.randn(batch, *input_shape, device=device)
        times: dict[str, list[float]] = {c: [] for c in alive}
        for r in range(rounds):
            for c in alive:
                say(f"latency {c} batch {batch} round {r + 1}/{rounds}")
                try:
                    lat = measure_latency(infer[c], x, threads=threads, min_run_time=min_run_time,
                                          method=method, label=title, sub_label=c,
                                          description=f"batch {batch}, {threads} threads")
                    times[c].extend(lat.times)
                except Exception as exc:
                    results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        for c in alive:
            if times[c] and results[c].error is None:
                results[c].latency[batch] = LatencyResult.from_times(times[c], threads)
        alive = [c for c in alive if results[c].error is None]

    if train:
        tb = train_batch or max(batches)
        say(f"training at batch {tb}")
        trainers: dict[str, _Trainer] = {}
        step_times: dict[str, list[float]] = {c: [] for c in alive}
        for c in alive:
            model = models[c]
            try:
                classes = num_classes
                if classes is None:
                    with torch.no_grad():
                        classes = model.eval()(sample).shape[1]
                fmt = _MEMORY_FORMATS[train_memory_format]
                model.to(memory_format=fmt)
                results[c].backward = saved_tensor_bytes(
                    model, torch.randn(tb, *input_shape, device=device).contiguous(
                        memory_format=fmt))
                trainers[c] = _Trainer(model, (tb, *input_shape), classes, device,
                                       memory_format=fmt)
                with num_threads(threads):
                    for _ in range(train_warmup):
                        trainers[c].step()
            except Exception as exc:
                results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        for r in range(rounds):
            for c in trainers:
                say(f"training {c} batch {tb} round {r + 1}/{rounds}")
                with num_threads(threads):
                    step_times[c].extend(trainers[c].timed_steps(train_steps))
        for c in trainers:
            results[c].train = TrainResult.from_times(step_times[c], tb, threads)

    settings = {
        "input_shape": list(input_shape), "batches": list(batches), "threads": threads,
        "inference_path": inference_path, "train": train,
        "train_batch": (train_batch or max(batches)) if train else None,
        "rounds": rounds, "min_run_time": min_run_time, "method": method,
        "train_steps": train_steps, "train_warmup": train_warmup,
        "memory_format": train_memory_format if train else None,
    }
    return BenchReport(title, env, settings,
                       [results[c] for c in convs], baseline)


def bench_model(
    model_name: str,
    convs: Sequence[str],
    *,
    input_size: int = 32,
    num_classes: int = 10,
    hparams: dict[str, dict] | None = None,
    plan=None,
    **kwargs,
) -> BenchReport:
    """:func:`bench_convs` on a model of the zoo: ``create_model(model_name, conv=c, ...)``.

    ``hparams`` maps a conv name to its constructor hyperparameters. ``plan`` (from
    :func:`leanconv.plan.make_plan`, a dict or a file) adds a row ``"planned"``: the vanilla
    network with each planned layer replaced.
    """
    from .models import available_models, create_model

    if model_name not in available_models():
        raise ValueError(f"unknown model {model_name!r}; available models: "
                         f"{', '.join(available_models())}")
    hparams = hparams or {}

    convs = list(convs)
    if plan is not None:
        convs.append("planned")

    def build(conv: str) -> nn.Module:
        if conv == "planned":
            return create_model(model_name, num_classes=num_classes, plan=plan)
        return create_model(model_name, conv=conv, num_classes=num_classes,
                            **hparams.get(conv, {}))

    kwargs.setdefault("num_classes", num_classes)
    title = kwargs.pop("title", None) or (
        f"{model_name} @{input_size}, {kwargs.get('inference_path', 'eager')}")
    return bench_convs(build, convs, (3, input_size, input_size), title=title, **kwargs)


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------
def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ms(lat: dict) -> str:
    return f"{lat['median'] * 1e3:.4g} ms (IQR {lat['iqr'] * 1e3:.2g})"


def header_lines(report: BenchReport) -> list[str]:
    env, s = report.env, report.settings
    load = env.get("load_average")
    load_txt = "n/a" if load is None else ", ".join(f"{v:.2f}" for v in load)
    return [
        f"## {report.title}" if report.title else "## benchmark",
        "",
        f"torch {env['torch']}, device {env['device']}, threads {env['threads']} "
        f"(of {env['cpu_count']} CPUs), allocator: {env.get('allocator', 'n/a')}"
        + (f", memory format: {s['memory_format']}" if s.get("memory_format") else ""),
        f"load average at start: {load_txt}; inference path: {s['inference_path']}; "
        f"rounds {s['rounds']}; latency = median (IQR) per forward call",
        "Numbers are only meaningful when nothing else runs on these cores.",
        "",
    ]


def format_table(report: BenchReport) -> str:
    """Markdown table: params, MACs, latency per batch with ratio and realised speed-up,
    training images/s and backward memory with their ratios (when measured)."""
    rows = report.rows()
    batches = report.settings["batches"]
    train = report.settings["train"]
    cols = ["conv", "params", "MACs", "MAC red."]
    for b in batches:
        cols += [f"latency b{b}", f"ratio b{b}", f"realised b{b}"]
    if train:
        cols += [f"train img/s b{report.settings['train_batch']}", "train ratio",
                 "bwd memory", "memory ratio"]
    if report.settings["inference_path"] != "eager":
        cols.append("max abs diff (rel.)")
    lines = header_lines(report)
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        if row["error"] and not row["latency"]:
            lines.append(f"| {row['conv']} | skipped: {row['error']} |")
            continue
        cells = [row["conv"], _si(row["params"]), _si(row["macs"]), _x(row["mac_reduction"])]
        for b in batches:
            lat = row["latency"].get(b)
            cells += ([_ms(lat), _x(lat["ratio"]), "-" if lat["realised"] is None
                       else f"{lat['realised']:.0%}"] if lat else ["-", "-", "-"])
        if train:
            ips = row["train_images_per_s"]
            cells += ["-" if ips is None else f"{ips:.1f}", _x(row["train_ratio"]),
                      _si(row["backward_bytes"], "B"), _x(row["memory_ratio"])]
        if report.settings["inference_path"] != "eager":
            d, rel = row["max_abs_diff"], row["max_rel_diff"]
            cells.append("-" if d is None else f"{d:.1e} ({rel:.0e})")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if r["error"] and r["latency"]]
    for row in errors:
        lines.append(f"\n{row['conv']}: {row['error']}")
    lines.append("")
    lines.append("ratio = module time / vanilla time (<= 1 is faster); MAC red. = vanilla MACs / "
                 "module MACs; realised = (vanilla time / module time) / MAC red.; bwd memory = "
                 "bytes of activations saved for backward (parameters excluded).")
    return "\n".join(lines)


def report_json(report: BenchReport) -> dict:
    """JSON-serialisable form of ``report`` (raw per-call times included)."""
    out = report.to_dict()
    out["raw"] = [asdict(r) for r in report.results]
    return out
