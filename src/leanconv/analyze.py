"""``leanconv analyze``: the papers' analysis pictures, from any model or checkpoint.

Five analyses, each a pure function of a model and a batch of images (what the tests call) plus a
plot; :func:`analyze_checkpoints` runs one of them on one or more checkpoints side by side and
writes ``WHAT.json`` (the numbers) and one PNG per picture to ``out``.

==============  ====================================================================================
``gradcam``     Grad-CAM and Grad-CAM++ overlays at the last block (SlimConv Sec. 4.2 "Class
                activation mapping", Fig. 4), computed by the ``grad-cam`` package
                (``pytorch_grad_cam``) for the images' true classes.
``gates``       SlimConv's channel weights w (Eq. 1) and the flipped w~ per module, mean and
                spread over the test images, and the fraction of near-0 / near-1 weights
                (SlimConv Sec. 4.6, Fig. 6: the weights become binary in late blocks).
                Near means < ``NEAR`` or > 1 - ``NEAR`` (``NEAR`` = 0.05).
``entropy``     Shannon entropy of every block's output feature maps (SlimConv Sec. 4.6, Fig. 7):
                each map (one channel of one image) is cut into ``bins`` = 32 equal-width bins
                between its own min and max, H = -sum p log2 p in bits (0 for a constant map,
                at most log2(min(bins, H*W))), averaged over channels and images.
``features``    A grid of one layer's feature maps for one test image (SPConv Fig. 1, SCConv
                Fig. 5); when the layer holds an SRU (SCConv Sec. 2.1, Eq. 3-4, Fig. 2) also its
                informative / non-informative weights W1, W2 and the reconstructed X^w.
``redundancy``  Per block: the mean absolute Pearson correlation between the channel maps of one
                image (off-diagonal pairs, channels with a constant map left out, averaged over
                images), and the fraction of channels whose principal components hold 95 % of
                the variance (PCA of the channels standardised, over all positions of all
                images; the same scale-free view as the correlation). "Reduced feature
                redundancy" is the claim of all four papers (SPConv Sec. 1, SCConv Sec. 1,
                SlimConv Sec. 1, CompConv Sec. 1).
==============  ====================================================================================

Blocks are the model's residual units: the zoo's ``BasicBlock``, ``Bottleneck``, ``ResNeXtBlock``,
``WideBasic``, the two ``InvertedResidual`` and ``DenseLayer``, and any class of those names (the
blocks of a torchvision model converted with :func:`leanconv.convert_convs`); a model without
them (a plain ``nn.Sequential``) uses its outermost conv layers instead. Everything reads the
model through forward hooks; no model is modified.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import available_convs, conv_class
from .layers.scconv import SpatialReconstruction
from .layers.slimconv import SlimConv

__all__ = [
    "CAM_METHODS",
    "NEAR",
    "WHATS",
    "AnalysisError",
    "analyze_checkpoints",
    "block_entropy",
    "block_redundancy",
    "cam_maps",
    "channel_correlation",
    "feature_maps",
    "find_blocks",
    "map_entropy",
    "pca_fraction",
    "resolve_layer",
    "slimconv_gates",
    "sru_maps",
]

WHATS = ("gradcam", "gates", "entropy", "features", "redundancy")
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus"}  # pytorch_grad_cam classes
NEAR = 0.05  # a gate weight is "near 0" below NEAR, "near 1" above 1 - NEAR
BINS = 32  # entropy histogram bins per feature map
VARIANCE = 0.95  # PCA: explained-variance level of the redundancy measure
_PIXELS = 128 * 32 * 32  # image pixels per forward when collecting statistics (128 at 32x32)


class AnalysisError(ValueError):
    """A choice (analysis, layer, dataset, checkpoint) does not fit; the message lists the allowed
    values."""


# ----------------------------------------------------------------------------------------------
# Where to look: blocks, layers, hooks
# ----------------------------------------------------------------------------------------------
def _block_classes() -> tuple[type, ...]:
    from .models.densenet import DenseLayer
    from .models.mobilenetv2 import InvertedResidual as MobileInvertedResidual
    from .models.resnet import BasicBlock, Bottleneck
    from .models.resnext_cifar import ResNeXtBlock
    from .models.shufflenetv2 import InvertedResidual as ShuffleInvertedResidual
    from .models.wide_resnet import WideBasic

    return (BasicBlock, Bottleneck, ResNeXtBlock, WideBasic, MobileInvertedResidual,
            ShuffleInvertedResidual, DenseLayer)


# Block classes of other libraries, recognised by name (a converted torchvision/timm model).
_BLOCK_NAMES = ("BasicBlock", "Bottleneck", "InvertedResidual", "_DenseLayer", "DenseLayer")


def _outermost(model: nn.Module, kinds: tuple[type, ...], names_too: bool = False) -> list[str]:
    names: list[str] = []
    for name, module in model.named_modules():
        hit = isinstance(module, kinds) or (names_too and type(module).__name__ in _BLOCK_NAMES)
        if name and hit and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks in registration order (the forward order of the
    zoo's models); see the module docstring."""
    blocks = _outermost(model, _block_classes(), names_too=True)
    if blocks:
        return blocks
    convs = (*(conv_class(c) for c in available_convs()), nn.Conv2d)
    return _outermost(model, convs)


def resolve_layer(model: nn.Module, layer: str | None, default: str = "last") -> str:
    """``layer`` checked against ``model.named_modules()``; ``None``: the first or last block."""
    blocks = find_blocks(model)
    if layer is None:
        if not blocks:
            raise AnalysisError("the model has no blocks or conv layers to analyse")
        return blocks[-1] if default == "last" else blocks[0]
    if layer and layer in dict(model.named_modules()):
        return layer
    raise AnalysisError(f"unknown layer {layer!r}; allowed: {', '.join(blocks)} "
                        f"(or any name of model.named_modules())")


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str], keep_input: bool = False):
    """Forward hooks storing each named module's latest output (and input) in a dict."""
    store: dict[str, Tensor | tuple[Tensor, Tensor]] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(module, inputs, output):
            if not isinstance(output, Tensor):  # e.g. a tuple: not feature maps
                store[name] = None
                return
            out = output.detach().clone()  # a later in-place op must not change what we saw
            store[name] = (inputs[0].detach().clone(), out) if keep_input else out
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _batches(images: Tensor) -> Iterator[Tensor]:
    """Slices of ``images`` small enough that every block's output stays in memory (hooks keep a
    copy of each): 128 images at 32x32, 2 at 224x224."""
    size = max(1, _PIXELS // (images.shape[-2] * images.shape[-1]))
    for start in range(0, len(images), size):
        yield images[start:start + size]


# ----------------------------------------------------------------------------------------------
# Numbers: entropy, redundancy
# ----------------------------------------------------------------------------------------------
def map_entropy(x: Tensor, bins: int = BINS) -> Tensor:
    """Shannon entropy in bits of every map of ``x`` (N, C, H, W) -> (N, C).

    Each map's values are binned into ``bins`` equal-width bins between the map's own min and
    max (so the measure ignores scale, and a constant map has entropy 0).
    """
    flat = x.detach().flatten(2).float()
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    span = hi - lo
    scaled = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    idx = (scaled * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(*flat.shape[:2], bins).scatter_add_(2, idx, torch.ones_like(scaled))
    p = counts / flat.shape[2]
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(2)  # empty bins give 0 * finite = 0


def channel_correlation(x: Tensor) -> Tensor:
    """Mean absolute Pearson correlation between the channel maps of each image: (N, C, H, W) ->
    (N,). Pairs with a constant map (zero variance, e.g. a dead ReLU channel) are left out; an
    image with fewer than two non-constant maps gives NaN."""
    step = max(1, 2**24 // x.shape[1] ** 2)  # images per (n, C, C) matrix: <= 128 MiB
    if len(x) > step:
        return torch.cat([channel_correlation(part) for part in x.split(step)])
    f = x.detach().flatten(2).double()
    f = f - f.mean(2, keepdim=True)
    norm = f.norm(dim=2)  # (N, C)
    live = norm > 1e-9 * norm.amax(1, keepdim=True).clamp_min(1e-300)
    corr = (f / norm.clamp_min(1e-300)[..., None]) @ (f / norm.clamp_min(1e-300)[..., None]).mT
    pairs = live[:, :, None] & live[:, None, :] & ~torch.eye(f.shape[1], dtype=torch.bool)
    count = pairs.sum((1, 2))
    total = (corr.abs() * pairs).sum((1, 2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan).float()


class _Covariance:
    """Streaming channel covariance over all positions of all images (for the PCA measure)."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, None, None

    def add(self, x: Tensor) -> None:
        f = x.detach().transpose(0, 1).flatten(1).double()  # (C, N*H*W)
        s, ss = f.sum(1), f @ f.T
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += f.shape[1]

    def matrix(self) -> Tensor:
        mean = self.s / self.n
        return self.ss / self.n - torch.outer(mean, mean)


def pca_fraction(cov: Tensor, level: float = VARIANCE) -> tuple[int, float]:
    """``(k, k / C)``: the fewest principal components that explain ``level`` of the variance of
    the C channels with covariance ``cov`` (C, C), after standardising each channel.

    PCA runs on the correlation matrix, so a few high-variance channels cannot dominate (the same
    scale-free view as :func:`channel_correlation`); constant channels explain nothing and count
    in C only. k = 0 when every channel is constant.
    """
    cov = cov.double()
    std = cov.diagonal().clamp_min(0).sqrt()
    live = std > 1e-9 * std.max().clamp_min(1e-300)
    if not live.any():
        return 0, 0.0
    corr = cov[live][:, live] / torch.outer(std[live], std[live])
    eig = torch.linalg.eigvalsh(corr).flip(0).clamp_min(0)
    k = int(torch.searchsorted(eig.cumsum(0) / eig.sum(), torch.tensor(level, dtype=eig.dtype)))
    k = min(k + 1, len(eig))
    return k, k / len(cov)


def _per_block(model: nn.Module, images: Tensor, blocks: Sequence[str] | None):
    """Yield ``{block: output}`` for each batch of ``images`` (the model in eval mode)."""
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _capture(model, blocks) as store:
            for batch in _batches(images):
                model(batch)
                yield {name: store[name] for name in blocks}
    finally:
        model.train(was_training)


def block_entropy(model: nn.Module, images: Tensor, blocks: Sequence[str] | None = None,
                  bins: int = BINS) -> dict[str, dict]:
    """Per block: mean entropy (bits) of its output maps, the spread over images, and the mean
    per channel (SlimConv Fig. 7)."""
    per: dict[str, list[Tensor]] = {}
    for outs in _per_block(model, images, blocks):
        for name, out in outs.items():
            per.setdefault(name, []).append(map_entropy(out, bins))
    result = {}
    for name, parts in per.items():
        h = torch.cat(parts)  # (N, C)
        result[name] = {"mean": h.mean().item(), "std_over_images": h.mean(1).std().item()
                        if len(h) > 1 else 0.0, "channels": h.shape[1],
                        "per_channel": [round(v, 4) for v in h.mean(0).tolist()]}
    return result


def block_redundancy(model: nn.Module, images: Tensor, blocks: Sequence[str] | None = None,
                     level: float = VARIANCE) -> dict[str, dict]:
    """Per block: mean |correlation| between channel maps and the PCA channel fraction at
    ``level`` of the variance (see the module docstring)."""
    corr: dict[str, list[Tensor]] = {}
    cov: dict[str, _Covariance] = {}
    for outs in _per_block(model, images, blocks):
        for name, out in outs.items():
            corr.setdefault(name, []).append(channel_correlation(out))
            cov.setdefault(name, _Covariance()).add(out)
    result = {}
    for name, parts in corr.items():
        c = torch.cat(parts)
        k, frac = pca_fraction(cov[name].matrix(), level)
        mean = float(c.nanmean())  # NaN (JSON null) when no image has two non-constant maps
        result[name] = {"mean_abs_corr": mean if math.isfinite(mean) else None,
                        "channels": int(cov[name].s.numel()),
                        "pca_channels": k, "pca_fraction": frac}
    return result


# ----------------------------------------------------------------------------------------------
# SlimConv gates, SRU masks, feature maps
# ----------------------------------------------------------------------------------------------
def slimconv_gates(model: nn.Module, images: Tensor, near: float = NEAR) -> dict[str, dict]:
    """SlimConv's channel weights per module over ``images`` (Eq. 1; Fig. 6).

    For each SlimConv: ``w_mean``/``w_std`` per channel over the images, the flipped weights
    ``w_flipped_mean`` (``w~_i = w_{C-1-i}``, Fig. 1b), the module's ``flipping`` mode, and the
    fractions of all (image, channel) weights below ``near`` and above ``1 - near``. Read from a
    hook on the SE's last conv ``fc2`` (w = sigmoid of its output). No SlimConv: an empty dict.
    """
    slims = {n: m for n, m in model.named_modules() if isinstance(m, SlimConv)}
    if not slims:
        return {}
    ws: dict[str, list[Tensor]] = {n: [] for n in slims}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _capture(model, [n + ".fc2" for n in slims]) as store:
            for batch in _batches(images):
                model(batch)
                for n in slims:
                    ws[n].append(torch.sigmoid(store[n + ".fc2"].flatten(1)))
    finally:
        model.train(was_training)
    result = {}
    for n, parts in ws.items():
        w = torch.cat(parts)  # (N, C)
        mean = w.mean(0)
        result[n] = {
            "channels": w.shape[1], "flipping": slims[n].flipping,
            "w_mean": mean.tolist(),
            "w_std": (w.std(0) if len(w) > 1 else torch.zeros_like(mean)).tolist(),
            "w_flipped_mean": mean.flip(0).tolist(),
            "near0": (w < near).float().mean().item(),
            "near1": (w > 1 - near).float().mean().item(),
        }
    return result


def feature_maps(model: nn.Module, image: Tensor, layer: str) -> Tensor:
    """The output (C, H, W) of module ``layer`` for one image (C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _capture(model, [layer]) as store:
            model(image.unsqueeze(0))
    finally:
        model.train(was_training)
    out = store.get(layer)
    if out is None or out.dim() != 4:
        raise AnalysisError(f"layer {layer!r} does not output feature maps (N, C, H, W) in the "
                            f"forward pass; allowed: {', '.join(find_blocks(model))} (or another "
                            f"module with such an output)")
    return out[0]


def _find_sru(model: nn.Module, layer: str) -> str | None:
    module = model.get_submodule(layer)
    for name, m in module.named_modules():
        if isinstance(m, SpatialReconstruction):
            return f"{layer}.{name}" if name else layer
    return None


def sru_maps(model: nn.Module, image: Tensor, layer: str) -> dict | None:
    """The first SRU inside ``layer`` on one image (SCConv Eq. 1-4, Fig. 2), or ``None``.

    Returns the SRU's name, its input X, the gate R = Sigmoid(W_gamma * GN(X)), the binary
    informative mask ``[R > t]``, the weights W1, W2 of its gate mode (hard: W1 = mask,
    W2 = 1 - mask; soft: W1 = 1 above t else R, W2 = 0 above t else R), and its output X^w,
    each (C, H, W). The gate is recomputed from the hooked input with the module's own
    parameters (``folded_affine``, ``gate_threshold``).
    """
    name = _find_sru(model, layer)
    if name is None:
        return None
    sru = model.get_submodule(name)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _capture(model, [name], keep_input=True) as store:
            model(image.unsqueeze(0))
            x, xw = store[name]
            weight, bias = sru.folded_affine()
            r = torch.sigmoid(F.group_norm(x, sru.gn.num_groups, weight, bias, sru.gn.eps))
    finally:
        model.train(was_training)
    mask = (r > sru.gate_threshold).float()
    if sru.gate == "hard":
        w1, w2 = mask, 1 - mask
    else:
        w1, w2 = torch.where(mask > 0, 1.0, r), torch.where(mask > 0, 0.0, r)
    return {"module": name, "gate": sru.gate, "threshold": sru.gate_threshold, "input": x[0],
            "reweight": r[0], "mask": mask[0], "w1": w1[0], "w2": w2[0], "output": xw[0]}


# ----------------------------------------------------------------------------------------------
# Class activation maps (pytorch_grad_cam)
# ----------------------------------------------------------------------------------------------
def cam_maps(model: nn.Module, images: Tensor, labels: Tensor | None = None,
             layer: str | None = None, methods: Sequence[str] = tuple(CAM_METHODS)) -> dict:
    """``{method: (N, H, W) numpy array in [0, 1]}`` at ``layer`` (default: the last block).

    Uses the ``grad-cam`` package (``pytorch_grad_cam``); the target of each image is its label
    (``None``: the predicted class). Each map is scaled to [0, 1] by the package.
    """
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise AnalysisError("gradcam needs the grad-cam package: "
                            "pip install 'leanconv[analyze]'") from None
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown:
        raise AnalysisError(f"unknown CAM method {unknown[0]!r}; allowed: "
                            f"{', '.join(CAM_METHODS)}")
    layer = resolve_layer(model, layer, "last")
    feature_maps(model, images[0], layer)  # a layer without (N, C, H, W) output: AnalysisError
    targets = None if labels is None else [ClassifierOutputTarget(int(c)) for c in labels]
    was_training = model.training
    model.eval()
    result = {}
    try:
        for method in methods:
            cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
            with cls(model=model, target_layers=[model.get_submodule(layer)]) as cam:
                result[method] = cam(input_tensor=images, targets=targets)
    finally:
        model.train(was_training)
    return result


# ----------------------------------------------------------------------------------------------
# The driver: checkpoints -> numbers (JSON) and pictures (PNG)
# ----------------------------------------------------------------------------------------------
def _load(paths: Sequence[str | Path]) -> list[dict]:
    from .checkpoint import build_model_from_checkpoint, load_checkpoint

    runs, labels = [], []
    for path in paths:
        ckpt = load_checkpoint(path)
        model = build_model_from_checkpoint(ckpt, path).eval()
        label = ckpt["conv"]
        runs.append({"path": str(path), "ckpt": ckpt, "model": model, "label": label})
        labels.append(label)
    for run in runs:  # the same conv twice: tell them apart by their run folder
        if labels.count(run["label"]) > 1:
            p = Path(run["path"])
            run["label"] = f"{run['label']} ({p.parent.name}/{p.name})"
    return runs


def _test_images(data: str, data_dir, count: int):
    """The first ``count`` test images of ``data``, normalised, and their labels (fixed)."""
    from .data import build_data, dataset_info, load_arrays

    info = dataset_info(data)
    if data == "imagefolder":
        info, _, test = build_data(data, batch_size=count, data_dir=data_dir, augment=False)
        images, labels = next(iter(test))
        return info, images[:count], labels[:count]
    images, labels = load_arrays(data, "test", data_dir)
    images, labels = images[:count], labels[:count]
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return info, (images.float() / 255 - mean) / std, labels


def _check_fits(runs: list[dict], data: str) -> None:
    from .data import DATASETS, dataset_info

    info = dataset_info(data)
    for run in runs:
        want = (run["ckpt"]["num_classes"], run["ckpt"]["in_channels"])
        if data != "imagefolder" and (info.num_classes, info.in_channels) != want:
            fits = [n for n, i in DATASETS.items() if (i.num_classes, i.in_channels) == want]
            raise AnalysisError(
                f"--data {data} ({_shape(info.num_classes, info.in_channels)}) does not fit "
                f"checkpoint {run['path']} ({_shape(*want)}); allowed: "
                f"{', '.join(fits) or 'imagefolder'}")


def _shape(classes: int, channels: int) -> str:
    return f"{classes} classes, {channels} input channel{'s' if channels != 1 else ''}"


def analyze_checkpoints(paths: Sequence[str | Path], what: str, *, out: str | Path,
                        data: str | None = None, data_dir=None, images: int = 4,
                        samples: int = 256, layer: str | None = None) -> dict:
    """Run analysis ``what`` on every checkpoint, write ``out/WHAT.json`` and the PNGs.

    ``images`` fixed test images (the first ones) are drawn (gradcam, features: the first);
    ``samples`` test images feed the statistics (gates, entropy, redundancy). ``data`` defaults
    to the first checkpoint's dataset. Returns the JSON content; ``"pictures"`` lists the PNGs.
    """
    if what not in WHATS:
        raise AnalysisError(f"unknown analysis {what!r}; allowed: {', '.join(WHATS)}")
    if not paths:
        raise AnalysisError("no checkpoint given")
    runs = _load(paths)
    data = data or runs[0]["ckpt"].get("data") or "fashion-mnist"
    _check_fits(runs, data)
    if what == "gates":
        for run in runs:
            if not any(isinstance(m, SlimConv) for m in run["model"].modules()):
                raise AnalysisError(
                    f"--what gates needs SlimConv modules; checkpoint {run['path']} (conv "
                    f"{run['ckpt']['conv']!r}) has none; allowed: checkpoints with conv slimconv")
    if layer is not None:
        for run in runs:
            resolve_layer(run["model"], layer)
    count = samples if what in ("gates", "entropy", "redundancy") else images
    info, x, y = _test_images(data, data_dir, max(1, count))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "what": what, "data": data, "images": len(x),
        "checkpoints": [{"path": r["path"], "label": r["label"], "model": r["ckpt"]["model"],
                         "conv": r["ckpt"]["conv"], "hparams": r["ckpt"]["hparams"],
                         "epoch": r["ckpt"]["epoch"]} for r in runs],
        "results": {}, "pictures": []}
    if what == "gradcam":
        result["settings"] = {"methods": list(CAM_METHODS), "target": "true label"}
        for run in runs:
            lay = resolve_layer(run["model"], layer, "last")
            with torch.no_grad():
                pred = run["model"](x).argmax(1)
            cams = cam_maps(run["model"], x, y, lay)
            result["results"][run["label"]] = {
                "layer": lay, "labels": y.tolist(), "predicted": pred.tolist(),
                "cams": {m: [[[round(float(v), 2) for v in row] for row in c] for c in a]
                         for m, a in cams.items()}}
        result["pictures"].append(_plot_gradcam(result, x, info, out / "gradcam.png"))
    elif what == "gates":
        result["settings"] = {"near": NEAR}
        for run in runs:
            result["results"][run["label"]] = slimconv_gates(run["model"], x)
            result["pictures"].append(_plot_gates(run["label"], result["results"][run["label"]],
                                                  out / f"gates-{_slug(run['label'])}.png"))
    elif what == "entropy":
        result["settings"] = {"bins": BINS, "unit": "bits", "binning": "per map, min to max"}
        for run in runs:
            result["results"][run["label"]] = block_entropy(run["model"], x)
        result["pictures"].append(_plot_per_block(
            result, [("mean", "Shannon entropy (bits)")], out / "entropy.png"))
    elif what == "redundancy":
        result["settings"] = {"variance": VARIANCE}
        for run in runs:
            result["results"][run["label"]] = block_redundancy(run["model"], x)
        result["pictures"].append(_plot_per_block(
            result, [("mean_abs_corr", "mean |correlation| between channels"),
                     ("pca_fraction",
                      f"channel fraction for {100 * VARIANCE:.0f} % of the variance (PCA)")],
            out / "redundancy.png"))
    else:  # features
        for run in runs:
            lay = resolve_layer(run["model"], layer, "first")
            maps = feature_maps(run["model"], x[0], lay)
            sru = sru_maps(run["model"], x[0], lay)
            entry = {"layer": lay, "label": int(y[0]), "shape": list(maps.shape),
                     "channel_mean": maps.mean((1, 2)).tolist(),
                     "channel_std": maps.std((1, 2)).tolist()}
            name = _slug(run["label"])
            result["pictures"].append(_plot_features(run["label"], lay, maps,
                                                     out / f"features-{name}.png"))
            if sru is not None:
                entry["sru"] = {"module": sru["module"], "gate": sru["gate"],
                                "threshold": sru["threshold"],
                                "informative_fraction": sru["mask"].mean().item(),
                                "informative_fraction_per_channel":
                                    sru["mask"].mean((1, 2)).tolist()}
                result["pictures"].append(_plot_sru(run["label"], sru, out / f"sru-{name}.png"))
            result["results"][run["label"]] = entry
    result["pictures"] = [str(p) for p in result["pictures"]]
    (out / f"{what}.json").write_text(_dumps(result))
    return result


_NUMBERS = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]")


def _dumps(obj) -> str:
    """Indented JSON with every list of numbers on one line (a CAM row, a channel vector)."""
    text = json.dumps(obj, indent=1)
    return _NUMBERS.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def _slug(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)
    return "-".join(p for p in keep.split("-") if p) or "model"


# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib, Agg canvas: no display needed)
# ----------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _image(x: Tensor, info) -> Tensor:
    """A normalised (C, H, W) image back to [0, 1], (H, W) or (H, W, 3) for imshow."""
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    img = (x * std + mean).clamp(0, 1)
    return (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_gradcam(result: dict, x: Tensor, info, path: Path) -> Path:
    """Rows: the input images, then one row per (checkpoint, method); CAM in 'jet' over the
    image (SlimConv Fig. 4: the brighter, the more the class score depends on that place)."""
    runs = result["results"]
    rows = [("input", None, None)] + [(label, m, r) for label, r in runs.items()
                                      for m in CAM_METHODS]
    n = len(x)
    fig = _figure(1.6 * n + 1.2, 1.6 * len(rows))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (label, method, r) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            _off(ax)
            img = _image(x[j], info)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            if method is None:
                ax.set_title(f"image {j}", fontsize=8)
                continue
            ax.imshow(r["cams"][method][j], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i <= len(CAM_METHODS):
                ax.set_title(f"label {r['labels'][j]}", fontsize=8)
            ax.set_xlabel(f"pred {r['predicted'][j]}", fontsize=7)
        axes[i][0].set_ylabel(label if method is None else f"{label}\n{method}", fontsize=8)
    fig.suptitle(f"Class activation maps at {next(iter(runs.values()))['layer']} "
                 f"({result['data']}, target = true label)", fontsize=9)
    return _save(fig, path)


def _plot_gates(label: str, gates: dict, path: Path) -> Path:
    """One row per SlimConv: mean w and flipped w~ per channel with the spread over images
    (SlimConv Fig. 6); last row: near-0 / near-1 fractions and the spread per module."""
    names = list(gates)
    fig = _figure(10, 1.7 * (len(names) + 1))
    axes = fig.subplots(len(names) + 1, 2, squeeze=False)
    for i, name in enumerate(names):
        g = gates[name]
        mean, std = torch.tensor(g["w_mean"]), torch.tensor(g["w_std"])
        for j, (m, s, title) in enumerate(((mean, std, "w"), (mean.flip(0), std.flip(0), "w~"))):
            ax = axes[i][j]
            ch, m, s = list(range(len(m))), m.numpy(), s.numpy()
            ax.bar(ch, m, width=1.0, color="C0" if j == 0 else "C1")
            ax.errorbar(ch, m, yerr=s, fmt="none", ecolor="k", elinewidth=0.5)
            ax.set_ylim(0, 1.05)
            ax.set_xlim(-0.5, len(m) - 0.5)
            ax.set_ylabel(name, fontsize=7)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(f"{title} per channel (mean, bar = std over images)", fontsize=8)
    ax0, ax1 = axes[-1]
    idx = torch.arange(len(names)).float().numpy()
    ax0.bar(idx - 0.2, [gates[n]["near0"] for n in names], 0.4, label=f"w < {NEAR}")
    ax0.bar(idx + 0.2, [gates[n]["near1"] for n in names], 0.4, label=f"w > {1 - NEAR:.2f}")
    ax0.set_ylabel("fraction", fontsize=7)
    ax0.legend(fontsize=7)
    ax1.plot(idx, [sum(gates[n]["w_std"]) / len(gates[n]["w_std"]) for n in names], "o-")
    ax1.set_ylabel("mean std over images", fontsize=7)
    for ax in (ax0, ax1):
        ax.set_xticks(idx.tolist(), names, rotation=60, fontsize=6)
    fig.suptitle(f"SlimConv channel weights: {label}", fontsize=9)
    return _save(fig, path)


def _plot_per_block(result: dict, metrics: list[tuple[str, str]], path: Path) -> Path:
    """One panel per metric, x = block (forward order), one line per checkpoint."""
    fig = _figure(5.5 * len(metrics), 4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    first = next(iter(result["results"].values()))
    for ax, (key, ylabel) in zip(axes, metrics, strict=True):
        for i, (label, blocks) in enumerate(result["results"].items()):
            ax.plot(range(len(blocks)), [blocks[b][key] for b in blocks], marker="os^Dv*"[i % 6],
                    label=label)
        ax.set_xticks(range(len(first)), list(first), rotation=60, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['what']} per block on {result['images']} {result['data']} test "
                 f"images", fontsize=9)
    return _save(fig, path)


def _grid(fig, maps: Tensor, cols: int, title: str):
    rows = -(-len(maps) // cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(a for row in axes for a in row):
        _off(ax)
        if k < len(maps):
            ax.imshow(maps[k].numpy(), cmap="viridis")
            ax.set_title(str(k), fontsize=6)
        else:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)


def _plot_features(label: str, layer: str, maps: Tensor, path: Path, limit: int = 64) -> Path:
    """The first ``limit`` channels of a layer's output, each scaled to its own range."""
    maps = maps[:limit]
    cols = min(8, len(maps))
    fig = _figure(1.3 * cols, 1.4 * -(-len(maps) // cols) + 0.4)
    _grid(fig, maps, cols, f"{label}: {layer}, {len(maps)} channels")
    return _save(fig, path)


def _plot_sru(label: str, sru: dict, path: Path, limit: int = 8) -> Path:
    """SRU of SCConv Fig. 2 on one image: input X, informative W1, non-informative W2 and the
    reconstructed X^w for the first ``limit`` channels."""
    rows = [("input X", sru["input"], "viridis", None), ("W1 (informative)", sru["w1"], "gray",
            (0, 1)), ("W2 (non-informative)", sru["w2"], "gray", (0, 1)),
            ("X^w (reconstructed)", sru["output"], "viridis", None)]
    cols = min(limit, sru["input"].shape[0])
    fig = _figure(1.3 * cols + 1, 1.4 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for i, (name, t, cmap, lim) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            _off(ax)
            ax.imshow(t[j].numpy(), cmap=cmap, **({"vmin": lim[0], "vmax": lim[1]} if lim else {}))
            if i == 0:
                ax.set_title(f"ch {j}", fontsize=7)
        axes[i][0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{label}: SRU {sru['module']} ({sru['gate']} gate, t = {sru['threshold']}, "
                 f"{100 * sru['mask'].mean().item():.0f} % informative)", fontsize=9)
    return _save(fig, path)
