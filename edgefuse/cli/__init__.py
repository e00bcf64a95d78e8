"""The ``edgefuse`` command line.

Thin layer over the stage functions. Each subcommand lives in its own module ``edgefuse/cli/<name>.py``
that defines ``register(subparsers)`` (builds its parser; imports nothing heavy) and
``run(args) -> int`` (imports torch/onnxruntime only when called), so ``edgefuse --help`` stays fast.

User mistakes raise :class:`edgefuse.errors.EdgefuseError`; :func:`main` prints them as one line and returns
the documented exit code (see ``edgefuse/errors.py`` and the README).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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
11 budget exceeded, 12 output exists (use --overwrite), 130 interrupted, 1 internal error (a bug)."""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    from edgefuse import __version__

    parser = argparse.ArgumentParser(
        prog="edgefuse",
        description="Ship language models to edge devices: fuse MLPs, recover, export to ONNX, quantize, profile.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgefuse {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"edgefuse.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand module not shipped in this build
            if exc.name == f"edgefuse.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Default: warnings only (stage commands print their own progress). -v: edgefuse's INFO. -vv: DEBUG, all."""
    root = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.basicConfig(level=root, format="%(levelname)s %(name)s: %(message)s")
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
    try:
        return int(args.run(args) or 0)
    except EdgefuseError as exc:
        print(f"edgefuse: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgefuse: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
