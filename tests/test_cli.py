"""The command line, as users run it: ``python -m gcollective node`` and ``status`` in real
processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
from cluster import ROOT, free_ports, wait_until

SECRET = "cli-test-secret-0123456789abcdef"


def gcollective(
    *args: str, env: dict | None = None, timeout: float = 20
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gcollective", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(env),
        cwd=ROOT,
    )


def environment(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GCOLLECTIVE_SECRET"}
    env["PYTHONPATH"] = ROOT
    env.update(extra or {})
    return env


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class Member:
    """``python -m gcollective node`` in a subprocess, its log in a temporary file."""

    def __init__(self, port: int, peers: list[int], env: dict | None = None, *extra: str):
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by the fixture
        args = ["--local", self.address, "--log-level", "INFO", *extra]
        if peers:
            args += ["--peers", ",".join(f"127.0.0.1:{p}" for p in peers)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gcollective", "node", *args],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=environment(env),
            cwd=ROOT,
        )
        wait_until(lambda: listening(port) or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


@pytest.fixture
def member():
    made: list[Member] = []

    def make(port: int, peers=(), env=None, *extra: str) -> Member:
        m = Member(port, list(peers), env, *extra)
        made.append(m)
        return m

    yield make
    for m in made:
        if m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(10)
        m.log.close()


def test_status_of_two_members_as_a_table_and_as_json(member):
    a_port, b_port = free_ports(2)
    a = member(a_port, [a_port, b_port])
    b = member(b_port, [a_port, b_port])

    def both_connected():
        done = gcollective("status", a.address, "--json")
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        return stats["peers"][b.address]["state"] == "connected" and stats

    stats = wait_until(both_connected)
    assert stats["address"] == a.address and stats["running"] is True
    assert set(stats["peers"]) == {b.address}

    table = gcollective("status", b.address)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("node ") and b.address in lines[0] and "running" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    members = next(i for i, line in enumerate(lines) if line.startswith("MEMBER"))
    rows = lines[header + 1 : members]
    assert len(rows) == 1 and rows[0].split()[:2] == [a.address, "connected"]

    assert a.stop(signal.SIGTERM) == 0
    assert b.stop(signal.SIGINT) == 0
    for m in (a, b):
        out = m.output()
        assert "running (id" in out and "stopped" in out and "Traceback" not in out


def test_status_lists_the_members_and_how_each_was_learnt(member):
    seed_port, b_port, c_port = free_ports(3)
    seed = member(seed_port, [seed_port])
    b = member(b_port, [b_port, seed_port])  # each knows the seed only
    c = member(c_port, [c_port, seed_port])

    def member_rows() -> dict[str, list[str]]:
        done = gcollective("status", c.address)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("MEMBER"))
        return {line.split()[0]: line.split()[1:] for line in lines[header + 1 :]}

    def both_alive() -> bool:
        rows = member_rows()
        return len(rows) == 2 and all(row[0] == "alive" for row in rows.values())

    wait_until(both_alive)
    rows = member_rows()
    assert rows[seed.address][2] == "configured"
    assert rows[b.address][2] in ("gossip", "announced")
    assert b.stop(signal.SIGTERM) == 0
    wait_until(lambda: member_rows()[b.address][0] == "left")
    seed.stop()


def test_status_with_a_secret(member):
    (port,) = free_ports(1)
    env = {"GCOLLECTIVE_SECRET": SECRET}
    m = member(port, [], env)
    done = gcollective("status", m.address, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["address"] == m.address
    # The secret from a variable named on the command line.
    done = gcollective("status", m.address, "--secret-env", "MY_SECRET", env={"MY_SECRET": SECRET})
    assert done.returncode == 0, done.stderr
    # Without the secret, or with another one: refused, said in one line.
    for env_ in ({}, {"GCOLLECTIVE_SECRET": SECRET + "x"}):
        done = gcollective("status", m.address, env=env_)
        assert done.returncode == 1
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
        assert "secret" in done.stderr and "Traceback" not in done.stderr
    assert m.stop() == 0
    # The member's log says what was asked, not that a handshake was garbled.
    assert "status query without the secret" in m.output()


def test_status_of_an_unreachable_member_fails_in_one_line():
    (port,) = free_ports(1)
    done = gcollective("status", f"127.0.0.1:{port}", "--timeout", "2")
    assert done.returncode == 1
    assert done.stderr.startswith("gcollective status: cannot get the status of")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["status", "nope"],
        ["status", "127.0.0.1:0"],
        ["status", "127.0.0.1:1", "--timeout", "-1"],
        ["status"],
        ["node"],
        ["node", "--local", "127.0.0.1:99999"],
        ["node", "--local", "127.0.0.1:7000", "--peers", "127.0.0.1:7001,bad"],
        ["node", "--local", "127.0.0.1:7000", "--secret-env", "GCOLLECTIVE_TEST_UNSET"],
        ["node", "--local", "127.0.0.1:7000", "--certfile", "x.pem"],
        ["node", "--local", "127.0.0.1:7000", "--log-level", "LOUD"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_with_usage(args):
    done = gcollective(*args)
    assert done.returncode == 2, (args, done.stderr)
    assert "usage:" in done.stderr and "Traceback" not in done.stderr


def test_help_everywhere():
    for args in ([], ["node"], ["status"], ["demo"]):
        done = gcollective(*args, "--help")
        assert done.returncode == 0 and "usage:" in done.stdout


def test_node_that_cannot_listen_fails_in_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        done = gcollective("node", "--local", address)
    assert done.returncode == 1
    assert "cannot listen on" in done.stderr and "Traceback" not in done.stderr


def test_status_of_something_that_never_answers_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts (in the kernel), never says a word
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        done = gcollective("status", address, "--timeout", "0.5")
    assert done.returncode == 1
    assert "no answer within 0.5s" in done.stderr and "Traceback" not in done.stderr


def test_status_over_tls_with_a_secret(tmp_path):
    """The query runs the same handshakes as a member (in this process, to stay quick)."""
    import trustme

    from gcollective import Collective
    from gcollective._status import CommandError, format_status, query_status

    ca = trustme.CA()
    cafile = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(cafile)
    files = {}
    for name in ("member", "client"):
        certfile = str(tmp_path / f"{name}.pem")
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(certfile)
        files[name] = {"certfile": certfile, "cafile": cafile}
    (port,) = free_ports(1)
    node = Collective(f"127.0.0.1:{port}", secret=SECRET, **files["member"])
    node.start()
    try:
        node.set("a", 1)
        stats = query_status(("127.0.0.1", port), secret=SECRET, tls=files["client"])
        assert stats["node_id"] == f"{node.node_id:x}" and stats["top_level_keys"] == 1
        assert format_status(stats).startswith(f"node {node.node_id:x} at 127.0.0.1:{port}")
        with pytest.raises(CommandError):
            query_status(("127.0.0.1", port), secret=SECRET, timeout=2)  # no TLS
    finally:
        node.stop()
