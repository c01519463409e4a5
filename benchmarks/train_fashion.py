"""ResNet-20 on Fashion-MNIST with every module, the short recipe, side by side.

Trains ``resnet20`` with vanilla, spconv, slimconv (compression_ratio=1: the block keeps its
width), scconv, compconv and ghost on the full Fashion-MNIST training set with the
``fashion-mnist`` recipe (8 epochs, one-cycle SGD + Nesterov, label smoothing 0.1, pad-2 crop +
flip) and reports test top-1, epochs, wall time and training images/s as a markdown table, on
stdout and in ``--markdown``. Each run lives in ``--out/<conv>``; an interrupted benchmark
picks up where it stopped (finished runs are read back, unfinished ones resumed exactly).

The bar (issue 4): vanilla reaches >= 92.5% test top-1 within 8 epochs and no module is more
than 1.0 point below vanilla. About 15 min per module on two free CPU cores, so ~1.5 h in all;
run it on an otherwise idle machine::

    .venv/bin/python benchmarks/train_fashion.py                       # the full benchmark
    .venv/bin/python benchmarks/train_fashion.py --train-subset 512 --test-subset 500 \\
        --epochs 1 --out /tmp/tf --markdown /tmp/tf.md                 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from leanconv.checkpoint import CheckpointError, load_checkpoint
from leanconv.train import TrainError, resolve_config, train

CONVS = {
    "vanilla": {},
    "spconv": {},
    "slimconv": {"compression_ratio": 1},
    "scconv": {},
    "compconv": {},
    "ghost": {},
}
BAR_VANILLA, BAR_GAP = 0.925, 0.010


def run_one(conv: str, hparams: dict, args) -> dict:
    out = Path(args.out) / conv
    config = resolve_config(
        args.recipe, model="resnet20", conv=conv, hparams=hparams, data="fashion-mnist",
        data_dir=args.data_dir, out=str(out), epochs=args.epochs, seed=args.seed,
        train_subset=args.train_subset, test_subset=args.test_subset)
    history, status = None, "ok"
    if (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt")
        if ckpt["epoch"] >= config.epochs and ckpt["config"].get("epochs") == config.epochs:
            history = ckpt["history"]
            status = "ok (read back)"
    if history is None:
        resume = (out / "last.pt").exists()
        history = train(config, resume=resume).history
    params = sum(v.numel() for k, v in load_checkpoint(out / "last.pt")["state_dict"].items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return {
        "conv": conv, "hparams": hparams, "status": status, "params": params,
        "epochs": len(history), "test_top1": history[-1]["test_top1"],
        "best_top1": max(r["test_top1"] for r in history),
        "test_top5": history[-1]["test_top5"],
        "wall_time_s": sum(r["time"] for r in history),
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
    }


def markdown(rows: list[dict], args) -> str:
    vanilla = next((r for r in rows if r["conv"] == "vanilla" and "test_top1" in r), None)
    lines = [
        f"ResNet-20 on Fashion-MNIST, recipe `{args.recipe}` ({args.train_subset or 60000} "
        f"train / {args.test_subset or 10000} test images); torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| conv | hparams | params | test top-1 | best top-1 | vs vanilla | epochs | wall time "
        "| train img/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items()) or "-"
        if "test_top1" not in r:
            lines.append(f"| {r['conv']} | {hp} | | failed: {r['status']} | | | | | |")
            continue
        delta = (f"{100 * (r['test_top1'] - vanilla['test_top1']):+.2f}" if vanilla else "")
        minutes, seconds = divmod(round(r["wall_time_s"]), 60)
        lines.append(
            f"| {r['conv']} | {hp} | {r['params'] / 1e3:.1f}k | {100 * r['test_top1']:.2f}% | "
            f"{100 * r['best_top1']:.2f}% | {delta} | {r['epochs']} | {minutes}m{seconds:02d}s | "
            f"{r['images_per_s']:.0f} |")
    if vanilla and not (args.train_subset or args.test_subset):
        ok = vanilla["test_top1"] >= BAR_VANILLA
        lines += ["", f"Bar: vanilla >= {100 * BAR_VANILLA:.1f}%: "
                  f"{'met' if ok else 'NOT met'} ({100 * vanilla['test_top1']:.2f}%)."]
        for r in rows:
            if r["conv"] != "vanilla" and "test_top1" in r:
                gap = vanilla["test_top1"] - r["test_top1"]
                lines.append(f"- {r['conv']}: {100 * gap:+.2f} points below vanilla "
                             f"({'within' if gap <= BAR_GAP else 'OUTSIDE'} the 1.0-point bar)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--convs", default=",".join(CONVS), help="comma-separated subset")
    p.add_argument("--recipe", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="quick runs only")
    p.add_argument("--test-subset", type=int, default=None, help="quick runs only")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="runs/train_fashion", help="one run folder per conv here")
    p.add_argument("--markdown", default="benchmarks/results/train_fashion.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for conv in [c.strip() for c in args.convs.split(",") if c.strip()]:
        hparams = CONVS.get(conv, {})
        print(f"== resnet20 / {conv} {hparams or ''}", file=sys.stderr, flush=True)
        try:
            rows.append(run_one(conv, hparams, args))
        except (TrainError, CheckpointError, ValueError) as e:
            message = str(e).splitlines()[0][:160]
            print(f"   {conv} failed: {message}", file=sys.stderr, flush=True)
            rows.append({"conv": conv, "hparams": hparams, "status": message})
    table = markdown(rows, args)
    print(table)
    path = Path(args.markdown)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written {path} and {path.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
