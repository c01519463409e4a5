"""``leanconv`` command line: argument parsing only; every command is a thin call into a module.

Each subcommand has one ``_add_<command>(subparsers)`` function below that declares its
arguments and sets ``func`` to the library call that does the work.

Errors: a bad argument gives one line, ``leanconv COMMAND: error: MESSAGE``, and exit code 2 --
whether argparse finds it (types below, ``choices``) or the library does (a ``ValueError``
raised at construction, a missing input file; :func:`main` is the one place that prints these).
Failures while the work runs (a corrupt checkpoint, a diverging loss) give one line and exit 1.
"""

from __future__ import annotations

import argparse
import sys

from .layers import available_convs, conv_hparams
from .layers._utils import as_fraction

__all__ = ["add_conv_arguments", "hparams_from_args", "main"]

# Raised by a subcommand for a bad argument: main() prints one line and exits with code 2.
_USAGE_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage of a conv-taking subcommand runs to ~20 lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _model_name(text: str) -> str:
    from .models import available_models

    names = available_models()
    if text not in names:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; available models: {', '.join(names)}")
    return text


def _input_size(text: str) -> str:
    """``224``, ``32x32`` or ``'cifar 32x32'`` (``leanconv.tables.parse_input``), sizes >= 1."""
    from .tables import parse_input

    try:
        _, (h, w) = parse_input(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if min(h, w) < 1:
        raise argparse.ArgumentTypeError(f"expected a size >= 1 (e.g. 224, 32x32), got {text!r}")
    return text


def _existing_file(text: str) -> str:
    import os

    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


# ----------------------------------------------------------------------------------------------
# Conv hyperparameters: one flag per constructor argument name (--split-ratio -> split_ratio),
# generated from the registry so that a name travels unchanged from the command line to the module.
# ----------------------------------------------------------------------------------------------
def _all_hparams() -> dict[str, object]:
    merged: dict[str, object] = {}
    for name in available_convs():
        for key, default in conv_hparams(name).items():
            merged.setdefault(key, default)
    return merged


def parse_hparam_value(text: str, default: object) -> object:
    """Parse a flag value with the type of the constructor default (``"1/2"`` is a number)."""
    if isinstance(default, bool) or text.lower() in ("true", "false"):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, str):
        return text  # string-valued hparams: "none" is a valid choice (SlimConv flipping="none")
    if text.lower() == "none":
        return None
    try:
        number = as_fraction(text)
    except (ValueError, ZeroDivisionError):
        return text
    if isinstance(default, int) and number.denominator == 1:
        return int(number)
    if default is None and number.denominator == 1 and "." not in text:
        return int(number)
    return float(number)


def add_conv_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """``--conv NAME`` (or ``--convs a,b,c``) plus one flag per paper hyperparameter."""
    if multiple:
        parser.add_argument("--convs", default=",".join(available_convs()),
                            help=f"comma-separated conv types from: {', '.join(available_convs())}")
    else:
        parser.add_argument("--conv", default="vanilla", choices=available_convs(),
                            help="convolution type placed by the model (default: vanilla)")
    group = parser.add_argument_group("conv hyperparameters (only those of the chosen conv apply)")
    for key, default in _all_hparams().items():
        group.add_argument(
            "--" + key.replace("_", "-"), dest="hp_" + key, default=None, metavar="V",
            type=lambda text, d=default: parse_hparam_value(text, d),
            help=f"(default {default!r})",
        )


def hparams_from_args(args: argparse.Namespace, conv: str | None = None) -> dict[str, object]:
    """The hyperparameters given on the command line that ``conv`` accepts.

    A flag given for a conv that does not take it is an error when a single ``--conv`` is used;
    with ``--convs`` each conv receives only the flags it understands.
    """
    given = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None}
    if conv is None:
        return given
    accepted = conv_hparams(conv)
    if hasattr(args, "conv") and not hasattr(args, "convs"):
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ValueError(
                f"--{unknown[0].replace('_', '-')} does not apply to conv {conv!r}; "
                f"its hyperparameters are: "
                f"{', '.join('--' + k.replace('_', '-') for k in accepted) or '(none)'}"
            )
    return {k: v for k, v in given.items() if k in accepted}


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------
def _add_convs(sub) -> None:
    p = sub.add_parser("convs", help="list the conv types and their hyperparameters")

    def run(args):
        for name in available_convs():
            hp = ", ".join(f"{k}={v!r}" for k, v in conv_hparams(name).items())
            print(f"{name:10s} {hp}")

    p.set_defaults(func=run)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="latency, training throughput and backward memory of conv types vs vanilla",
        description="Measure every conv type on the same architecture side by side and print "
        "ratios to vanilla. Only meaningful when nothing else runs on the cores.")
    p.add_argument("model", type=_model_name, help="model name (see leanconv.available_models())")
    add_conv_arguments(p, multiple=True)
    p.add_argument("--batch", type=_int_list, default=[1, 32], metavar="B[,B...]",
                   help="inference batch sizes (default: 1,32)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="intra-op threads for every measurement (default: 1)")
    p.add_argument("--train", action="store_true",
                   help="also measure training images/s and memory held for backward")
    p.add_argument("--train-batch", type=_positive_int, default=None,
                   help="training batch size (default: the largest --batch)")
    p.add_argument("--train-memory-format", choices=("contiguous", "channels_last"),
                   default="contiguous",
                   help="layout of model and batch in the training measurement (default: "
                   "contiguous)")
    p.add_argument("--input", type=_positive_int, default=32,
                   help="input height = width (default: 32)")
    p.add_argument("--classes", type=_positive_int, default=10,
                   help="number of classes (default: 10)")
    p.add_argument("--inference-path", choices=("eager", "prepared", "compiled"), default="eager",
                   help="eager: model.eval(); prepared: leanconv.prepare_for_inference; "
                   "compiled: prepared + torch.compile (default: eager)")
    p.add_argument("--rounds", type=_positive_int, default=3,
                   help="interleaved rounds over the conv types (default: 3)")
    p.add_argument("--min-run-time", type=_positive_float, default=0.5,
                   help="seconds per latency measurement and round (default: 0.5)")
    p.add_argument("--train-steps", type=_positive_int, default=5,
                   help="timed training steps per round (default: 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="add a 'planned' row: the network of a `leanconv plan` file")

    def run(args):
        import json

        from .bench import bench_model, format_table, report_json

        convs = [c.strip() for c in args.convs.split(",") if c.strip()]
        plan = None
        if args.plan is not None:
            from .plan import load_plan

            plan = load_plan(args.plan)  # a PlanError is a ValueError: main() prints one line
        report = bench_model(
            args.model, convs, input_size=args.input, num_classes=args.classes, plan=plan,
            hparams={c: hparams_from_args(args, c) for c in convs},
            batches=args.batch, threads=args.threads, train=args.train,
            train_batch=args.train_batch, train_memory_format=args.train_memory_format,
            inference_path=args.inference_path,
            rounds=args.rounds, min_run_time=args.min_run_time, train_steps=args.train_steps,
            device=args.device, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        print(format_table(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report_json(report), f, indent=1)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leanconv",
        description="Slim convolutions (SlimConv, SPConv, SCConv, CompConv): build, profile, "
        "train, compare and benchmark.",
    )
    parser.add_argument(
        "--no-tune-allocator", action="store_true",
        help="keep glibc malloc's defaults (by default freed activation memory stays in the heap "
        "instead of being unmapped, which spares a page fault per 4 KiB on every forward; see "
        "leanconv.runtime)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="parameters, MACs (= the papers' FLOPs) and a per-layer "
                       "table of a model, counted on the meta device")
    p.add_argument("model", type=_model_name,
                   help="model name (see `leanconv.available_models()`)")
    add_conv_arguments(p)
    p.add_argument("--input", type=_input_size, default=None, metavar="SIZE",
                   help="input size: 224, 32x32 or 'cifar 32x32'; <= 64 picks the CIFAR build "
                   "of models that have one (default: the model's, 32 for CIFAR-only models "
                   "such as resnet20, else 224)")
    p.add_argument("--classes", type=_positive_int, default=None, help="classifier width")
    p.add_argument("--in-channels", type=_positive_int, default=None,
                   help="input channels (default 3)")
    p.add_argument("--layers", action="store_true", help="print one line per layer")
    p.add_argument("--elementwise", action="store_true",
                   help="also count norm / activation / elementwise / pooling ops")
    p.add_argument("--counter", default="macs", choices=("macs", "macs+bn", "macs+bn4+pool+bias"),
                   help="counting convention of the 'counted' total (docs/reproduction.md)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the report as JSON")

    def run(args):
        import json

        from .models import default_input_size
        from .profile import profile
        from .tables import build_model, parse_input

        size = args.input or str(default_input_size(args.model))
        _, (h, w) = parse_input(size)
        hp = hparams_from_args(args, args.conv)
        model, name = build_model(args.model, args.conv, input=size, num_classes=args.classes,
                                  in_channels=args.in_channels, **hp)
        try:
            report = profile(model, (h, w), count_elementwise=args.elementwise,
                             counter=args.counter)
        except RuntimeError as e:  # e.g. a kernel larger than the downsampled map
            raise ValueError(f"--input {h}x{w}: {name} cannot run at this size "
                             f"({str(e).splitlines()[0]})") from None
        print(f"{name}  conv={args.conv}" + "".join(f" {k}={v}" for k, v in hp.items()))
        print(report.table(layers=args.layers))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"model": name, "conv": args.conv, "hparams": hp,
                           **report.to_dict()}, handle, indent=2)

    p.set_defaults(func=run)


def _add_tables(sub) -> None:
    p = sub.add_parser("tables", help="reproduce the papers' Params/FLOPs rows of a targets CSV")
    p.add_argument("--targets", type=_existing_file, default=None, metavar="CSV",
                   help="CSV with columns paper,table,input,classes,model,conv,hparams,"
                   "params_M,macs_G (default: the papers' 66 rows shipped with leanconv, "
                   "leanconv/targets/complexity.csv; see docs/reproduction.md)")
    p.add_argument("--markdown", metavar="OUT.md", default=None, help="write a markdown table")
    p.add_argument("--json", metavar="OUT.json", default=None,
                   help="write one object per CSV row with measured_params_M / measured_macs_G")
    p.add_argument("--rows", type=_int_list, default=None, metavar="1,2,5",
                   help="only these 1-based CSV rows")
    p.add_argument("--counter", default=None, choices=("macs", "macs+bn", "macs+bn4+pool+bias"),
                   help="one counting convention for every row (default: each paper's own)")

    def run(args):
        from .tables import run_tables

        run_tables(args.targets, markdown=args.markdown, json_path=args.json, rows=args.rows,
                   counter=args.counter)

    p.set_defaults(func=run)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on a dataset with a recipe (torchrun for many processes)",
        description="Train MODEL with conv NAME. Writes config.yaml/json, metrics.csv/jsonl, "
        "last.pt and best.pt to --out. Under `torchrun --nproc_per_node N` the same command "
        "runs data-parallel.")
    p.add_argument("model", type=_model_name, help="model name (see leanconv.available_models())")
    add_conv_arguments(p)
    p.add_argument("--data", default=None,
                   help="fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic "
                   "(default: the recipe's)")
    p.add_argument("--recipe", default=None,
                   help="recipe name (fashion-mnist, cifar, cifar-compconv, imagenet, "
                   "imagenet-cosine) or a .yaml path (default: the dataset's)")
    p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-CONV-DATA)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--epochs", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="per process")
    p.add_argument("--lr", type=_positive_float, default=None, help="(peak) learning rate")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--schedule", choices=("step", "cosine", "onecycle", "constant"), default=None)
    p.add_argument("--seed", type=int, default=None, help="default 0; a seed repeats a run")
    p.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                   help="train on a fixed random subset of N images (quick runs)")
    p.add_argument("--test-subset", type=_positive_int, default=None, metavar="N",
                   help="evaluate on a fixed random subset of N test images")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="turn off the dataset's training augmentation")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision (bf16 on CPU; fp16 or bf16 on CUDA)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="train in the channels_last memory format (on the 2-core test machine "
                   "1.2x faster for a vanilla ResNet-56, slower for SlimConv; "
                   "docs/performance.md)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for imagefolder (default 0)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from last.pt (or from CHECKPOINT), exactly")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="a plan from `leanconv plan`: each planned layer gets its chosen conv "
                   "(recorded in the checkpoints; --conv must stay vanilla)")

    def run(args):
        import logging
        import os

        from .checkpoint import CheckpointError
        from .data import DataError
        from .train import TrainError, resolve_config, resume_config, train

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        hparams = hparams_from_args(args, args.conv)
        overrides = dict(
            model=args.model, conv=args.conv, data=args.data, data_dir=args.data_dir,
            out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
            schedule=args.schedule, seed=args.seed, train_subset=args.train_subset,
            test_subset=args.test_subset, augment=args.augment, amp=args.amp,
            channels_last=args.channels_last, workers=args.workers, device=args.device)
        if args.resume and args.out is None and args.resume is True:
            raise ValueError("--resume needs --out DIR (or --resume CHECKPOINT)")
        try:
            if args.plan is not None:
                from .plan import load_plan

                overrides["plan"] = load_plan(args.plan).to_dict()
            if args.resume:
                path = args.resume if args.resume is not True else f"{args.out}/last.pt"
                config = resume_config(path, recipe=args.recipe, hparams=hparams or None,
                                       **overrides)
            else:
                if args.out is None:
                    conv = "planned" if args.plan else args.conv
                    overrides["out"] = f"runs/{args.model}-{conv}-{args.data or 'default'}"
                config = resolve_config(args.recipe, hparams=hparams, **overrides)
        except (DataError, TrainError) as e:  # a bad --data, --recipe or option value
            raise ValueError(str(e)) from None
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        # a bad conv hyperparameter is a usage error too: build on the meta device (no memory,
        # no data read) so that it is found before training starts
        import torch

        from .data import dataset_info
        from .models import create_model

        info = dataset_info(config.data)
        try:
            with torch.device("meta"):
                create_model(config.model, conv=config.conv, num_classes=info.num_classes,
                             in_channels=info.in_channels, **config.hparams)
        except TypeError as e:
            raise ValueError(f"cannot build {config.model} with conv={config.conv}: {e}") from None
        try:
            result = train(config, resume=args.resume)
        except (CheckpointError, DataError, TrainError) as e:
            raise SystemExit(f"error: {e}") from None
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"best test top-1 {100 * result.best_top1:.2f}%; run saved in {result.out}")

    p.set_defaults(func=run)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a checkpoint on a test set",
                       description="Rebuild the model a checkpoint describes and report test "
                       "top-1, top-5 and loss (the run's numbers, exactly, on its dataset).")
    p.add_argument("checkpoint", type=_existing_file,
                   help="a last.pt or best.pt written by `leanconv train`")
    p.add_argument("--data", default=None, help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="default: the run's eval batch size")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="OUT", default=None,
                   help='write {"top1": ..., "top5": ..., "loss": ...} (fractions) to OUT')

    def run(args):
        import json

        from .checkpoint import CheckpointError
        from .data import DataError
        from .train import TrainError, evaluate_checkpoint

        try:
            res = evaluate_checkpoint(args.checkpoint, data=args.data, data_dir=args.data_dir,
                                      batch_size=args.batch_size, device=args.device)
        except (CheckpointError, DataError, TrainError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"top1 {100 * res['top1']:.2f}%  top5 {100 * res['top5']:.2f}%  "
              f"loss {res['loss']:.4f}  ({res['count']} test images)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({k: res[k] for k in ("top1", "top5", "loss")}, f, indent=1)

    p.set_defaults(func=run)


def _add_compare(sub) -> None:
    from .compare import BUDGETS, DEFAULT_CONVS

    p = sub.add_parser(
        "compare", help="the side-by-side study: complexity, speed and accuracy of conv types",
        description="Train and measure MODEL with every conv type on one dataset: params, MACs, "
        "latency at batch 1/32 and training img/s and backward memory as ratios to vanilla "
        "(measured in the same run), and test top-1 over seeds. Writes results.md, "
        "results.json, pareto.png and the resolved config to --out; re-running with the same "
        "--out reuses finished entries. Budgets: "
        + "; ".join(f"{b.name}: {b.description}" for b in BUDGETS.values()))
    p.add_argument("--model", type=_model_name, default="resnet20",
                   help="model name (default: resnet20)")
    add_conv_arguments(p, multiple=True)
    p.set_defaults(convs=",".join(DEFAULT_CONVS))
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist | cifar10 | cifar100 | synthetic (default: fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help="quick (default, < 10 min on 2 cores), standard, full, tiny (tests)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="number of seeds (default: budget's)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--recipe", default=None, help="training recipe (default: the dataset's)")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="override the budget's train subset (0 = full train set)")
    p.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="override the budget's test subset (0 = full test set)")
    p.add_argument("--batch", type=_int_list, default=None, metavar="B[,B...]",
                   help="inference latency batch sizes (default: 1,32)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op threads of the speed measurements (default: 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--plan-max-macs", type=_positive_float, default=None, metavar="F",
                   help="MAC budget (fraction of vanilla's) of the 'planned' row: the network "
                   "`leanconv plan` chooses among the study's convs for training on this "
                   "machine (default: 0.8; tiny budget: no planned row)")
    p.add_argument("--no-plan", action="store_true", help="no 'planned' row")
    p.add_argument("--plan", default=None, metavar="PLAN.json", type=_existing_file,
                   help="the 'planned' row is this plan (from `leanconv plan`) instead of one "
                   "made here")
    p.add_argument("--time-budget", type=_non_negative_float, default=None, metavar="SECONDS",
                   help="size the train subset so that the study takes SECONDS (quick: 540; "
                   "0 = no sizing)")

    def run(args):
        import logging

        from .checkpoint import CheckpointError
        from .compare import resolve_compare_config, run_compare
        from .data import DataError
        from .train import TrainError

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                                datefmt="%H:%M:%S")
        convs = [c.strip() for c in args.convs.split(",") if c.strip()]
        try:
            config = resolve_compare_config(
                args.budget, model=args.model, convs=convs, data=args.data,
                hparams={c: hparams_from_args(args, c) for c in convs}, seeds=args.seeds,
                data_dir=args.data_dir, recipe=args.recipe, epochs=args.epochs,
                train_subset=args.train_subset,
                test_subset=args.test_subset, batches=args.batch,
                threads=args.threads, device=args.device, out=args.out,
                plan_max_macs=args.plan_max_macs, plan_file=args.plan)
            if args.no_plan:
                config.plan_max_macs = None
            if args.time_budget is not None:
                config.time_budget = args.time_budget or None
        except (DataError, TrainError) as e:  # a bad --data or --recipe
            raise ValueError(str(e)) from None
        try:
            run_compare(config)
        except (CheckpointError, DataError, TrainError) as e:
            raise SystemExit(f"error: {e}") from None

    p.set_defaults(func=run)


def _add_plan(sub) -> None:
    from .plan import DEFAULT_CACHE, OBJECTIVES

    p = sub.add_parser(
        "plan", help="choose each layer's conv from times measured on this machine",
        description="Time every candidate conv (vanilla, each conv type with its paper defaults, "
        "variants and width-aligned variants) at each replaceable layer's shape in its host "
        "context (conv + BN + ReLU), choose per layer the fastest network under a MAC budget "
        "(or the leanest under a time budget), then time the planned network whole against "
        "vanilla. Measured times are cached per machine, so planning again measures nothing "
        "new. Only meaningful when nothing else runs on the cores.")
    p.add_argument("model", type=_model_name, help="model name (see leanconv.available_models())")
    p.add_argument("--input", type=_positive_int, default=32,
                   help="input height = width (default: 32)")
    p.add_argument("--batch", type=_positive_int, default=128, help="batch size (default: 128)")
    p.add_argument("--classes", type=_positive_int, default=10,
                   help="number of classes (default: 10)")
    p.add_argument("--in-channels", type=_positive_int, default=3,
                   help="input channels (default: 3)")
    p.add_argument("--objective", choices=OBJECTIVES, default="inference",
                   help="inference: best of eager and prepare_for_inference; training: forward "
                   "+ backward + SGD step, best of NCHW and channels_last (default: inference)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-macs", type=_positive_float, default=None, metavar="F",
                        help="MAC budget as a fraction of vanilla's (default: 1.0); the "
                        "predicted time is minimised")
    budget.add_argument("--max-time", type=_positive_float, default=None, metavar="F",
                        help="time budget as a fraction of vanilla's predicted time; the MACs "
                        "are minimised")
    p.add_argument("--min-macs", type=_non_negative_float, default=None, metavar="F",
                   help="with the MAC budget: keep at least this fraction of vanilla's MACs "
                   "(a floor against plans too lean to keep accuracy)")
    p.add_argument("--convs", default=None, metavar="NAME[,NAME...]",
                   help="candidate conv types (default: every registered one; vanilla is "
                   "always a candidate)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op threads (default: torch's, i.e. the cores)")
    p.add_argument("--rounds", type=_positive_int, default=3,
                   help="interleaved rounds (default: 3)")
    p.add_argument("--min-run-time", type=_non_negative_float, default=0.1,
                   help="seconds per candidate and round (default: 0.1)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help=f"folder of the latency tables (default: {DEFAULT_CACHE})")
    p.add_argument("--no-check", action="store_true",
                   help="skip timing the planned network whole against vanilla")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--out", default="plan.json", help="plan file to write (default: plan.json)")

    def run(args):
        from .plan import format_plan, make_plan

        convs = None
        if args.convs is not None:
            convs = [c.strip() for c in args.convs.split(",") if c.strip()]
        plan = make_plan(  # a PlanError is a ValueError: main() prints one line
            args.model, input_size=args.input, batch=args.batch, num_classes=args.classes,
            in_channels=args.in_channels, objective=args.objective, max_macs=args.max_macs,
            max_time=args.max_time, min_macs=args.min_macs, convs=convs, threads=args.threads,
            device=args.device, rounds=args.rounds, min_run_time=args.min_run_time,
            cache_dir=args.cache, check=not args.no_check,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        plan.save(args.out)
        print(format_plan(plan))
        print(f"plan written to {args.out}")

    p.set_defaults(func=run)


def _add_analyze(sub) -> None:
    from .analyze import WHATS

    p = sub.add_parser(
        "analyze", help="the papers' analysis pictures (Grad-CAM, SlimConv gates, entropy, "
        "feature maps, redundancy) from checkpoints",
        description="Run one analysis on one or more checkpoints side by side and write "
        "WHAT.json (the numbers) and one PNG per picture to --out (docs/analysis.md).")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="leanconv checkpoints (.pt)")
    p.add_argument("--what", required=True, metavar="WHAT", help=" | ".join(WHATS))
    p.add_argument("--data", default=None,
                   help="dataset of the test images (default: the first checkpoint's)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--out", default="runs/analyze", help="output folder (default: runs/analyze)")
    p.add_argument("--layer", default=None,
                   help="module name for gradcam (default: last block) and features (default: "
                   "first block)")
    p.add_argument("--images", type=_positive_int, default=4,
                   help="test images drawn by gradcam (features draws the first) (default: 4)")
    p.add_argument("--samples", type=_positive_int, default=256,
                   help="test images behind gates, entropy and redundancy (default: 256)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op threads (default: torch's; 1 is faster on a busy machine)")

    def run(args):
        import torch

        from .analyze import analyze_checkpoints
        from .checkpoint import CheckpointError
        from .data import DataError

        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            result = analyze_checkpoints(
                args.checkpoints, args.what, out=args.out, data=args.data,
                data_dir=args.data_dir, images=args.images, samples=args.samples,
                layer=args.layer)
        except (CheckpointError, DataError) as e:  # an unreadable checkpoint, a bad --data
            raise ValueError(str(e)) from None  # AnalysisError is one already: main() prints it
        for path in [*result["pictures"], f"{args.out}/{args.what}.json"]:
            print(path)

    p.set_defaults(func=run)


def _add_export(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser(
        "export", help="export a checkpoint or zoo model to ONNX / an ExportedProgram, checked",
        description="Prepare the model for inference (BN folded), export it with a dynamic batch "
        "dimension and check it against PyTorch on random inputs (and the checkpoint's test "
        "images when its dataset is here): max absolute / relative difference, and latency of "
        "ONNX Runtime (or the ExportedProgram) beside PyTorch's. Exit 1 if the difference "
        "exceeds --tolerance, 2 for a bad argument or a model that cannot export.")
    p.add_argument("source", metavar="CKPT_OR_MODEL",
                   help="a leanconv training checkpoint (last.pt / best.pt) or a model name")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="(default: onnx)")
    p.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    add_conv_arguments(p)
    p.set_defaults(conv=None)  # None: not given (a checkpoint names its own conv)
    p.add_argument("--input", default=None, metavar="SIZE",
                   help="model names only: input size, 224, 32 or 'cifar 32x32' (default: 224)")
    p.add_argument("--classes", type=_positive_int, default=None,
                   help="model names only: classifier width")
    p.add_argument("--in-channels", type=_positive_int, default=None,
                   help="model names only (default 3)")
    p.add_argument("--opset", type=_positive_int, default=None,
                   help="ONNX opset (default: the exporter's)")
    p.add_argument("--batch", type=_int_list, default=[1], metavar="B[,B...]",
                   help="latency batch sizes (default: 1)")
    p.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads (default: 1)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--tolerance", type=_non_negative_float, default=1e-4,
                   help="largest accepted relative difference (default: 1e-4)")

    def run(args):
        from .export import ExportError, export_model, load_source

        hparams = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None}
        try:  # a bad argument or a model that cannot export: main() prints one line, exit 2
            if args.conv is not None:
                hparams = hparams_from_args(args, args.conv)
            src = load_source(args.source, conv=args.conv, input=args.input,
                              num_classes=args.classes, in_channels=args.in_channels,
                              hparams=hparams)
            print(f"exporting {src.label}" + (f"; {src.note}" if src.note else ""))
            report = export_model(src.model, src.example_input, format=args.format, out=args.out,
                                  opset=args.opset, real_inputs=src.real_inputs,
                                  latency_batches=() if args.no_latency else args.batch,
                                  threads=args.threads)
        except ExportError as e:
            raise ValueError(str(e).splitlines()[0]) from None
        print(report.summary())
        if report.max_rel > args.tolerance:
            from .export import rounding_floor

            print(f"parity FAILED: max relative difference {report.max_rel:.3g} > "
                  f"{args.tolerance:g}", file=sys.stderr)
            floor = rounding_floor(src.model, src.example_input.expand(2, -1, -1, -1))
            why = ("the export is within the model's own float32 rounding (which is large "
                   "when the model has discontinuities, e.g. SRU's threshold gate)"
                   if report.max_rel <= 10 * floor else "the export adds more than rounding")
            print(f"PyTorch's own float32 output differs from float64 by {floor:.3g} "
                  f"(relative, random input): {why}", file=sys.stderr)
            return 1
        print(f"parity OK (max relative difference {report.max_rel:.3g} <= {args.tolerance:g})")
        return 0

    p.set_defaults(func=run)


_SUBCOMMANDS = [_add_convs, _add_profile, _add_tables, _add_bench, _add_plan, _add_train,
                _add_eval, _add_compare, _add_analyze, _add_export]


def main(argv: list[str] | None = None) -> int:
    """Run ``leanconv ARGV``. A bad argument ends in one line on stderr and exit code 2 (see the
    module docstring); a failure while the work runs in one line and exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.no_tune_allocator:
        from .runtime import tune_allocator

        tune_allocator()
    try:
        result = args.func(args)
    except _USAGE_ERRORS as e:  # the one error path for bad arguments
        message = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) else str(e)
        prog = f"{parser.prog} {args.command}"
        parser.exit(2, f"{prog}: error: {message} (see {prog} --help)\n")
    return int(result or 0)





if __name__ == "__main__":
    sys.exit(main())
