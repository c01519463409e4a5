"""Issue 11's bars: plan, then time the planned network whole against vanilla, in one run.

For each case `leanconv.plan.make_plan` measures (or reads from the machine's latency cache) every
candidate at every layer shape, chooses per layer under the MAC budget, and `check_plan` times the
planned and the vanilla network whole, both paths each (inference: eager and
prepare_for_inference; training: NCHW and channels_last), in interleaved rounds. Printed per case:
the plan table, then a summary of MAC fraction, measured speed-up (best planned path vs best
vanilla path) against the bar, and the error of the predicted whole-network time.

    python benchmarks/plan.py                          # the three cases of issue 11, 2 threads
    python benchmarks/plan.py --cases r56-infer --json plan.json

Numbers are only meaningful when nothing else runs on the cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leanconv.plan import format_plan, make_plan
from leanconv.runtime import allocator_setup, tune_allocator

# name: (model, input, batch, objective, max MACs, speed-up bar)
CASES = {
    "r56-infer": ("resnet56", 32, 128, "inference", 0.65, 1.10),
    "r50-infer": ("resnet50", 224, 8, "inference", 0.70, 1.20),
    "r56-train": ("resnet56", 32, 64, "training", 0.80, 1.00),
}


def run_case(name: str, args) -> dict:
    model, size, batch, objective, max_macs, bar = CASES[name]
    t0 = time.perf_counter()
    plan = make_plan(model, input_size=size, batch=batch,
                     num_classes=1000 if size >= 224 else 10, objective=objective,
                     max_macs=max_macs, threads=args.threads, rounds=args.rounds,
                     min_run_time=args.min_run_time, cache_dir=args.cache, check=False,
                     progress=lambda msg: print(msg, flush=True))
    planned = time.perf_counter() - t0
    from leanconv.plan import check_plan

    plan.check = check_plan(plan, rounds=args.check_rounds, min_run_time=args.check_run_time,
                            threads=args.threads)
    print(format_plan(plan), flush=True)
    c = plan.check
    return {"case": name, "model": model, "input": size, "batch": batch, "objective": objective,
            "max_macs": max_macs, "bar": bar, "mac_fraction": plan.totals["mac_fraction"],
            "path": plan.path, "convs": plan.convs(),
            "predicted_speedup": plan.totals["predicted_speedup"], "speedup": c["speedup"],
            "prediction_error": c["prediction_error"], "measured": c["measured"],
            "met": c["speedup"] >= bar and plan.totals["mac_fraction"] <= max_macs,
            "plan_seconds": planned, "plan": plan.to_dict()}


def summary(rows: list[dict], args) -> str:
    lines = [
        f"## leanconv plan: issue 11 bars ({torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} threads, torch {torch.__version__}, {allocator_setup()})",
        "",
        "| case | path | convs | MACs vs vanilla | predicted speed-up | measured speed-up "
        "(best vs best) | bar | met | prediction error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        convs = ", ".join(f"{k} x{v}" for k, v in r["convs"].items())
        lines.append(
            f"| {r['case']} ({r['model']} @{r['input']} b{r['batch']} {r['objective']}) | "
            f"{r['path']} | {convs} | {r['mac_fraction']:.3f} (<= {r['max_macs']}) | "
            f"{r['predicted_speedup']:.2f}x | {r['speedup']:.2f}x | >= {r['bar']:.2f}x | "
            f"{'yes' if r['met'] else 'no'} | {r['prediction_error']:+.1%} |")
    lines += ["", "speed-up = vanilla time / planned time (training: images/s ratio); "
              "prediction error = predicted / measured time of the planned network on its path "
              "- 1."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--check-rounds", type=int, default=5)
    p.add_argument("--check-run-time", type=float, default=1.0)
    p.add_argument("--cache", default=None, help="latency cache folder (default: leanconv's)")
    p.add_argument("--json", default=None, help="write the rows (plans included) as JSON")
    p.add_argument("--no-tune-allocator", action="store_true")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown[0]!r}; allowed: {', '.join(CASES)}")
    if args.cache is None:
        from leanconv.plan import DEFAULT_CACHE

        args.cache = DEFAULT_CACHE
    if not args.no_tune_allocator:
        tune_allocator()
    rows = [run_case(c, args) for c in cases]
    print(summary(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
