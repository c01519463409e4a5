"""Reproduce the papers' Params / FLOPs columns from a CSV of target rows.

The reference CSV, the papers' 66 target rows, ships with the package
(``leanconv/targets/complexity.csv``, :func:`packaged_targets`; its README there names each row's
paper and table). A CSV has the columns
``paper, table, input, classes, model, conv, hparams, params_M, macs_G, note``; any other columns
are carried through. Each row is built with :func:`leanconv.create_model` on the meta device and
measured with :func:`leanconv.profile`; the paper's "FLOPs" are multiply-accumulates (MACs).

``hparams`` vocabulary (space-separated ``key=value`` tokens; values may be fractions, ``1/2``).
A key maps to the first constructor argument of the row's conv that exists (see
docs/reproduction.md):

======== ======================================================================================
key      constructor argument
======== ======================================================================================
alpha    ``split_ratio`` (SPConv alpha, SCConv/CRU alpha)
g        ``gwc_groups`` (group count of the group-wise conv, SPConv / CRU / SCConv)
r        ``squeeze_ratio`` for scconv / cru; ``se_reduction`` for slimconv (SE reduction)
k        ``compression_ratio`` (SlimConv k = C_in / C_out of the module)
L        ``se_min_channels`` (SlimConv's SE floor)
s        ``ratio`` (GhostConv s)
d        ``depth`` (CompConv recursion depth)
C0       ``base_channels`` (CompConv adaptive-depth constant C_0)
variant  a paper's ablation (:data:`VARIANTS`; tokens combine, ``variant=no-P1 variant=no-P3``):
         SPConv Table 4 ``P20`` -> representative="vanilla", ``P22`` ->
         representative="gwc-then-pwc", ``no-P3`` -> fusion="sum", ``no-P1`` -> redundant=False;
         SCConv Table 1 ``S+C`` / ``C+S`` / ``C&S`` -> order="sc" / "cs" / "parallel";
         SlimConv Table 7 ``no-flipping`` / ``only-flipping`` -> flipping="none" / "only";
         CompConv Table 1 ``no-shuffle`` -> shuffle=False, Table 2 ``identity-group`` /
         ``identity-random`` / ``identity-conv`` -> identity="group" / "random" / "conv"
stages   model argument: replace convs only in these stages (``stages=3,4``; the numbers of each
         model: :func:`leanconv.models.model_stages`)
======== ======================================================================================

``input`` is ``"<dataset> <H>x<W>"``: ``imagenet`` builds the model with ``stem="imagenet"``, any
other dataset (``cifar``, ``mnist``) with ``stem="cifar"`` (3x3 stride-1 stem, no max pool), see
:func:`build_model`.

MACs are counted under the row's paper's counting convention (:data:`PAPER_COUNTERS`, one
convention per paper, names from :data:`leanconv.profile.COUNTERS`; papers not listed: ``"macs"``),
and the plain conv + linear MACs are reported next to them. The evidence for each paper's
convention is in docs/reproduction.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import torch

from .layers import conv_hparams
from .layers._utils import as_fraction
from .models import available_models, create_model
from .models import placement as _placement
from .profile import profile

__all__ = [
    "HPARAM_KEYS",
    "PAPER_COUNTERS",
    "RowResult",
    "build_model",
    "evaluate_rows",
    "packaged_targets",
    "parse_hparams",
    "parse_input",
    "read_targets",
    "resolve_model_name",
    "to_json",
    "to_markdown",
    "to_text",
]

PARAMS_TOL = 0.03
MACS_TOL = 0.05

#: paper -> FLOPs counting convention of its tables (leanconv.profile.COUNTERS), one rule for all
#: of a paper's rows, each derived from rows it reproduces exactly (docs/reproduction.md):
#: SlimConv / SCConv: conv + linear + 2 per BatchNorm output element (SlimConv CIFAR-100
#: MobileNetV2 94.72M and ResNet-50 1.305G / 0.836G exact; SCConv ResNet-56 126.84M exact,
#: DenseNet-121 898.06M vs 898.23M). SPConv: + 4 per BN element, 1 per pooling input element,
#: 1 per biased conv/linear output (ResNet-20 41.62M and all five SPConv-ResNet-20 rows within
#: 0.1%). CompConv: conv + linear only, from its text: Sec. 3.5 counts a module's operations as
#: Eq. 7-8, H x W x k^2 x C_in x C_out conv terms with none for normalisation.
PAPER_COUNTERS: dict[str, str] = {
    "SPConv": "macs+bn4+pool+bias",
    "SlimConv": "macs+bn",
    "SCConv": "macs+bn",
    "CompConv": "macs",
}


def paper_counter(paper: str) -> str:
    """The counting convention of ``paper``'s tables (``"macs"`` for a paper not listed)."""
    return PAPER_COUNTERS.get(paper, "macs")

# key -> {conv name or "*": candidate constructor argument names, first that exists wins}
HPARAM_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "alpha": {"*": ("split_ratio", "alpha")},
    "g": {"*": ("gwc_groups", "group_size", "g")},
    "r": {"slimconv": ("se_reduction", "reduction"),
          "*": ("squeeze_ratio", "squeeze", "se_reduction")},
    "k": {"*": ("compression_ratio", "k")},
    "L": {"*": ("se_min_channels", "min_channels")},
    "s": {"*": ("ratio", "s")},
    "d": {"*": ("depth", "d")},
    "C0": {"*": ("base_channels", "adaptive_base", "C0")},
}
#: named ablation variants of the papers' tables -> constructor arguments
VARIANTS: dict[str, dict[str, object]] = {
    # SPConv Table 4: P1 count the redundant channels, P20 / P21 / P22 representative transform
    # (P21, GWC + PWC, is the default), P3 parameter-free fusion
    "P20": {"representative": "vanilla"},
    "P22": {"representative": "gwc-then-pwc"},
    "no-P3": {"fusion": "sum"},
    "no-P1": {"redundant": False},
    # SCConv Table 1: the order of SRU and CRU
    "S+C": {"order": "sc"},
    "C+S": {"order": "cs"},
    "C&S": {"order": "parallel"},
    # SlimConv Table 7: "w/o flipping", "only flipping"
    "no-flipping": {"flipping": "none"},
    "only-flipping": {"flipping": "only"},
    # CompConv Table 1 (shuffle block) and Table 2 (identity mapping options)
    "no-shuffle": {"shuffle": False},
    "identity-group": {"identity": "group"},
    "identity-random": {"identity": "random"},
    "identity-conv": {"identity": "conv"},
}
MODEL_KEYS = ("stages",)
# (paper, conv) -> placement the paper used for another paper's module (models/placement.py)
_TABLE_PLACEMENTS: dict = getattr(_placement, "TABLE_PLACEMENTS", {})


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def _number(text: str, default: object) -> object:
    try:
        value = as_fraction(text)
    except (ValueError, ZeroDivisionError):
        return text
    if value.denominator == 1 and not isinstance(default, float) and "." not in text:
        return int(value)
    return float(value)


def parse_hparams(text: str, conv: str) -> tuple[dict[str, object], dict[str, object]]:
    """``"alpha=1/2 g=2"`` -> (conv kwargs, model kwargs) with the constructor names of ``conv``.

    Raises ValueError for an unknown key, or a key the conv does not take.
    """
    accepted = conv_hparams(conv)
    conv_kwargs: dict[str, object] = {}
    model_kwargs: dict[str, object] = {}
    for token in (text or "").split():
        if "=" not in token:
            raise ValueError(f"hparams token {token!r} is not key=value")
        key, value = token.split("=", 1)
        if key == "variant":
            if value not in VARIANTS:
                raise ValueError(f"unknown variant {value!r}; known: {', '.join(VARIANTS)}")
            for arg, val in VARIANTS[value].items():
                if arg not in accepted:
                    raise ValueError(f"variant {value!r} needs argument {arg!r}, which conv "
                                     f"{conv!r} does not take ({', '.join(accepted) or 'none'})")
                conv_kwargs[arg] = val
            continue
        if key in MODEL_KEYS:
            model_kwargs[key] = tuple(int(v) for v in value.split(","))
            continue
        if key not in HPARAM_KEYS:
            raise ValueError(f"unknown hparams key {key!r}; known: "
                             f"{', '.join([*HPARAM_KEYS, 'variant', *MODEL_KEYS])}")
        table = HPARAM_KEYS[key]
        candidates = table.get(conv, table["*"])
        arg = next((c for c in candidates if c in accepted), None)
        if arg is None:
            raise ValueError(f"hparams key {key!r} does not apply to conv {conv!r} "
                             f"(its arguments: {', '.join(accepted) or 'none'})")
        conv_kwargs[arg] = _number(value, accepted[arg])
    return conv_kwargs, model_kwargs


def parse_input(text: str) -> tuple[str, tuple[int, int]]:
    """``"cifar 32x32"`` -> ``("cifar", (32, 32))``; a bare ``"224"`` means 224x224."""
    text = (text or "").strip().lower()
    match = re.search(r"(\d+)\s*(?:x\s*(\d+))?\s*$", text)
    if not match:
        raise ValueError(f"cannot read an input size from {text!r} (expected e.g. 'cifar 32x32')")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    dataset = text[: match.start()].strip() or ("cifar" if h <= 64 else "imagenet")
    return dataset, (h, w)


def resolve_model_name(model: str, dataset: str) -> str:
    """The registered builder for ``model`` on ``dataset``.

    Models that exist in both a CIFAR and an ImageNet build take ``stem="cifar"`` /
    ``stem="imagenet"`` (:func:`build_model` passes it from the dataset); a builder registered as
    ``<model>_cifar`` (or ``<model>_imagenet``) is preferred when one exists.
    """
    names = set(available_models())
    small = not dataset.startswith("imagenet")
    order = [f"{model}_cifar", model] if small else [model, f"{model}_imagenet"]
    for name in order:
        if name in names:
            return name
    raise ValueError(f"unknown model {model!r} for {dataset!r}; available models: "
                     f"{', '.join(sorted(names))}")


def build_model(model: str, conv: str = "vanilla", *, input: str | int = "imagenet 224x224",
                num_classes: int | None = None, in_channels: int | None = None,
                device: str | torch.device = "meta", **kwargs):
    """Build the model a table row describes (on the meta device by default: no allocation)."""
    dataset, _ = parse_input(str(input))
    name = resolve_model_name(model, dataset)
    kwargs = dict(kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    # ``stages`` is checked by create_model against the model's registered stages (model_stages).
    # Models built for both datasets take stem="imagenet"/"cifar" (docs/placement.md); CIFAR-only
    # builders accept only "cifar"; others take no stem at all.
    stem = "imagenet" if dataset.startswith("imagenet") else "cifar"
    with torch.device(device):
        try:
            return create_model(name, conv=conv, stem=stem, **kwargs), name
        except TypeError as exc:
            if "stem" not in str(exc):
                raise
            return create_model(name, conv=conv, **kwargs), name


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
@dataclass
class RowResult:
    """One CSV row with its measurement."""

    row: dict[str, str]
    index: int
    builder: str | None = None
    params: int | None = None
    macs: int | None = None  # under ``counter``: the number compared with the paper
    macs_convlinear: int | None = None  # plain conv + linear MACs
    counter: str = "macs"
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def _paper(self, column: str) -> float | None:
        try:
            return float(self.row.get(column, ""))
        except ValueError:
            return None

    @property
    def paper_params_m(self) -> float | None:
        return self._paper("params_M")

    @property
    def paper_macs_g(self) -> float | None:
        return self._paper("macs_G")

    @property
    def params_m(self) -> float | None:
        return None if self.params is None else self.params / 1e6

    @property
    def macs_g(self) -> float | None:
        return None if self.macs is None else self.macs / 1e9

    @staticmethod
    def _rel(measured, paper):
        if measured is None or paper in (None, 0):
            return None
        return (measured - paper) / paper

    @property
    def macs_convlinear_g(self) -> float | None:
        return None if self.macs_convlinear is None else self.macs_convlinear / 1e9

    @property
    def params_diff(self) -> float | None:
        return self._rel(self.params_m, self.paper_params_m)

    @property
    def macs_diff(self) -> float | None:
        return self._rel(self.macs_g, self.paper_macs_g)

    @property
    def ok(self) -> bool:
        dp, dm = self.params_diff, self.macs_diff
        return (dp is not None and dm is not None
                and abs(dp) <= PARAMS_TOL + 1e-12 and abs(dm) <= MACS_TOL + 1e-12)

    @property
    def ok_or_printed(self) -> bool:
        """Each column within tolerance or, rounded to the digits the paper prints, equal to it
        (e.g. 0.5555 G against a printed 0.6)."""
        columns = ((self.params_diff, PARAMS_TOL, self.params_m, "params_M"),
                   (self.macs_diff, MACS_TOL, self.macs_g, "macs_G"))
        return all(diff is not None and (abs(diff) <= tol + 1e-12 or _printed_equal(
            value, self.row.get(column, ""))) for diff, tol, value, column in columns)

    @property
    def ok_convlinear(self) -> bool:
        """``ok`` with the plain conv + linear MACs instead of the paper's convention."""
        dp = self.params_diff
        dm = self._rel(self.macs_convlinear_g, self.paper_macs_g)
        return (dp is not None and dm is not None
                and abs(dp) <= PARAMS_TOL + 1e-12 and abs(dm) <= MACS_TOL + 1e-12)

    def to_dict(self) -> dict:
        out = dict(self.row)
        out.update(
            measured_params_M=None if self.params is None else round(self.params_m, 6),
            measured_macs_G=None if self.macs is None else round(self.macs_g, 6),
            measured_params=self.params,
            measured_macs=self.macs,
            counter=self.counter,
            measured_macs_convlinear_G=(None if self.macs_convlinear is None
                                        else round(self.macs_convlinear_g, 6)),
            measured_macs_convlinear=self.macs_convlinear,
            params_rel_diff=None if self.params_diff is None else round(self.params_diff, 5),
            macs_rel_diff=None if self.macs_diff is None else round(self.macs_diff, 5),
            within_tolerance=self.ok,
            within_tolerance_or_printed=self.ok_or_printed,
            builder=self.builder,
            error=self.error,
        )
        return out


def _printed_equal(measured: float | None, printed: str) -> bool:
    """``measured`` rounded half-up to the decimals of ``printed`` (``"0.10"``: 2) equals it."""
    try:
        paper = Decimal(printed.strip())
    except InvalidOperation:
        return False
    if measured is None or not paper.is_finite():
        return False
    step = Decimal(1).scaleb(paper.as_tuple().exponent)
    return Decimal(repr(measured)).quantize(step, rounding=ROUND_HALF_UP) == paper


def packaged_targets() -> Traversable:
    """The papers' target rows shipped with leanconv (``leanconv/targets/complexity.csv``)."""
    return resources.files("leanconv") / "targets" / "complexity.csv"


def read_targets(path: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Rows of a targets CSV (``#``-prefixed lines are comments); ``None``: the packaged one."""
    source = packaged_targets() if path is None else Path(path)
    with source.open(newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    rows = list(csv.DictReader(lines))
    required = {"input", "model", "conv"}
    if rows and not required <= set(rows[0]):
        raise ValueError(f"{path}: the CSV needs the columns {sorted(required)}, "
                         f"has {sorted(rows[0])}")
    return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in rows]


def evaluate_row(row: dict[str, str], index: int = 0, counter: str | None = None) -> RowResult:
    """Build and profile one row; any failure is recorded in ``error`` rather than raised.

    MACs are counted under ``counter`` (default: the paper's convention, :func:`paper_counter`).
    """
    result = RowResult(row=row, index=index,
                       counter=counter or paper_counter(row.get("paper", "")))
    try:
        conv = row.get("conv") or "vanilla"
        conv_kwargs, model_kwargs = parse_hparams(row.get("hparams", ""), conv)
        # A paper that built a competitor its own way: placement override (docs/placement.md).
        override = _TABLE_PLACEMENTS.get((row.get("paper", ""), conv))
        if override is not None:
            model_kwargs["placement"] = dict(override)
        classes = row.get("classes")
        in_channels = row.get("in_channels")
        _, (h, w) = parse_input(row["input"])
        model, result.builder = build_model(
            row["model"], conv, input=row["input"],
            num_classes=int(classes) if classes else None,
            in_channels=int(in_channels) if in_channels else None,
            **model_kwargs, **conv_kwargs,
        )
        report = profile(model, (1, int(in_channels) if in_channels else 3, h, w),
                         counter=result.counter)
        result.params, result.macs = report.params, report.counted_macs
        result.macs_convlinear = report.macs
    except Exception as exc:  # one bad row must not stop the table
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def evaluate_rows(rows: Iterable[dict[str, str]], counter: str | None = None) -> list[RowResult]:
    return [evaluate_row(row, i + 1, counter) for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _columns(results: Sequence[RowResult]) -> tuple[list[str], list[list[str]]]:
    head = ["#", "paper", "table", "input", "cls", "model", "conv", "hparams",
            "params M (paper)", "params M", "Δparams", "MACs G (paper)", "MACs G", "ΔMACs",
            "counter", "conv+lin MACs G", "ok"]
    rows = []
    for r in results:
        row = r.row
        rows.append([
            str(r.index), row.get("paper", ""), row.get("table", ""), row.get("input", ""),
            row.get("classes", ""), row.get("model", ""), row.get("conv", ""),
            row.get("hparams", ""),
            row.get("params_M", ""), _fmt(r.params_m, 3), _pct(r.params_diff),
            row.get("macs_G", ""), _fmt(r.macs_g, 4), _pct(r.macs_diff),
            r.counter, _fmt(r.macs_convlinear_g, 4),
            "yes" if r.ok else ("ERROR" if r.error else "printed" if r.ok_or_printed else "no"),
        ])
    return head, rows


def _summary(results: Sequence[RowResult]) -> str:
    n_ok = sum(r.ok for r in results)
    n = len(results)
    errors = sum(r.error is not None for r in results)
    pct = 100 * n_ok / n if n else 0.0
    plain = sum(r.ok_convlinear for r in results)
    printed = sum(r.ok_or_printed for r in results)
    return (f"{n_ok}/{n} rows ({pct:.1f}%) within ±{PARAMS_TOL:.0%} params and "
            f"±{MACS_TOL:.0%} MACs (MACs counted as the `counter` column says; "
            f"{plain}/{n} with plain conv+linear MACs); {printed}/{n} with each column within "
            f"tolerance or equal at the paper's printed precision (ok: `printed`); "
            f"{errors} rows could not be built")


def to_text(results: Sequence[RowResult]) -> str:
    head, rows = _columns(results)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    for r in results:
        if r.error:
            lines.append(f"row {r.index}: {r.error}")
    lines.append(_summary(results))
    return "\n".join(lines)


def to_markdown(results: Sequence[RowResult]) -> str:
    head, rows = _columns(results)

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    errors = [r for r in results if r.error]
    if errors:
        lines.append("")
        lines += [f"- row {r.index}: `{esc(r.error)}`" for r in errors]
    lines += ["", _summary(results), ""]
    return "\n".join(lines)


def to_json(results: Sequence[RowResult]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=2)


def run_tables(targets: str | os.PathLike | None = None, markdown: str | None = None,
               json_path: str | None = None, rows: Sequence[int] | None = None,
               counter: str | None = None) -> list[RowResult]:
    """What ``leanconv tables`` does: evaluate, print, and write markdown / JSON.

    ``targets``: a CSV path (default: the packaged papers' rows, :func:`packaged_targets`);
    ``rows``: 1-based row numbers to evaluate (default: all); ``counter`` forces one counting
    convention for every row (default: each paper's own).
    """
    data = read_targets(targets)
    bad = sorted(i for i in rows or () if not 1 <= i <= len(data))
    if bad:
        raise ValueError(f"rows must be between 1 and {len(data)} (the CSV's data rows), "
                         f"got {bad[0]}")
    wanted = set(rows or range(1, len(data) + 1))
    results = [evaluate_row(row, i, counter) for i, row in enumerate(data, 1) if i in wanted]
    print(to_text(results))
    if markdown:
        with open(markdown, "w") as handle:
            handle.write(to_markdown(results))
    if json_path:
        with open(json_path, "w") as handle:
            handle.write(to_json(results) + "\n")
    return results

