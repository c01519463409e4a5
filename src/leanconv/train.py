"""Training and evaluation: one loop for one process or many (``torchrun``), on CPU or CUDA.

>>> from leanconv.train import resolve_config, train
>>> config = resolve_config("fashion-mnist", model="resnet20", conv="spconv",
...                         hparams={"split_ratio": 0.5}, out="runs/sp")
>>> result = train(config)              # writes runs/sp/{config.yaml,metrics.*,last.pt,best.pt}
>>> evaluate_checkpoint("runs/sp/best.pt")["top1"]

A run directory holds the resolved config (``config.yaml`` and ``config.json``), one row per
epoch in ``metrics.csv`` and ``metrics.jsonl`` (loss, top-1, top-5 as fractions, lr, time,
images/s), and checkpoints ``last.pt`` (every epoch) and ``best.pt`` (best test top-1), both
written atomically. ``resume=True`` continues from ``last.pt`` bit-for-bit: model, optimizer,
scheduler, AMP scaler, epoch and every random stream (torch, numpy, python, the data
generator; one set per rank) are restored.

Under ``torchrun --nproc_per_node N`` the same call uses DistributedDataParallel (gloo on CPU,
nccl on CUDA), a ``DistributedSampler`` per epoch, rank-0-only logging and checkpoints, and
exact evaluation (each rank scores a disjoint shard without padding; the sums are
all-reduced). BatchNorm statistics: ``SyncBatchNorm`` on CUDA; on CPU, where it does not
exist, the running statistics are averaged over ranks at every epoch end.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import distributed as D
from .checkpoint import (
    CheckpointError,
    build_model_from_checkpoint,
    get_rng_state,
    load_checkpoint,
    load_state_into,
    save_checkpoint,
    set_rng_state,
)
from .data import build_data, dataset_info

__all__ = [
    "METRIC_FIELDS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "available_recipes",
    "evaluate",
    "evaluate_checkpoint",
    "load_recipe",
    "resolve_config",
    "resume_config",
    "train",
]

_logger = logging.getLogger(__name__)

METRIC_FIELDS = ("epoch", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                 "lr", "time", "images_per_s")


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or Inf; the last good state is in ``last.pt``."""


# ----------------------------------------------------------------------------------------------
# Configuration: a recipe (YAML shipped in leanconv/recipes) + command-line overrides
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that determines a run; saved as ``config.yaml`` and inside every checkpoint."""

    model: str = "resnet20"
    conv: str = "vanilla"
    hparams: dict = field(default_factory=dict)  # conv hyperparameters, constructor names
    plan: dict | None = None  # a leanconv plan (per-layer convs); conv is then "vanilla"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    recipe: str = "fashion-mnist"
    description: str = ""
    out: str = "runs/default"
    epochs: int = 8
    batch_size: int = 128
    eval_batch_size: int = 500
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "step"  # step | cosine | onecycle | constant
    milestones: list = field(default_factory=list)  # step: epochs where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # cosine: linear warmup
    pct_start: float = 0.3  # onecycle
    div_factor: float = 25.0  # onecycle
    final_div_factor: float = 1e4  # onecycle
    seed: int = 0
    train_subset: int | None = None  # a fixed random subset of the training set
    test_subset: int | None = None
    augment: bool = True
    image_size: int | None = None  # imagefolder crop size (default 224)
    amp: str | None = None  # None | bf16 | fp16
    channels_last: bool = False  # model (and so every activation) in channels_last memory format
    workers: int = 0  # DataLoader workers for imagefolder (0 is right on 2 cores)
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu


# Keys that may differ between a checkpoint's config and the command resuming it.
_RESUME_FREE = {"out", "data_dir", "workers", "device", "description"}
_SCHEDULES = ("step", "cosine", "onecycle", "constant")


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``leanconv/recipes``."""
    files = resources.files("leanconv") / "recipes"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict:
    """A shipped recipe by name (``cifar``, ``imagenet``, ...) or a path to a YAML file."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise TrainError(f"recipe file {name} does not exist")
        text = path.read_text()
    else:
        res = resources.files("leanconv") / "recipes" / f"{name}.yaml"
        if not res.is_file():
            raise TrainError(f"unknown recipe {name!r}; available recipes: "
                             f"{', '.join(available_recipes())} (or a path to a .yaml file)")
        text = res.read_text()
    recipe = yaml.safe_load(text) or {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise TrainError(f"recipe {name!r} has unknown keys: {', '.join(unknown)}")
    return recipe


def resolve_config(recipe: str | None = None, **overrides) -> TrainConfig:
    """The recipe's values, then every override that is not ``None``.

    Without a recipe, the dataset's default recipe is used (fashion-mnist -> ``fashion-mnist``,
    cifar10/100 -> ``cifar``, imagefolder -> ``imagenet``).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if recipe is None:
        recipe = dataset_info(overrides.get("data", TrainConfig.data)).default_recipe
    values = {"recipe": recipe, **load_recipe(recipe), **overrides}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainError(f"unknown config keys: {', '.join(unknown)}")
    config = TrainConfig(**values)
    _validate(config)
    return config


def resume_config(path, **overrides) -> TrainConfig:
    """The config saved in checkpoint ``path`` with the ``overrides`` that are not ``None``.

    :func:`train` then refuses overrides that would change the run (anything but ``out``,
    ``data_dir``, ``workers``, ``device``, and ``epochs`` of a step schedule).
    """
    from .checkpoint import load_checkpoint

    saved = load_checkpoint(path).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} has no training config")
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig(**values)
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
    dataset_info(c.data)
    if c.plan is not None:
        from .plan import PlanError, load_plan

        if c.conv != "vanilla":
            raise TrainError(f"conv={c.conv!r} with a plan: the plan chooses each layer's conv")
        try:
            plan = load_plan(c.plan, warn_machine=False)
        except PlanError as e:
            raise TrainError(str(e)) from None
        if plan.model != c.model:
            raise TrainError(f"the plan was made for model {plan.model!r}, not {c.model!r}")
    if c.schedule not in _SCHEDULES:
        raise TrainError(f"schedule={c.schedule!r}; allowed: {', '.join(_SCHEDULES)}")
    if c.optimizer not in ("sgd", "adamw"):
        raise TrainError(f"optimizer={c.optimizer!r}; allowed: sgd, adamw")
    if c.amp not in (None, "bf16", "fp16"):
        raise TrainError(f"amp={c.amp!r}; allowed: bf16, fp16")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(getattr(c, key), int) or getattr(c, key) < 1:
            raise TrainError(f"{key}={getattr(c, key)!r}; must be a positive integer")
    if not (isinstance(c.lr, int | float) and c.lr > 0):
        raise TrainError(f"lr={c.lr!r}; must be a positive number")
    c.milestones = [int(m) for m in c.milestones]
    # Checkpoints hold primitives only (weights_only=True): an exact fraction travels as "4/3".
    c.hparams = {k: str(v) if isinstance(v, Fraction) else v for k, v in c.hparams.items()}
    c.lr, c.weight_decay = float(c.lr), float(c.weight_decay)


# ----------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule (stepped every iteration)
# ----------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    if c.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                           nesterov=c.nesterov and c.momentum > 0, weight_decay=c.weight_decay)


def build_scheduler(optimizer, c: TrainConfig, steps_per_epoch: int):
    total = c.epochs * steps_per_epoch
    if c.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=c.lr, total_steps=total, pct_start=c.pct_start,
            div_factor=c.div_factor, final_div_factor=c.final_div_factor,
            cycle_momentum=c.optimizer == "sgd" and c.momentum > 0)
    warmup = round(c.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if c.schedule == "step":
            return c.gamma ** bisect.bisect_right(c.milestones, step // steps_per_epoch)
        if c.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", *,
             amp: str | None = None, env: D.DistEnv | None = None) -> dict:
    """Cross-entropy, top-1 and top-5 (fractions) over the loader; summed exactly over ranks.

    Returns ``{"loss", "top1", "top5", "count"}``.
    """
    device = torch.device(device)
    env = env or D.DistEnv(device=device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(len(labels)), dtype=torch.float64,
                                          device=device)])
    D.all_reduce_sum(sums, env)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": top1 / count, "top5": top5 / count,
            "count": int(sums[3].item())}


def evaluate_checkpoint(path, data: str | None = None, data_dir=None,
                        batch_size: int | None = None, device: str | None = None) -> dict:
    """Rebuild the checkpoint's model and score it on the test split of ``data`` (default: the
    dataset it was trained on), with the run's eval batch size, test subset and AMP setting,
    so the numbers equal those the run reported for that epoch."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config", {})
    data = data or ckpt.get("data") or config.get("data")
    same_data = data == config.get("data")
    dev = D.pick_device(0, device)
    info, _, test = build_data(
        data, batch_size=config.get("batch_size", 128),
        eval_batch_size=batch_size or config.get("eval_batch_size", 500),
        data_dir=data_dir if data_dir is not None else config.get("data_dir"),
        seed=config.get("seed", 0), image_size=config.get("image_size"),
        test_subset=config.get("test_subset") if same_data else None)
    if (info.num_classes, info.in_channels) != (ckpt["num_classes"], ckpt["in_channels"]):
        raise CheckpointError(
            f"checkpoint {path} is for {ckpt['num_classes']} classes and {ckpt['in_channels']} "
            f"input channels; dataset {data} has {info.num_classes} and {info.in_channels}")
    model = build_model_from_checkpoint(ckpt, path).to(dev)
    return evaluate(model, test, dev, amp=config.get("amp"))


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: nn.Module  # unwrapped (no DDP), on its device
    history: list  # one metrics row per epoch
    best_top1: float
    out: Path


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _write_rows(out: Path, rows: list[dict], append: bool) -> None:
    mode = "a" if append else "w"
    csv_path = out / "metrics.csv"
    header = not append or not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        if header:
            writer.writeheader()
        writer.writerows(rows)
    with open(out / "metrics.jsonl", mode) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _check_resume_config(config: TrainConfig, saved: dict, path) -> None:
    current = asdict(config)
    for key in current:
        if key in _RESUME_FREE:
            continue
        if key == "epochs" and config.schedule in ("step", "constant"):
            continue  # a step schedule can be extended
        if key in saved and saved[key] != current[key]:
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={saved[key]!r}, not "
                f"{current[key]!r}; resume with the same settings or start a new --out")


def train(config: TrainConfig, *, resume: bool | str = False) -> TrainResult:
    """Train ``config.model`` as the config says; see the module docstring for the outputs.

    ``resume``: ``True`` continues from ``<out>/last.pt``, a path continues from that file.
    Raises :class:`NonFiniteLossError` when the loss stops being finite, :class:`TrainError`,
    :class:`CheckpointError` or :class:`leanconv.data.DataError` when a run cannot start.
    """
    from torch.nn.parallel import DistributedDataParallel

    from .models import create_model

    _validate(config)
    out = Path(config.out)
    env = D.setup(config.device)
    try:
        ckpt = None
        if resume:
            path = out / "last.pt" if resume is True else Path(resume)
            ckpt = load_checkpoint(path)
            _check_resume_config(config, ckpt.get("config", {}), path)
        elif (out / "last.pt").exists():
            raise TrainError(f"{out} already holds a run (last.pt); pass --resume to continue "
                             "it or choose another --out")

        _seed_everything(config.seed)
        info, train_loader, test_loader = build_data(
            config.data, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
            data_dir=config.data_dir, augment=config.augment, seed=config.seed, rank=env.rank,
            world_size=env.world_size, train_subset=config.train_subset,
            test_subset=config.test_subset, image_size=config.image_size,
            workers=config.workers)
        try:
            model = create_model(config.model, conv=config.conv, num_classes=info.num_classes,
                                 in_channels=info.in_channels, plan=config.plan,
                                 **config.hparams)
        except (ValueError, TypeError) as e:
            what = "its plan" if config.plan else f"conv={config.conv} {config.hparams}"
            raise TrainError(f"cannot build {config.model} with {what}: {e}") from None
        if ckpt is not None:
            load_state_into(model, ckpt["state_dict"], out / "last.pt")
        plan_path = (config.plan or {}).get("path")
        if env.is_main and plan_path in ("channels_last", "contiguous") and (
                (plan_path == "channels_last") != bool(config.channels_last)):
            _logger.warning("the plan's times were measured for %s training; this run trains "
                            "in %s (%s)", plan_path,
                            "channels_last" if config.channels_last else "NCHW",
                            "pass --channels-last" if plan_path == "channels_last"
                            else "drop --channels-last")
        if env.distributed and env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(env.device)
        if config.channels_last:  # weights in NHWC: oneDNN then runs every conv (and its
            model.to(memory_format=torch.channels_last)  # output) in NHWC, for any input layout
        # Different dropout masks per rank; the same weights everywhere (DDP broadcasts them).
        torch.manual_seed(config.seed + env.rank)

        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise TrainError(f"the training set is smaller than one batch ({config.batch_size})")
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, steps_per_epoch)
        scaler = torch.amp.GradScaler(env.device.type) if config.amp == "fp16" else None
        history, best, start_epoch = [], -1.0, 0
        data_gen = getattr(train_loader, "generator", None)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, history = ckpt["epoch"], list(ckpt.get("history", []))
            best = ckpt.get("best_top1", -1.0)
            rng = ckpt.get("rng") or []
            if len(rng) == env.world_size:
                set_rng_state(rng[env.rank], data_gen)
            elif env.is_main:
                _logger.warning("checkpoint has RNG states for %d ranks, this run has %d: "
                                "continuing with fresh random streams", len(rng), env.world_size)

        ddp = model
        if env.distributed:
            ddp = DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=env.device.type == "cuda")
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

        def checkpoint(epoch: int) -> dict:
            rng = D.all_gather_objects(get_rng_state(data_gen), env)
            return {"model": config.model, "conv": config.conv, "hparams": dict(config.hparams),
                    "plan": config.plan,
                    "num_classes": info.num_classes, "in_channels": info.in_channels,
                    "data": config.data, "config": asdict(config), "epoch": epoch,
                    "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng, "metrics": history[-1] if history else None,
                    "history": history, "best_top1": best}

        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "config.yaml", "w") as f:
                yaml.safe_dump(asdict(config), f, sort_keys=False)
            (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
            _write_rows(out, history, append=False)  # a resumed run drops rows of a lost epoch
        if ckpt is None and env.is_main:  # the last good state until the first epoch ends
            save_checkpoint(checkpoint(0), out / "last.pt")
        elif ckpt is None:
            checkpoint(0)  # every rank joins the all-gather of RNG states
        if env.is_main:
            _logger.info("training %s (conv=%s%s) on %s: %d train / %d test images, %d epochs "
                         "from %d, %d steps/epoch, %d process(es) on %s", config.model,
                         config.conv, "".join(f" {k}={v}" for k, v in config.hparams.items()),
                         config.data,
                         _num_images(train_loader), _num_images(test_loader, env),
                         config.epochs, start_epoch, steps_per_epoch, env.world_size, env.device)

        for epoch in range(start_epoch, config.epochs):
            row = _train_epoch(ddp, model, train_loader, criterion, optimizer, scheduler, scaler,
                               config, env, epoch, out)
            if env.device.type != "cuda":  # SyncBatchNorm does that on CUDA
                D.distribute_bn(model, env)
            test = evaluate(model, test_loader, env.device, amp=config.amp, env=env)
            row.update(test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"])
            row["time"] = time.perf_counter() - row.pop("_start")
            row = {k: row[k] for k in METRIC_FIELDS}
            history.append(row)
            is_best = row["test_top1"] > best
            best = max(best, row["test_top1"])
            state = checkpoint(epoch + 1)
            if env.is_main:
                save_checkpoint(state, out / "last.pt")
                if is_best:
                    save_checkpoint(state, out / "best.pt")
                _write_rows(out, [row], append=True)
                _logger.info(
                    "epoch %d/%d  loss %.4f  train %.2f%%  test loss %.4f  top1 %.2f%%  "
                    "top5 %.2f%%  lr %.4g  %.1fs  %.0f img/s", epoch + 1, config.epochs,
                    row["train_loss"], 100 * row["train_top1"], row["test_loss"],
                    100 * row["test_top1"], 100 * row["test_top5"], row["lr"], row["time"],
                    row["images_per_s"])
        if env.distributed:
            torch.distributed.barrier()  # every rank returns after rank 0 wrote the files
        return TrainResult(model, history, best, out)
    finally:
        D.teardown(env)


def _num_images(loader, env: D.DistEnv | None = None) -> int:
    if hasattr(loader, "labels"):  # TensorLoader: holds the whole split
        return len(loader.labels)
    return len(loader.dataset) * (env.world_size if env else 1)  # approximately, when sharded


def _train_epoch(ddp, model, loader, criterion, optimizer, scheduler, scaler, config, env,
                 epoch, out) -> dict:
    from tqdm import tqdm

    ddp.train()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, count
    per_rank = getattr(loader, "num_samples", None) or len(loader) * config.batch_size
    bar = tqdm(total=per_rank * env.world_size, unit="img",
               unit_scale=True, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=None if env.is_main else True, dynamic_ncols=True)
    for step, (images, labels) in enumerate(loader):
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        with _autocast(env.device, config.amp):
            logits = ddp(images)
            loss = criterion(logits.float(), labels)
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        D.all_reduce_sum(bad, env)  # every rank stops at the same step
        if bad.item():
            bar.close()
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}/{len(loader)};"
                f" training stopped. The last good state (end of epoch {epoch}) is in "
                f"{out / 'last.pt'}: lower --lr (or drop --amp) and --resume, or start again")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = len(labels)
        sums += torch.stack([loss.detach().double() * n,
                             (logits.detach().argmax(1) == labels).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=env.device)])
        bar.update(n * env.world_size)
        if step % 20 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
    bar.close()
    elapsed = time.perf_counter() - start
    D.all_reduce_sum(sums, env)
    loss_sum, correct, count = sums.tolist()
    return {"_start": start, "epoch": epoch + 1, "train_loss": loss_sum / count,
            "train_top1": correct / count, "lr": lr, "images_per_s": count / elapsed}
