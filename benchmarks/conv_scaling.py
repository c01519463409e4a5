"""Does a 3x3 convolution get cheaper with fewer channels? The kernel-level reason behind the
CIFAR-scale verdicts of issue 6.

Every slim module replaces ResNet-56's 16 -> 16 3x3 conv at 32x32 with convs of 4-8 channels
(SPConv: 8 -> 16 dense + 8 -> 16 1x1; Ghost/CompConv: 16 -> 8 + a depthwise 8; SlimConv: 8 -> 8
and 4 -> 4; CRU: 4 -> 16 ...). This script times single convs of those shapes, in both memory
layouts, forward (``torch.inference_mode``) and forward + backward (input and weight gradients),
and prints each as a ratio to the 16 -> 16 conv next to its MAC ratio. A ratio near 1 for a
quarter or half of the MACs is time the module cannot save with these kernels.

    python benchmarks/conv_scaling.py                         # batch 64 and 128, 2 threads
    python benchmarks/conv_scaling.py --batch 8 --size 56 --base 64

Numbers are only meaningful when nothing else runs on the cores.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from leanconv.bench import environment, measure_latency, num_threads
from leanconv.runtime import allocator_setup, tune_allocator

# (in, out, groups, kernel) as multiples of the base width (16 for ResNet-56's first stage)
SHAPES = (
    (1, 1, 1, 3),           # vanilla 16 -> 16
    (1, 1 / 2, 1, 3),       # Ghost / CompConv d=1 primary conv 16 -> 8
    (1 / 2, 1, 1, 3),       # SPConv's dense Eq. 3, 8 -> 16
    (1 / 2, 1 / 2, 1, 3),   # SlimConv top 8 -> 8
    (1 / 4, 1 / 4, 1, 3),   # SlimConv bottom 4 -> 4
    (1 / 4, 1, 1, 3),       # CRU's dense Eq. 5, 4 -> 16
    (1 / 2, 1 / 2, "dw", 3),  # Ghost / CompConv cheap depthwise 8
    (1 / 2, 1, 1, 1),       # SPConv redundant 1x1, 8 -> 16
)


class _Step(nn.Module):
    """Forward + backward of one conv (input and weight gradients), as a callable module."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        with torch.inference_mode(False), torch.enable_grad():  # the timer runs in inference mode
            x = x.detach().requires_grad_()
            y = self.conv(x)
            y.backward(torch.ones_like(y))
        return y


LAYOUTS = (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last))


def shape_rows(base: int) -> list[dict]:
    """Name, widths, groups, kernel and MACs ratio (to the base 3x3 conv) of each timed conv."""
    rows = []
    for cin_f, cout_f, groups, k in SHAPES:
        cin, cout = int(base * cin_f), int(base * cout_f)
        g = cin if groups == "dw" else groups
        rows.append({
            "conv": f"{cin} -> {cout} {k}x{k}" + (" depthwise" if groups == "dw" else ""),
            "in": cin, "out": cout, "groups": g, "kernel": k,
            "macs_ratio": cout * (cin // g) * k * k / (base * base * 9),
        })
    return rows


def run(args) -> list[dict]:
    """Time every conv of :data:`SHAPES`; each row gets ``times[(batch, layout, mode)] = (s,
    ratio to the base conv)`` with mode ``"fwd"`` or ``"fwd+bwd"``."""
    if not args.no_tune_allocator:
        tune_allocator()
    rows = shape_rows(args.base)
    base: dict[tuple, float] = {}
    for row in rows:
        row["times"] = {}
        for batch in args.batch:
            for layout, memory_format in LAYOUTS:
                conv = nn.Conv2d(row["in"], row["out"], row["kernel"], padding=row["kernel"] // 2,
                                 groups=row["groups"], bias=False).to(memory_format=memory_format)
                x = torch.randn(batch, row["in"], args.size, args.size).contiguous(
                    memory_format=memory_format)
                for mode, model in (("fwd", conv.eval()), ("fwd+bwd", _Step(conv))):
                    t = measure_latency(model, x, threads=args.threads,
                                        min_run_time=args.min_run_time).median
                    key = (batch, layout, mode)
                    base.setdefault(key, t)  # the first row is the base conv
                    row["times"][key] = (t, t / base[key])
    return rows


def format_table(rows: list[dict], args) -> str:
    env = environment(args.threads)
    keys = list(rows[0]["times"])
    lines = [
        f"## 3x3 / 1x1 convs at {args.size}x{args.size}, base width {args.base}, "
        f"{args.threads} threads",
        "",
        f"torch {env['torch']}, {allocator_setup()}; median of `torch.utils.benchmark` blocks "
        f"({args.min_run_time} s each); ratio = time / time of the {args.base} -> {args.base} "
        f"3x3 conv in the same layout and batch.",
        "",
        "| conv | MACs ratio | " + " | ".join(f"{m} b{b} {lay}" for b, lay, m in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for row in rows:
        cells = [f"{t * 1e3:.2f} ms ({r:.2f})" for t, r in (row["times"][k] for k in keys)]
        lines.append(f"| {row['conv']} | {row['macs_ratio']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=lambda t: [int(b) for b in t.split(",")], default=[64, 128])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--base", type=int, default=16, help="the vanilla conv's width (default 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--no-tune-allocator", action="store_true")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.base % 4:
        p.error(f"--base must be a multiple of 4 (the smallest conv is base/4 wide), "
                f"got {args.base}")
    with num_threads(args.threads):
        print(format_table(run(args), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
