"""The read loop of an accepted connection (``_connections._PlainReader``): a peer that says
HELLO and then nothing is cut after ``idle_timeout``, one that keeps talking is not, however
long it goes on, and what it sends is applied as it comes. Real members, real sockets."""

from __future__ import annotations

import json
import logging
import time

import gevent
import pytest
from cluster import free_port, wait_for
from gevent import socket as gsocket

from gcollective import Collective
from gcollective._connections import _PLAIN_READ_SIZE, _PlainReader
from gcollective._wire import encode_hello

IDLE = 0.6  # idle_timeout of the member under test
HELLO = encode_hello(987654321, "127.0.0.1", 1, 0)
ORIGIN = 77


def ops_frame(seq: int, key: str, value: int) -> bytes:
    """An OPS frame of origin ``ORIGIN``: operation ``seq``, a SET of ``key``."""
    hlc = (int(time.time() * 1000) << 16) + seq
    return (json.dumps([1, ORIGIN, seq, [hlc], 0, "", [key], [value], None]) + "\n").encode()


@pytest.fixture
def member():
    node = Collective(f"127.0.0.1:{free_port()}", [], idle_timeout=IDLE, sync_interval=0.1)
    node.start()
    yield node
    node.stop()


def closed_by_peer(sock: gsocket.socket, within: float) -> bool:
    """True once the member closed ``sock`` (within ``within`` seconds), False if it stays."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except gsocket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_a_peer_silent_after_hello_is_cut_after_idle_timeout(member, caplog):
    sock = gsocket.create_connection(member.local)
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gcollective"):
        sock.sendall(HELLO)
        assert closed_by_peer(sock, 10 * IDLE)
        took = time.monotonic() - began
        wait_for(lambda: any("silent for" in r.getMessage() for r in caplog.records))
    sock.close()
    assert IDLE * 0.9 <= took < 5 * IDLE, took


def test_a_peer_that_keeps_talking_is_never_cut_and_each_frame_applies_as_it_comes(member):
    sock = gsocket.create_connection(member.local)
    sock.sendall(HELLO)
    # Well past idle_timeout in all, each gap well under it: the silence is measured from
    # the last data, not from the connection's start or the previous cut-off check.
    for seq in range(1, 11):
        sock.sendall(ops_frame(seq, f"k{seq}", seq))
        wait_for(lambda seq=seq: member.get(f"k{seq}") == seq)
        gevent.sleep(IDLE / 3)
    assert not closed_by_peer(sock, IDLE / 3)
    # Then it goes quiet: cut within about idle_timeout of its last frame.
    assert closed_by_peer(sock, 10 * IDLE)
    sock.close()


def test_frames_split_over_reads_and_many_in_one_read_all_apply(member):
    sock = gsocket.create_connection(member.local)
    sock.sendall(HELLO)
    frames = b"".join(ops_frame(seq, f"m{seq}", seq) for seq in range(1, 201))
    # One frame cut in three pieces, then the rest in one burst.
    first_end = frames.index(b"\n") + 1
    for piece in (frames[:5], frames[5 : first_end - 3], frames[first_end - 3 : first_end]):
        sock.sendall(piece)
        gevent.sleep(0.05)
    wait_for(lambda: member.get("m1") == 1)
    sock.sendall(frames[first_end:])
    wait_for(lambda: all(member.get(f"m{seq}") == seq for seq in range(1, 201)))
    assert not closed_by_peer(sock, 0.1)
    sock.close()


def test_a_stream_of_full_reads_is_read_in_bigger_pieces():
    """A read that fills the plain read size (a bulk writer's stream of frames) makes the
    next reads bigger: each read costs a decode and an apply of its own, and the 64 KiB
    reads cost a bulk write's receivers 4-7 % more CPU per key than 0.4.2's 256 KiB."""
    sender, receiver = gsocket.socketpair()
    data = b"x" * (_PLAIN_READ_SIZE * 3)
    reads: list[int] = []

    def received(chunk: bytes, now: float) -> bool:
        reads.append(len(chunk))
        return bool(chunk)

    reader = gevent.spawn(_PlainReader(receiver, 30.0, received).run)
    sender.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 4 * len(data))
    sent = 0
    while sent < len(data):  # (the reader runs only once this greenlet yields)
        sent += sender.send(data[sent:], gsocket.MSG_DONTWAIT)
    sender.close()
    reader.get(timeout=10)
    receiver.close()
    assert sum(reads) == len(data)
    assert reads[0] == _PLAIN_READ_SIZE
    assert max(reads) > _PLAIN_READ_SIZE, reads
