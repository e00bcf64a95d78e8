"""The ``edgefuse`` command line.

Thin layer over the stage functions. Each subcommand lives in its own module ``edgefuse/cli/<name>.py``
that defines ``register(subparsers)`` (builds its parser; imports nothing heavy) and
``run(args) -> int`` (imports torch/onnxruntime only when called), so ``edgefuse --help`` stays fast.
Options that set a config key are derived from the typed config (:mod:`edgefuse.cli.options`); every
subcommand takes its positionals anywhere among the options and ``-v``/``-q`` after its name.

User mistakes raise :class:`edgefuse.errors.EdgefuseError`; :func:`main` prints them as one line and returns
the documented exit code (see ``edgefuse/errors.py`` and the README).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from edgefuse.cli.options import CommandParser, add_verbosity
from edgefuse.errors import EdgefuseError

# Order is the order shown by `edgefuse --help`: the pipeline stages, then the whole-pipeline commands.
SUBCOMMANDS: tuple[str, ...] = (
    "fuse",
    "ntk",
    "finetune",
    "export",
    "optimize",
    "quantize",
    "tune",
    "profile",
    "report",
    "run",
    "check",
    "schema",
)

EPILOG = """exit codes: 0 ok, 2 bad argument/config, 3 not found, 4 unsupported architecture, 5 fusion failed,
6 bad data, 7 export validation failed, 8 quantization failed, 9 profiling failed, 10 missing dependency,
11 budget exceeded, 12 output exists (use --overwrite) or may not be replaced, 13 output could not be written
(disk full, read-only), 130 interrupted, 1 internal error (a bug)."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``edgefuse fuse: error: ...; see --help``), exit 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    from edgefuse import __version__

    parser = OneLineParser(
        prog="edgefuse",
        description="Ship language models to edge devices: fuse MLPs, fine-tune to recover accuracy, export to "
        "ONNX, quantize, profile.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgefuse {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"edgefuse.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand module not shipped in this build
            if exc.name == f"edgefuse.cli.{name}":
                continue
            raise
        module.register(sub)
        add_verbosity(sub.choices[name])
    return parser


class QuietLibraries(logging.Filter):
    """Drop warnings that libraries log on the root logger (onnxruntime's quantizer: "Please consider to run
    pre-processing before quantization", on every call) unless -v is given; their errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname.replace("\\", "/")


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Default: warnings only (stage commands print their own progress). -v: edgefuse's INFO. -vv: DEBUG, all."""
    root = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.basicConfig(level=root, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # a failed command prints one line: library advice is shown with -v only
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, QuietLibraries) for f in handler.filters):
                handler.addFilter(QuietLibraries())
    if verbose == 1 and not quiet:
        logging.getLogger("edgefuse").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of exiting (testable as ``main([...])``).

    Example:
        >>> main(["--version"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    from edgefuse.progress import keep_alive

    try:
        # in a log (stderr not a terminal) a long command says it is alive at most every 30 s
        with keep_alive(f"edgefuse {args.command}", enabled=not args.quiet and not sys.stderr.isatty()):
            return int(args.run(args) or 0)
    except BaseException as exc:  # the last line of defence: one line and an exit code, always
        code, line = error_line(exc, verbose=args.verbose)
        if code is None:
            raise
        print(line, file=sys.stderr)
        return code


def one_line(text: object) -> str:
    """``text`` on one line: its lines joined with ``; `` (a user error is one line on stderr)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def error_line(exc: BaseException, *, verbose: int = 0) -> tuple[int | None, str]:
    """(exit code, the line to print) for an exception that reached :func:`main`; (None, "") for SystemExit.

    Example:
        >>> error_line(ValueError("boom"))
        (1, 'edgefuse: internal error: ValueError: boom (a bug in edgefuse; run with -vv for the traceback)')
    """
    from edgefuse.io_utils import describe_os_error

    if isinstance(exc, SystemExit):
        return None, ""
    if isinstance(exc, EdgefuseError):
        return exc.exit_code, f"edgefuse: error: {one_line(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "edgefuse: interrupted; no partial output was left behind"
    if isinstance(exc, OSError) and (text := describe_os_error(exc)):
        from edgefuse.errors import OutputWriteError

        return OutputWriteError.exit_code, f"edgefuse: error: {text}"
    if verbose >= 2:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return 1, (f"edgefuse: internal error: {type(exc).__name__}: {one_line(exc)[:300]} (a bug in edgefuse; "
               "run with -vv for the traceback)")


if __name__ == "__main__":
    raise SystemExit(main())
