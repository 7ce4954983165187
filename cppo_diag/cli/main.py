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


class _OneLineErrorParser(argparse.ArgumentParser):
    """A subcommand parser whose usage errors are one line (the option and what was expected), not the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrorParser)
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


def _one_line_warnings():
    """Warnings as one line each (``cppo-diag: warning: <message>``), without the source line they came from.
    Returns the previous formatter (``main`` restores it, so calling ``main`` in-process leaves no trace)."""
    import warnings

    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_a, **_k: f"cppo-diag: warning: {message}\n"
    return previous


def error_line(exc: BaseException) -> str:
    """One line for an exception that ends a command: the message (which names the field or file) for bad
    input (ValueError, LookupError, OSError, TypeError and cppo-diag's own errors); for anything else the
    exception type too, and how to see the traceback."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory (is an input value far larger than expected, e.g. a huge 'pos'?) {msg}"
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {msg}"
    if isinstance(exc, (ValueError, LookupError, OSError, TypeError, argparse.ArgumentTypeError)) \
            or type(exc).__module__.startswith("cppo_diag"):
        return msg
    return f"{type(exc).__name__}: {msg} (set CPPO_DIAG_TRACEBACK=1 for the traceback)"


def main(argv: list[str] | None = None) -> int:
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    import warnings

    previous_format = _one_line_warnings()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - every error ends as one line naming what was wrong
        if os.environ.get("CPPO_DIAG_TRACEBACK"):
            raise
        print(f"cppo-diag {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
