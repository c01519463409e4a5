"""Every conv type at the four ResNet-50 3x3 shapes, as ratios to a vanilla 3x3 conv + BN.

For each shape C@HxW (64@56, 128@28, 256@14, 512@7: the stride-1 3x3 convs of ResNet-50's four
stages) and each conv type, the measured unit is ``conv(C -> C') + BatchNorm2d(C')``: the module
plus the host BN that every paper keeps after the 3x3 conv it replaces (``--no-bn``: the module
alone, for every type including vanilla). C' is the width the module really produces
(``conv_out_channels``: SlimConv's natural width is C/k; every other type keeps C). Params, MACs
(from :func:`leanconv.profile`) and CPU latency (median of pooled interleaved rounds, eval mode,
``torch.inference_mode``) are printed as ratios module / vanilla measured in the same run, as a
markdown table.

    python benchmarks/layers.py                    # all convs, batch 1 and 32, 1 thread
    python benchmarks/layers.py --threads 2 --convs vanilla,spconv,slimconv
    python benchmarks/layers.py --quick            # smoke run: tiny shapes, seconds
    python benchmarks/layers.py --shapes cifar --batch 128 --threads 2 --inference-path prepared

Numbers are only meaningful when nothing else runs on the cores.
"""

from __future__ import annotations

import argparse
import json
import sys

from torch import nn

from leanconv.bench import bench_convs, header_lines
from leanconv.cli import add_conv_arguments, hparams_from_args
from leanconv.layers import conv_out_channels, create_conv
from leanconv.runtime import tune_allocator

RESNET50_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
# The stride-1 3x3 convs of CIFAR ResNet-20/56/110's three stages (issue 6 times them at batch 128).
CIFAR_SHAPES = ((16, 32), (32, 16), (64, 8))
QUICK_SHAPES = ((16, 14), (32, 7))


def unit(conv: str, channels: int, bn: bool, hparams: dict) -> nn.Module:
    """``conv(C -> C')`` followed by the host ``BatchNorm2d(C')`` (or the conv alone)."""
    width = conv_out_channels(conv, channels, channels, **hparams)
    layer = create_conv(conv, channels, width, **hparams)
    return nn.Sequential(layer, nn.BatchNorm2d(width)) if bn else nn.Sequential(layer)


def _ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"


def run(args) -> list[dict]:
    if not args.no_tune_allocator:
        tune_allocator()
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    hparams = {c: hparams_from_args(args, c) for c in convs}
    shapes = QUICK_SHAPES if args.quick else (
        CIFAR_SHAPES if args.shapes == "cifar" else RESNET50_SHAPES)
    batches = args.batch or ([1, 2] if args.quick else [1, 32])
    rounds = args.rounds or (1 if args.quick else 3)
    min_run_time = args.min_run_time or (0.01 if args.quick else 0.5)

    reports = []
    for channels, size in shapes:
        print(f"shape {channels}@{size}", file=sys.stderr, flush=True)
        reports.append(bench_convs(
            lambda c, ch=channels: unit(c, ch, not args.no_bn, hparams.get(c, {})),
            convs, (channels, size, size), batches=batches, threads=args.threads,
            inference_path=args.inference_path, rounds=rounds, min_run_time=min_run_time,
            title=f"{channels}@{size}",
            progress=(lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None,
        ))

    measured = "conv + host BN" if not args.no_bn else "conv alone"
    lines = header_lines(reports[0])
    family = "CIFAR ResNet" if args.shapes == "cifar" and not args.quick else "ResNet-50"
    lines[0] = (f"## Conv types at the {family} 3x3 shapes, {measured}, ratios to vanilla "
                f"(same unit) measured in the same run")
    cols = ["shape", "conv", "out", "params", "params ratio", "MACs", "MACs ratio"]
    for b in batches:
        cols += [f"latency b{b} (ms)", f"latency ratio b{b}"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    table = []
    for (channels, size), report in zip(shapes, reports, strict=True):
        rows = report.rows()
        base = next((r for r in rows if r["conv"] == report.baseline), None)
        for row in rows:
            out = conv_out_channels(row["conv"], channels, channels,
                                    **hparams.get(row["conv"], {})) if not row["error"] else None
            record = {"shape": f"{channels}@{size}", "out_channels": out, **row}
            table.append(record)
            if row["error"]:
                lines.append(f"| {channels}@{size} | {row['conv']} | skipped: {row['error']} |")
                continue
            cells = [f"{channels}@{size}", row["conv"], str(out), f"{row['params']:,}",
                     _ratio(row["params"], base and base["params"]), f"{row['macs']:,}",
                     _ratio(row["macs"], base and base["macs"])]
            for b in batches:
                lat = row["latency"].get(b)
                cells += ["-", "-"] if lat is None else [
                    f"{lat['median'] * 1e3:.3g} (IQR {lat['iqr'] * 1e3:.2g})",
                    "-" if lat["ratio"] is None else f"{lat['ratio']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ratio = module / vanilla (< 1: fewer params / MACs, faster). "
              f"MACs per image; latency per forward call of the {measured}, eval mode."]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": reports[0].env, "settings": reports[0].settings,
                       "unit": measured, "rows": table}, f, indent=1)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conv_arguments(p, multiple=True)
    p.add_argument("--batch", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="batch sizes (default 1,32; --quick: 1,2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--no-bn", action="store_true", help="measure the conv alone, without host BN")
    p.add_argument("--shapes", choices=("resnet50", "cifar"), default="resnet50",
                   help="resnet50: 64@56 128@28 256@14 512@7; cifar: 16@32 32@16 64@8 (the "
                   "stages of CIFAR ResNets)")
    p.add_argument("--inference-path", choices=("eager", "prepared", "compiled"),
                   default="eager", help="eval-mode module, or leanconv.prepare_for_inference")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per latency measurement and round (default 0.5)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes and timings")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="keep glibc malloc's defaults (see leanconv.runtime)")
    return p


if __name__ == "__main__":
    run(build_parser().parse_args())
