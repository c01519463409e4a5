"""Why SPConv learns slower in its first epoch (issue 14): one quick-budget epoch of ResNet-20
on Fashion-MNIST (20,000 train images, 157 steps at batch 128, the `fashion-mnist` recipe's
one-cycle schedule), test top-1 on 5,000 test images after 79 and 157 steps, for variants that
each change one suspect:

    vanilla        the reference
    spconv         SPConv as built (Eq. 2-6, torchvision's Kaiming fan-out init)
    sum            fusion="sum": Y = U3 + U1 instead of Eq. 4-6's softmax
    default-init   SPConv's inner convs re-initialised with PyTorch's default
    fan-in         ... with Kaiming fan-in (per-filter weight norm equal to vanilla's)

With --precise the test top-1 is also measured after recomputing every BN's statistics on the
last 40 training batches (tells slow learning from lagging running statistics).

    python benchmarks/spconv_start.py spconv sum vanilla --seeds 0 1 --json out.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

import leanconv
from leanconv.data import build_data
from leanconv.layers.spconv import SPConv
from leanconv.train import build_optimizer, build_scheduler, evaluate, resolve_config

VARIANTS = ("vanilla", "spconv", "sum", "default-init", "fan-in")


def build(variant: str) -> nn.Module:
    conv = "vanilla" if variant == "vanilla" else "spconv"
    hparams = {"fusion": "sum"} if variant == "sum" else {}
    model = leanconv.create_model("resnet20", conv=conv, num_classes=10, in_channels=1, **hparams)
    for module in model.modules():
        if isinstance(module, SPConv):
            for inner in module.modules():
                if isinstance(inner, nn.Conv2d) and variant == "default-init":
                    inner.reset_parameters()
                elif isinstance(inner, nn.Conv2d) and variant == "fan-in":
                    nn.init.kaiming_normal_(inner.weight, mode="fan_in", nonlinearity="relu")
    return model


def precise_top1(model: nn.Module, batches: list, test_loader) -> float:
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return evaluate(model, test_loader)["top1"]


def run(variant: str, seed: int, precise: bool, checkpoints=(79, 157)) -> dict:
    torch.manual_seed(seed)
    model = build(variant)
    config = resolve_config("fashion-mnist", epochs=1, train_subset=20000, seed=seed)
    _, train_loader, test_loader = build_data(
        "fashion-mnist", batch_size=128, eval_batch_size=500, train_subset=20000,
        test_subset=5000, seed=seed)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    result = {"variant": variant, "seed": seed, "top1": {}, "precise_top1": {},
              "capability": torch.backends.cpu.get_cpu_capability()}
    recent: list[torch.Tensor] = []
    for step, (x, y) in enumerate(train_loader, 1):
        model.train()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent = [*recent[-39:], x]
        if step in checkpoints:
            result["top1"][step] = round(evaluate(model, test_loader)["top1"], 4)
            if precise:
                result["precise_top1"][step] = round(precise_top1(model, recent, test_loader), 4)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--precise", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="append one JSON line per run to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        for variant in args.variants:
            result = run(variant, seed, args.precise)
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
