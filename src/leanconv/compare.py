"""``leanconv compare``: every conv type on one model and one dataset, side by side.

For each conv type the study reports

* complexity: parameters and MACs (the papers' "FLOPs") from :func:`leanconv.profile`;
* speed, measured in one process run with the rounds interleaved across conv types
  (:func:`leanconv.bench.bench_convs`): eager inference latency at batch 1 and 32 and its ratio
  to vanilla, training images/s of full SGD steps and the bytes of activations autograd keeps
  for backward (the memory a training step adds), each with its ratio to vanilla;
* accuracy: test top-1 after the budget's training (:func:`leanconv.train.train`, the
  project's one training loop), mean ± sample standard deviation over seeds. The number is the
  top-1 of the *last* epoch (the best epoch would be chosen on the test set).

Budgets (``--budget``; every value can be overridden by a flag):

=========  =====  ===================  =====================  ==================================
budget     seeds  training             test set               speed measurement
=========  =====  ===================  =====================  ==================================
tiny       1      1 epoch, 64 images,  64 images              1 round, 0.01 s, 1 step, latency
                  batch 16                                    at batch 1 and 4 (tests)
quick      1      1 epoch, fixed       full                   2 rounds x 0.2 s, 2 steps/round
                  random 20,000-image
                  subset of train
standard   1      recipe (fashion-     full                   3 rounds x 0.5 s, 5 steps/round
                  mnist: 8 epochs, the
                  full train set)
full       3      recipe epochs x 2    full                   5 rounds x 1.0 s, 10 steps/round
                  (16 on fashion-mnist)
=========  =====  ===================  =====================  ==================================

``standard`` is the protocol of the training benchmark (resnet20 on the full Fashion-MNIST
train set with the short ``fashion-mnist`` recipe). ``quick`` is sized to finish in under 10
minutes on 2 CPU cores for the six default conv types; see docs/compare.md for measured times.

Hyperparameters: module defaults, plus the command-line flags each conv accepts. One study
default differs: SlimConv's ``compression_ratio`` (k) is 1 on models built of basic blocks
(resnet20 and the other CIFAR ResNets), where k = 4/3 would narrow every block's inner width,
so that the block keeps its width (the k = 1 variant the SlimConv papers tabulate, and the
setting of the training benchmark); see :func:`study_hparams`. ``--compression-ratio``
overrides it. The resolved hyperparameters of every conv are printed and saved.

Resuming: ``--out`` holds ``config.json`` / ``config.yaml`` (the resolved study config),
``entries/`` (one JSON file per finished piece of work, written atomically: ``speed.json`` for
the side-by-side measurement of the whole conv set and ``train-<conv>-seed<k>.json`` per
training run) and ``runs/`` (the training run directories, checkpointed every epoch). Running
the same command again reuses every entry whose stored key equals the current config and
resumes an interrupted training run from its last epoch; entries made under a different config
are ignored (and overwritten when recomputed). The speed entry covers all conv types at once,
because its ratios are only fair when every type is measured in the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml

__all__ = [
    "BUDGETS",
    "JSON_COLUMNS",
    "Budget",
    "CompareConfig",
    "format_results",
    "md_columns",
    "resolve_compare_config",
    "run_compare",
    "study_hparams",
]

_logger = logging.getLogger(__name__)

DEFAULT_CONVS = ("vanilla", "spconv", "slimconv", "scconv", "compconv", "ghost")
BASELINE = "vanilla"
PLANNED = "planned"  # the row of the network `leanconv plan` chose among the study's convs

# Training- and test-set sizes, for the ETA and the sizing of the quick budget.
_TRAIN_SIZES = {"fashion-mnist": 60000, "cifar10": 50000, "cifar100": 50000, "synthetic": 512}
_TEST_SIZES = {"fashion-mnist": 10000, "cifar10": 10000, "cifar100": 10000, "synthetic": 256}
# Seconds kept free of the study's time budget for results, plot and process exit.
_BUDGET_MARGIN = 10.0
# A test image costs about a third of a training image (forward only, no augmentation).
_EVAL_COST = 1 / 3


# ----------------------------------------------------------------------------------------------
# Budgets and the resolved study configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How much work a study does. ``None`` for epochs = the recipe's; ``epochs_factor``
    multiplies the recipe's epochs (``full``)."""

    name: str
    seeds: int
    epochs: int | None
    train_subset: int | None
    test_subset: int | None
    rounds: int
    min_run_time: float
    train_steps: int
    train_warmup: int
    epochs_factor: int = 1
    batches: tuple[int, ...] = (1, 32)
    batch_size: int | None = None  # training batch size; None = the recipe's
    description: str = ""
    time_budget: float | None = None  # seconds for the whole study: sizes the train subset
    plan_max_macs: float | None = 0.8  # the planned row's MAC budget (None: no planned row)
    plan_rounds: int = 2
    plan_min_run_time: float = 0.05


BUDGETS: dict[str, Budget] = {
    "tiny": Budget("tiny", 1, 1, 64, 64, rounds=1, min_run_time=0.01, train_steps=1,
                   train_warmup=0, batches=(1, 4), batch_size=16, plan_max_macs=None,
                   plan_rounds=1, plan_min_run_time=0.0,
                   description="smoke test: 1 epoch on 64 images at batch 16, 64 test images, "
                   "latency at batch 1 and 4, no planned row"),
    "quick": Budget("quick", 1, 1, 20000, None, rounds=2, min_run_time=0.2, train_steps=2,
                    train_warmup=1, time_budget=540.0,
                    description="1 seed, 1 epoch on a fixed random train subset sized from the "
                    "throughput measured on this machine so that the study takes 9 minutes "
                    "(at most 20,000 images, the same for every conv), full test set"),
    "standard": Budget("standard", 1, None, None, None, rounds=3, min_run_time=0.5,
                       train_steps=5, train_warmup=3,
                       description="1 seed, the recipe on the full train set (the training "
                       "benchmark's protocol)"),
    "full": Budget("full", 3, None, None, None, rounds=5, min_run_time=1.0, train_steps=10,
                   train_warmup=3, epochs_factor=2,
                   description="3 seeds, twice the recipe's epochs on the full train set"),
}


@dataclass
class CompareConfig:
    """Everything that determines a study; saved as ``config.json`` / ``config.yaml``."""

    model: str = "resnet20"
    convs: list = field(default_factory=lambda: list(DEFAULT_CONVS))
    data: str = "fashion-mnist"
    data_dir: str | None = None
    budget: str = "quick"
    recipe: str | None = None  # None: the dataset's default recipe
    seeds: list = field(default_factory=lambda: [0])
    epochs: int | None = None  # None: the recipe's (times the budget's factor)
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int | None = None  # training batch size (None: the recipe's)
    hparams: dict = field(default_factory=dict)  # conv -> resolved constructor hparams
    batches: list = field(default_factory=lambda: [1, 32])  # inference latency batch sizes
    threads: int = 1  # intra-op threads of the speed measurements
    train_batch: int | None = None  # batch of the throughput/memory measurement (recipe's)
    rounds: int = 2
    min_run_time: float = 0.2
    train_steps: int = 2
    train_warmup: int = 1
    device: str = "cpu"
    out: str = "runs/compare"
    time_budget: float | None = None  # seconds for the whole study (sizes train_subset)
    plan_max_macs: float | None = None  # MAC budget of the planned row (None: no planned row)
    plan_file: str | None = None  # a plan file for the planned row instead of planning here
    plan_rounds: int = 2
    plan_min_run_time: float = 0.05


def study_hparams(model: str, conv: str, given: dict, *, num_classes: int = 10,
                  in_channels: int = 3) -> dict:
    """The hyperparameters ``conv`` gets in the study: ``given`` plus the study defaults.

    Only one default differs from the module's: SlimConv's ``compression_ratio`` (k) becomes 1
    on models built of two-conv basic blocks (CIFAR ResNets, ResNet-18/34) and on models that
    cannot be built with the module default. There SlimConv sits in the block's first conv, and
    k = 4/3 would narrow the block's inner width to C/k, so the study would compare a thinner
    network rather than a conv; k = 1 keeps the host's widths (the k = 1 variant of the SlimConv
    papers, and the setting of the training benchmark). Bottleneck models keep k = 4/3 (SlimConv
    in ``conv2``, ``conv3`` reads C/k: the paper's own ResNet-50). The check builds the model on
    the meta device (no memory, no compute).
    """
    from .layers import SlimConv
    from .models import create_model

    hparams = dict(given)
    if conv == "slimconv" and "compression_ratio" not in hparams:
        try:
            with torch.device("meta"):
                net = create_model(model, conv=conv, num_classes=num_classes,
                                   in_channels=in_channels, **hparams)
        except ValueError:
            hparams["compression_ratio"] = 1
            return hparams
        if any(isinstance(getattr(m, "conv1", None), SlimConv) and hasattr(m, "conv2")
               and not hasattr(m, "conv3") for m in net.modules()):
            hparams["compression_ratio"] = 1
    return hparams


def resolve_compare_config(
    budget: str = "quick",
    *,
    model: str = "resnet20",
    convs: Sequence[str] | str | None = None,
    data: str = "fashion-mnist",
    hparams: dict[str, dict] | None = None,
    seeds: int | None = None,
    **overrides,
) -> CompareConfig:
    """The study config of ``budget`` with every override that is not ``None``.

    ``convs`` is a list or a comma-separated string (vanilla, the baseline, is added first when
    missing); ``hparams`` maps a conv to the hyperparameters given for it; ``seeds`` is a count
    (seeds ``0 .. seeds-1``); other overrides are :class:`CompareConfig` fields.
    """
    from .data import dataset_info
    from .layers import available_convs, conv_hparams
    from .models import available_models
    from .train import load_recipe

    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r}; allowed: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    if isinstance(convs, str):
        convs = [c.strip() for c in convs.split(",") if c.strip()]
    convs = list(dict.fromkeys(convs or DEFAULT_CONVS))
    unknown = [c for c in convs if c not in available_convs()]
    if unknown:
        raise ValueError(f"unknown conv {unknown[0]!r}; available: {', '.join(available_convs())}")
    if BASELINE not in convs:
        convs.insert(0, BASELINE)
    if model not in available_models():
        raise ValueError(f"unknown model {model!r}; available models: "
                         f"{', '.join(available_models())}")
    info = dataset_info(data)
    n_seeds = b.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ValueError(f"seeds={n_seeds}; must be at least 1")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(CompareConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown compare options: {', '.join(bad)}")

    recipe_name = overrides.get("recipe") or info.default_recipe
    recipe = load_recipe(recipe_name)
    epochs = b.epochs
    if epochs is None:
        epochs = int(recipe.get("epochs", 8)) * b.epochs_factor
    given = hparams or {}
    resolved_hp = {}
    for c in convs:
        accepted = conv_hparams(c)
        hp = {k: v for k, v in given.get(c, {}).items() if k in accepted}
        resolved_hp[c] = study_hparams(model, c, hp, num_classes=info.num_classes,
                                       in_channels=info.in_channels)
    config = CompareConfig(
        model=model, convs=convs, data=data, budget=budget, recipe=recipe_name,
        seeds=list(range(n_seeds)), epochs=epochs, train_subset=b.train_subset,
        test_subset=b.test_subset, hparams=resolved_hp, batches=list(b.batches),
        batch_size=b.batch_size, rounds=b.rounds,
        min_run_time=b.min_run_time, train_steps=b.train_steps, train_warmup=b.train_warmup,
        time_budget=b.time_budget, plan_max_macs=b.plan_max_macs, plan_rounds=b.plan_rounds,
        plan_min_run_time=b.plan_min_run_time)
    if "train_subset" in overrides or "epochs" in overrides:
        config.time_budget = None  # the user sized the training: no automatic sizing
    config = replace(config, **overrides)
    if config.plan_max_macs is not None and not config.plan_max_macs > 0:
        raise ValueError(f"plan_max_macs={config.plan_max_macs}; must be a positive fraction "
                         f"of vanilla's MACs (or None for no planned row)")
    # 0 = the whole split
    config.train_subset = config.train_subset or None
    config.test_subset = config.test_subset or None
    if config.train_batch is None:
        config.train_batch = config.batch_size or int(recipe.get("batch_size", 128))
    config.batches = [int(x) for x in config.batches]
    if not config.batches or min(config.batches) < 1:
        raise ValueError(f"batches={config.batches}; must be positive integers")
    return config


# ----------------------------------------------------------------------------------------------
# Entries: small JSON files written atomically, reused when their key equals the current one
# ----------------------------------------------------------------------------------------------
def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_entry(path: Path, key: dict) -> dict | None:
    """The entry at ``path`` if it exists, parses and was made under ``key``."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != _jsonable(key):
        return None
    return entry


def _speed_key(c: CompareConfig, input_shape, num_classes, plan: dict | None = None) -> dict:
    return {"model": c.model, "convs": c.convs, "hparams": c.hparams, "data": c.data,
            "plan": None if plan is None else plan["layers"],
            "input_shape": list(input_shape), "num_classes": num_classes,
            "batches": c.batches, "threads": c.threads, "train_batch": c.train_batch,
            "rounds": c.rounds, "min_run_time": c.min_run_time, "train_steps": c.train_steps,
            "train_warmup": c.train_warmup, "device": c.device, "torch": torch.__version__}


def _train_config(c: CompareConfig, conv: str, seed: int, runs: Path, plan: dict | None = None):
    """The :class:`leanconv.train.TrainConfig` of one (conv, seed) run and its reuse key;
    ``conv`` :data:`PLANNED` is the vanilla model with ``plan`` applied."""
    from .train import _RESUME_FREE, resolve_config

    planned = conv == PLANNED
    tc = resolve_config(c.recipe, model=c.model, conv="vanilla" if planned else conv,
                        hparams={} if planned else dict(c.hparams[conv]),
                        plan=plan if planned else None,
                        data=c.data, data_dir=c.data_dir, epochs=c.epochs, seed=seed,
                        batch_size=c.batch_size,
                        train_subset=c.train_subset, test_subset=c.test_subset,
                        device=c.device, out=str(runs / "pending"))
    key = {k: v for k, v in asdict(tc).items() if k not in _RESUME_FREE}
    digest = hashlib.sha1(json.dumps(_jsonable(key), sort_keys=True).encode()).hexdigest()[:8]
    tc.out = str(runs / f"{conv}-seed{seed}-{digest}")
    return tc, key


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------
def _fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _environment(c: CompareConfig) -> dict:
    from .bench import environment

    env = environment(c.threads, c.device)
    env["latency_threads"] = c.threads
    env["training_threads"] = torch.get_num_threads()
    env["platform"] = platform.platform()
    return env


def _measure_speed(c: CompareConfig, info, say: Callable[[str], None],
                   plan: dict | None = None) -> dict:
    """Complexity + speed of every conv (and of the planned network, given ``plan``) in one
    :func:`bench_convs` run (ratios to vanilla)."""
    from .bench import bench_convs, report_json
    from .models import create_model

    def build(conv: str):
        if conv == PLANNED:
            return create_model(c.model, num_classes=info.num_classes,
                                in_channels=info.in_channels, plan=plan)
        return create_model(c.model, conv=conv, num_classes=info.num_classes,
                            in_channels=info.in_channels, **c.hparams.get(conv, {}))

    input_shape = (info.in_channels, info.image_size, info.image_size)
    report = bench_convs(
        build, c.convs + ([PLANNED] if plan is not None else []), input_shape,
        batches=c.batches, threads=c.threads, train=True,
        train_batch=c.train_batch, num_classes=info.num_classes, rounds=c.rounds,
        min_run_time=c.min_run_time, train_steps=c.train_steps, train_warmup=c.train_warmup,
        device=c.device, baseline=BASELINE, title=f"{c.model} on {c.data}",
        progress=lambda msg: say(f"[speed] {msg}"))
    out = report_json(report)
    out.pop("raw", None)  # per-call times: large and not needed for the study
    return out


def _summarise_run(result_history: list, run_dir: str, seconds: float) -> dict:
    last = result_history[-1]
    return {"top1": last["test_top1"], "top5": last["test_top5"],
            "best_top1": max(r["test_top1"] for r in result_history),
            "epochs": len(result_history),
            "train_time_s": sum(r["time"] for r in result_history),
            "run_images_per_s": statistics.fmean(r["images_per_s"] for r in result_history),
            "wall_time_s": seconds, "run_dir": run_dir}


def run_compare(
    config: CompareConfig,
    *,
    progress: Callable[[str], None] | None = None,
    trainer: Callable | None = None,
    print_table: bool = True,
) -> dict:
    """Run (or finish) the study ``config`` describes; returns the ``results.json`` content.

    ``trainer`` is :func:`leanconv.train.train` by default (injectable for tests).
    Writes ``config.json``, ``config.yaml``, ``entries/*.json``, ``runs/``, ``results.json``,
    ``results.md`` and ``pareto.png`` (when matplotlib is installed) to ``config.out``.
    """
    from .data import dataset_info
    from .train import train as default_trainer

    say = progress or _logger.info
    trainer = trainer or default_trainer
    c = config
    out = Path(c.out)
    entries, runs = out / "entries", out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    config_dict = _jsonable(asdict(c))
    _write_json(out / "config.json", config_dict)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(config_dict, f, sort_keys=False)
    info = dataset_info(c.data)
    env = _environment(c)
    started = time.perf_counter()
    stats = {"reused": [], "computed": []}
    sized = c.time_budget is not None and c.train_subset is not None
    say(f"compare {c.model} on {c.data}, budget {c.budget}: {', '.join(c.convs)}"
        + (f" + {PLANNED} (max {c.plan_max_macs} x vanilla's MACs)" if c.plan_max_macs else "")
        + f"; seeds {c.seeds}, {c.epochs} epoch(s)"
        + (f" on at most {c.train_subset} train images, sized to finish the study in "
           f"{_fmt_s(c.time_budget)} (study ETA {_fmt_s(c.time_budget)})" if sized else
           f" on {c.train_subset} train images" if c.train_subset else "")
        + f"; speed with {c.threads} thread(s), training with {env['training_threads']}; "
        f"output in {out}")
    for conv in c.convs:
        if c.hparams.get(conv):
            say(f"  {conv}: " + ", ".join(f"{k}={v}" for k, v in c.hparams[conv].items()))
    input_shape = (info.in_channels, info.image_size, info.image_size)

    # 0. the planned network: per-layer choice among the study's convs, from measured times ----
    plan = None
    if c.plan_file is not None:
        from .plan import load_plan

        plan = load_plan(c.plan_file).to_dict()
        if plan["model"] != c.model:
            raise ValueError(f"--plan {c.plan_file} was made for model {plan['model']!r}, "
                             f"not {c.model!r}")
        say(f"[plan] the planned row is {c.plan_file}")
    elif c.plan_max_macs is not None:
        plan = _make_plan(c, info, entries, stats, say)
    rows_convs = c.convs + ([PLANNED] if plan is not None else [])

    # 1. complexity and speed, all conv types in one run --------------------------------------
    key = _speed_key(c, input_shape, info.num_classes, plan)
    speed = _load_entry(entries / "speed.json", key)
    if speed is not None and any(r.get("error") for r in speed["report"]["rows"]):
        speed = None  # a conv that failed may work now: measure the set again
    if speed is None:
        say(f"[speed] measuring {len(rows_convs)} networks side by side "
            f"(batches {c.batches}, {c.rounds} interleaved rounds)")
        t0 = time.perf_counter()
        report = (_measure_speed(c, info, say) if plan is None
                  else _measure_speed(c, info, say, plan=plan))
        speed = {"key": key, "report": report, "seconds": time.perf_counter() - t0}
        _write_json(entries / "speed.json", speed)
        stats["computed"].append("speed")
        say(f"[speed] done in {_fmt_s(speed['seconds'])}")
    else:
        stats["reused"].append("speed")
        say("[speed] reusing entries/speed.json")
    speed_rows = {r["conv"]: r for r in speed["report"]["rows"]}

    # 2. training, one entry per (conv, seed) -------------------------------------------------
    per_image = {}  # predicted seconds per training image, from the measured throughput
    if sized:
        per_image = _size_training(c, speed_rows, rows_convs, key, entries, runs, trainer,
                                   started, say)
        config_dict = _jsonable(asdict(c))
        _write_json(out / "config.json", config_dict)
        with open(out / "config.yaml", "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)
    jobs = [(conv, seed) for conv in rows_convs for seed in c.seeds]
    done: dict[tuple[str, int], dict] = {}
    errors: dict[str, str] = {}
    plans = {}
    for conv, seed in jobs:
        tc, tkey = _train_config(c, conv, seed, runs, plan)
        plans[conv, seed] = (tc, tkey)
        entry = _load_entry(entries / f"train-{conv}-seed{seed}.json", tkey)
        if entry is not None:
            done[conv, seed] = entry
            stats["reused"].append(f"train-{conv}-seed{seed}")
    todo = [j for j in jobs if j not in done]
    if done:
        say(f"[train] reusing {len(done)} finished run(s); {len(todo)} to go")

    n_train = c.train_subset or _TRAIN_SIZES.get(c.data)
    n_test = c.test_subset or _TEST_SIZES.get(c.data, 0)
    if not per_image:  # not calibrated: scale the speed stage's throughput to all threads
        for conv in rows_convs:
            ips = (speed_rows.get(conv) or {}).get("train_images_per_s")
            if ips:  # measured with c.threads threads; training uses all of them
                per_image[conv] = c.threads / (ips * max(1, env["training_threads"]))

    def predicted(conv: str) -> float | None:
        if n_train is None or conv not in per_image:
            return None
        return per_image[conv] * (n_train * c.epochs + _EVAL_COST * n_test * c.epochs)

    calib_actual, calib_pred = 0.0, 0.0
    for i, (conv, seed) in enumerate(todo):
        tc, tkey = plans[conv, seed]
        remaining = [predicted(cv) for cv, _ in todo[i:]]
        factor = calib_actual / calib_pred if calib_pred else 1.0
        eta = None if any(p is None for p in remaining) else factor * sum(remaining)
        say(f"[train {i + 1}/{len(todo)}] {conv} seed {seed}: {tc.epochs} epoch(s)"
            + (f" on {n_train} images" if n_train else "")
            + f"; study ETA {_fmt_s(eta)} (elapsed {_fmt_s(time.perf_counter() - started)})")
        resume = (Path(tc.out) / "last.pt").exists()
        if resume:
            say(f"  resuming the interrupted run in {tc.out}")
        t0 = time.perf_counter()
        try:
            result = trainer(tc, resume=resume)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one conv that fails must not sink the study
            message = f"seed {seed}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            errors.setdefault(conv, message)
            say(f"  {conv} {message}")
            continue
        seconds = time.perf_counter() - t0
        entry = {"key": tkey, "conv": conv, "seed": seed,
                 **_summarise_run(result.history, tc.out, seconds)}
        _write_json(entries / f"train-{conv}-seed{seed}.json", entry)
        done[conv, seed] = entry
        stats["computed"].append(f"train-{conv}-seed{seed}")
        p = predicted(conv)
        if p:
            calib_actual, calib_pred = calib_actual + seconds, calib_pred + p
        say(f"  {conv} seed {seed}: test top-1 {100 * entry['top1']:.2f}% "
            f"in {_fmt_s(seconds)}")

    # 3. results ---------------------------------------------------------------------------------
    rows = []
    for conv in rows_convs:
        s = speed_rows.get(conv, {})
        runs_done = [done[conv, seed] for seed in c.seeds if (conv, seed) in done]
        top1 = [r["top1"] for r in runs_done]
        row = {
            "conv": conv,
            "hparams": c.hparams.get(conv, {}) if conv != PLANNED else {
                "plan": ", ".join(f"{k} x{v}" for k, v in _plan_counts(plan).items())},
            "params": s.get("params"),
            "macs": s.get("macs"),
            "params_ratio": s.get("params_ratio"),
            "mac_reduction": s.get("mac_reduction"),
        }
        for b in c.batches:
            lat = (s.get("latency") or {}).get(str(b)) or (s.get("latency") or {}).get(b) or {}
            row[f"latency_b{b}_ms"] = 1e3 * lat["median"] if lat.get("median") else None
            row[f"latency_b{b}_iqr_ms"] = 1e3 * lat["iqr"] if lat.get("iqr") is not None \
                else None
            row[f"latency_b{b}_ratio"] = lat.get("ratio")
        row.update({
            "train_images_per_s": s.get("train_images_per_s"),
            "train_ratio": s.get("train_ratio"),
            "backward_bytes": s.get("backward_bytes"),
            "memory_ratio": s.get("memory_ratio"),
            "peak_bytes": s.get("peak_bytes"),  # accelerator peak allocation (None on CPU)
            "top1_mean": statistics.fmean(top1) if top1 else None,
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "top1_runs": top1,
            "seeds": [r["seed"] for r in runs_done],
            "epochs": c.epochs,
            "train_time_s": statistics.fmean(r["train_time_s"] for r in runs_done)
            if runs_done else None,
            # throughput of the accuracy runs themselves (all threads, data loading included)
            "run_images_per_s": statistics.fmean(r["run_images_per_s"] for r in runs_done)
            if runs_done else None,
            "error": s.get("error") or errors.get(conv),
        })
        rows.append(row)
    _add_paired_differences(rows, done)

    env["load_average_end"] = env_load()
    results = {
        "title": f"leanconv compare: {c.model} on {c.data}, budget {c.budget}",
        "config": config_dict,
        "budget": asdict(BUDGETS[c.budget]),
        "env": env,
        "speed_env": speed["report"].get("env"),
        "speed_settings": speed["report"].get("settings"),
        "rows": rows,
        "plan": plan,
        "seconds": time.perf_counter() - started,
        "reused": stats["reused"],
        "computed": stats["computed"],
    }
    results = _jsonable(results)
    _write_json(out / "results.json", results)
    text = format_results(results)
    (out / "results.md").write_text(text + "\n")
    try:
        from .plots import pareto_plot

        pareto_plot(results, out / "pareto.png")
    except ImportError as exc:
        say(f"pareto.png skipped: {exc} (pip install 'leanconv[plot]')")
    if print_table:
        print(text, flush=True)
    say(f"study finished in {_fmt_s(results['seconds'])}; {len(stats['computed'])} piece(s) "
        f"computed, {len(stats['reused'])} reused; results in {out}")
    return results


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1-30); more seeds use 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_difference(values: dict[int, float], reference: dict[int, float]
                      ) -> tuple[float, float | None, int] | None:
    """Mean of ``values[s] - reference[s]`` over the seeds ``s`` both have, the half-width of
    its 95 % t-interval (None with one seed) and the number of pairs; None without a pair.

    Pairing by seed removes what the seed does to both runs alike (data order, augmentation),
    so the interval is that of the difference, not of two independent means.
    """
    diffs = [values[s] - reference[s] for s in sorted(values) if s in reference]
    if not diffs:
        return None
    n = len(diffs)
    if n == 1:
        return diffs[0], None, 1
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return statistics.fmean(diffs), t * statistics.stdev(diffs) / math.sqrt(n), n


def _add_paired_differences(rows: list[dict], done: dict) -> None:
    """Each row's top-1 difference to vanilla, paired by seed (``top1_diff``,
    ``top1_diff_ci95`` half-width, ``top1_pairs``); None where vanilla has no common seed."""
    by_conv: dict[str, dict[int, float]] = {}
    for (conv, seed), entry in done.items():
        by_conv.setdefault(conv, {})[seed] = entry["top1"]
    reference = by_conv.get("vanilla", {})
    for row in rows:
        paired = (paired_difference(by_conv.get(row["conv"], {}), reference)
                  if row["conv"] != "vanilla" else None)
        row["top1_diff"], row["top1_diff_ci95"], row["top1_pairs"] = paired or (None, None, 0)


def accuracy_verdict(row: dict) -> str | None:
    """One plain sentence on a row's accuracy against vanilla (None without a paired run)."""
    if row.get("top1_diff") is None:
        return None
    diff, half, n = 100 * row["top1_diff"], row["top1_diff_ci95"], row["top1_pairs"]
    fewer = (f" at {row['mac_reduction']:.2f}x fewer MACs" if row.get("mac_reduction")
             else "")
    if half is None:
        return (f"{row['conv']}: {diff:+.2f} points against vanilla from one seed: too few "
                f"runs to tell from seed noise")
    low, high = diff - 100 * half, diff + 100 * half
    span = f"{diff:+.2f} points, 95 % interval {low:+.2f} to {high:+.2f}, {n} paired seeds"
    if low <= 0 <= high:
        return f"{row['conv']}: matches vanilla within seed noise{fewer} ({span})"
    word = "loses" if diff < 0 else "gains"
    return f"{row['conv']}: {word} {abs(diff):.2f} points{fewer} ({span})"


def _plan_counts(plan: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in plan["layers"]:
        counts[layer["conv"]] = counts.get(layer["conv"], 0) + 1
    return counts


def _make_plan(c: CompareConfig, info, entries: Path, stats: dict, say) -> dict:
    """The study's planned network (objective training at the study's training batch, MAC
    budget ``c.plan_max_macs``, candidates the study's convs); reused from ``entries/plan.json``
    when made under the same key. Its layer times come from the machine's latency cache."""
    from .plan import PlanError, machine_key, make_plan

    key = {"model": c.model, "convs": c.convs, "data": c.data, "train_batch": c.train_batch,
           "plan_max_macs": c.plan_max_macs, "rounds": c.plan_rounds,
           "min_run_time": c.plan_min_run_time,
           "machine": machine_key(c.device, c.threads, c.train_batch)}
    entry = _load_entry(entries / "plan.json", key)
    if entry is not None:
        stats["reused"].append("plan")
        say("[plan] reusing entries/plan.json")
        return entry["plan"]
    t0 = time.perf_counter()
    try:
        plan = make_plan(
            c.model, input_size=info.image_size, batch=c.train_batch,
            num_classes=info.num_classes, in_channels=info.in_channels, objective="training",
            max_macs=c.plan_max_macs, convs=[v for v in c.convs if v != BASELINE],
            paths=("contiguous",),  # the study trains and measures every network in NCHW
            threads=c.threads, device=c.device, rounds=c.plan_rounds,
            min_run_time=c.plan_min_run_time, check=False,
            progress=lambda msg: say(f"[plan] {msg}"))
    except PlanError as exc:
        raise ValueError(f"the planned row: {exc}") from None
    data = plan.to_dict()
    _write_json(entries / "plan.json", {"key": key, "plan": data,
                                        "seconds": time.perf_counter() - t0})
    stats["computed"].append("plan")
    t = data["totals"]
    say(f"[plan] {', '.join(f'{k} x{v}' for k, v in _plan_counts(data).items())}: "
        f"{t['mac_fraction']:.2f}x vanilla's MACs, predicted {t['predicted_speedup']:.2f}x "
        f"vanilla's training speed ({_fmt_s(time.perf_counter() - t0)})")
    return data


def _size_training(c: CompareConfig, speed_rows: dict, rows_convs: list, speed_key: dict,
                   entries: Path, runs: Path, trainer, started: float, say) -> dict:
    """Set ``c.train_subset`` so that the study ends within ``c.time_budget`` seconds.

    A calibration run (the study's own training loop, vanilla, 1 epoch on 1,024 images and
    1,000 test images: data loading and evaluation included) gives seconds per vanilla image
    here; each conv's cost is that times vanilla's / its training throughput from the speed
    stage. The subset (a multiple of the batch size, at most the budget's, at least 1,024) is
    the largest whose predicted training fits in the time left; it is the same for every conv
    and is kept in ``entries/sizing.json`` so that a resumed study trains on the same subset.
    Returns the predicted seconds per training image of each conv (for the ETA).
    """
    import shutil

    from .train import resolve_config

    key = {"speed": speed_key, "time_budget": c.time_budget, "cap": c.train_subset}
    entry = _load_entry(entries / "sizing.json", key)
    if entry is None:
        cal_train, cal_test = 1024, 1000
        tc = resolve_config(c.recipe, model=c.model, conv=BASELINE, data=c.data,
                            data_dir=c.data_dir, epochs=1, seed=0, batch_size=c.batch_size,
                            train_subset=cal_train, test_subset=cal_test, device=c.device,
                            out=str(runs / "calibration"))
        shutil.rmtree(tc.out, ignore_errors=True)
        say(f"[sizing] calibration: {BASELINE}, 1 epoch on {cal_train} images")
        t0 = time.perf_counter()
        trainer(tc, resume=False)
        seconds = time.perf_counter() - t0
        shutil.rmtree(tc.out, ignore_errors=True)
        vanilla_cost = seconds / (cal_train + _EVAL_COST * cal_test)
        base_ips = (speed_rows.get(BASELINE) or {}).get("train_images_per_s")
        per_image = {}
        for conv in rows_convs:
            ips = (speed_rows.get(conv) or {}).get("train_images_per_s")
            per_image[conv] = vanilla_cost * (base_ips / ips if base_ips and ips else 1.0)
        n_test = c.test_subset or _TEST_SIZES.get(c.data, 0)
        left = c.time_budget - (time.perf_counter() - started) - _BUDGET_MARGIN
        cost = sum(per_image.values()) * len(c.seeds) * c.epochs
        batch = c.batch_size or c.train_batch or 128
        n = c.train_subset
        if cost > 0:
            n = int((left / cost - _EVAL_COST * n_test) // batch * batch)
        n = max(min(n, c.train_subset), min(1024, c.train_subset))
        entry = {"key": key, "train_subset": n, "seconds_per_image": per_image,
                 "calibration_seconds": seconds}
        _write_json(entries / "sizing.json", entry)
    c.train_subset = entry["train_subset"]
    say(f"[sizing] {c.train_subset} train images per conv (the same for every conv) fit the "
        f"{_fmt_s(c.time_budget)} budget on this machine")
    return dict(entry["seconds_per_image"])


def env_load():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
# Keys of every results.json row, plus latency_b{B}_ms, latency_b{B}_iqr_ms and
# latency_b{B}_ratio for each latency batch size B.
JSON_COLUMNS = ("conv", "hparams", "params", "macs", "params_ratio", "mac_reduction",
                "train_images_per_s", "train_ratio", "backward_bytes", "memory_ratio",
                "peak_bytes", "top1_mean", "top1_std", "top1_runs", "top1_diff", "top1_diff_ci95",
                "top1_pairs", "seeds", "epochs",
                "train_time_s", "run_images_per_s", "error")


def md_columns(batches: Sequence[int]) -> list[str]:
    """Column headers of ``results.md`` for the latency batch sizes ``batches``."""
    cols = ["conv", "hparams", "params", "MACs", "MAC red."]
    for b in batches:
        cols += [f"latency b{b}", f"ratio b{b}"]
    return [*cols, "train img/s", "train ratio", "bwd memory", "memory ratio", "top-1 %",
            "vs vanilla", "train time"]


def _si(n, unit=""):
    from .bench import _si as si

    return si(n, unit)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _top1(row) -> str:
    if row["top1_mean"] is None:
        return "-"
    n = len(row["top1_runs"])
    text = f"{100 * row['top1_mean']:.2f}"
    if row["top1_std"] is not None:
        text += f" ± {100 * row['top1_std']:.2f}"
    return text + f" (n={n})"


def _diff(row) -> str:
    if row["conv"] == "vanilla":
        return "reference"
    if row.get("top1_diff") is None:
        return "-"
    text = f"{100 * row['top1_diff']:+.2f}"
    if row.get("top1_diff_ci95") is not None:
        text += f" ± {100 * row['top1_diff_ci95']:.2f}"
    return text


def format_results(results: dict) -> str:
    """The markdown of ``results.md``: a header on how it was measured, then the table."""
    c, env = results["config"], results["env"]
    s = results.get("speed_settings") or {}
    senv = results.get("speed_env") or {}
    load = senv.get("load_average")
    load_txt = "n/a" if not load else ", ".join(f"{v:.2f}" for v in load)
    train_txt = f"{c['epochs']} epoch(s) of recipe `{c['recipe']}`" + (
        f" on a fixed random subset of {c['train_subset']} train images" if c["train_subset"]
        else " on the full train set") + (
        f" (the same for every conv; the largest that fits the study in "
        f"{_fmt_s(c['time_budget'])} at the throughput measured on this machine, at most the "
        f"budget's cap)" if c.get("time_budget") else "") + (
        f", tested on {c['test_subset']} test images" if c["test_subset"]
        else ", tested on the full test set")
    lines = [
        f"## {results['title']}",
        "",
        f"- training: {train_txt}; seeds {c['seeds']}; top-1 = last epoch, mean ± sample std "
        f"over seeds; {env['training_threads']} training thread(s)",
        f"- speed: measured in one run, {s.get('rounds', c['rounds'])} rounds interleaved over "
        f"the conv types; eager inference latency (median per forward call) with "
        f"{c['threads']} thread(s) on {c['device']}; training img/s = SGD steps at batch "
        f"{c['train_batch']} with {c['threads']} thread(s); bwd memory = bytes of activations "
        f"saved for backward at batch {c['train_batch']}",
        f"- torch {env['torch']}, {env['cpu_count']} CPUs, load average when speed was "
        f"measured: {load_txt}; {env['platform']}",
        "",
    ]
    cols = md_columns(c["batches"])
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in results["rows"]:
        hp = ", ".join(f"{k}={v}" for k, v in row["hparams"].items()) or "defaults"
        cells = [row["conv"], hp, _si(row["params"]), _si(row["macs"]),
                 _x(row["mac_reduction"])]
        for b in c["batches"]:
            ms = row.get(f"latency_b{b}_ms")
            cells += ["-" if ms is None else f"{ms:.3g} ms", _x(row.get(f"latency_b{b}_ratio"))]
        ips = row["train_images_per_s"]
        cells += ["-" if ips is None else f"{ips:.0f}", _x(row["train_ratio"]),
                  _si(row["backward_bytes"], "B"), _x(row["memory_ratio"]), _top1(row),
                  _diff(row),
                  "-" if row["train_time_s"] is None else _fmt_s(row["train_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    verdicts = [v for v in map(accuracy_verdict, results["rows"]) if v]
    if verdicts:
        lines += ["", "Accuracy against vanilla (top-1 difference paired by seed, 95 % "
                  "t-interval):", "", *(f"- {v}" for v in verdicts)]
    for row in results["rows"]:
        if row["error"]:
            lines.append(f"\n{row['conv']}: {row['error']}")
    plan = results.get("plan")
    if plan:
        t = plan["totals"]
        lines += [
            "",
            f"planned = the vanilla network with each replaceable layer's conv chosen by "
            f"`leanconv plan` among the study's convs from times measured on this machine "
            f"({plan['machine']['capability']}, {plan['machine']['threads']} thread(s)): "
            f"objective training at batch {plan['batch']}, at most "
            f"{plan['budget'].get('max_macs')} x vanilla's MACs; predicted "
            f"{t['predicted_speedup']:.2f}x vanilla's training speed on path {plan['path']}.",
        ]
    lines += [
        "",
        "ratio = module / vanilla (latency: <= 1 is faster; train: >= 1 is faster; memory: "
        "<= 1 is smaller); MAC red. = vanilla MACs / module MACs; MACs = multiply-accumulates "
        "per image (the papers' FLOPs); vs vanilla = mean top-1 difference to vanilla in "
        "points, paired by seed, ± the half-width of its 95 % t-interval; train time = mean "
        "time of one training run's epochs (training + evaluation).",
    ]
    return "\n".join(lines)
