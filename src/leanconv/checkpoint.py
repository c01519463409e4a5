"""Checkpoints: written atomically, loadable with ``weights_only=True``, self-describing.

A checkpoint is a dict of tensors and primitives only (no pickled classes), so
``torch.load(path, weights_only=True)`` reads it::

    {"format": "leanconv-checkpoint", "version": 1,
     "model": "resnet20", "conv": "spconv", "hparams": {"split_ratio": 0.5},
     "num_classes": 10, "in_channels": 1, "data": "fashion-mnist",
     "plan": None | {...a leanconv plan: the conv of every planned layer...},
     "config": {...resolved training config...},
     "epoch": 3,                       # completed epochs
     "state_dict": {...}, "optimizer": {...}, "scheduler": {...}, "scaler": {...} | None,
     "rng": [{"torch": ByteTensor, "numpy": {...}, "python": [...], "data": ByteTensor}, ...],
     "metrics": {...last epoch row...}, "history": [...all rows...], "best_top1": 0.91}

``rng`` holds one entry per rank so that a resumed multi-process run continues each rank's
random streams exactly.
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "CheckpointError",
    "build_model_from_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "leanconv-checkpoint"
VERSION = 1
_REQUIRED = ("model", "conv", "hparams", "num_classes", "in_channels", "state_dict", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is used for."""


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A reader (or a crash) sees either the previous complete file or the new complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; any problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(e).__name__}: {first[:200]})") from None
    except Exception as e:  # e.g. pickle.UnpicklingError: not a torch file at all
        raise CheckpointError(f"checkpoint {path} is not a readable torch file "
                              f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a leanconv checkpoint (no '{FORMAT}' header)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {ckpt.get('version')}; this "
                              f"leanconv reads version {VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def load_state_into(model: nn.Module, state_dict: dict, path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), first {k}: checkpoint "
                         f"{tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
        raise CheckpointError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def build_model_from_checkpoint(ckpt: dict, path="checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights."""
    from .models import create_model

    try:
        model = create_model(ckpt["model"], conv=ckpt["conv"], num_classes=ckpt["num_classes"],
                             in_channels=ckpt["in_channels"], plan=ckpt.get("plan"),
                             **ckpt["hparams"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} names a model this leanconv cannot build: "
                              f"{e}") from None
    load_state_into(model, ckpt["state_dict"], path)
    return model


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and primitives
# ----------------------------------------------------------------------------------------------
def get_rng_state(data_generator: torch.Generator | None = None) -> dict:
    """Every random stream a training step may draw from, in a weights_only-safe form."""
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state: dict, data_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"],
                             s["has_gauss"], s["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


def _to_lists(obj):
    return [_to_lists(x) for x in obj] if isinstance(obj, tuple) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj
