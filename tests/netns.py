"""Real kernel network faults for tests: members in their own network namespaces.

``Network(count)`` makes one namespace per member plus a hub namespace holding a bridge; each
member's ``eth0`` (a veth pair to the bridge) gets ``10.77.0.<i+1>/24``. Every address lives
only inside namespaces made here, so the host's network is never touched. ``impair(i, rule)``
installs an nftables rule in member i's namespace that applies to every packet it sends or
receives on ``eth0`` (``LOSS`` drops a quarter of them at random, ``PARTITION`` all of them);
``restore(i)`` removes it and returns how many packets it dropped, which proves the fault
happened. Namespace names carry the test process's pid and a counter, so parallel runs do not
collide; ``close()`` deletes them all (killing whatever still runs inside).

Needs root, ``ip`` with netns support and ``nft``: ``missing()`` says what is missing, for a
skip.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from typing import Any

from cluster import HERE, ROOT, NodeProcess

LOSS = "numgen random mod 100 < 25"  # a quarter of the packets, each way, independently
PARTITION = ""  # every packet
_TABLE = "gcollective_test"
_made = itertools.count()


def _run(*command: str, stdin: str | None = None) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def missing() -> str | None:
    """Why namespaced tests cannot run here (``None`` when they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed (apt-get install {package})"
    probe = f"gct{os.getpid()}p{next(_made)}"
    try:
        _run("ip", "netns", "add", probe)
        try:
            _run("ip", "netns", "exec", probe, "nft", "list", "ruleset")
        finally:
            _run("ip", "netns", "delete", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot use network namespaces or nftables here: {exc}"
    return None


class Network:
    """``count`` member namespaces joined by a bridge (see the module docstring)."""

    def __init__(self, count: int) -> None:
        tag = f"gct{os.getpid()}n{next(_made)}"
        self.hub = f"{tag}h"
        self.members = [f"{tag}m{i}" for i in range(count)]
        self.made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self._add(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.members):
            self._add(name)
            port = f"v{i}"
            _run("ip", "link", "add", port, "netns", self.hub, "type", "veth", "peer", "name",
                 "eth0", "netns", name)  # fmt: skip
            _run("ip", "-n", self.hub, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.hub, "link", "set", port, "up")
            _run("ip", "-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")

    def _add(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)

    def address(self, i: int) -> str:
        return f"10.77.0.{i + 1}"

    def launcher(self, i: int) -> list[str]:
        """The command prefix that runs a program inside member i's namespace."""
        return ["ip", "netns", "exec", self.members[i]]

    def impair(self, i: int, rule: str) -> None:
        """Drop member i's packets that match ``rule`` (nftables syntax), both ways."""
        self.restore(i)
        chains = "".join(
            f"chain {hook} {{ type filter hook {hook} priority 0; policy accept; "
            f'{way} "eth0" {rule} counter drop; }}\n'
            for hook, way in (("input", "iifname"), ("output", "oifname"))
        )
        _run(*self.launcher(i), "nft", "-f", "-", stdin=f"table inet {_TABLE} {{\n{chains}}}\n")

    def restore(self, i: int) -> int:
        """Remove member i's fault; returns the packets it dropped (0 if there was none)."""
        listing = subprocess.run(
            [*self.launcher(i), "nft", "-j", "list", "table", "inet", _TABLE],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if listing.returncode != 0:
            return 0  # no fault installed
        _run(*self.launcher(i), "nft", "delete", "table", "inet", _TABLE)
        return sum(_counted_packets(item) for item in json.loads(listing.stdout)["nftables"])

    def close(self) -> None:
        """Delete every namespace made (their interfaces and rules go with them)."""
        for name in reversed(self.made):
            for pid in _pids_in(name):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        self.made.clear()


def _pids_in(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(word) for word in done.stdout.split()]


def _counted_packets(item: dict[str, Any]) -> int:
    rule = item.get("rule")
    if not rule:
        return 0
    return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)


class NamespacedMember(NodeProcess):
    """A member process (tests/node_process.py) inside member ``i``'s namespace of
    ``network``, listening on ``port`` there; its peers are every member's address."""

    def __init__(self, network: Network, i: int, port: int, **options: Any) -> None:
        self.port = port
        self.local = f"{network.address(i)}:{port}"
        self.peers = [f"{network.address(j)}:{port}" for j in range(len(network.members))]
        self.options = options
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*network.launcher(i), sys.executable, os.path.join(HERE, "node_process.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
