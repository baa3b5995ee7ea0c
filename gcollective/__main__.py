"""Command line: ``python -m gcollective {node,status,verify,demo} ...``; ``--help`` on each.

- ``node``: run a standalone member until SIGINT or SIGTERM (then flush and exit 0).
- ``status``: ask a running member for its ``stats()`` over the peer port (see ``_wire``'s
  status query) and print them as a table or as JSON.
- ``verify``: ask members for their version vectors and tree digests (``_verify``) and say
  whether they agree.
- ``demo``: collective.js's cluster example with forked workers.

Exit codes: 0 success, 1 a runtime failure (cannot listen, member unreachable, refused), 2 bad
arguments. Failures are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from ._options import check_resolve_interval
from ._status import SECRET_ENV, CommandError, TlsFiles, format_status, query_status
from ._validate import check_seconds, format_address, is_ascii_digits, parse_address

if TYPE_CHECKING:
    from gevent.pywsgi import WSGIServer

    from ._node import Collective


def _positive_int(text: str) -> int:
    # (not int(text) alone: it takes other scripts' digits, "1_000" and spaces)
    if not is_ascii_digits(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return number


def _port(text: str) -> int:
    number = _positive_int(text)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return number


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _addresses(text: str) -> list[tuple[str, int]]:
    return [_address(part) for part in text.split(",") if part.strip()]


def _seconds(text: str) -> float:
    try:
        return check_seconds("the value", float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _resolve_interval(text: str) -> float:
    try:
        return check_resolve_interval(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _add_security(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-env",
        metavar="VAR",
        help=f"environment variable holding the collective's secret (default: {SECRET_ENV} "
        "if set; the secret itself is never taken on the command line)",
    )
    parser.add_argument("--certfile", help="TLS: this member's certificate (PEM)")
    parser.add_argument("--keyfile", help="TLS: its private key, unless in --certfile")
    parser.add_argument("--cafile", help="TLS: the collective's CA certificate")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gcollective``."""
    parser = argparse.ArgumentParser(
        prog="python -m gcollective",
        description="gcollective: one nested dict shared live by every process of a gevent app.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_node_command(commands)
    _add_status_command(commands)
    _add_verify_command(commands)
    _add_demo_command(commands)
    return parser


#: What ``add_subparsers`` returns: each ``_add_*_command`` adds its command to it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_node_command(commands: Commands) -> None:
    node = commands.add_parser(
        "node",
        help="run a standalone member until SIGINT or SIGTERM",
        description=(
            "Run one member of a collective (for example a seed that keeps the data while "
            "application workers restart). Logs to stderr. SIGINT or SIGTERM sends what is "
            "queued to reachable peers, then exits with 0."
        ),
    )
    node.add_argument(
        "--local", type=_address, required=True, metavar="HOST:PORT", help="address to listen on"
    )
    node.add_argument(
        "--peers",
        type=_addresses,
        action="extend",
        default=[],
        metavar="HOST:PORT,...",
        help="every member's address, comma-separated (may be repeated; --local is skipped); "
        "a HOST that is a DNS name stands for every address it resolves to",
    )
    node.add_argument(
        "--resolve-interval",
        type=_resolve_interval,
        default=5.0,
        metavar="S",
        help="seconds between two resolutions of each DNS name in --peers (default 5)",
    )
    node.add_argument(
        "--max-members",
        type=_positive_int,
        metavar="N",
        help="members learnt from others (not in --peers) kept and dialled at most "
        "(default: max_members' default, see docs/membership.rst)",
    )
    node.add_argument(
        "--advertise", type=_address, metavar="HOST:PORT", help="address announced to peers"
    )
    _add_security(node)
    node.add_argument(
        "--data-dir",
        metavar="DIR",
        default=os.environ.get("GCOLLECTIVE_DATA_DIR") or None,
        help="keep the data on disk here and come back with it on restart (default: "
        "GCOLLECTIVE_DATA_DIR if set, else memory only; see docs/durability.rst)",
    )
    node.add_argument(
        "--metrics",
        type=_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP on this address (needs gcollective[metrics])",
    )
    node.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    node.add_argument(
        "--start-timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for a peer's state before carrying on (default 10)",
    )


def _add_status_command(commands: Commands) -> None:
    status = commands.add_parser(
        "status",
        help="print a running member's stats",
        description=(
            "Ask the member listening at HOST:PORT for its stats over the peer protocol "
            "(authenticated when the collective has a secret) and print them."
        ),
    )
    status.add_argument("address", type=_address, metavar="HOST:PORT", help="the member")
    status.add_argument("--json", action="store_true", help="print the stats as JSON")
    status.add_argument(
        "--timeout", type=_seconds, default=5.0, metavar="S", help="seconds to wait (default 5)"
    )
    _add_security(status)


def _add_verify_command(commands: Commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check that members which applied the same operations hold the same data",
        description=(
            "Ask each member for its version vector and digests of its tree (per top-level "
            "key; the tree is not copied) and say whether they agree, which keys differ if "
            "not, and how far behind each member is. Exit 0 when they agree, 1 otherwise."
        ),
    )
    verify.add_argument(
        "addresses", type=_address, nargs="+", metavar="HOST:PORT", help="the members"
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="seconds to wait for each answer (default 30: a big tree takes seconds)",
    )
    verify.add_argument(
        "--settle",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="seconds members may take to catch up before they are judged (default 5)",
    )
    _add_security(verify)


def _add_demo_command(commands: Commands) -> None:
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


def _secret(parser: argparse.ArgumentParser, variable: str | None) -> str | None:
    if variable is None:
        return os.environ.get(SECRET_ENV) or None
    secret = os.environ.get(variable)
    if not secret:
        parser.error(f"--secret-env: environment variable {variable} is not set or empty")
    return secret


def _tls_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TlsFiles:
    files: TlsFiles = {"certfile": args.certfile, "keyfile": args.keyfile, "cafile": args.cafile}
    if any(files.values()) and not (args.certfile and args.cafile):
        parser.error("TLS needs --certfile and --cafile (and --keyfile unless in --certfile)")
    return files if any(files.values()) else {}


def run_node(args: argparse.Namespace, secret: str | None, tls: TlsFiles) -> int:
    """``node``: run a member until SIGINT or SIGTERM."""
    import signal

    import gevent
    from gevent.event import Event

    from ._errors import DataDirError
    from ._node import Collective

    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("gcollective")
    try:
        node = Collective(
            args.local,
            args.peers,
            advertise=args.advertise,
            secret=secret,
            data_dir=args.data_dir,
            resolve_interval=args.resolve_interval,
            **({} if args.max_members is None else {"max_members": args.max_members}),
            **tls,
        )
    except (ValueError, TypeError) as exc:
        raise CommandError(str(exc)) from None
    stopping = Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stopping.set)
    try:
        node.start(timeout=args.start_timeout)
    except OSError as exc:
        raise CommandError(f"cannot listen on {format_address(args.local)}: {exc}") from None
    except (ValueError, DataDirError) as exc:  # an unusable TLS file or data_dir
        raise CommandError(str(exc)) from None
    metrics = _serve_metrics(node, args.metrics) if args.metrics else None
    log.info(
        "member %s running (id %x, %d peers); stop with SIGINT or SIGTERM",
        format_address(args.local),
        node.node_id,
        len(node.peers),
    )
    stopping.wait()
    log.info("stopping: sending what is queued")
    if metrics is not None:
        metrics.stop()
    node.stop()
    logging.shutdown()
    return 0


def _serve_metrics(node: Collective, address: tuple[str, int]) -> WSGIServer:
    """Start the metrics endpoint of ``node`` (``--metrics``), or stop the node and fail."""
    try:
        from ._metrics import describe, serve_metrics

        server = serve_metrics(node, address)
    except (ImportError, OSError) as exc:
        node.stop()
        raise CommandError(f"--metrics {format_address(address)}: {exc}") from None
    logging.getLogger("gcollective").info("metrics at %s", describe(address))
    return server


def run_verify(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``verify``: 0 when the members agree, 1 when they do not or one cannot be asked."""
    from ._verify import format_report, verify
    from ._wire import encode_digest_request

    secret = _secret(parser, args.secret_env)
    tls = _tls_files(parser, args)

    def query(address: tuple[str, int], buckets: list[int]) -> dict[str, Any]:
        return query_status(
            address,
            secret=secret,
            timeout=args.timeout,
            tls=tls,
            request=encode_digest_request(buckets),
        )

    try:
        report = verify(args.addresses, query, args.settle, format_address)
    except CommandError as exc:
        print(f"gcollective verify: {exc}", file=sys.stderr)
        return 1
    _print_answer(report, args.json, format_report)
    return 0 if report["agree"] else 1


#: A command's answer: the stats of ``status``, the report of ``verify``.
Answer = TypeVar("Answer", bound=Mapping[str, object])


def _print_answer(answer: Answer, as_json: bool, as_text: Callable[[Answer], str]) -> None:
    """A command's answer on stdout: JSON with ``--json``, else as ``as_text`` lays it out."""
    print(json.dumps(answer, indent=2, sort_keys=True) if as_json else as_text(answer))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return run_verify(parser, args)
    if args.command in ("node", "status"):
        secret = _secret(parser, args.secret_env)
        tls = _tls_files(parser, args)
        try:
            if args.command == "node":
                return run_node(args, secret, tls)
            stats = query_status(args.address, secret=secret, timeout=args.timeout, tls=tls)
        except CommandError as exc:
            print(f"gcollective {args.command}: {exc}", file=sys.stderr)
            return 1
        _print_answer(stats, args.json, format_status)
        return 0
    if args.command == "demo":
        if args.base_port + args.workers - 1 > 65535:
            build_parser().error("--base-port + --workers runs past port 65535")
        from ._demo import run_supervisor

        return run_supervisor(args.workers, args.base_port, args.host, args.once)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
