"""Links that lose packets or go silent, with real kernel faults: three member processes, each
in its own network namespace, nftables dropping their packets while every member writes.

What must hold: nothing written is lost, and once the fault ends the members converge fast
(within ``LOSS_TARGET`` after 25 % loss on every link, ``HEAL_TARGET`` after a partition),
not after TCP's retransmission backoff or ``idle_timeout``. Each case proves its fault really
happened (the rules' counters dropped packets) and that writes were in flight when it ended
(the members disagreed then). CI runs one short run of each; ``pytest -m soak`` repeats them
and runs longer partitions and a flapping link. Figures go to stderr (``-s`` shows them).

The targets bound the time to converge less the longest time a member (or this test) was
runnable but waiting for a CPU (``CpuWaits``): on a loaded runner (load 10-17 on two cores)
a 14 s partition converged 3-5 s after it healed, 3 s of it members waiting for a core,
0.9-1.4 s without. A link waiting out TCP's backoff sleeps, which is not subtracted: with
``stall_timeout=600`` (no redial, as in 0.4.2) the partition case still fails at load 17
(13.4 s, 7.7 s less the waits).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import pytest
from cluster import converged, scheduler_times, wait_until
from netns import LOSS, PARTITION, NamespacedMember, Network, missing

LOSS_TARGET = 3.0  # seconds from the end of 10 s of 25 % loss on every link to convergence
HEAL_TARGET = 2.0  # seconds from a partition's end to convergence
SLACK = 0.5  # a loaded machine delays the test's polling (beyond the waits it subtracts)
BUSY = 14.0  # seconds of writes at the full pace in a partition (see ``partitioned``)
# A partition ends a link within about stall_timeout (2 s) plus a PROGRESS tick (1 s); the
# bound leaves room for a loaded machine and stays far below send_timeout.
SEND_TIMEOUT = 60.0
SILENT_BOUND = 15.0
PORT = 7000  # the namespaces are new and empty: nothing else listens in them
MEMBERS = 3

_why_not = missing()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


@pytest.fixture
def network():
    """``network()`` starts ``MEMBERS`` member processes in namespaces of their own and waits
    until they are all connected; everything is torn down after the test, even on failure."""
    made: list[tuple[Network, list[NamespacedMember]]] = []

    def make(**options) -> tuple[Network, list[NamespacedMember]]:
        net = Network(MEMBERS)
        nodes: list[NamespacedMember] = []
        made.append((net, nodes))
        nodes.extend(NamespacedMember(net, i, PORT, **options) for i in range(MEMBERS))
        for node in nodes:
            node.start()
        wait_until(lambda: all(all_connected(n) for n in nodes), timeout=30, what="connected")
        return net, nodes

    yield make
    for net, nodes in made:
        try:
            for node in nodes:
                node.stop()
        finally:
            net.close()  # the namespaces go, and their rules with them


def all_connected(node: NamespacedMember) -> bool:
    peers = node.call("stats")["peers"].values()
    return len(peers) == MEMBERS - 1 and all(p["state"] == "connected" for p in peers)


def reconnects(nodes: list[NamespacedMember]) -> int:
    """Connections made beyond the first one per link."""
    return sum(p["connects"] - 1 for n in nodes for p in n.call("stats")["peers"].values())


class Writer:
    """Keeps every member writing (a new key each, in turn) while a fault is on."""

    BATCH = 5  # keys per member and round

    def __init__(self, nodes: list[NamespacedMember]) -> None:
        self.nodes = nodes
        self.rounds = 0

    def write_for(self, seconds: float, pause: float = 0.005) -> None:
        """Write in turn for ``seconds`` (the fault's duration, not a synchronisation),
        pausing ``pause`` seconds between rounds (by default about a thousand keys a second
        per member)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = self.rounds * self.BATCH
            for i, node in enumerate(self.nodes):
                node.call("write_keys", prefix=f"m{i}", start=start, count=self.BATCH)
            self.rounds += 1
            time.sleep(pause)

    @property
    def leaves(self) -> int:
        return self.rounds * self.BATCH * len(self.nodes)


def converge_after(nodes: list[NamespacedMember], leaves: int, ended: float) -> float:
    """Seconds from ``ended`` until every member holds the same ``leaves`` leaves."""
    wait_until(lambda: converged(nodes, leaves=leaves), timeout=120, interval=0.02)
    return time.monotonic() - ended


class CpuWaits:
    """How long each of some processes has been runnable but waiting for a CPU since this
    was made: on a loaded machine (a CI runner with other jobs on its cores) that is most of
    a catch-up's wall time, while a member waiting on the network (TCP's retransmission
    backoff, a timeout) sleeps and adds nothing. Subtracting the longest wait from the time
    to converge keeps what the targets bound; on a quiet machine it subtracts ~0. (The
    longest, not the sum: the processes wait in parallel; where they waited one after the
    other on the critical path, this subtracts less than the load added: stricter.)"""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.before = [scheduler_times(pid)[1] for pid in pids]

    def longest(self) -> float:
        """The longest wait of one process so far (seconds)."""
        return max(scheduler_times(pid)[1] - before for pid, before in zip(self.pids, self.before))


def report(case: str, figures: dict[str, object]) -> None:
    print(f"[lossy] {case}: {figures}", file=sys.stderr)


def end_fault(net: Network, members: list[int]) -> list[int]:
    """Remove the faults of ``members``; returns the packets each one's rules dropped."""
    return [net.restore(i) for i in members]


def run_case(
    make: Callable[..., tuple[Network, list[NamespacedMember]]],
    fault: Callable[[Network, Writer], None],
    faulty: list[int],
) -> dict[str, object]:
    """Start members, let ``fault`` impair ``faulty`` members while they write, end it and
    measure the convergence; checks the fault and the writes in flight really happened."""
    net, nodes = make()
    writer = Writer(nodes)
    writer.write_for(0.2)  # some writes before the fault, too
    before = reconnects(nodes)
    fault(net, writer)
    in_flight = not converged(nodes, leaves=writer.leaves)
    waits = CpuWaits([node.proc.pid for node in nodes] + [os.getpid()])
    ended = time.monotonic()  # before the first rule goes: the figure errs on the slow side
    dropped = end_fault(net, faulty)
    seconds = converge_after(nodes, writer.leaves, ended)
    waited = waits.longest()
    figures = {
        "converged_after_s": round(seconds, 2),
        "waited_for_a_cpu_s": round(waited, 2),
        "converged_less_waits_s": round(seconds - waited, 2),
        "dropped_packets": dropped,
        "writes": writer.leaves,
        "in_flight_at_end": in_flight,
        "reconnects": reconnects(nodes) - before,
    }
    assert all(dropped), f"some member's rules dropped nothing: no fault there ({dropped})"
    assert in_flight, "the members agreed when the fault ended: nothing was in flight"
    assert converged(nodes, leaves=writer.leaves)
    return figures


def tls_options(directory) -> dict[str, str]:
    """Options for members that speak TLS, with one certificate naming every address."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(*(f"10.77.0.{i + 1}" for i in range(MEMBERS)))
    files = {"cafile": directory / "ca.pem", "certfile": directory / "member.pem"}
    ca.cert_pem.write_to_path(str(files["cafile"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(files["certfile"]))
    return {name: str(path) for name, path in files.items()}


def lossy(seconds: float) -> Callable[[Network, Writer], None]:
    def fault(net: Network, writer: Writer) -> None:
        for i in range(MEMBERS):
            net.impair(i, LOSS)
        writer.write_for(seconds)

    return fault


def partitioned(seconds: float, member: int = 2) -> Callable[[Network, Writer], None]:
    """``member`` isolated for ``seconds``; past ``BUSY`` seconds the writes slow down so
    that the catch-up after the heal stays the same size (this measures the links, not
    how fast a member applies a backlog)."""

    def fault(net: Network, writer: Writer) -> None:
        net.impair(member, PARTITION)
        writer.write_for(seconds, pause=0.005 * max(1.0, seconds / BUSY))

    return fault


def flapping(seconds: float, period: float = 0.7, member: int = 2) -> Callable:
    """``member`` isolated for ``period``, then reachable for ``period``, over and over; ends
    isolated (the caller heals it)."""

    def fault(net: Network, writer: Writer) -> None:
        deadline = time.monotonic() + seconds
        dropped = 0
        while True:
            net.impair(member, PARTITION)
            writer.write_for(period)
            if time.monotonic() > deadline:
                break
            dropped += net.restore(member)
            writer.write_for(period)
        assert dropped > 0

    return fault


def test_loss_on_every_link_converges_fast_once_it_ends(network):
    figures = run_case(network, lossy(10), list(range(MEMBERS)))
    report("10 s of 25 % loss", figures)
    assert figures["converged_less_waits_s"] < LOSS_TARGET + SLACK, figures


def test_partition_converges_fast_once_it_heals(network):
    figures = run_case(network, partitioned(14), [2])
    report("14 s partition", figures)
    assert figures["converged_less_waits_s"] < HEAL_TARGET + SLACK, figures


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_silent_link_redials_long_before_send_timeout(network, tmp_path, tls):
    """Lost packets end a link after about ``stall_timeout``, not after ``send_timeout``
    (which the kernel now waits, so that a peer alive but not reading keeps its link:
    tests/test_slow_reader.py): the PROGRESS timer tells that nothing answers (over TLS
    too, whose socket holds the connection's descriptor)."""
    net, nodes = network(send_timeout=SEND_TIMEOUT, **(tls_options(tmp_path) if tls else {}))
    links = [p for n in nodes for p in n.call("stats")["peers"].values()]
    assert all(link["tls"] is tls for link in links), links
    writer = Writer(nodes)
    writer.write_for(0.2)
    silent = nodes[2].local
    net.impair(2, PARTITION)
    began = time.monotonic()

    def redialled() -> list[str]:
        writer.write_for(0.05)  # (data in flight to notice the silence by)
        errors = [n.call("stats")["peers"][silent]["last_error"] or "" for n in nodes[:2]]
        return errors if all("no acknowledgement" in e for e in errors) else []

    errors = wait_until(redialled, timeout=SILENT_BOUND, what="links to the silent member ended")
    report("silent link", {"ended_after_s": round(time.monotonic() - began, 2), "why": errors})
    assert all(end_fault(net, [2]))
    wait_until(lambda: converged(nodes, leaves=writer.leaves), timeout=120, interval=0.02)


@pytest.mark.soak
@pytest.mark.parametrize("run", range(5))
def test_soak_loss(network, run):
    figures = run_case(network, lossy(10), list(range(MEMBERS)))
    report(f"10 s of 25 % loss, run {run}", figures)
    assert figures["converged_less_waits_s"] < LOSS_TARGET, figures


@pytest.mark.soak
@pytest.mark.parametrize("seconds", [3, 8, 14, 30, 60])
def test_soak_partition(network, seconds):
    figures = run_case(network, partitioned(seconds), [2])
    report(f"{seconds} s partition", figures)
    assert figures["converged_less_waits_s"] < HEAL_TARGET, figures


@pytest.mark.soak
@pytest.mark.parametrize("run", range(5))
def test_soak_flapping(network, run):
    figures = run_case(network, flapping(10), [2])
    report(f"flapping 0.7 s / 0.7 s for 10 s, run {run}", figures)
    assert figures["converged_less_waits_s"] < HEAL_TARGET, figures
