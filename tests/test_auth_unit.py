"""The authentication layer without sockets: handshake, refusals, sealed records."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples

from gcollective import _auth, _records
from gcollective._auth import (
    MAX_LINE,
    AcceptorHandshake,
    AuthenticationError,
    DialerHandshake,
    Step,
    check_no_auth,
    encode_refusal,
    explain_refusal,
    generate_secret,
    secret_is_weak,
)
from gcollective._errors import ProtocolError
from gcollective._records import Opener, Sealer
from gcollective._wire import FrameDecoder, encode_hello, encode_ops, parse_hello

SECRET = "a long shared secret for the tests, é"
HLC = 1 << 16  # operation frames below come from origin 12345


def handshake(dialer_secret=SECRET, acceptor_secret=SECRET, dialer_info="d", acceptor_info="a"):
    """Run a complete handshake; returns both sides and the three messages."""
    dialer = DialerHandshake(dialer_secret, dialer_info)
    acceptor = AcceptorHandshake(acceptor_secret, acceptor_info)
    auth1 = dialer.start()
    auth2, done = acceptor.receive(auth1)
    assert not done and auth2
    auth3, done = dialer.receive(auth2)
    assert done and auth3
    assert acceptor.receive(auth3) == Step(b"", True)
    return dialer, acceptor, (auth1, auth2, auth3)


def channel(**sizes):
    """A sealer and the matching opener of one fresh connection (dialer to acceptor)."""
    dialer, acceptor, _ = handshake()
    record_size = sizes.get("record_size", _records.RECORD_SIZE)
    max_record = sizes.get("max_record", _records.RECORD_SIZE)
    return dialer.sealer(record_size), acceptor.opener(max_record)


def decode(line: bytes):
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return json.loads(line)


def encode(message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def forged_auth3(secret, auth1: bytes, auth2: bytes) -> bytes:
    """AUTH3 as a dialer holding ``secret`` computes it, without checking AUTH2 first."""
    _, _, _, nonce_d, info_d = decode(auth1)
    _, _, nonce_a, info_a, _ = decode(auth2)
    transcript = _auth._transcript_hash(
        bytes.fromhex(nonce_d), info_d, bytes.fromhex(nonce_a), info_a
    )
    keys = _auth._derive(_auth._master_key(secret), transcript)
    return encode(["auth", 3, keys.dialer_proof.hex()])


# -- handshake -------------------------------------------------------------------------------


def test_right_secret_completes_both_ways_and_both_directions_carry_records():
    dialer, acceptor, (auth1, _, _) = handshake()
    assert dialer.done and acceptor.done
    assert (dialer.peer_info, acceptor.peer_info) == ("a", "d")
    assert dialer.leftover == acceptor.leftover == b""
    assert decode(auth1)[:3] == ["auth", 1, 1]
    sealer, opener = dialer.sealer(), acceptor.opener()
    assert opener.feed(sealer.seal(encode_hello(7, "10.0.0.1", 9000))) == [
        encode_hello(7, "10.0.0.1", 9000)
    ]
    # The reverse direction has its own keys (unused by one-way connections, but sound).
    back_sealer, back_opener = acceptor.sealer(), dialer.opener()
    assert back_opener.feed(back_sealer.seal(b"[4]\n")) == [b"[4]\n"]


def test_str_and_bytes_secrets_agree_and_any_length_works():
    handshake(SECRET, SECRET.encode())
    handshake(b"\x00\xff" * 1000, b"\x00\xff" * 1000)
    handshake("x", "x")


def test_handshake_messages_split_byte_by_byte_and_leftover_records():
    dialer = DialerHandshake(SECRET)
    acceptor = AcceptorHandshake(SECRET)
    auth1 = dialer.start()
    sends = [acceptor.receive(auth1[i : i + 1]) for i in range(len(auth1))]
    assert all(step == (b"", False) for step in sends[:-1])
    auth2 = sends[-1].send
    steps = [dialer.receive(auth2[i : i + 1]) for i in range(len(auth2))]
    assert steps[-1].done and not any(step.done for step in steps[:-1])
    sealer = dialer.sealer()
    records = sealer.seal(b"first batch\n") + sealer.seal(b"second batch\n")
    # AUTH3 and the first records arrive in one read: the records stay for the opener.
    assert acceptor.receive(steps[-1].send + records[:30]) == Step(b"", True)
    assert acceptor.leftover == records[:30]
    opener = acceptor.opener()
    assert opener.feed(acceptor.leftover) + opener.feed(records[30:]) == [
        b"first batch\n",
        b"second batch\n",
    ]


def test_nonces_and_keys_are_fresh_per_connection():
    first = handshake()
    second = handshake()
    assert decode(first[2][0])[3] != decode(second[2][0])[3]
    assert decode(first[2][1])[2] != decode(second[2][1])[2]
    assert first[0].sealer().seal(b"x") != second[0].sealer().seal(b"x")


def test_wrong_secret_is_caught_by_the_dialer_and_the_acceptor_is_told():
    dialer = DialerHandshake("the dialer's secret")
    acceptor = AcceptorHandshake("the acceptor's secret")
    auth2, _ = acceptor.receive(dialer.start())
    with pytest.raises(AuthenticationError, match="different secret") as caught:
        dialer.receive(auth2)
    assert caught.value.reason == "bad-proof"
    assert isinstance(caught.value, ProtocolError)
    # The dialer's reply tells the acceptor why instead of just hanging up.
    with pytest.raises(AuthenticationError, match="secrets differ") as told:
        acceptor.receive(caught.value.reply)
    assert told.value.reason == "refused"
    assert not dialer.done and not acceptor.done
    with pytest.raises(RuntimeError, match="already failed"):
        dialer.receive(b"more")


def test_wrong_secret_is_caught_by_the_acceptor():
    # A dialer that does not check AUTH2 (or an attacker) still cannot produce AUTH3.
    dialer = DialerHandshake(SECRET)
    acceptor = AcceptorHandshake(SECRET)
    auth1 = dialer.start()
    auth2, _ = acceptor.receive(auth1)
    with pytest.raises(AuthenticationError, match="different secret") as caught:
        acceptor.receive(forged_auth3("not the secret", auth1, auth2))
    assert caught.value.reason == "bad-proof"
    assert not acceptor.done
    with pytest.raises(RuntimeError):
        acceptor.opener()


def test_missing_handshake_plain_hello_is_refused_with_a_clear_reason():
    acceptor = AcceptorHandshake(SECRET)
    hello = encode_hello(7, "127.0.0.1", 9000) + encode_ops(12345, 1, [HLC], [0], ["k"], [1])
    with pytest.raises(AuthenticationError, match=r"plain HELLO.*no secret") as caught:
        acceptor.receive(hello)
    assert caught.value.reason == "missing-handshake"
    assert "requires a secret and this node has none" in explain_refusal(decode(caught.value.reply))


def test_node_without_secret_refuses_a_dialer_with_one():
    dialer = DialerHandshake(SECRET)
    (first,) = FrameDecoder(4096).feed(dialer.start())
    with pytest.raises(AuthenticationError, match="this node has none") as caught:
        check_no_auth(first)
    assert caught.value.reason == "no-secret"
    with pytest.raises(AuthenticationError, match="it has no secret configured") as told:
        dialer.receive(caught.value.reply)
    assert told.value.reason == "refused"
    # A plain HELLO passes the check and goes on to parse_hello as before.
    (hello,) = FrameDecoder(4096).feed(encode_hello(7, "127.0.0.1", 9000))
    check_no_auth(hello)
    assert parse_hello(hello).node_id == 7


def test_peer_closing_during_the_handshake():
    with pytest.raises(AuthenticationError, match="before sending") as caught:
        AcceptorHandshake(SECRET).receive(b"")
    assert caught.value.reason == "closed"
    acceptor = AcceptorHandshake(SECRET)
    acceptor.receive(DialerHandshake(SECRET).start()[:10])
    with pytest.raises(AuthenticationError, match="in the middle of"):
        acceptor.receive(b"")
    dialer = DialerHandshake(SECRET)
    dialer.start()
    with pytest.raises(AuthenticationError, match="closed the connection") as caught:
        dialer.receive(b"")  # e.g. an older acceptor that does not know the handshake
    assert caught.value.reason == "closed"


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\xff\xfe\n",
        b'{"auth": 1}\n',
        b'["auth"]\n',
        b'["auth",true,1,"' + b"0" * 64 + b'",""]\n',
        b'["auth",2,"' + b"0" * 64 + b'","",""]\n',
        b'["auth",1,1,"' + b"A" * 64 + b'",""]\n',  # uppercase hex: one spelling only
        b'["auth",1,1,"' + b"0" * 62 + b'",""]\n',
        b'["auth",1,1,"' + b"0" * 64 + b'",7]\n',
        b'["auth",1,1,"' + b"0" * 64 + b'","","extra"]\n',
        b'["auth",1,1,"' + b"0" * 64 + b'","' + b"i" * 257 + b'"]\n',
        b"[" * 2000 + b"\n",
        b'["auth",1,1,"' + b"0" * 64 + b'","\\ud800"]\n',  # a lone surrogate has no UTF-8
    ],
)
def test_bad_first_messages_are_refused(junk):
    with pytest.raises(AuthenticationError) as caught:
        AcceptorHandshake(SECRET).receive(junk)
    assert caught.value.reason == "bad-message"
    assert explain_refusal(decode(caught.value.reply)) is not None


def test_overlong_handshake_line_is_refused_before_buffering_more():
    acceptor = AcceptorHandshake(SECRET)
    acceptor.receive(b"x" * MAX_LINE)
    with pytest.raises(AuthenticationError, match="longer than"):
        acceptor.receive(b"x")
    dialer = DialerHandshake(SECRET)
    dialer.start()
    with pytest.raises(AuthenticationError, match="longer than"):
        dialer.receive(b"[" + b" " * MAX_LINE)


def test_other_handshake_version_is_refused_by_name():
    message = decode(DialerHandshake(SECRET).start())
    message[2] = 2
    with pytest.raises(AuthenticationError, match="version 2") as caught:
        AcceptorHandshake(SECRET).receive(encode(message))
    assert caught.value.reason == "version"
    assert "another version" in explain_refusal(decode(caught.value.reply))


def test_bad_auth2_and_auth3_shapes():
    for bad in (b'["auth",3,"00"]\n', b"[1,2]\n", b'["auth",2,"zz","",""]\n'):
        dialer = DialerHandshake(SECRET)
        dialer.start()
        with pytest.raises(AuthenticationError) as caught:
            dialer.receive(bad)
        assert caught.value.reason == "bad-message"
    for bad in (b'["auth",3]\n', b'["auth",3,5]\n', b'["auth",2,"00"]\n', b"{}\n"):
        acceptor = AcceptorHandshake(SECRET)
        acceptor.receive(DialerHandshake(SECRET).start())
        with pytest.raises(AuthenticationError) as caught:
            acceptor.receive(bad)
        assert caught.value.reason in ("bad-message", "bad-proof")


def test_replayed_dialer_transcript_fails_against_a_new_acceptor():
    _, _, (auth1, _, auth3) = handshake()
    replay_target = AcceptorHandshake(SECRET)
    replay_target.receive(auth1)  # the recorded AUTH1 is accepted (a fresh AUTH2)...
    with pytest.raises(AuthenticationError, match="replayed") as caught:
        replay_target.receive(auth3)  # ...but the recorded proof misses the fresh nonce
    assert caught.value.reason == "bad-proof"
    assert not replay_target.done


def test_replayed_acceptor_reply_fails_against_a_new_dialer():
    _, _, (_, auth2, _) = handshake()
    dialer = DialerHandshake(SECRET)
    dialer.start()
    with pytest.raises(AuthenticationError, match="different secret"):
        dialer.receive(auth2)


def test_records_replayed_from_another_connection_fail():
    sealer, _ = channel()
    recorded = sealer.seal(encode_ops(12345, 1, [HLC], [0], ["k"], ["evil"]))
    _, opener = channel()
    with pytest.raises(AuthenticationError, match="another key"):
        opener.feed(recorded)


def test_reflection_fails():
    dialer = DialerHandshake(SECRET)
    acceptor = AcceptorHandshake(SECRET)
    auth1 = dialer.start()
    auth2, _ = acceptor.receive(auth1)
    acceptor_proof = decode(auth2)[4]
    # Sending the acceptor's own proof back as the dialer's.
    with pytest.raises(AuthenticationError, match="different secret"):
        acceptor.receive(encode(["auth", 3, acceptor_proof]))
    # Getting a second session of the same members to prove over the first one's nonces.
    acceptor = AcceptorHandshake(SECRET)
    auth2, _ = acceptor.receive(auth1)
    nonce_a = decode(auth2)[2]
    oracle = AcceptorHandshake(SECRET)
    oracle_auth2, _ = oracle.receive(encode(["auth", 1, 1, nonce_a, "a"]))
    with pytest.raises(AuthenticationError, match="different secret"):
        acceptor.receive(encode(["auth", 3, decode(oracle_auth2)[4]]))
    # Reflecting records: what the acceptor seals cannot pass as the dialer's stream.
    dialer, acceptor, _ = handshake()
    with pytest.raises(AuthenticationError, match="another key"):
        acceptor.opener().feed(acceptor.sealer().seal(b"[4]\n"))


@pytest.mark.parametrize("which", [0, 1])
def test_altered_info_is_detected(which):
    dialer = DialerHandshake(SECRET, "dialer-info")
    acceptor = AcceptorHandshake(SECRET, "acceptor-info")
    auth1 = dialer.start()
    if which == 0:
        auth1 = auth1.replace(b"dialer-info", b"dialer-inf0")
    auth2, _ = acceptor.receive(auth1)
    if which == 1:
        auth2 = auth2.replace(b"acceptor-info", b"acceptor-inf0")
    with pytest.raises(AuthenticationError, match="different secret"):
        dialer.receive(auth2)


def test_api_misuse_raises():
    dialer = DialerHandshake(SECRET)
    with pytest.raises(RuntimeError, match="start"):
        dialer.receive(b"x")
    dialer.start()
    with pytest.raises(RuntimeError, match="already"):
        dialer.start()
    with pytest.raises(RuntimeError, match="not complete"):
        dialer.sealer()
    dialer, acceptor, (_, auth2, _) = handshake()
    dialer.sealer()
    with pytest.raises(RuntimeError, match="once"):
        dialer.sealer()
    with pytest.raises(RuntimeError, match="complete"):
        dialer.receive(auth2)
    acceptor.opener()
    with pytest.raises(RuntimeError, match="once"):
        acceptor.opener()
    with pytest.raises(ValueError, match="empty"):
        DialerHandshake("")
    with pytest.raises(TypeError):
        AcceptorHandshake(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="info"):
        DialerHandshake(SECRET, "i" * 300)
    with pytest.raises(ValueError, match="info"):
        DialerHandshake(SECRET, "\ud800")
    with pytest.raises(ValueError):
        encode_refusal("Not A Code")


def test_refusal_explanations_and_secret_helpers():
    assert explain_refusal(["auth", 0, "wrong-secret"]).startswith("peer refused")
    assert "'whatever'" in explain_refusal(["auth", 0, "whatever"])
    assert explain_refusal(["auth", 1, 1]) is None
    assert explain_refusal(["gcollective", 1]) is None
    assert explain_refusal(["auth", False, "no-secret"]) is None
    one, two = generate_secret(), generate_secret()
    assert one != two and len(one) >= 43 and not secret_is_weak(one)
    assert secret_is_weak("hunter2") and not secret_is_weak(bytes(range(16)))


@pytest.mark.parametrize("module", [_auth, _records])
def test_auth_modules_import_only_the_standard_library(module):
    with open(module.__file__, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module)
    assert imported <= {
        "__future__",
        "hashlib",
        "hmac",
        "json",
        "os",
        "re",
        "secrets",
        "struct",
        "typing",
    }


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.integers(0, 2), bit=st.integers(0, 10**6))
def test_any_single_bit_flip_in_the_handshake_is_detected(message, bit):
    dialer = DialerHandshake(SECRET, "d")
    acceptor = AcceptorHandshake(SECRET, "a")

    def flip(data: bytes, index: int) -> bytes:
        if index != message:
            return data
        position = bit % (len(data) * 8)
        altered = bytearray(data)
        altered[position // 8] ^= 1 << (position % 8)
        return bytes(altered)

    with pytest.raises(AuthenticationError):
        auth2, _ = acceptor.receive(flip(dialer.start(), 0))
        if not auth2:
            acceptor.receive(b"")  # the newline was hit: the line never ends
        step = dialer.receive(flip(auth2, 1))
        if not step.done:
            dialer.receive(b"")
        step = acceptor.receive(flip(step.send, 2))
        if not step.done:
            acceptor.receive(b"")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=12,
)
_hex32 = st.binary(min_size=32, max_size=32).map(bytes.hex)


@settings(max_examples=examples(300), deadline=None)
@given(
    fields=st.lists(_json | _hex32 | st.sampled_from(["auth", 0, 1, 2, 3]), max_size=6),
    junk=st.binary(max_size=40),
)
def test_arbitrary_input_only_ever_raises_authentication_error(fields, junk):
    line = json.dumps(["auth", *fields]).encode() + b"\n"
    for data in (line, junk + b"\n", line + junk):
        for side in ("acceptor", "dialer", "acceptor after AUTH1"):
            if side == "dialer":
                handshake_ = DialerHandshake(SECRET)
                handshake_.start()
            else:
                handshake_ = AcceptorHandshake(SECRET)
                if side == "acceptor after AUTH1":
                    handshake_.receive(DialerHandshake(SECRET).start())
            try:
                step = handshake_.receive(data)
            except AuthenticationError as exc:
                assert exc.reason in {
                    "bad-message",
                    "bad-proof",
                    "refused",
                    "version",
                    "missing-handshake",
                }
                continue
            assert not step.done


# -- sealed records ---------------------------------------------------------------------------


def test_record_format_is_length_counter_payload_hmac():
    dialer, _, _ = handshake()
    key = dialer._keys.dialer_to_acceptor
    sealer = dialer.sealer()
    sealer.seal(b"zero")
    record = sealer.seal(b"payload")
    length, counter = struct.unpack(">IQ", record[:12])
    assert (length, counter) == (7, 1) and record[12:19] == b"payload"
    assert record[19:] == hmac.digest(key, record[:19], "sha256")
    assert len(record) == len(b"payload") + _records.OVERHEAD


@given(key=st.binary(min_size=16, max_size=64), parts=st.lists(st.binary(max_size=200)))
def test_precomputed_mac_equals_hmac_sha256(key, parts):
    expected = hmac.new(key, b"".join(parts), hashlib.sha256).digest()
    assert _records._Mac(key).tag(*parts) == expected


def test_records_split_byte_by_byte_and_glued_together_decode():
    payloads = [
        encode_ops(12345, i + 1, [HLC + i], [0], [f"k.{i}"], ["é" * i]) * 3 for i in range(5)
    ]
    dialer, acceptor, _ = handshake()
    sealer, opener = dialer.sealer(), acceptor.opener()
    stream = b"".join(sealer.seal(p) for p in payloads)
    out = []
    for i in range(len(stream)):
        out.extend(opener.feed(stream[i : i + 1]))
        assert opener.buffered <= len(stream)
    assert out == payloads and opener.buffered == 0 and opener.counter == 5
    opener.close()
    dialer, acceptor, _ = handshake()
    sealer, opener = dialer.sealer(), acceptor.opener()
    assert opener.feed(b"".join(sealer.seal(p) for p in payloads)) == payloads
    # What a node does with the payloads: one FrameDecoder over the joined stream.
    decoder = FrameDecoder(1 << 20)
    assert len(decoder.feed(b"".join(payloads))) == 15


def test_big_payloads_are_split_into_records_and_frames_span_them():
    sealer, opener = channel(record_size=1000, max_record=1000)
    payload = b"".join(encode_ops(12345, i + 1, [HLC], [0], ["k"], ["v" * 300]) for i in range(10))
    stream = sealer.seal(payload)
    assert sealer.counter == -(-len(payload) // 1000)
    assert len(stream) == len(payload) + sealer.counter * _records.OVERHEAD
    parts = opener.feed(stream)
    assert b"".join(parts) == payload and all(len(p) <= 1000 for p in parts)
    assert len(FrameDecoder(1 << 20).feed(b"".join(parts))) == 10
    assert sealer.seal(b"") == b"" and sealer.counter == len(parts)


def test_tampered_record_is_rejected_and_nothing_after_it_is_released():
    sealer, opener = channel()
    good = sealer.seal(encode_ops(12345, 1, [HLC], [0], ["k"], ["fine"]))
    bad = bytearray(sealer.seal(encode_ops(12345, 2, [HLC], [0], ["k"], [10])))
    bad[-40] ^= 1  # one payload byte: 10 becomes 11
    after = sealer.seal(encode_ops(12345, 3, [HLC], [0], ["k"], ["later"]))
    assert len(opener.feed(good)) == 1
    with pytest.raises(AuthenticationError, match="fails authentication") as caught:
        opener.feed(bytes(bad) + after)
    assert caught.value.reason == "bad-record"
    with pytest.raises(AuthenticationError):
        opener.feed(after)  # the opener stays failed
    with pytest.raises(AuthenticationError):
        opener.close()


def test_replayed_reordered_and_dropped_records_are_rejected():
    key = os.urandom(32)
    sealer = Sealer(key)
    records = [sealer.seal(b"[%d]\n" % i) for i in range(3)]
    cases = {
        "replayed": [records[0], records[1], records[1]],
        "reordered": [records[1], records[0]],
        "dropped": [records[0], records[2]],
    }
    for name, sequence in cases.items():
        opener = Opener(key)
        with pytest.raises(AuthenticationError, match="was due") as caught:
            for record in sequence:
                opener.feed(record)
        assert caught.value.reason == "bad-record", name
    # Rewriting the counter field to hide the gap breaks the MAC instead.
    opener = Opener(key)
    opener.feed(records[0])
    spliced = records[2][:4] + struct.pack(">Q", 1) + records[2][12:]
    with pytest.raises(AuthenticationError, match="fails authentication"):
        opener.feed(spliced)


def test_truncated_record_is_never_released():
    sealer, opener = channel()
    first = sealer.seal(b"[1]\n")
    second = sealer.seal(b"[2]\n")
    assert opener.feed(first + second[:-1]) == [b"[1]\n"]
    assert opener.buffered == len(second) - 1
    with pytest.raises(AuthenticationError, match="truncated") as caught:
        opener.close()
    assert caught.value.reason == "truncated"
    # A cut record followed by a later one does not line up either.
    sealer, opener = channel()
    records = [sealer.seal(b"[%d]\n" % i) for i in range(3)]
    with pytest.raises(AuthenticationError):
        opener.feed(records[0][:-5] + records[1])


def test_oversized_record_is_refused_before_buffering_more():
    sealer, opener = channel(record_size=4096, max_record=1024)
    stream = sealer.seal(b"x" * 4096)
    with pytest.raises(AuthenticationError, match="more than 1024"):
        opener.feed(stream[:12])  # the header alone is enough to refuse it
    assert opener.buffered == 0
    _, opener = channel(max_record=1024)
    assert opener.feed(b"\x00\x00") == []
    with pytest.raises(AuthenticationError, match="announces 65535 bytes"):
        opener.feed(b"\xff\xff" + bytes(8))


def test_sealer_and_opener_validate_sizes():
    with pytest.raises(ValueError):
        Sealer(os.urandom(32), 0)
    with pytest.raises(ValueError):
        Opener(os.urandom(32), 1 << 32)


def _corrupt(stream: bytes, bit: int) -> bytes:
    altered = bytearray(stream)
    altered[bit // 8] ^= 1 << (bit % 8)
    return bytes(altered)


@settings(max_examples=examples(300), deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6),
    bit=st.integers(min_value=0),
    chunk=st.integers(min_value=1, max_value=700),
)
def test_any_single_bit_flip_in_a_sealed_stream_is_detected(payloads, bit, chunk):
    sealer, opener = channel(max_record=512)
    records = [sealer.seal(p) for p in payloads]
    stream = b"".join(records)
    bit %= len(stream) * 8
    hit, start = 0, 0
    while start + len(records[hit]) <= bit // 8:  # the record the flipped bit falls in
        start += len(records[hit])
        hit += 1
    corrupted = _corrupt(stream, bit)
    released = []
    with pytest.raises(AuthenticationError):
        for i in range(0, len(corrupted), chunk):
            released.extend(opener.feed(corrupted[i : i + chunk]))
        opener.close()  # a longer announced length only stalls: end of stream exposes it
    # Nothing from the flipped record or after it is released; what is, is intact (records
    # completed in the same feed as the bad one are dropped with it).
    assert released == payloads[: len(released)] and len(released) <= hit
