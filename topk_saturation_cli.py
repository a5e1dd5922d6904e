"""The ``topk-saturation`` console script.

It assembles the subcommands of both packages; it lives outside them so that the package
dependency stays one way (``interventions`` may import ``probes``, never the reverse).
Subcommands mirror the Python API:

    topk-saturation analyze     probes.analysis.analyze
    topk-saturation probe       probes.probe_run.run_probe
    topk-saturation intervene   interventions (steering and patching)
    topk-saturation early-exit  interventions.early_exit
    topk-saturation compare     probes.compare.compare

Bad input prints one line on stderr and exits with code 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

PROG = "topk-saturation"

# (module, function that registers the subcommand).
_SUBCOMMANDS = [
    ("probes.cli", "add_analyze_parser"),
    ("probes.cli", "add_probe_parser"),
    ("interventions.cli", "add_intervene_parser"),
    ("interventions.cli", "add_early_exit_parser"),
    ("probes.cli", "add_compare_parser"),
]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand.

    Returns:
        The ``topk-saturation`` parser; each subcommand sets ``func``, the function that
        runs it.
    """
    parser = _Parser(prog=PROG, description="How transformers settle their top-k predictions "
                     "layer by layer.")
    from probes import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module_name, register in _SUBCOMMANDS:
        module = importlib.import_module(module_name)
        if hasattr(module, register):
            getattr(module, register)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn user errors into one line and exit code 2.

    Args:
        argv: The arguments after the program name (None: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for a user error (one line on stderr), 130 when
        interrupted. Errors in parsing the arguments exit with 2 (``SystemExit``).
    """
    from probes.errors import TopkSaturationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TopkSaturationError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; rerun the same command to resume where it "
              "stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
