"""Export a network for deployment (ONNX or a ``torch.export`` ExportedProgram) and check it.

:func:`export_model` takes a model in its training form, applies
:func:`leanconv.prepare_for_inference` (BN folded, modules' own ``fuse_for_inference``; the
memory format is left as it is, which exports cleanly), exports it with a dynamic batch
dimension and then checks it against PyTorch:

* ``format="onnx"``: ``torch.export.export`` followed by ``torch.onnx.export(dynamo=True)``
  (a single file, ``external_data=False``); checked with ONNX Runtime's CPU provider;
* ``format="exported-program"``: ``torch.export.export`` saved with ``torch.export.save``
  (a ``.pt2`` file); checked by loading the file back and running ``ExportedProgram.module()``.

The reference is the model as given, in eval mode (so the figures cover BN folding and export
together). The parity check runs random inputs at two batch sizes (1 and 3, neither the traced
batch of 2, so the dynamic batch dimension is exercised) and, when given, real inputs; for each
it reports the largest absolute difference and that difference relative to the largest
``|output|`` (the convention of :func:`leanconv.inference.max_abs_diff`). The dynamo ONNX
exporter has shipped numerical bugs before (pytorch/pytorch#169178), hence a check on every export
(/work/shared/notes/ecosystem.md §5).

A model that cannot be exported raises :class:`ExportError` naming the innermost module whose
forward fails and the operation (an ATen op without an ONNX translation, or the line with the
data-dependent control flow ``torch.export`` cannot trace).

>>> report = export_model(model, torch.randn(1, 3, 32, 32), format="onnx", out="r20.onnx")
>>> print(report.summary())
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .inference import prepare_for_inference

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportReport",
    "ParityResult",
    "Source",
    "check_parity",
    "export_model",
    "load_runtime",
    "load_source",
    "rounding_floor",
]

FORMATS = ("onnx", "exported-program")
_MAX_BATCH = 4096


class ExportError(RuntimeError):
    """A model cannot be exported; ``module`` and ``op`` say which part and which operation."""

    def __init__(self, message: str, module: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.module, self.op = module, op


@dataclass
class ParityResult:
    """Exported runtime vs PyTorch on one input batch."""

    name: str  # "random b1", "fashion-mnist test b64", ...
    batch: int
    max_abs: float
    max_rel: float  # max_abs / max |PyTorch output|


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and measured (latencies in seconds, median)."""

    format: str
    out: Path
    size_bytes: int
    input_shape: tuple[int, ...]  # one sample, batch excluded
    runtime: str  # "ONNX Runtime" | "ExportedProgram"
    parity: list[ParityResult] = field(default_factory=list)
    latency: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch: (torch, rt)
    threads: int = 1

    @property
    def max_abs(self) -> float:
        return max((p.max_abs for p in self.parity), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((p.max_rel for p in self.parity), default=0.0)

    def summary(self) -> str:
        lines = [f"wrote {self.out} ({self.format}, {self.size_bytes / 1e6:.2f} MB), input "
                 f"(N, {', '.join(map(str, self.input_shape))}) with dynamic batch N"]
        for p in self.parity:
            lines.append(f"  parity {self.runtime} vs PyTorch, {p.name:<22s} max abs "
                         f"{p.max_abs:.3g}  max rel {p.max_rel:.3g}")
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        for batch, (t_torch, t_rt) in self.latency.items():
            lines.append(f"  latency b{batch} ({threads}): PyTorch prepared "
                         f"{1e3 * t_torch:.2f} ms, {self.runtime} {1e3 * t_rt:.2f} ms "
                         f"({t_rt / t_torch:.2f}x)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """The exporters print progress to stdout and warn freely; keep the user's output clean."""
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO())):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _trace_input(example_input: torch.Tensor) -> torch.Tensor:
    # torch.export specialises a dimension whose example size is 1, so trace with batch 2.
    if example_input.dim() < 1:
        raise ValueError("example_input must have a batch dimension")
    return example_input[:1].expand(2, *example_input.shape[1:]).clone()


def _export_program(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    with _quiet():
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))


def _to_onnx(ep: torch.export.ExportedProgram, x: torch.Tensor, out: Path | None, opset,
             optimize: bool = True):
    kwargs = {} if opset is None else {"opset_version": opset}
    with _quiet():
        return torch.onnx.export(ep, (x,), None if out is None else str(out), dynamo=True,
                                 external_data=False, optimize=optimize, **kwargs)


def export_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    format: str = "onnx",
    out: str | Path,
    prepare: bool = True,
    opset: int | None = None,
    optimize: bool = True,
    check: bool = True,
    batches: Sequence[int] = (1, 3),
    real_inputs: dict[str, torch.Tensor] | None = None,
    latency_batches: Sequence[int] = (),
    threads: int = 1,
    min_run_time: float = 0.5,
) -> ExportReport:
    """Export ``model`` (prepared for inference) to ``out`` and check it against PyTorch.

    Args:
        model: the network, in training or eval form; it is not modified.
        example_input: one input batch (its shape past the batch dimension is fixed in the
            export; the batch dimension is dynamic, 1 to 4096).
        format: ``"onnx"`` or ``"exported-program"``.
        out: file to write (``.onnx`` / ``.pt2`` by convention); its folder is created.
        prepare: apply :func:`leanconv.prepare_for_inference` (``memory_format=None``) first.
        opset: ONNX opset (default: the exporter's).
        optimize: run the ONNX exporter's graph optimiser (constant folding, redundant op
            removal); ``False`` exports about 2x faster (ONNX Runtime optimises at load anyway).
        check: run the parity check on random batches of sizes ``batches`` and ``real_inputs``
            (a dict name -> batch).
        latency_batches: batch sizes at which to time PyTorch (eager,
            ``prepare_for_inference(model)`` with its default channels_last) and the exported
            runtime, both with ``threads`` intra-op threads (median per call).

    Raises:
        ValueError: a bad argument (the message names it and its allowed values).
        ExportError: the model cannot be exported; names the module and the operation.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")
    for name, values in (("batches", batches), ("latency_batches", latency_batches)):
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
            raise ValueError(f"{name} must be positive integers, got {list(values)!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = model
    was_training = model.training
    model.eval()
    try:
        deployed = (prepare_for_inference(model, memory_format=None) if prepare
                    else model)
        x = _trace_input(example_input)
        try:
            ep = _export_program(deployed, x)
        except Exception as exc:
            raise _diagnose_export(deployed, x, exc) from None
        if format == "onnx":
            try:
                _to_onnx(ep, x, out, opset, optimize)
            except Exception as exc:
                raise _diagnose_onnx(ep, deployed, x, exc, opset) from None
        else:
            with _quiet():
                torch.export.save(ep, str(out))
        report = ExportReport(format, out, out.stat().st_size, tuple(x.shape[1:]),
                              "ONNX Runtime" if format == "onnx" else "ExportedProgram",
                              threads=threads)
        if check or latency_batches:
            runtime = load_runtime(out, format, threads=threads)
        if check:
            inputs = {f"random b{b}": torch.randn(b, *x.shape[1:], generator=_gen(b))
                      for b in batches}
            inputs.update(real_inputs or {})
            report.parity = check_parity(reference, runtime, inputs)
        # PyTorch's side is leanconv's own inference path (prepared, channels_last: faster than
        # the NCHW graph that was exported, docs/performance.md), so the ratio is a fair one.
        fastest = prepare_for_inference(model) if prepare and latency_batches else model
        for b in latency_batches:
            report.latency[b] = _latency(fastest, runtime, torch.randn(b, *x.shape[1:]),
                                         threads, min_run_time)
    finally:
        model.train(was_training)
    return report


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Runtimes and the parity check
# ----------------------------------------------------------------------------------------------
def load_runtime(path: str | Path, format: str, *, threads: int = 1
                 ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function ``batch -> [output tensors]`` running the exported file in its runtime.

    ONNX files run in an ONNX Runtime CPU session with ``threads`` intra-op threads;
    ``.pt2`` files are loaded with ``torch.export.load`` and run through ``.module()``.
    """
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("checking an ONNX export needs onnxruntime: "
                              "pip install 'leanconv[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]

        return run_onnx
    if format == "exported-program":
        with _quiet():
            module = torch.export.load(str(path)).module()

        def run_ep(x: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                return [t for t in tree_leaves(module(x)) if isinstance(t, torch.Tensor)]

        return run_ep
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")


def check_parity(model: nn.Module, runtime: Callable[[torch.Tensor], list[torch.Tensor]],
                 inputs: dict[str, torch.Tensor]) -> list[ParityResult]:
    """Largest absolute and relative output difference of ``runtime`` vs ``model`` (eval mode)
    on every named input batch."""
    results = []
    model.eval()
    for name, x in inputs.items():
        with torch.no_grad():
            ref = [t for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
        got = runtime(x)
        if len(ref) != len(got):
            raise ExportError(f"{name}: the export returns {len(got)} tensors, PyTorch "
                              f"{len(ref)}")
        diff = scale = 0.0
        for r, g in zip(ref, got, strict=True):
            if tuple(r.shape) != tuple(g.shape):
                raise ExportError(f"{name}: output shape {tuple(g.shape)} differs from "
                                  f"PyTorch's {tuple(r.shape)}")
            if r.numel():
                diff = max(diff, (r.float() - g.float()).abs().max().item())
                scale = max(scale, r.float().abs().max().item())
        results.append(ParityResult(name, x.shape[0], diff, diff / scale if scale else diff))
    return results


def rounding_floor(model: nn.Module, x: torch.Tensor) -> float:
    """How far PyTorch's own float32 output is from float64 on ``x``, relative to the largest
    ``|output|``: the parity no runtime can be expected to beat.

    For most networks it is about 1e-7 to 1e-6. Discontinuous modules raise it: SRU's threshold
    gate (SCConv Eq. 3) flips for elements within rounding of the threshold, and at ResNet-50
    scale that moves the logits by about 1e-2 (docs/deployment.md).
    """
    import copy

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out32 = [t for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
            out64 = [t for t in tree_leaves(copy.deepcopy(model).double()(x.double()))
                     if isinstance(t, torch.Tensor)]
    finally:
        model.train(was_training)
    diff = max((float((a.double() - b).abs().max()) for a, b in zip(out32, out64, strict=True)
                if a.numel()), default=0.0)
    scale = max((float(b.abs().max()) for b in out64 if b.numel()), default=0.0)
    return diff / scale if scale else diff


def _latency(model: nn.Module, runtime, x: torch.Tensor, threads: int,
             min_run_time: float) -> tuple[float, float]:
    from .bench import measure_latency

    t_torch = measure_latency(model, x, threads=threads, min_run_time=min_run_time).median
    # The runtime manages its own threads (ONNX Runtime session options); the Timer's thread
    # setting only affects PyTorch.
    t_rt = measure_latency(runtime, x, threads=threads, min_run_time=min_run_time).median
    return t_torch, t_rt


# ----------------------------------------------------------------------------------------------
# Naming what failed
# ----------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _record_inputs(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, tuple]:
    """The first positional inputs each submodule receives in ``model(x)``."""
    seen: dict[nn.Module, tuple] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen.setdefault(module, tuple(args))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _innermost_failing(model: nn.Module, x: torch.Tensor,
                       attempt: Callable[[nn.Module, tuple], None]) -> tuple[str, nn.Module,
                                                                             Exception | None]:
    """Descend from ``model`` into the first child whose own export ``attempt`` fails."""
    try:
        records = _record_inputs(model, x)
    except Exception:
        return "", model, None
    name, module, error = "", model, None
    while True:
        for child_name, child in module.named_children():
            args = records.get(child)
            if not args or not all(isinstance(a, torch.Tensor) for a in args):
                continue
            try:
                attempt(child, args)
            except Exception as exc:
                name = f"{name}.{child_name}" if name else child_name
                module, error = child, exc
                break
        else:
            return name, module, error


def _static_export(module: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    shapes = tuple({0: batch} if a.dim() >= 1 and a.shape[0] == args[0].shape[0] else None
                   for a in args)
    with _quiet():
        return torch.export.export(module, args, dynamic_shapes=shapes)


def _describe_export_error(exc: BaseException) -> str:
    text = str(exc)
    call = re.search(r"The following call raised this error:\n\s*File \"[^\"]*\", line (\d+), "
                     r"in \w+\n\s*(.+)", text)
    if "data-dependent" in text:
        where = f" at `{call.group(2).strip()}`" if call else ""
        return f"data-dependent control flow{where} ({type(exc).__name__})"
    if call:
        return f"`{call.group(2).strip()}`: {_first_line(exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _module_label(name: str, module: nn.Module) -> str:
    return f"{name or '(the model itself)'} ({type(module).__name__})"


def _diagnose_export(model: nn.Module, x: torch.Tensor, exc: Exception) -> ExportError:
    name, module, inner = _innermost_failing(model, x, _static_export)
    op = _describe_export_error(inner or exc)
    return ExportError(f"torch.export cannot trace module {_module_label(name, module)}: {op}",
                       module=name, op=op)


_ONNX_OP = (re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', "
                       r"overload='([^']+)'\)>"),
            re.compile(r"target=([\w.]+)\]"))


def _onnx_op(exc: BaseException) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        match = _ONNX_OP[0].search(text)
        if match:
            return f"{match.group(1)}.{match.group(2)}"
        match = _ONNX_OP[1].search(text)
        if match:
            return match.group(1).removeprefix("torch.ops.")
        exc = exc.__cause__ or exc.__context__
    return None


def _diagnose_onnx(ep: torch.export.ExportedProgram, model: nn.Module, x: torch.Tensor,
                   exc: Exception, opset) -> ExportError:
    op = _onnx_op(exc)
    name = module_type = None
    if op is not None:
        # The ExportedProgram records, for every node, the stack of modules it was called from.
        for node in ep.graph.nodes:
            if node.op == "call_function" and str(node.target) == op:
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    name, module_type = list(stack.values())[-1]
                    module_type = module_type.rsplit(".", 1)[-1]
                break
    if name is None:  # op not in the graph as such (a decomposition's): bisect the modules
        def attempt(m: nn.Module, args: tuple) -> None:
            _to_onnx(_static_export(m, args), args[0], None, opset, optimize=False)

        name, module, inner = _innermost_failing(model, x, attempt)
        module_type = type(module).__name__
        op = op or (_onnx_op(inner) if inner else None)
    what = f"op {op} has no ONNX translation" if op else _first_line(exc)
    return ExportError(f"ONNX export fails in module {name or '(the model itself)'} "
                       f"({module_type}): {what}", module=name, op=op)


# ----------------------------------------------------------------------------------------------
# What the command line exports: a checkpoint or a zoo model
# ----------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A model to export, its example input and, for a checkpoint, real test images."""

    model: nn.Module
    example_input: torch.Tensor
    label: str
    real_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""


def load_source(source: str, *, conv: str | None = None, input: str | None = None,
                num_classes: int | None = None, in_channels: int | None = None,
                hparams: dict | None = None, real_batch: int = 64) -> Source:
    """The model ``source`` names: a leanconv training checkpoint (a file) or a zoo model name.

    A checkpoint rebuilds its model (:func:`leanconv.checkpoint.build_model_from_checkpoint`)
    at its dataset's image size; when that dataset is on this machine the first
    ``real_batch`` test images (normalised as in training) are added to the parity check.
    A model name is built with ``conv`` and ``hparams`` at ``input`` (``"224"``, ``"32"``,
    ``"cifar 32x32"``; default 224), untrained (``weights=None``: nothing is downloaded).

    Raises ``ValueError`` with a one-line message for anything that does not fit.
    """
    from .checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
    from .data import DataError, build_data, dataset_info

    path = Path(source)
    if path.is_file():
        given = [flag for flag, value in (("--conv", conv), ("--input", input),
                                          ("--classes", num_classes),
                                          ("--in-channels", in_channels)) if value is not None]
        given += ["--" + k.replace("_", "-") for k in (hparams or {})]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to model names only; checkpoint "
                             f"{path} describes its own model")
        try:
            ckpt = load_checkpoint(path)
            model = build_model_from_checkpoint(ckpt, path)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        config = ckpt.get("config", {})
        data = ckpt.get("data") or config.get("data")
        size = config.get("image_size") or (dataset_info(data).image_size if data else 32)
        example = torch.randn(1, ckpt["in_channels"], size, size)
        label = f"{path} ({ckpt['model']}, conv={ckpt['conv']})"
        real, note = {}, ""
        try:
            if data is None:
                raise DataError("the checkpoint names no dataset")
            _, _, test = build_data(data, batch_size=real_batch, eval_batch_size=real_batch,
                                    data_dir=config.get("data_dir"), image_size=size,
                                    test_subset=real_batch)
            images, _ = next(iter(test))
            real[f"{data} test b{images.shape[0]}"] = images.float()
        except (DataError, StopIteration, OSError) as e:
            note = f"no real inputs ({e}); random inputs only"
        return Source(model, example, label, real, note)
    if path.suffix in (".pt", ".pth", ".ckpt") or "/" in source:
        raise ValueError(f"checkpoint {source} does not exist")
    from .tables import build_model, parse_input

    conv = conv or "vanilla"
    try:
        _, (h, w) = parse_input(input or "224")
        model, name = build_model(source, conv, input=input or "224", num_classes=num_classes,
                                  in_channels=in_channels, device="cpu", **(hparams or {}))
    except (ValueError, TypeError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
    channels = in_channels or 3
    return Source(model, torch.randn(1, channels, h, w), f"{name} (conv={conv}, untrained)")
