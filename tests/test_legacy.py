"""collective.js compatibility mode: the codec, collective.js's store rules, and mixed clusters
of LegacyCollective nodes and faithful collective.js peers (tests/legacy_peer.py) on loopback.

Everything runs in this process: the nodes on the gevent hub of the main thread, the legacy
peers in plain threads with blocking sockets. So waiting is done with ``gevent.sleep``.
"""

from __future__ import annotations

import json
import logging
import time

import gevent
import pytest
from cluster import free_port, free_ports, wait_for
from gevent import socket as gsocket
from legacy_peer import LegacyPeer, js_stringify

from gcollective._errors import (
    InvalidKeyError,
    InvalidValueError,
    NotStartedError,
    ProtocolError,
)
from gcollective._legacy import LegacyCollective
from gcollective._legacy_wire import (
    DELETE,
    INCREMENT,
    SET,
    LegacyStore,
    LineDecoder,
    MixedProtocolError,
    encode_accept,
    encode_data,
    encode_new,
    parse_data,
    parse_message,
    parse_new,
)
from gcollective._node import Collective
from gcollective._wire import encode_hello

HOST = "127.0.0.1"
FAST = {"backoff_min": 0.02, "backoff_max": 0.2, "connect_timeout": 1.0}


def hosts(*ports: int) -> list[dict]:
    return [{"host": HOST, "port": p} for p in ports]


@pytest.fixture
def make():
    """``make.node(port, peer_ports, start=True, **options)`` and ``make.peer(port, ports)``;
    everything made is stopped after the test."""
    made: list = []

    class Make:
        @staticmethod
        def node(port, peer_ports=(), start=True, timeout=5.0, **options):
            node = LegacyCollective(
                f"{HOST}:{port}", [f"{HOST}:{p}" for p in peer_ports], **{**FAST, **options}
            )
            made.append(node)
            if start:
                node.start(timeout=timeout)
            return node

        @staticmethod
        def peer(port, ports=()):
            peer = LegacyPeer({"host": HOST, "port": port}, hosts(*ports))
            made.append(peer)
            return peer.start()

    yield Make
    for thing in reversed(made):
        thing.stop()


def data_line(key, time_ms, value, op=0) -> bytes:
    return (js_stringify([2, [key, time_ms, value, op]]) + "\n").encode()


def now_ms() -> int:
    return int(time.time() * 1000)


def listen(port: int):
    """A gevent listening socket (gevent.socket.create_server would make a blocking one)."""
    sock = gsocket.socket()
    sock.bind((HOST, port))
    sock.listen(8)
    return sock


def read_exactly(sock, size: int, timeout: float = 5.0) -> bytes:
    data = b""
    with gevent.Timeout(timeout):
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, f"connection closed after {data!r}"
            data += chunk
    return data


def joined(members, total: int) -> bool:
    """Every member has a connection to every other one and got the data it asked for."""
    for member in members:
        if isinstance(member, LegacyPeer):
            accepted = any(c[0] == 1 and c[1] is not None for c in list(member.received))
            if member.active != total - 1 or not accepted:
                return False
        else:
            links = member.stats()["peers"].values()
            if len(links) != total - 1 or any(v["state"] != "connected" for v in links):
                return False
    return True


# -- the codec ------------------------------------------------------------------------------------


def test_codec_writes_what_json_stringify_writes():
    assert encode_new(HOST, 9000, True) == b'[0,["127.0.0.1",9000,true]]\n'
    assert encode_accept(None) == b"[1,null]\n"
    data = {"café": {"日本": ["a/b", 1, True, None, 0.5]}, "n": -3}
    assert encode_accept(data) == (js_stringify([1, data]) + "\n").encode()
    line = encode_data("über.ключ", 1700000000123, '✓ "q" \n tab\t', SET)
    assert line == data_line("über.ключ", 1700000000123, '✓ "q" \n tab\t')
    assert line.count(b"\n") == 1  # the newline inside the value is escaped
    assert encode_data("k", 1, None, DELETE) == b'[2,["k",1,null,2]]\n'


def test_decoder_splits_several_lines_and_joins_split_ones():
    lines = [data_line(f"k.{i}", 1000 + i, "é€🎉") for i in range(3)]
    stream = b"".join(lines)
    assert LineDecoder(1 << 20).feed(stream) == [line[:-1] for line in lines]
    decoder = LineDecoder(1 << 20)
    out = []
    for i in range(len(stream)):  # one byte at a time: multi-byte characters split too
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == [line[:-1] for line in lines]
    assert decoder.buffered == 0
    assert [parse_data(parse_message(line)[1])[3] for line in out] == ["é€🎉"] * 3


def test_decoder_refuses_oversized_lines_and_tails():
    with pytest.raises(ProtocolError):
        LineDecoder(1024).feed(b"x" * 1025)
    decoder = LineDecoder(1024)
    decoder.feed(b"x" * 1000)
    with pytest.raises(ProtocolError):
        decoder.feed(b"y" * 100)
    with pytest.raises(ProtocolError):
        LineDecoder(1024).feed(b"[1,null]\n" + b"z" * 2000 + b"\n")
    assert LineDecoder(1024).feed(b"a" * 1024 + b"\n" + b"b" * 1024) == [b"a" * 1024]


def test_parsing_messages():
    assert parse_message(b'[0,["10.0.0.2",9001,true]]') == (0, ["10.0.0.2", 9001, True])
    assert parse_new(["10.0.0.2", 9001, True]) == ("10.0.0.2", 9001, True)
    assert parse_new(["10.0.0.2", 9001, 1]) == ("10.0.0.2", 9001, False)  # only `true` asks
    assert parse_data(["a.b", 5, [1], 0]) == ("a.b", ("a", "b"), 5, [1], SET)
    assert parse_data(["a", 5, 2.5, 1])[4] == INCREMENT
    assert parse_data(["a", 5, "ignored", 2])[3:] == (None, DELETE)
    assert parse_data(["a", 5, 1])[4] == SET  # no operation: collective.js's default
    assert parse_data(["a", 5, 1, 7])[4] == SET  # neither 1 nor 2: a SET, as collective.js
    assert parse_data(["a", 1.7e12, 1, 0])[2] == 1.7e12  # numbers as JSON gives them
    for bad in (
        b"[2,[",
        b"{}",
        b"[9,null]",
        b'[2,["a..b",1,1,0]]',
        b"[2,[5,1,1,0]]",
        b'[2,["a","x",1,0]]',
        b'[2,["a",1,"x",1]]',
        b'[2,["a",1,NaN,0]]',
        b'[0,["h",0,true]]',
    ):
        with pytest.raises(ProtocolError):
            kind, payload = parse_message(bad)
            (parse_new if kind == 0 else parse_data)(payload)
    with pytest.raises(MixedProtocolError, match="native protocol"):
        parse_message(encode_hello(7, HOST, 9000)[:-1])


# -- collective.js's store rules --------------------------------------------------------------


def test_store_compares_times_per_key_string():
    store = LegacyStore()
    assert store.apply("a.b", ("a", "b"), 100, SET, 1)
    assert not store.apply("a.b", ("a", "b"), 99, SET, 2)  # older: loses
    assert store.apply("a.b", ("a", "b"), 100, SET, 3)  # a tie applies
    assert store.data == {"a": {"b": 3}}
    assert store.apply("a", ("a",), 50, SET, "x")  # 'a' never compares with 'a.b'
    assert store.data == {"a": "x"}
    assert not store.apply("a.b", ("a", "b"), 10, SET, 4)  # loses, but walks through 'a'
    assert store.data == {"a": {}}
    assert not store.apply("a.b", ("a", "b"), 99, DELETE, None)
    assert store.apply("a.b", ("a", "b"), 200, DELETE, None)
    assert "a.b" not in store.history  # a DELETE forgets the time...
    assert store.apply("a.b", ("a", "b"), 1, SET, "back")  # ...so an old SET brings it back
    assert store.data == {"a": {"b": "back"}}


def test_store_increments_ignore_time_and_start_from_zero():
    store = LegacyStore()
    store.apply("n", ("n",), 100, SET, 10)
    assert store.apply("n", ("n",), 1, INCREMENT, 5)
    assert store.apply("m.c", ("m", "c"), 1, INCREMENT, 2.5)
    store.apply("s", ("s",), 1, SET, "text")
    store.apply("s", ("s",), 1, INCREMENT, 3)  # not a number: counts as nothing
    assert store.data == {"n": 15, "m": {"c": 2.5}, "s": 3}


def test_store_writes_through_non_objects_and_accept_keeps_history():
    store = LegacyStore()
    store.apply("a", ("a",), 100, SET, [1, 2])
    store.apply("a.b.c", ("a", "b", "c"), 100, SET, 1)
    assert store.data == {"a": {"b": {"c": 1}}}
    store.apply("x.y", ("x", "y"), 100, DELETE, None)  # collective.js walks there first
    assert store.data["x"] == {}
    store.replace({"a": {"b": {"c": 9}}})
    assert not store.apply("a.b.c", ("a", "b", "c"), 99, SET, 0)  # history survived
    assert store.get(("a", "b")) == {"c": 9}


# -- the public API ----------------------------------------------------------------------------


def test_api_matches_the_native_one(make):
    with pytest.raises(NotStartedError):
        LegacyCollective(f"{HOST}:{free_port()}").set("a", 1)
    node = make.node(free_port())
    node.set("users.42.visits", 1)
    node.set("users.42.visits", 2, INCREMENT)
    assert node.incr("users.42.visits") == 4
    assert node.get(("users", "42")) == {"visits": 4}
    node.set("users.42.visits", None, DELETE)
    node.delete("users.42")
    assert node.snapshot() == {"users": {}}
    got = node.get("users")
    got["x"] = 1
    assert node.get("users") == {}  # reads are copies
    for key in ("", "a..b", ".a", ("a", ""), 5, ("a.b", "c")):
        with pytest.raises(InvalidKeyError):
            node.set(key, 1)
    for value in ({1, 2}, float("nan"), {"k": object()}, b"x", "\ud800"):
        with pytest.raises(InvalidValueError):
            node.set("k", value)
    node.set("s", "text")
    with pytest.raises(InvalidValueError):
        node.incr("s")
    with pytest.raises(InvalidValueError):
        node.incr("n", True)
    with pytest.raises(ValueError):
        node.set("k", 1, 3)
    assert node.get("k") is None and node.running and not node.synced
    node.stop()
    assert not node.running and node.get("s") == "text"
    with pytest.raises(NotStartedError):
        node.set("a", 1)


def test_options():
    local = f"{HOST}:{free_port()}"
    node = LegacyCollective(local, [local], protocol="collective.js", sync_interval=1.0)
    assert node.peers == [] and node.max_frame == 256 * 1024 * 1024
    with pytest.raises(ValueError):
        LegacyCollective(local, protocol="gcollective")
    with pytest.raises(TypeError):
        LegacyCollective(local, no_such_option=1)
    with pytest.raises(ValueError):
        LegacyCollective(local, connect_timeout=0)
    assert isinstance(Collective(local, protocol="collective.js"), LegacyCollective)


# -- joining -----------------------------------------------------------------------------------


def test_a_legacy_peer_joins_a_node_and_writes_flow_both_ways(make):
    node_port, peer_port = free_ports(2)
    node = make.node(node_port, [peer_port])  # the peer is not up: the node starts alone
    node.set("config.name", "ann")
    node.set("hits", 10)
    peer = make.peer(peer_port, [node_port, peer_port])
    wait_for(lambda: peer.get("config") == {"name": "ann"}, what="the peer got the data")
    assert peer.get("hits") == 10
    peer.set("from.peer", [1, "two"])
    peer.set("hits", 5, 1)
    wait_for(lambda: node.get("hits") == 15)
    assert node.get("from.peer") == [1, "two"]
    node.incr("hits", 3)
    node.delete("config.name")
    wait_for(lambda: peer.get("hits") == 18 and peer.get("config") == {})
    peer.set("from.peer", None, 2)
    wait_for(lambda: node.get("from") == {})
    assert node.snapshot() == peer.snapshot() == {"config": {}, "hits": 18, "from": {}}
    assert peer.errors == [] and peer.foreign_lines == []


def test_a_node_joins_a_legacy_peer_that_has_data(make):
    node_port, peer_port = free_ports(2)
    peer = make.peer(peer_port, [peer_port, node_port])  # alone: the node is not up yet
    peer.set("shop.cart", {"apples": 3, "note": "ça va"})
    peer.set("count", 7)
    node = make.node(node_port, [peer_port, node_port])
    assert node.synced  # start() returned after the peer's Accept
    assert node.snapshot() == {"shop": {"cart": {"apples": 3, "note": "ça va"}}, "count": 7}
    node.set("count", 1, INCREMENT)
    node.set("shop.cart.apples", 4)
    wait_for(lambda: peer.get("count") == 8 and peer.get("shop.cart.apples") == 4)
    peer.set("shop.cart", None, 2)
    wait_for(lambda: node.get("shop") == {})
    assert peer.errors == [] and peer.foreign_lines == []


def test_a_mixed_cluster_of_four_runs_collective_js_readme_example(make):
    ports = free_ports(4)
    members = [
        make.node(ports[0], ports),
        make.peer(ports[1], ports),
        make.node(ports[2], ports),
        make.peer(ports[3], ports),
    ]

    def everyone(predicate):
        return lambda: all(predicate(m) for m in members)

    # In collective.js, writes made while a member is still joining can miss it (its Accept
    # replaces what it applied; a peer connects to a newcomer only on its New): settle first.
    wait_for(lambda: joined(members, len(ports)), what="everyone connected and joined")
    members[0].set("over.nine.thousand", 0)
    wait_for(everyone(lambda m: m.get("over.nine.thousand") == 0))
    for member in members:
        member.set("over.nine.thousand", 9000, INCREMENT)
    wait_for(everyone(lambda m: m.get("over.nine.thousand") == 36000), what="9000 x 4")
    for i, member in enumerate(members):
        member.set(f"by.m{i}", {"i": i, "name": f"member {i}"})
    wait_for(everyone(lambda m: len(m.get("by") or {}) == 4))
    members[1].set("by.m0", None, DELETE)  # a peer deletes a node's key
    members[2].delete("by.m3")  # a node deletes a peer's key
    members[3].set("over.nine.thousand", None, DELETE)
    expected = {
        "over": {"nine": {}},
        "by": {f"m{i}": {"i": i, "name": f"member {i}"} for i in (1, 2)},
    }
    wait_for(everyone(lambda m: m.snapshot() == expected), what="all converged")
    for peer in members[1::2]:
        assert peer.errors == [] and peer.foreign_lines == []


def test_the_joiner_takes_the_snapshot_and_drops_what_it_applied_before(make):
    # The test plays a collective.js member with (gevent) sockets: it listens where the node
    # expects a member, and reads what the node sends.
    node_port, member_port = free_ports(2)
    listener = listen(member_port)
    node = make.node(node_port, [member_port], start=False)
    starting = gevent.spawn(node.start, 5.0)
    with gevent.Timeout(5):
        incoming, _ = listener.accept()
    new = (js_stringify([0, [HOST, node_port, True]]) + "\n").encode()
    assert read_exactly(incoming, len(new)) == new  # its only member: asked for the data
    node.set("mine", 1)
    with gsocket.create_connection((HOST, node_port)) as out:
        out.sendall(data_line("early", now_ms(), "applied, then dropped"))
        wait_for(lambda: node.get("early"))
        out.sendall(b'[1,{"theirs":{"x":1}}]\n')
        starting.join(5)
        assert starting.successful() and node.synced
    assert node.snapshot() == {"theirs": {"x": 1}}  # 'mine' and 'early' are gone, as in c.js
    incoming.close()
    listener.close()


def test_new_carries_the_advertised_address(make):
    node_port, member_port = free_ports(2)
    listener = listen(member_port)
    node = make.node(node_port, [member_port], start=False, advertise=f"localhost:{node_port}")
    starting = gevent.spawn(node.start, 5.0)
    with gevent.Timeout(5):
        incoming, _ = listener.accept()
    new = b'[0,["localhost",%d,true]]\n' % node_port
    assert read_exactly(incoming, len(new)) == new
    incoming.close()  # went away before its Accept: the node carries on without
    starting.join(5)
    assert starting.successful() and not node.synced
    stats = node.stats()
    assert stats["advertise"] == f"localhost:{node_port}" and stats["protocol"] == "collective.js"
    assert json.loads(json.dumps(stats))["peers"][f"{HOST}:{member_port}"]["connects"] == 1
    listener.close()


def test_a_node_connects_back_to_a_new_member_and_sends_its_data(make):
    node_port, member_port = free_ports(2)
    node = make.node(node_port)
    node.set("a.b", "c")
    listener = listen(member_port)
    with gsocket.create_connection((HOST, node_port)) as out:
        out.sendall((js_stringify([0, [HOST, member_port, True]]) + "\n").encode())
        with gevent.Timeout(5):
            incoming, _ = listener.accept()
    expected = (js_stringify([1, {"a": {"b": "c"}}]) + "\n").encode()
    assert read_exactly(incoming, len(expected)) == expected  # no New: it announced itself
    node.set("later", 1)  # later changes follow on the same connection
    line = read_exactly(incoming, len(data_line("later", now_ms(), 1)))
    key, _, _, value, op = parse_data(parse_message(line[:-1])[1])
    assert (key, value, op) == ("later", 1, SET)
    incoming.close()
    listener.close()


# -- what a Node member really sends ----------------------------------------------------------


def test_a_late_timestamp_loses(make):
    port = free_port()
    node = make.node(port)
    node.set("k", "newest")
    node.set("gone", 1)
    now = now_ms()
    with gsocket.create_connection((HOST, port)) as member:
        member.sendall(data_line("k", now - 60_000, "a minute late"))
        member.sendall(data_line("marker", now, 1))  # same connection: applied in order
        wait_for(lambda: node.get("marker") == 1)
        assert node.get("k") == "newest"
        member.sendall(data_line("k", now + 60_000, "from the future"))
        member.sendall(data_line("gone", now + 60_000, None, DELETE))
        member.sendall(data_line("gone", now, "older than the delete: brings it back"))
        member.sendall(data_line("marker", now, 2))
        wait_for(lambda: node.get("marker") == 2)
    assert node.get("k") == "from the future"
    assert node.get("gone") == "older than the delete: brings it back"  # c.js forgets deletes
    node.set("k", "now")  # the future time is remembered: a local SET loses too
    assert node.get("k") == "from the future"


def test_several_messages_in_one_read_and_one_split_across_reads(make):
    port = free_port()
    node = make.node(port)
    t = now_ms()
    burst = b"".join(data_line(f"burst.{i}", t, i) for i in range(50))
    with gsocket.create_connection((HOST, port)) as member:
        member.sendall(burst)  # one send, so (almost always) one read
        wait_for(lambda: len(node.get("burst") or {}) == 50)
        line = data_line("ключ.🎉", t, {"text": "naïve café ✓", "n": 1.5e-7})
        cut = line.index("🎉".encode()) + 2  # inside the 4-byte character
        before = node.received_bytes
        member.sendall(line[:cut])
        wait_for(lambda: node.received_bytes == before + cut)  # the node has read the first part
        assert node.get("ключ") is None
        member.sendall(line[cut:])
        wait_for(lambda: node.get(("ключ", "🎉")) == {"text": "naïve café ✓", "n": 1.5e-7})
        member.sendall(b"\n" + b"not json\n" + b'[7,"unknown type"]\n' + data_line("ok", t, 1))
        wait_for(lambda: node.get("ok") == 1)  # bad lines are skipped, the rest is applied
    assert node.skipped_messages == 2 and node.running


def test_utf8_keys_and_values_both_ways(make):
    node_port, peer_port = free_ports(2)
    node = make.node(node_port)
    peer = make.peer(peer_port, [node_port, peer_port])
    wait_for(lambda: peer.active == 1 and peer.received, what="the peer joined")
    node.set("café.naïve", "日本語 ✓ 🎉 a/b \u2028")
    peer.set("ключ.子", {"emoji": "🎉", "quote": '"', "ctl": "\x01\t"})
    wait_for(lambda: peer.get("café.naïve") == "日本語 ✓ 🎉 a/b \u2028")
    wait_for(lambda: node.get(("ключ", "子")) == {"emoji": "🎉", "quote": '"', "ctl": "\x01\t"})
    assert peer.errors == [] and peer.foreign_lines == []


# -- restarts and reconnects ---------------------------------------------------------------


def test_members_restarting_on_their_port_rejoin(make):
    node_port, peer_port = free_ports(2)
    ports = [node_port, peer_port]
    node = make.node(node_port, ports)
    peer = make.peer(peer_port, ports)
    node.set("kept", "yes")
    wait_for(lambda: peer.get("kept") == "yes")
    # The peer dies and is forked again under the same port, as in collective.js's README.
    peer.stop()
    wait_for(lambda: node._links[(HOST, peer_port)].state != "connected")
    node.set("while.away", 1)  # queued for the peer's port
    peer = make.peer(peer_port, ports)
    wait_for(lambda: peer.snapshot() == {"kept": "yes", "while": {"away": 1}})
    peer.set("from.new.peer", 1)
    wait_for(lambda: node.get("from.new.peer") == 1)
    # Now the node restarts. The peer's connection to the old one is gone for good (no
    # reconnect in collective.js); the new node's New makes it connect back.
    node.stop()
    # A restart takes longer than the peer takes to see the old connection end; without
    # this wait the peer could answer the new node's New on the old, dead connection.
    wait_for(lambda: peer.active == 0)
    node = make.node(node_port, ports)
    assert node.synced and node.get("kept") == "yes" and node.get("from.new.peer") == 1
    peer.set("after.restart", True)
    wait_for(lambda: node.get("after.restart") is True)
    assert peer.errors == []


def test_a_new_from_a_connected_member_is_answered_on_a_fresh_connection(make):
    # A member that restarts without its old connections closing (a crash, a cable pulled):
    # its New arrives while the node still believes its connection to it is fine.
    node_port, member_port = free_ports(2)
    listener = listen(member_port)
    node = make.node(node_port, [member_port], start=False)
    starting = gevent.spawn(node.start, 5.0)
    with gevent.Timeout(5):
        old, _ = listener.accept()
    read_exactly(old, len(encode_new(HOST, node_port, True)))
    with gsocket.create_connection((HOST, node_port)) as out:
        out.sendall(b"[1,{}]\n")
        starting.join(5)
    node.set("k", 1)
    read_exactly(old, len(data_line("k", now_ms(), 1)))
    with gsocket.create_connection((HOST, node_port)) as out:
        out.sendall((js_stringify([0, [HOST, member_port, True]]) + "\n").encode())
        with gevent.Timeout(5):
            fresh, _ = listener.accept()
    expected = (js_stringify([1, {"k": 1}]) + "\n").encode()
    assert read_exactly(fresh, len(expected)) == expected  # and no New before it
    with gevent.Timeout(5):
        assert old.recv(1) == b""  # the old connection was ended
    for sock in (old, fresh, listener):
        sock.close()


def test_a_dropped_link_is_redialed_and_reannounced(make):
    a_port, b_port = free_ports(2)
    a = make.node(a_port, [a_port, b_port])
    b = make.node(b_port, [a_port, b_port])
    a.set("x", 1)
    wait_for(lambda: b.get("x") == 1)
    b.stop()
    # Operations sent in the instant a link breaks can be lost (TCP took them); those made
    # once the writer knows the link is down are queued.
    wait_for(lambda: a._links[(HOST, b_port)].state != "connected")
    a.set("queued", "while b was down")
    # b comes back knowing nobody: a's writer redials it, opens with New [host, port, false]
    # and sends what it queued; the New makes b connect back.
    b = make.node(b_port, [])
    wait_for(lambda: b.get("queued") == "while b was down")
    b.set("reverse", 1)
    wait_for(lambda: a.get("reverse") == 1)
    assert not b.synced  # nobody sent it a snapshot: it has only what came after


# -- one protocol per collective -----------------------------------------------------------


def test_native_and_legacy_nodes_refuse_each_other(make, caplog):
    caplog.set_level(logging.INFO, logger="gcollective")
    legacy_port, native_port = free_ports(2)
    legacy = make.node(legacy_port)
    native = Collective(f"{HOST}:{native_port}", [f"{HOST}:{legacy_port}"], backoff_max=0.2)
    try:
        native.start(timeout=0.3)  # dials the legacy node with HELLO
        wait_for(lambda: legacy.refused_connections >= 1)
        assert "refusing connection from 127.0.0.1:" in caplog.text
        assert "speaks gcollective's native protocol" in caplog.text
        assert f"(from a node listening on {HOST}:{native_port})" in caplog.text
        # And the other way: a legacy node dials the native one with New.
        other = make.node(free_port(), [native_port])
        wait_for(lambda: native.refused_connections >= 1)
        assert "first frame is not a gcollective HELLO" in caplog.text
        assert native.snapshot() == {} and other.snapshot() == {}
    finally:
        native.stop()
