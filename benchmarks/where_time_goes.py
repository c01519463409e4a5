"""Where inference time goes: convolutions vs everything else, per conv type (torch.profiler).

For each conv type, the model of the zoo is prepared for inference (``prepare_for_inference``:
folded, channels_last), run a few times under ``torch.profiler``, and the self CPU time of every
ATen op is summed into two classes: **convolution kernels** (``aten::mkldnn_convolution`` /
``aten::convolution_overrideable`` / ``aten::_convolution`` self time) and **everything else**
(normalisation, gates, fusions, concatenation, copies, pooling, residual adds, ReLU). The table
gives both per forward call and the three most expensive non-conv ops, to show whether a slim
module loses time in its convolutions or around them.

    python benchmarks/where_time_goes.py                         # ResNet-56 b128, every conv
    python benchmarks/where_time_goes.py --model resnet50 --input 224 --batch 8 --classes 1000

The profiler adds overhead and attributes OpenMP waiting to the op that waits, so the split is
indicative (the totals run above the un-profiled latency); ratios between conv types measured
in the same run are what to read. Only meaningful when nothing else runs on the cores.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from leanconv import create_model, prepare_for_inference
from leanconv.layers import available_convs
from leanconv.runtime import allocator_setup, tune_allocator

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::_convolution",
            "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::mkldnn_convolution_pointwise")


def split_times(model: torch.nn.Module, x: torch.Tensor, calls: int) -> dict:
    """Self CPU milliseconds per call: convolution kernels, the rest, and the rest by op."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_op[event.key] += event.self_cpu_time_total / 1e3 / calls
    conv = sum(t for op, t in per_op.items() if op in CONV_OPS)
    other = {op: t for op, t in per_op.items() if op not in CONV_OPS}
    return {"conv_ms": conv, "other_ms": sum(other.values()),
            "top_other": sorted(other.items(), key=lambda kv: -kv[1])[:3]}


def run(args) -> list[dict]:
    if not args.no_tune_allocator:
        tune_allocator()
    torch.set_num_threads(args.threads)
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    x = torch.randn(args.batch, 3, args.input, args.input)
    rows = []
    for conv in convs:
        model = create_model(args.model, conv=conv, num_classes=args.classes)
        rows.append({"conv": conv, **split_times(prepare_for_inference(model), x, args.calls)})
    base = next((r for r in rows if r["conv"] == "vanilla"), None)
    print(f"## Where inference time goes: {args.model} @{args.input}, batch {args.batch}, "
          f"prepared (channels_last), {args.threads} threads, {allocator_setup()}\n")
    print("| conv | conv kernels ms | other ops ms | total ms | conv vs vanilla conv | "
          "top other ops (ms per call) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['conv_ms'] / base['conv_ms']:.2f}x" if base else "-"
        top = ", ".join(f"{op.removeprefix('aten::')} {t:.1f}" for op, t in r["top_other"])
        print(f"| {r['conv']} | {r['conv_ms']:.1f} | {r['other_ms']:.1f} | "
              f"{r['conv_ms'] + r['other_ms']:.1f} | {rel} | {top} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--convs", default=",".join(available_convs()),
                   help="comma-separated conv types (default: all; vanilla is the reference)")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=5, help="profiled forward calls (default 5)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="keep glibc malloc's defaults (see leanconv.runtime)")
    return p


if __name__ == "__main__":
    run(build_parser().parse_args())
