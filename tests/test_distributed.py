"""Two processes under ``torchrun`` on CPU (gloo): replicas stay identical, evaluation is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch import nn
    import torch.distributed as dist
    from leanconv import create_conv
    from leanconv.models import register_model
    from leanconv.train import evaluate_checkpoint, resolve_config, train

    @register_model
    def ddp_tiny(*, conv="vanilla", num_classes=10, in_channels=3, **hp):
        return nn.Sequential(
            create_conv(conv, in_channels, 8, 3, stride=2, **hp), nn.BatchNorm2d(8), nn.ReLU(),
            create_conv(conv, 8, 16, 3, stride=2, **hp), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes))

    out = sys.argv[1]
    config = resolve_config("fashion-mnist", model="ddp_tiny", data="synthetic", out=out,
                            epochs=2, batch_size=16, train_subset=96, test_subset=101)
    result = train(config)
    rank = int(os.environ["RANK"])
    torch.save(result.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    # one process, the whole test set (train() returns once rank 0 has written last.pt)
    single = evaluate_checkpoint(os.path.join(out, "last.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"history": result.history, "initialized": dist.is_initialized(),
                   "single": single}, f)
""")


def test_two_process_torchrun_keeps_replicas_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    states = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key  # parameters and BN statistics
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    timing = ("time", "images_per_s")
    strip = [[{k: v for k, v in row.items() if k not in timing} for row in log["history"]]
             for log in logs]
    assert strip[0] == strip[1]  # all-reduced metrics
    assert not logs[0]["initialized"]  # the process group was torn down

    # rank 0 alone writes the run: one row per epoch, checkpoints equal the replicas
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.equal(v, states[0][k]) for k, v in ckpt["state_dict"].items())
    assert len(ckpt["rng"]) == 2  # one set of random streams per rank
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])

    # exact evaluation: 101 test images over 2 ranks, none padded or counted twice;
    # the single-process evaluation of the saved model gives the same numbers
    single = logs[0]["single"]
    assert single["count"] == 101
    assert single["top1"] == rows[-1]["test_top1"] and single["top5"] == rows[-1]["test_top5"]
    assert single["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-6)
