"""``cppo-diag`` entry point: a thin router over subcommand modules.

Each subcommand is a module ``cppo_diag.cli.<name>_cmd`` exposing

    HELP: str                                   one line shown in ``cppo-diag --help``
    def add_arguments(parser) -> None           fills the subcommand's argparse parser
    def run(args) -> int                        does the work, returns the exit code

Modules are imported only when their subcommand runs (``--help`` stays fast and a missing optional
dependency breaks only its own subcommand).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in --help.
SUBCOMMANDS = [
    "rules",
    "train",
    "demo",
    "report",
    "recompute",
    "stats",
    "doctor",
    "import",
    "app",
    "study",
]


def _module(name: str):
    return importlib.import_module(f"cppo_diag.cli.{name}_cmd")


def _available(only: str | None = None) -> dict[str, object]:
    """Subcommand name -> module, for the modules that exist in this install (``only``: just that one)."""
    found = {}
    for name in [only] if only in SUBCOMMANDS else SUBCOMMANDS:
        try:
            found[name] = _module(name)
        except ModuleNotFoundError as exc:  # subcommand not shipped (or its module is absent)
            if exc.name != f"cppo_diag.cli.{name}_cmd":
                raise
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``only``: add just that subcommand (running one imports nothing else, e.g. not
    ``train``'s torch, which a ``stats`` scan would pay for at every start)."""
    from cppo_diag import __version__

    parser = argparse.ArgumentParser(
        prog="cppo-diag",
        description=(
            "Diagnostics for token-level trust regions in LLM reinforcement learning: record per-token "
            "log-probs from any trainer, recompute CPPO / DPPO / GRPO-clip / CISPO / TRM masks offline, "
            "and see where in a sequence the trust region bites."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cppo-diag {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available(only).items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
