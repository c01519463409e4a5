"""ResNet-20 on Fashion-MNIST with every module, the short recipe: the training benchmark.

This is ``leanconv compare --budget standard`` (the one implementation of the study: resnet20,
vanilla / spconv / slimconv with compression_ratio=1 / scconv / compconv / ghost, the full
Fashion-MNIST train set, the 8-epoch ``fashion-mnist`` recipe) seen through the training issue's
bar: vanilla reaches >= 92.5% test top-1 within 8 epochs and no module is more than 1.0 point
below vanilla. It reuses every finished entry of the study in ``--out`` (an interrupted run
resumes), then prints test top-1, epochs, wall time and training images/s with the verdicts.
About 2 h on two otherwise idle CPU cores::

    .venv/bin/python benchmarks/train_fashion.py [--out runs/compare-standard] [--markdown F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanconv.cli import main as leanconv_main

VANILLA_BAR = 92.5  # % test top-1 within 8 epochs
MAX_GAP = 1.0  # points below vanilla


def bar_table(results: dict) -> str:
    rows = {r["conv"]: r for r in results["rows"]}
    vanilla = 100 * rows["vanilla"]["top1_mean"]  # results.json holds fractions
    lines = [
        "| conv | hparams | test top-1 % | vs vanilla | epochs | wall time | images/s | bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for conv, r in rows.items():
        top1 = 100 * r["top1_mean"]
        if conv == "vanilla":
            ok = top1 >= VANILLA_BAR
            verdict = f"{'PASS' if ok else 'FAIL'} (>= {VANILLA_BAR})"
        else:
            ok = top1 >= vanilla - MAX_GAP
            verdict = f"{'PASS' if ok else 'FAIL'} (>= vanilla - {MAX_GAP})"
        hparams = ", ".join(f"{k}={v}" for k, v in r["hparams"].items()) or "defaults"
        lines.append(
            f"| {conv} | {hparams} | {top1:.2f} | {top1 - vanilla:+.2f} | {r['epochs']} | "
            f"{r['train_time_s'] / 60:.1f} min | {r['run_images_per_s']:.0f} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare-standard")
    parser.add_argument("--markdown", help="also write the bar table to this file")
    args = parser.parse_args(argv)
    code = leanconv_main(["compare", "--budget", "standard", "--out", args.out])
    if code:
        return code
    results = json.loads((Path(args.out) / "results.json").read_text())
    table = bar_table(results)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
