"""Discovery by DNS (issue 19): a name in ``peers`` stands for every address it resolves to,
resolved again every ``resolve_interval``; a new address is dialled as it appears. Real
resolution and real processes: the members run in a network namespace of their own, where
``ip netns exec`` puts ``/etc/netns/<namespace>/hosts`` over ``/etc/hosts``, which glibc's
``getaddrinfo`` (behind gevent's default resolver) reads on every call. One name listed on
several lines resolves to all of its addresses (glibc's ``multi``); the test rewrites the
file in place (the bind mount holds its inode) to change the answer while the members run."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
from cluster import HERE, ROOT, NodeProcess, started_members, wait_until

from gcollective import Collective
from gcollective._discovery import is_name, resolve, split_names

FAST = {"sync_interval": 0.1, "backoff_max": 0.3, "resolve_interval": 0.2}
PORT = 7400  # (the namespace is new and holds nothing else: any port is free there)
NAME = "members.gctest"
_made = itertools.count()


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def _missing() -> str | None:
    """Why these tests cannot run here (``None`` when they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` not installed (apt-get install iproute2)"
    return None


class HostsNamespace:
    """A network namespace with ``lo`` up and a hosts file (and a resolv.conf naming a DNS
    server that is not there, so a name missing from the hosts file fails at once)."""

    def __init__(self) -> None:
        self.name = f"gcd{os.getpid()}n{next(_made)}"
        self.etc = f"/etc/netns/{self.name}"
        os.makedirs(self.etc)
        try:
            with open(f"{self.etc}/resolv.conf", "w") as file:
                file.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            self.write_hosts({})
            _run("ip", "netns", "add", self.name)
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def write_hosts(self, names: dict[str, list[str]]) -> None:
        """The hosts file lists each name once per address (in place: see the docstring)."""
        lines = ["127.0.0.1 localhost\n"]
        for name, addresses in names.items():
            lines += [f"{address} {name}\n" for address in addresses]
        mode = "r+" if os.path.exists(f"{self.etc}/hosts") else "w"
        with open(f"{self.etc}/hosts", mode) as file:
            file.seek(0)
            file.truncate()
            file.write("".join(lines))

    def launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in map(int, done.stdout.split()):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=30)
        shutil.rmtree(self.etc, ignore_errors=True)


class NamedMember(NodeProcess):
    """A member process (tests/node_process.py) in ``namespace``, listening on ``host``;
    its stderr (its log, INFO and up) goes to ``log_path``."""

    def __init__(self, namespace: HostsNamespace, host: str, peers: list[str], log_path: str,
                 **options: Any) -> None:  # fmt: skip
        self.port = PORT
        self.local = f"{host}:{PORT}"
        self.peers = peers
        self.options = {**FAST, **options}
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        env["GCOLLECTIVE_TEST_LOG"] = "INFO"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*namespace.launcher(), sys.executable, os.path.join(HERE, "node_process.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )

    def log(self) -> str:
        with open(self.log_path) as file:
            return file.read()


@pytest.fixture
def namespace():
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    made = HostsNamespace()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def members(namespace, tmp_path):
    """``start(host, peers, **options)``: a started member in the namespace; all stopped."""

    def make(host: str, peers: list[str], **options: Any) -> NamedMember:
        return NamedMember(namespace, host, peers, str(tmp_path / f"{host}.log"), **options)

    yield from started_members(make)


def connected_to(member: NamedMember, others: list[NamedMember]) -> bool:
    peers = member.call("stats")["peers"]
    return all(peers.get(other.local, {}).get("state") == "connected" for other in others)


def full_mesh(group: list[NamedMember]) -> bool:
    return all(connected_to(m, [o for o in group if o is not m]) for m in group)


def test_a_name_resolving_to_several_addresses_changed_while_running_brings_the_new_member_in(
    namespace, members
):
    name = f"{NAME}:{PORT}"
    namespace.write_hosts({NAME: ["127.0.0.2", "127.0.0.3"]})
    a = members("127.0.0.2", [name])
    b = members("127.0.0.3", [name])
    wait_until(lambda: full_mesh([a, b]), what="the two members the name lists linked")
    assert a.call("stats")["dns"] == {name: {"addresses": [b.local], "error": None}}
    assert a.call("stats")["members"][b.local]["learnt"] == "dns"
    a.call("set", key="before", value=1)

    # A third member, which lists nobody: only the name's new answer can bring it in.
    c = members("127.0.0.4", [])
    namespace.write_hosts({NAME: ["127.0.0.2", "127.0.0.3", "127.0.0.4"]})
    wait_until(lambda: full_mesh([a, b, c]), timeout=30, what="the new member dialled")
    for member in (a, b):  # (c may reach one of them through the other first: gossip)
        wait_until(
            lambda m=member: c.local in m.call("stats")["dns"][name]["addresses"],
            what="the new answer",
        )
        assert member.call("stats")["members"][c.local]["learnt"] == "dns"
    wait_until(lambda: c.call("get", key="before")["value"] == 1, what="c caught up")
    c.call("set", key="from_c", value=2)
    for member in (a, b):
        wait_until(lambda m=member: m.call("get", key="from_c")["value"] == 2, what="c's write")

    # Gone from DNS is not gone: b stays a member (membership, not DNS, decides liveness).
    namespace.write_hosts({NAME: ["127.0.0.2", "127.0.0.4"]})
    wait_until(
        lambda: a.call("stats")["dns"][name]["addresses"] == [c.local], what="b gone from DNS"
    )
    assert connected_to(a, [b]) and connected_to(b, [a])
    b.call("set", key="from_b", value=3)
    wait_until(lambda: a.call("get", key="from_b")["value"] == 3, what="b's write after")


def test_members_announcing_their_own_names_are_dialled_once_not_also_by_address(
    namespace, members
):
    """A StatefulSet's pods: the service name gives their addresses, each advertises its own
    name. Each must be dialled once, by the name it announces: a second link to its address
    would send everything twice and never hear back (holding back what may be forgotten)."""
    name = f"{NAME}:{PORT}"
    namespace.write_hosts(
        {NAME: ["127.0.0.2", "127.0.0.3"], "a.gctest": ["127.0.0.2"], "b.gctest": ["127.0.0.3"]}
    )
    a = members("127.0.0.2", [name], advertise=f"a.gctest:{PORT}")
    b = members("127.0.0.3", [name], advertise=f"b.gctest:{PORT}")

    def only_by_name(member: NamedMember, other: str) -> bool:
        peers = member.call("stats")["peers"]
        return set(peers) == {other} and peers[other]["state"] == "connected"

    wait_until(
        lambda: only_by_name(a, f"b.gctest:{PORT}") and only_by_name(b, f"a.gctest:{PORT}"),
        timeout=30,
        what="each member linked once, under the name it announces",
    )
    a.call("set", key="x", value=1)
    wait_until(lambda: b.call("get", key="x")["value"] == 1, what="replication")
    assert set(a.call("stats")["members"]) == {f"b.gctest:{PORT}"}


def test_a_name_that_does_not_resolve_at_first_warns_once_and_dials_once_it_does(
    namespace, members
):
    name = f"{NAME}:{PORT}"
    a = members("127.0.0.2", [name])  # (starts although its only peer does not resolve)
    b = members("127.0.0.3", [])
    wait_until(lambda: a.call("stats")["dns"][name]["error"] is not None, what="the failure noted")
    # Several rounds of failures, then the name resolves: one warning each way, no more.
    wait_until(lambda: a.call("stats")["uptime"] > 10 * FAST["resolve_interval"], what="rounds")
    namespace.write_hosts({NAME: ["127.0.0.3"]})
    wait_until(lambda: full_mesh([a, b]), timeout=30, what="the member found once resolved")
    assert a.call("stats")["dns"] == {name: {"addresses": [b.local], "error": None}}
    log = a.log()
    assert log.count("does not resolve") == 1, log
    assert log.count("resolves again") == 1, log

    # Failing again keeps the last good answer (and the member, linked).
    namespace.write_hosts({})
    wait_until(lambda: a.call("stats")["dns"][name]["error"] is not None, what="fails again")
    assert a.call("stats")["dns"][name]["addresses"] == [b.local]
    assert connected_to(a, [b])
    assert a.log().count("keeping its last 1 address(es)") == 1


def test_a_name_resolving_to_the_member_itself_is_skipped_and_names_are_told_from_addresses():
    assert is_name("localhost") and is_name("members.example")
    assert not is_name("127.0.0.1") and not is_name("::1") and not is_name("fe80::1%eth0")
    assert split_names([("127.0.0.1", 1), ("localhost", 2)]) == (
        [("127.0.0.1", 1)],
        [("localhost", 2)],
    )
    assert ("127.0.0.1", 7) in resolve(("localhost", 7))  # (real resolution, gevent's)
    from cluster import free_port

    port = free_port()
    node = Collective(f"127.0.0.1:{port}", [f"localhost:{port}"], **FAST)
    node.start(timeout=2)
    try:
        stats = node.stats()
        assert stats["peers"] == {}, "its own address must not be dialled"
        assert stats["dns"] == {f"localhost:{port}": {"addresses": [], "error": None}}
    finally:
        node.stop()


@pytest.mark.parametrize("bad", [0, 0.01, -1, float("nan"), "5", True, None])
def test_resolve_interval_out_of_range_is_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="resolve_interval must be a number of seconds"):
        Collective("127.0.0.1:1", [], resolve_interval=bad)


def test_the_stats_of_a_member_without_names_say_so():
    node = Collective("127.0.0.1:1", ["127.0.0.1:2"])
    assert json.dumps(node.stats()["dns"]) == "{}"


def test_the_cli_node_takes_a_name_resolve_interval_and_max_members(namespace, members, tmp_path):
    """``python -m gcollective node --peers NAME:PORT --resolve-interval S --max-members N``
    dials every address the name resolves to; ``status`` shows how each member was learnt."""
    name = f"{NAME}:{PORT}"
    b = members("127.0.0.3", [])
    c = members("127.0.0.4", [])
    namespace.write_hosts({NAME: ["127.0.0.2", "127.0.0.3", "127.0.0.4"]})
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(tmp_path / "cli.log", "w") as log:
        cli = subprocess.Popen(
            [*namespace.launcher(), sys.executable, "-m", "gcollective", "node",
             "--local", f"127.0.0.2:{PORT}", "--peers", name, "--resolve-interval", "0.2",
             "--max-members", "8"],
            env=env, stderr=log,
        )  # fmt: skip
    try:
        wait_until(lambda: connected_to(b, [c]) and connected_to(c, [b]), what="b and c linked")

        def status() -> dict[str, Any]:
            done = subprocess.run(
                [*namespace.launcher(), sys.executable, "-m", "gcollective", "status",
                 f"127.0.0.2:{PORT}", "--json"],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            return json.loads(done.stdout) if done.returncode == 0 else {}

        wait_until(
            lambda: all(
                status().get("peers", {}).get(m.local, {}).get("state") == "connected"
                for m in (b, c)
            ),
            timeout=30,
            what="the CLI member linked to both addresses of the name",
        )
        stats = status()
        assert {stats["members"][m.local]["learnt"] for m in (b, c)} == {"dns"}
        assert sorted(stats["dns"][name]["addresses"]) == [b.local, c.local]
    finally:
        cli.terminate()
        cli.wait(30)
    assert cli.returncode == 0


@pytest.mark.parametrize(
    "flag, value",
    [("--resolve-interval", "0.01"), ("--resolve-interval", "x"), ("--max-members", "0")],
)
def test_the_cli_refuses_a_bad_resolve_interval_or_max_members(flag, value):
    done = subprocess.run(
        [sys.executable, "-m", "gcollective", "node", "--local", "127.0.0.1:1", flag, value],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and f"argument {flag}" in done.stderr, done.stderr


def test_the_gunicorn_worker_reads_resolve_interval_and_max_members_and_binds_under_a_name():
    from gcollective.gunicorn import ConfigError, settings_from_env

    env = {
        "GCOLLECTIVE_HOSTS": "members.example",  # (a headless service: never resolved here)
        "GCOLLECTIVE_BIND": "10.1.2.3",
        "GCOLLECTIVE_RESOLVE_INTERVAL": "2.5",
        "GCOLLECTIVE_MAX_MEMBERS": "64",
    }
    settings = settings_from_env(env, 2)
    assert settings.slots == (("10.1.2.3", 9400), ("10.1.2.3", 9401))
    assert settings.peers == (("members.example", 9400), ("members.example", 9401))
    assert (settings.resolve_interval, settings.max_members) == (2.5, 64)
    peers = {"GCOLLECTIVE_PEERS": "members.example:7000", "GCOLLECTIVE_BIND": "10.1.2.3"}
    assert settings_from_env(peers, 1).slots == (("10.1.2.3", 7000),)
    plain = settings_from_env({}, 1)
    assert (plain.resolve_interval, plain.max_members) == (None, None)
    for variable, bad in [
        ("GCOLLECTIVE_RESOLVE_INTERVAL", "0"),
        ("GCOLLECTIVE_RESOLVE_INTERVAL", "soon"),
        ("GCOLLECTIVE_MAX_MEMBERS", "0"),
        ("GCOLLECTIVE_MAX_MEMBERS", "100000"),
    ]:
        with pytest.raises(ConfigError) as caught:
            settings_from_env({variable: bad}, 1)
        assert caught.value.variable == variable
    with pytest.raises(ConfigError, match="not among the hosts"):  # (no name: as before)
        settings_from_env({"GCOLLECTIVE_HOSTS": "10.0.0.1", "GCOLLECTIVE_BIND": "10.0.0.2"}, 1)
