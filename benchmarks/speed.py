"""Issue 6's bars: are the modules faster and leaner than vanilla convolution in real networks?

Three scenarios, every conv type side by side with vanilla in the same run (2 threads by default,
the setting of the bars):

- CIFAR ResNet-56, 32x32, batch 128, inference -- eager (``model.eval()``) and prepared
  (:func:`leanconv.prepare_for_inference`);
- ResNet-56, batch 64, training: images/s (forward + backward + SGD step) and bytes of
  activations saved for backward;
- ResNet-50, 224x224, batch 8, inference -- eager and prepared.

Then each module is checked against the bars, PASS/FAIL:

- inference: time ratio (module / vanilla) <= 1.0 in both inference scenarios, in eager mode or
  through the prepared path (reported separately; the verdict takes the better path);
- SPConv and SlimConv: realised speed-up ((vanilla time / module time) / (vanilla MACs /
  module MACs)) >= 0.6 in both inference scenarios;
- training: images/s ratio >= 0.9 and backward-memory ratio <= 1.5.

    python benchmarks/speed.py                       # the full run (tens of minutes)
    python benchmarks/speed.py --convs vanilla,spconv,slimconv --json speed.json
    python benchmarks/speed.py --quick               # smoke run: small sizes, seconds

Numbers are only meaningful when nothing else runs on the cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from leanconv.bench import bench_model, format_table, report_json
from leanconv.cli import add_conv_arguments, hparams_from_args
from leanconv.runtime import tune_allocator

# Bars of issue 6.
MAX_TIME_RATIO = 1.0
MIN_REALISED = 0.6
REALISED_CONVS = ("spconv", "slimconv")
MIN_TRAIN_RATIO = 0.9
MAX_MEMORY_RATIO = 1.5


@dataclass
class Scenario:
    key: str
    model: str
    input: int
    batch: int
    train: bool
    path: str = "eager"
    layout: str = "contiguous"


def scenarios(args) -> list[Scenario]:
    q = args.quick
    cifar = args.cifar_model or ("resnet20" if q else "resnet56")
    imagenet = args.imagenet_model or "resnet50"
    out = []
    for path in args.paths:
        out.append(Scenario(f"cifar-inference-{path}", cifar, 32, 2 if q else 128, False, path))
    for layout in args.train_layouts:
        out.append(Scenario(f"cifar-train-{layout}", cifar, 32, 2 if q else 64, True,
                            layout=layout))
    for path in args.paths:
        out.append(Scenario(f"imagenet-inference-{path}", imagenet, 32 if q else 224,
                            1 if q else 8, False, path))
    return out


def evaluate_bars(rows: dict[str, list[dict]], paths: list[str],
                  layouts: tuple[str, ...] = ("contiguous",)) -> list[dict]:
    """PASS/FAIL per conv from the rows of each scenario (``rows[scenario_key]`` as returned by
    :meth:`BenchReport.rows`). A bar whose numbers are missing is ``None`` (not measured).
    Training is judged per layout (module and vanilla in the same one); the verdict takes the
    layout where the module does best."""

    def get(key, conv):
        return next((r for r in rows.get(key, []) if r["conv"] == conv and not r["error"]), None)

    def latency(key, conv):
        row = get(key, conv)
        return next(iter(row["latency"].values()), None) if row else None

    convs = []
    for key_rows in rows.values():
        convs += [r["conv"] for r in key_rows if r["conv"] not in convs]
    verdicts = []
    for conv in convs:
        if conv == "vanilla":
            continue
        v = {"conv": conv}
        speed_ok, realised_ok = [], []
        for family in ("cifar", "imagenet"):
            best_ratio = best_realised = None
            for path in paths:
                lat = latency(f"{family}-inference-{path}", conv)
                v[f"{family}_{path}_ratio"] = lat and lat["ratio"]
                v[f"{family}_{path}_realised"] = lat and lat["realised"]
                if lat and lat["ratio"] is not None:
                    best_ratio = min(best_ratio or lat["ratio"], lat["ratio"])
                if lat and lat["realised"] is not None:
                    best_realised = max(best_realised or lat["realised"], lat["realised"])
            if best_ratio is not None:
                speed_ok.append(best_ratio <= MAX_TIME_RATIO)
            if conv in REALISED_CONVS and best_realised is not None:
                realised_ok.append(best_realised >= MIN_REALISED)
        v["inference"] = all(speed_ok) if speed_ok else None
        v["realised"] = (all(realised_ok) if realised_ok else None) if conv in REALISED_CONVS \
            else "n/a"
        v["training"] = v["train_ratio"] = v["memory_ratio"] = v["train_layout"] = None
        for layout in layouts:
            train = get(f"cifar-train-{layout}", conv)
            if not train or train["train_ratio"] is None:
                continue
            ok = (train["train_ratio"] >= MIN_TRAIN_RATIO and train["memory_ratio"] is not None
                  and train["memory_ratio"] <= MAX_MEMORY_RATIO)
            # the best layout: a passing one first, then the higher images/s ratio
            if v["training"] is None or (ok, train["train_ratio"]) > (v["training"],
                                                                       v["train_ratio"]):
                v.update(training=ok, train_ratio=train["train_ratio"],
                         memory_ratio=train["memory_ratio"], train_layout=layout)
        verdicts.append(v)
    return verdicts


def _pf(value) -> str:
    return {True: "PASS", False: "FAIL", None: "not measured", "n/a": "n/a"}[value]


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def bars_table(verdicts: list[dict], paths: list[str]) -> str:
    cols = ["conv"]
    for family in ("cifar", "imagenet"):
        cols += [f"{family} {p} time ratio" for p in paths]
    cols += ["inference <= 1.0", "realised >= 60%", "train ratio", "memory ratio",
             "training >= 0.9x, <= 1.5x"]
    lines = ["## Issue 6 bars (PASS/FAIL per module)", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for v in verdicts:
        cells = [v["conv"]]
        for family in ("cifar", "imagenet"):
            for p in paths:
                ratio, real = v[f"{family}_{p}_ratio"], v[f"{family}_{p}_realised"]
                cells.append(_x(ratio) + ("" if real is None else f" ({real:.0%})"))
        layout = f" ({v['train_layout']})" if v.get("train_layout") else ""
        cells += [_pf(v["inference"]), _pf(v["realised"]), _x(v["train_ratio"]) + layout,
                  _x(v["memory_ratio"]), _pf(v["training"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "time ratio = module / vanilla latency (realised share of the MAC reduction in "
              "brackets); the inference verdicts take the better of the paths, the training "
              "verdict the better layout (in brackets)."]
    return "\n".join(lines)


def run(args) -> dict:
    if not args.no_tune_allocator:
        tune_allocator()
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    hparams = {c: hparams_from_args(args, c) for c in convs}
    rounds = args.rounds or (1 if args.quick else 3)
    min_run_time = args.min_run_time or (0.01 if args.quick else 0.5)
    threads = args.threads or (1 if args.quick else 2)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
    results, rows = {}, {}
    for sc in scenarios(args):
        print(f"scenario {sc.key}: {sc.model} @{sc.input}, batch {sc.batch}", file=sys.stderr,
              flush=True)
        report = bench_model(
            sc.model, convs, input_size=sc.input, num_classes=1000 if "imagenet" in sc.key else 10,
            hparams=hparams, batches=() if sc.train else (sc.batch,), threads=threads,
            train=sc.train, train_batch=sc.batch if sc.train else None,
            inference_path=sc.path, rounds=rounds, min_run_time=min_run_time,
            train_steps=1 if args.quick else args.train_steps,
            train_warmup=1 if args.quick else 3, device=args.device,
            train_memory_format=sc.layout,
            title=f"{sc.key}: {sc.model} @{sc.input}, batch {sc.batch}", progress=say,
        )
        print(format_table(report), "\n", flush=True)
        results[sc.key] = report_json(report)
        rows[sc.key] = report.rows()
    verdicts = evaluate_bars(rows, args.paths, tuple(args.train_layouts))
    print(bars_table(verdicts, args.paths))
    out = {"scenarios": results, "bars": verdicts}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conv_arguments(p, multiple=True)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default 2, the bars' setting; --quick: 1)")
    p.add_argument("--paths", type=lambda t: t.split(","),
                   default=["eager", "prepared", "compiled"],
                   help="inference paths: eager, prepared, compiled (default: all three)")
    p.add_argument("--train-layouts", type=lambda t: t.split(","),
                   default=["contiguous", "channels_last"],
                   help="memory formats of the training measurement, module and vanilla alike "
                   "(default: contiguous,channels_last)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="keep glibc malloc's defaults (see leanconv.runtime)")
    p.add_argument("--cifar-model", default=None, help="default resnet56 (--quick: resnet20)")
    p.add_argument("--imagenet-model", default=None, help="default resnet50")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per latency measurement and round (default 0.5)")
    p.add_argument("--train-steps", type=int, default=5, help="timed steps per round (default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: ResNet-20 batch 2, ResNet-50 at 32x32 batch 1, 1 thread, "
                   "one round, short timings")
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p


if __name__ == "__main__":
    run(build_parser().parse_args())
