"""Shared-secret authentication of connections, sans-IO: bytes in, bytes and results out.

Nothing here touches a socket; the node feeds what it reads and sends what it is told to.

Handshake
=========

Connections are one-way once set up (the dialer streams frames, the acceptor only reads), but
authenticating needs a short exchange in both directions first. Each message is one JSON line,
like the rest of the wire; binary values are lowercase hex:

===========  =============================================================================
AUTH1        dialer -> acceptor ``["auth", 1, version, dialer_nonce, dialer_info]``
AUTH2        acceptor -> dialer ``["auth", 2, acceptor_nonce, acceptor_info, acceptor_proof]``
AUTH3        dialer -> acceptor ``["auth", 3, dialer_proof]``
REFUSE       either way ``["auth", 0, code]``: why a side gives up (``wrong-secret``,
             ``no-secret``, ``secret-required``, ``bad-message``, ``version``; and
             ``tls-required``, sent in clear by a TLS node to a plain one); for the
             peer's log only, it is not authenticated and changes no decision
===========  =============================================================================

Nonces are 32 fresh random bytes from each side; ``info`` is a short string the node may use
to say who it is (authenticated once the handshake completes, not secret). From the secret, a
master key is derived with HKDF-SHA256 (so secrets of any length and alphabet work). The
transcript (version, both nonces, both infos) is hashed, and each proof is HMAC-SHA256 under a
handshake key over a role label and that hash, compared in constant time. The acceptor proves
itself first, so a dialer never reveals a proof to a stranger; the acceptor's proof covers the
dialer's fresh nonce, so no recorded AUTH2 fits a new connection, and likewise the dialer's
proof covers the acceptor's fresh nonce, so a replayed AUTH1 + AUTH3 fails. The role labels
differ, so neither proof can be sent back as the other (reflection).

Both sides then derive one key per direction (HKDF-SHA256 from the master key and the
transcript hash). After AUTH3 the dialer sends only sealed records (``_records``: their layout
and checks); the first one should start with the usual HELLO frame.

Threat model
============

*No secret, no TLS.* Anyone who can reach a member's port is a member: they can write, delete
and, by announcing an address in HELLO (the node connects back), read everything. Anyone on
the network path can read and alter the traffic. Fine on loopback or a trusted private network
only.

*Secret only.* An attacker on the network who does not hold the secret cannot join, cannot
write, and cannot get a member to send it data: it cannot complete the handshake, and it
cannot inject, alter, replay, reorder or splice frames on an authenticated connection, nor
replay a recorded handshake or record on a new one. It can still: read everything that passes
on the path (frames are authenticated, **not encrypted**); cut or stall connections (the
members reconnect and catch up, but a sustained attack denies service); hold unauthenticated
connections open until the handshake timeout, within the connection limit; relay one member's
handshake to another member (it gains nothing: it has no keys, and every member is entitled to
the same data); and, having recorded one handshake or simply asked a member for its AUTH2, try
to guess the secret offline. The last point is why the secret must be random and long (at
least 128 bits, e.g. ``generate_secret()``), not a password.

*TLS only (mutual).* Every connection is encrypted and both ends verify that the other's
certificate was signed by the configured CA; only holders of such a certificate and its key
can connect, read or write, and a network attacker sees only traffic volume and timing and can
cut connections. Every certificate that CA signs is a member, so the CA must be dedicated to
the collective.

*Secret and TLS.* Both are needed to join: a leaked secret without a certificate, or a stolen
certificate without the secret, is not enough. Confidentiality comes from TLS.

In every mode a member is fully trusted: there is no per-member authorization, and any member
can change or delete anything, including by sending operations in another member's name
(members are known by the address and id they announce; the node notices two senders
numbering one origin's operations alike, logs it and applies both). Whatever the mode,
nothing received is unpickled, evaluated or imported: values are JSON only, and the limits on
frame size, connections and handshake time apply before authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from typing import Any, NamedTuple, TypeGuard, Union

# Defined with the other exceptions so that ``gcollective`` can export it without this module.
from ._errors import AuthenticationError
from ._records import RECORD_SIZE, Opener, Sealer

__all__ = [
    "AUTH_VERSION",
    "MAX_INFO",
    "AuthenticationError",
    "Step",
    "DialerHandshake",
    "AcceptorHandshake",
    "check_no_auth",
    "explain_refusal",
    "encode_refusal",
    "generate_secret",
    "secret_is_weak",
    "secret_weakness",
]

AUTH_VERSION = 1
AUTH_MAGIC = "auth"
AUTH1, AUTH2, AUTH3, REFUSE = 1, 2, 3, 0

#: Longest ``info`` string a side may send, in characters.
MAX_INFO = 256
#: Longest handshake line, in bytes (a maximal AUTH1 or AUTH2 is well under it).
MAX_LINE = 4096
#: Secrets shorter than this many bytes fall to offline guessing (see the threat model).
MIN_SECRET_BYTES = 16
#: Secrets of printable text shorter than this look typed, not generated (a hex secret of
#: 128 bits has 32 characters).
MIN_TEXT_SECRET_CHARS = 32
_MIN_DISTINCT_CHARS = 8

NONCE_SIZE = 32

_DOMAIN = b"gcollective-auth-v1\x00"
_LABEL_HANDSHAKE = b"handshake key\x00"
_LABEL_ACCEPTOR_PROOF = b"acceptor proof\x00"
_LABEL_DIALER_PROOF = b"dialer proof\x00"
_LABEL_DIALER_TO_ACCEPTOR = b"dialer to acceptor\x00"
_LABEL_ACCEPTOR_TO_DIALER = b"acceptor to dialer\x00"

# 32 bytes as lowercase hex, strictly: one spelling per value (no uppercase, no spaces).
_HEX32 = re.compile(r"[0-9a-f]{64}")
_CODE = re.compile(r"[a-z0-9-]{1,32}")

_digest = hmac.digest
_compare = hmac.compare_digest

Secret = Union[str, bytes]

#: Why each refusal code is sent, phrased for the log of the side that receives it.
_REFUSALS = {
    "wrong-secret": "our proof does not match its secret: the secrets differ",
    "no-secret": "it has no secret configured and this node has one; "
    "set the same secret on every member",
    "secret-required": "it requires a secret and this node has none; "
    "set the same secret on every member",
    "bad-message": "it could not parse our handshake message",
    "version": "it speaks another version of the authentication handshake",
    "tls-required": "it requires TLS and this node has none; "
    "set certfile, keyfile and cafile on every member",
    # (Not a handshake refusal: sent when a member refuses our stamps, see clock_skew.)
    "clock-skew": "this node's clock (or a stamp it relayed) is more than clock_skew ahead "
    "of the peer's: it refuses our operations until the clocks agree (check both clocks)",
    # (Nor this one: sent when a member refuses this incarnation as declared down.)
    "declared-down": "it declared this member down (silent past down_timeout) and may have "
    "forgotten what this member holds or lacks: restart this member empty to rejoin",
}


#: What a dialer without a secret opens with, and what the acceptor's log says about it.
_UNAUTHENTICATED = {
    "gcollective": "peer skipped authentication (it sent a plain HELLO): it has no secret "
    "and this node requires one; set the same secret on every member",
    "gcollective-status": "status query without the secret: this node requires one (pass it "
    "to `python -m gcollective status` with GCOLLECTIVE_SECRET or --secret-env)",
}


class Step(NamedTuple):
    """What a handshake asks of the node after ``receive``: send ``send`` (may be empty);
    once ``done``, the peer is authenticated and the keys are ready."""

    send: bytes
    done: bool


# -- key schedule --------------------------------------------------------------------------


def _secret_bytes(secret: Secret) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    elif not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")
    if not secret:
        raise ValueError("secret must not be empty")
    return bytes(secret)


def _master_key(secret: Secret) -> bytes:
    """HKDF-Extract: a uniform 32-byte key from a secret of any length."""
    return _digest(_DOMAIN, _secret_bytes(secret), "sha256")


def _expand(prk: bytes, label: bytes) -> bytes:
    """HKDF-Expand for one 32-byte block."""
    return _digest(prk, label + b"\x01", "sha256")


def _transcript_hash(
    nonce_d: bytes, info_d: str, nonce_a: bytes, info_a: str, version: int = AUTH_VERSION
) -> bytes:
    # Fixed-size fields and length-prefixed strings: no two transcripts encode alike.
    di = info_d.encode("utf-8")
    ai = info_a.encode("utf-8")
    data = b"".join(
        (
            _DOMAIN,
            version.to_bytes(2, "big"),
            nonce_d,
            len(di).to_bytes(2, "big"),
            di,
            nonce_a,
            len(ai).to_bytes(2, "big"),
            ai,
        )
    )
    return hashlib.sha256(data).digest()


class _Keys(NamedTuple):
    acceptor_proof: bytes
    dialer_proof: bytes
    dialer_to_acceptor: bytes
    acceptor_to_dialer: bytes


def _derive(prk: bytes, transcript: bytes) -> _Keys:
    handshake_key = _expand(prk, _LABEL_HANDSHAKE)
    return _Keys(
        _digest(handshake_key, _LABEL_ACCEPTOR_PROOF + transcript, "sha256"),
        _digest(handshake_key, _LABEL_DIALER_PROOF + transcript, "sha256"),
        _expand(prk, _LABEL_DIALER_TO_ACCEPTOR + transcript),
        _expand(prk, _LABEL_ACCEPTOR_TO_DIALER + transcript),
    )


# -- messages ------------------------------------------------------------------------------


def _line(message: list[object]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def encode_refusal(code: str) -> bytes:
    """A REFUSE line: tells the peer why this side gives up (for its log only)."""
    if not _CODE.fullmatch(code):
        raise ValueError(f"bad refusal code {code!r}")
    return _line([AUTH_MAGIC, REFUSE, code])


def refused_as_down(why: str | None) -> bool:
    """Whether ``why`` (from ``explain_refusal``) says the peer refused this incarnation as
    declared down."""
    return why == _refused_for("declared-down")


def _refused_for(code: str) -> str:
    """What ``explain_refusal`` says of a REFUSE with a known ``code``."""
    return f"peer refused the handshake: {_REFUSALS[code]}"


def explain_refusal(message: object) -> str | None:
    """If ``message`` (a decoded frame) is a REFUSE, why the peer refused; else ``None``."""
    if (
        type(message) is list
        and len(message) == 3
        and message[0] == AUTH_MAGIC
        and message[1] == REFUSE
        and type(message[1]) is int
    ):
        code = message[2]
        if type(code) is str and code in _REFUSALS:
            return _refused_for(code)
        return f"peer refused the handshake (code {repr(code)[:40]})"
    return None


def _is_auth(message: object) -> TypeGuard[list[Any]]:
    return type(message) is list and len(message) >= 2 and message[0] == AUTH_MAGIC


def check_no_auth(message: object) -> None:
    """For a node *without* a secret: check the first frame of an accepted connection.

    Raises ``AuthenticationError`` (reason ``no-secret``, with a REFUSE reply to send) if the
    peer opened with the authentication handshake instead of HELLO, so both logs say why
    instead of "first frame is not a gcollective HELLO".
    """
    if _is_auth(message):
        raise AuthenticationError(
            "peer wants to authenticate with a secret and this node has none; "
            "set the same secret on every member",
            "no-secret",
            encode_refusal("no-secret"),
        )


def generate_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text) for ``secret=`` / GCOLLECTIVE_SECRET."""
    return secrets.token_urlsafe(32)


def secret_weakness(secret: Secret) -> str | None:
    """Why ``secret`` is open to offline guessing (a recorded or solicited handshake lets an
    attacker test guesses), or ``None``: shorter than ``MIN_SECRET_BYTES``, or text that looks
    chosen by a person (a passphrase) rather than made by a generator: printable ASCII with
    whitespace, fewer than ``MIN_TEXT_SECRET_CHARS`` characters, or very few distinct ones.

    Printable text carries at most 6.6 bits a character, and a phrase or password far less:
    25 printable characters of one were guessed in 21 tries. ``generate_secret()`` gives 43
    characters of base64 (256 bits); ``openssl rand -hex 32`` or ``-base64 32`` pass too.
    """
    data = _secret_bytes(secret)
    if len(data) < MIN_SECRET_BYTES:
        return f"the secret is shorter than {MIN_SECRET_BYTES} bytes"
    if not all(32 <= byte < 127 for byte in data):
        return None  # raw bytes, or non-ASCII text: not a typed passphrase
    if b" " in data:
        return "the secret looks like a passphrase (printable text with spaces)"
    if len(data) < MIN_TEXT_SECRET_CHARS:
        return (
            f"the secret looks like a password (printable text shorter than "
            f"{MIN_TEXT_SECRET_CHARS} characters)"
        )
    if len(set(data)) < _MIN_DISTINCT_CHARS:
        return "the secret looks like a password (very few distinct characters)"
    return None


def secret_is_weak(secret: Secret) -> bool:
    """True if ``secret_weakness`` finds a reason to warn."""
    return secret_weakness(secret) is not None


def _encodable(text: str) -> bool:
    # JSON can carry lone surrogates ("\ud800"), which have no UTF-8 form to MAC.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_info(info: str) -> str:
    if type(info) is not str:
        raise TypeError(f"info must be a str, not {type(info).__name__}")
    if len(info) > MAX_INFO or not _encodable(info):
        raise ValueError(f"info must be text of at most {MAX_INFO} characters")
    return info


class _Handshake:
    """What both roles share: line buffering, failure bookkeeping, the keys once done."""

    def __init__(self, secret: Secret, info: str = "") -> None:
        self._prk = _master_key(secret)
        self._info = _check_info(info)
        self._nonce = os.urandom(NONCE_SIZE)
        self._buffer = b""
        self._keys: _Keys | None = None
        self._failed = False
        self._sealer_made = False
        self._opener_made = False
        #: Bytes received after the peer's last handshake message (the start of the sealed
        #: stream): feed them to the opener before anything read later.
        self.leftover = b""
        #: The peer's ``info``, authenticated; ``None`` until ``done``.
        self.peer_info: str | None = None

    @property
    def done(self) -> bool:
        """True once the peer is authenticated."""
        return self._keys is not None

    def _fail(self, message: str, reason: str, refuse: str = "") -> AuthenticationError:
        self._failed = True
        return AuthenticationError(message, reason, encode_refusal(refuse) if refuse else b"")

    def _feed(self, data: bytes, waiting_for: str) -> None:
        if self._failed:
            raise RuntimeError("the handshake already failed")
        if self.done:
            raise RuntimeError("the handshake is complete: feed later bytes to the opener")
        if not data:
            where = "in the middle of" if self._buffer else "before sending"
            raise self._fail(f"peer closed the connection {where} {waiting_for}", "closed")
        self._buffer += data

    def _take_line(self, waiting_for: str) -> object:
        """The next complete line decoded (any JSON: checked by the caller), or ``None`` while
        it is incomplete."""
        buffer = self._buffer
        end = buffer.find(b"\n", 0, MAX_LINE + 1)
        if end < 0:
            if len(buffer) > MAX_LINE:
                raise self._fail(
                    f"{waiting_for} is longer than {MAX_LINE} bytes: not a gcollective handshake",
                    "bad-message",
                    "bad-message",
                )
            return None
        self._buffer = buffer[end + 1 :]
        try:
            return json.loads(buffer[:end])
        except (ValueError, RecursionError):
            raise self._fail(
                f"{waiting_for} is not a JSON line: not a gcollective handshake",
                "bad-message",
                "bad-message",
            ) from None

    def _check_refusal(self, message: object) -> None:
        why = explain_refusal(message)
        if why is not None:
            raise self._fail(why, "refused")

    def _finish(self, keys: _Keys, peer_info: str) -> None:
        self._keys = keys
        self.peer_info = peer_info
        self.leftover, self._buffer = self._buffer, b""
        self._prk = b""  # keep no more key material than the direction keys

    def _direction_keys(self) -> tuple[bytes, bytes]:
        """(key this side seals with, key this side opens with)."""
        raise NotImplementedError

    def sealer(self, record_size: int = RECORD_SIZE) -> Sealer:
        """The sealer for what this side sends after the handshake. Once per handshake: two
        sealers would reuse counters under one key."""
        if not self.done:
            raise RuntimeError("the handshake is not complete")
        if self._sealer_made:
            raise RuntimeError("sealer() may be called once per handshake")
        self._sealer_made = True
        return Sealer(self._direction_keys()[0], record_size)

    def opener(self, max_record: int = RECORD_SIZE) -> Opener:
        """The opener for what this side receives after the handshake; feed it ``leftover``
        first. Once per handshake."""
        if not self.done:
            raise RuntimeError("the handshake is not complete")
        if self._opener_made:
            raise RuntimeError("opener() may be called once per handshake")
        self._opener_made = True
        return Opener(self._direction_keys()[1], max_record)


def _parse_nonce(value: object) -> bytes | None:
    if type(value) is str and _HEX32.fullmatch(value):
        return bytes.fromhex(value)
    return None


def _parse_info(value: object) -> str | None:
    if type(value) is str and len(value) <= MAX_INFO and _encodable(value):
        return value
    return None


def _proof_matches(proof: object, expected: bytes) -> bool:
    # Compared as hex text in constant time; a proof of the wrong type or length just fails.
    if type(proof) is not str or not _HEX32.fullmatch(proof):
        return False
    return _compare(proof.encode("ascii"), expected.hex().encode("ascii"))


def _is_message(message: object, kind: int, length: int) -> TypeGuard[list[Any]]:
    return (
        _is_auth(message)
        and len(message) == length
        and message[1] == kind
        and type(message[1]) is int
    )


class DialerHandshake(_Handshake):
    """The side that dialed: sends AUTH1, checks AUTH2, answers AUTH3.

    ``secret`` is the collective's shared secret (str, or non-empty bytes); ``info`` a short
    string for the peer (authenticated, not secret). Send ``start()``'s bytes; pass everything
    read to ``receive()`` (``b""`` means the peer closed) until it returns ``done``; send that
    last ``Step.send`` and, from then on, only records made by ``sealer()``. Any failure
    raises ``AuthenticationError``.
    """

    _started = False

    def start(self) -> bytes:
        """AUTH1: the first bytes to send on the new connection."""
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        return _line([AUTH_MAGIC, AUTH1, AUTH_VERSION, self._nonce.hex(), self._info])

    def receive(self, data: bytes) -> Step:
        """Feed bytes read from the peer (``b""`` at end of stream).

        Returns ``Step(AUTH3 line, True)`` once the acceptor proved it holds the secret, and
        ``Step(b"", False)`` while AUTH2 is incomplete.
        """
        if not self._started:
            raise RuntimeError("call start() and send its bytes first")
        waiting_for = "its handshake reply (AUTH2)"
        self._feed(data, waiting_for)
        message = self._take_line(waiting_for)
        if message is None:
            return Step(b"", False)
        self._check_refusal(message)
        if not _is_message(message, AUTH2, 5):
            raise self._fail("peer's handshake reply is not AUTH2", "bad-message", "bad-message")
        nonce_a = _parse_nonce(message[2])
        info_a = _parse_info(message[3])
        if nonce_a is None or info_a is None:
            raise self._fail("peer's AUTH2 is malformed", "bad-message", "bad-message")
        keys = _derive(self._prk, _transcript_hash(self._nonce, self._info, nonce_a, info_a))
        if not _proof_matches(message[4], keys.acceptor_proof):
            raise self._fail(
                "peer's proof does not match: it has a different secret "
                "(or the handshake was altered in transit)",
                "bad-proof",
                "wrong-secret",
            )
        self._finish(keys, info_a)
        return Step(_line([AUTH_MAGIC, AUTH3, keys.dialer_proof.hex()]), True)

    def _direction_keys(self) -> tuple[bytes, bytes]:
        keys = self._keys
        assert keys is not None
        return keys.dialer_to_acceptor, keys.acceptor_to_dialer


class AcceptorHandshake(_Handshake):
    """The side that accepted: reads AUTH1, answers AUTH2, checks AUTH3.

    Pass everything read to ``receive()`` (``b""`` means the peer closed) and send each
    ``Step.send``, until ``done``; then read the rest of the stream through ``opener()``,
    feeding it ``leftover`` first. Any failure raises ``AuthenticationError``. Nothing the
    peer sends may be acted upon before ``done``.
    """

    _pending: tuple[_Keys, str] | None = None  # after AUTH1: the keys and the dialer's info

    def receive(self, data: bytes) -> Step:
        """Feed bytes read from the peer (``b""`` at end of stream).

        Returns ``Step(AUTH2 line, False)`` once AUTH1 is in, ``Step(b"", True)`` once the
        dialer proved it holds the secret, and ``Step(b"", False)`` while waiting.
        """
        send = b""
        if self._pending is None:
            waiting_for = "the authentication handshake (AUTH1)"
            self._feed(data, waiting_for)
            message = self._take_line(waiting_for)
            if message is None:
                return Step(b"", False)
            send = self._on_auth1(message)
            # An honest dialer sends AUTH3 only after reading AUTH2, but whatever followed
            # AUTH1 in the same read must be checked now rather than left in the buffer.
            message = self._take_line("its proof (AUTH3)")
        else:
            self._feed(data, "its proof (AUTH3)")
            message = self._take_line("its proof (AUTH3)")
        if message is None:
            return Step(send, False)
        self._on_auth3(message)
        return Step(send, True)

    def _on_auth1(self, message: object) -> bytes:
        opener = message[0] if type(message) is list and message else None
        if type(opener) is str and opener in _UNAUTHENTICATED:
            raise self._fail(_UNAUTHENTICATED[opener], "missing-handshake", "secret-required")
        if not (_is_auth(message) and message[1] == AUTH1 and type(message[1]) is int):
            raise self._fail(
                "first message is not the authentication handshake (AUTH1)",
                "bad-message",
                "bad-message",
            )
        version = message[2] if len(message) > 2 else None
        if version != AUTH_VERSION or type(version) is not int:
            raise self._fail(
                f"peer speaks authentication version {repr(version)[:20]}, "
                f"this node {AUTH_VERSION}",
                "version",
                "version",
            )
        if len(message) != 5:
            raise self._fail("peer's AUTH1 is malformed", "bad-message", "bad-message")
        nonce_d = _parse_nonce(message[3])
        info_d = _parse_info(message[4])
        if nonce_d is None or info_d is None:
            raise self._fail("peer's AUTH1 is malformed", "bad-message", "bad-message")
        keys = _derive(self._prk, _transcript_hash(nonce_d, info_d, self._nonce, self._info))
        self._pending = (keys, info_d)
        return _line([AUTH_MAGIC, AUTH2, self._nonce.hex(), self._info, keys.acceptor_proof.hex()])

    def _on_auth3(self, message: object) -> None:
        self._check_refusal(message)
        if not _is_message(message, AUTH3, 3):
            raise self._fail("peer's reply is not AUTH3", "bad-message", "bad-message")
        pending = self._pending
        assert pending is not None
        keys, info_d = pending
        if not _proof_matches(message[2], keys.dialer_proof):
            raise self._fail(
                "peer's proof does not match: it has a different secret, "
                "or it replayed or altered a handshake",
                "bad-proof",
                "wrong-secret",
            )
        self._pending = None
        self._finish(keys, info_d)

    def _direction_keys(self) -> tuple[bytes, bytes]:
        keys = self._keys
        assert keys is not None
        return keys.acceptor_to_dialer, keys.dialer_to_acceptor
