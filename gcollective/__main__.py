"""Command line: ``python -m gcollective demo [--workers N]``."""

from __future__ import annotations

import argparse
import os
import sys


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return number


def _port(text: str) -> int:
    number = _positive_int(text)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gcollective``."""
    parser = argparse.ArgumentParser(
        prog="python -m gcollective",
        description="gcollective: one nested dict shared live by every process of a gevent app.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="run collective.js's cluster example with forked worker processes",
        description=(
            "A supervisor forks N workers, each a member on consecutive ports. Each sets "
            "'over.nine.thousand' to 0, increments it by 9000, prints 9000 x N, deletes it and "
            "prints None. Dead workers are restarted under the same id and catch up. Ctrl-C "
            "stops."
        ),
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=max(2, os.cpu_count() or 1),
        help="number of worker processes (default: CPU count, at least 2)",
    )
    demo.add_argument(
        "--base-port", type=_port, default=9000, help="port of worker 0 (default 9000)"
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--once", action="store_true", help="exit once every worker has printed None")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.base_port + args.workers - 1 > 65535:
            build_parser().error("--base-port + --workers runs past port 65535")
        from ._demo import run_supervisor

        return run_supervisor(args.workers, args.base_port, args.host, args.once)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
