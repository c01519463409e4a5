"""``leanconv`` command line: argument parsing only; every command is a thin call into a module.

Each subcommand has one ``_add_<command>(subparsers)`` function below that declares its
arguments and sets ``func`` to the library call that does the work.
"""

from __future__ import annotations

import argparse
import sys

from .layers import available_convs, conv_hparams
from .layers._utils import as_fraction

__all__ = ["add_conv_arguments", "hparams_from_args", "main"]


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
            raise SystemExit(
                f"error: --{unknown[0].replace('_', '-')} does not apply to conv {conv!r}; "
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanconv",
        description="Slim convolutions (SlimConv, SPConv, SCConv, CompConv): build, profile, "
        "train, compare and benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS = [_add_convs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
