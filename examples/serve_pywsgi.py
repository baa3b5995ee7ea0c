"""The example app in plain processes: gevent's WSGIServer after ``monkey.patch_all()``.

    python examples/serve_pywsgi.py --processes 3 --http-port 8000 --base-port 9400

starts 3 processes. Process i serves HTTP on ``http-port + i`` and is the gcollective member
``base-port + i``; every process lists all of them as peers. Hits counted through any port
show up on every port. A process that crashes is started again on the same ports and catches
up from the others. Ctrl-C (or SIGTERM) stops them all, each flushing what it still had to
send. Put a load balancer in front of the HTTP ports to serve one site.
"""

import sys

if __name__ == "__main__" and "--member" in sys.argv[1:]:
    # A member process patches first, like any gevent app; the launcher stays unpatched.
    from gevent import monkey

    monkey.patch_all()

import argparse
import os
import signal
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of the launcher (and of each member, which adds ``--member I``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, help="member processes (3)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port of process 0")
    parser.add_argument("--base-port", type=int, default=9400, help="member port of process 0")
    parser.add_argument("--member", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    return args


def run_member(args: argparse.Namespace) -> None:
    """One process: a gcollective member plus a WSGIServer, until SIGTERM or SIGINT."""
    import gevent
    from gevent.pywsgi import WSGIServer

    import gcollective

    sys.path.insert(0, HERE)
    from app import app

    index = args.member
    os.environ["GCOLLECTIVE_WORKER_SLOT"] = str(index)
    peers = [(args.host, args.base_port + i) for i in range(args.processes)]
    gcollective.start((args.host, args.base_port + index), peers)
    server = WSGIServer((args.host, args.http_port + index), app, log=None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, server.stop)
    print(
        f"member {index}: http://{args.host}:{args.http_port + index}/ "
        f"(gcollective {args.host}:{args.base_port + index}, pid {os.getpid()})",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        gcollective.stop()  # flush what is still queued for the others


def launch(args: argparse.Namespace) -> int:
    """Start the members, restart any that dies, stop them all on SIGTERM / SIGINT."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    base_argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]

    def spawn(index: int) -> subprocess.Popen:
        return subprocess.Popen([*base_argv, "--member", str(index)])

    children = {index: spawn(index) for index in range(args.processes)}
    while not stopping:
        time.sleep(0.2)
        for index, child in list(children.items()):
            code = child.poll()
            if code is not None and not stopping:
                print(f"member {index} exited ({code}); starting it again", flush=True)
                time.sleep(0.5)
                children[index] = spawn(index)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


def main(argv: list[str]) -> int:
    """Run the launcher, or one member when started with ``--member``."""
    args = parse_args(argv)
    if args.member is not None:
        run_member(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
