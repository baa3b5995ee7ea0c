"""Checks for what callers pass in: keys become paths, values become private JSON copies."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterable, Union

from ._errors import InvalidKeyError, InvalidValueError

__all__ = [
    "Address",
    "Key",
    "parse_key",
    "has_utf8",
    "clean_value",
    "check_amount",
    "check_ttl",
    "MAX_TTL",
    "parse_address",
    "format_address",
    "parse_members",
    "check_positive",
    "check_seconds",
    "is_ascii_digits",
    "check_sizes",
    "MIN_SECONDS",
    "MAX_SECONDS",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "check_number",
    "INT_BOUND",
    "INT_LOW",
    "clean_flat_dict",
]

#: A dotted string ('users.42.visits') or a tuple of segments (('users', 'a.b@c.d')).
Key = Union[str, "tuple[str, ...]"]

#: A member's address: ``"host:port"`` (``"[v6]:port"``), ``(host, port)`` or
#: ``{"host": host, "port": port}``; ``parse_address`` checks it at run time.
Address = Union[str, tuple[str, int], dict[str, Any]]

#: Nesting limit for keys and values together, well below the JSON codec's own limit: a
#: key's segments plus the nesting of the value stored there (a list or dict counts one level,
#: each list or dict inside it one more). One rule on every path (``set``, ``incr``, OPS and
#: SNAPSHOT frames), so whatever one member accepts every member, joiners too, accepts.
MAX_DEPTH = 100

#: The most decimal digits of an int: Python's default limit on converting an int to or from
#: text, which the JSON codec hits on both ends (``sys.get_int_max_str_digits``).
MAX_INT_DIGITS = 4300
#: Ints strictly between minus this and this have at most ``MAX_INT_DIGITS`` digits.
INT_BOUND = 10**MAX_INT_DIGITS
#: ``-INT_BOUND``, made once: negating a 4,300-digit int on every check cost 40 ns.
INT_LOW = -INT_BOUND


def has_utf8(text: str) -> bool:
    """True unless ``text`` holds a lone surrogate, which UTF-8 (and so the wire) cannot
    carry. Values are encoded in batches after ``set()`` returns, so they are checked here."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_key(key: object) -> tuple[str, ...]:
    """Turn a key into its path of segments, or raise ``InvalidKeyError``."""
    if type(key) is str:
        # Split first: one C-level scan of the parts then finds any empty segment.
        segments = key.split(".")
        if "" in segments:
            raise InvalidKeyError(f"key {key!r} is empty or has an empty segment")
        if len(segments) > MAX_DEPTH:
            raise InvalidKeyError(f"key is deeper than {MAX_DEPTH} segments")
        if not key.isascii() and not has_utf8(key):
            raise InvalidKeyError(f"key {key!r} holds a lone surrogate, which UTF-8 cannot carry")
        return tuple(segments)
    if isinstance(key, (tuple, list)):
        if not key:
            raise InvalidKeyError("key is an empty sequence")
        for segment in key:
            if not isinstance(segment, str):
                raise InvalidKeyError(
                    f"key segment {segment!r} is a {type(segment).__name__}, not a str"
                )
            if not segment:
                raise InvalidKeyError(f"key {tuple(key)!r} has an empty segment")
            if not has_utf8(segment):
                raise InvalidKeyError(
                    f"key {tuple(key)!r} holds a lone surrogate, which UTF-8 cannot carry"
                )
        if len(key) > MAX_DEPTH:
            raise InvalidKeyError(f"key is deeper than {MAX_DEPTH} segments")
        return tuple(str(s) for s in key)
    if isinstance(key, str):  # a str subclass
        return parse_key(str(key))
    raise InvalidKeyError(f"key must be a str or a tuple of str, not {type(key).__name__}")


def check_number(number: int | float) -> int | float:
    """``number`` (an int or float) if the JSON codec carries it exactly, else
    ``InvalidValueError``: an int of more than ``MAX_INT_DIGITS`` digits, or a float that is
    not finite (which JSON has no number for)."""
    if type(number) is int:
        if INT_LOW < number < INT_BOUND:
            return number
        raise InvalidValueError(
            f"an int of more than {MAX_INT_DIGITS} digits cannot travel as JSON "
            "(Python's limit on converting ints to text)"
        )
    if math.isfinite(number):
        return number
    raise InvalidValueError(f"{number!r} is not a JSON number")


# ``Any``, not ``object``, on purpose: the hot path tells types apart by ``kind = type(value)``,
# which mypy does not narrow ``value`` by, and rewriting it for the checker would slow every
# ``set()``. What it returns is a JSON value, which callers read as ``Any`` (as json.loads).
def clean_value(value: Any, depth: int = 0) -> Any:
    """A private copy of ``value`` made only of JSON types, or ``InvalidValueError``.

    Tuples become lists and subclasses of JSON types become the plain types, so what is kept
    locally is exactly what every other replica decodes. ``depth`` is the number of segments
    of the key it is stored at (see ``MAX_DEPTH``).
    """
    kind = type(value)
    if kind is int:
        return check_number(value)
    if kind is bool or value is None:
        return value
    if kind is str:
        if has_utf8(value):
            return value
        raise InvalidValueError(f"{value!r} holds a lone surrogate, which UTF-8 cannot carry")
    if kind is float:
        return check_number(value)
    if depth >= MAX_DEPTH:
        raise InvalidValueError(
            f"key and value are nested deeper than {MAX_DEPTH} levels together (the key's "
            "segments plus the value's nesting)"
        )
    if kind is dict or isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            inner = type(v)
            if (
                type(k) is str
                and k.isascii()
                and (
                    (inner is int and INT_LOW < v < INT_BOUND)
                    or (inner is str and v.isascii())
                    or inner is bool
                    or v is None
                )
            ):
                out[k] = v  # the common member (a session's), checked here: no call
                continue
            if not isinstance(k, str):
                raise InvalidValueError(
                    f"dict key {k!r} is a {type(k).__name__}; JSON object keys are str"
                )
            if not has_utf8(k):
                raise InvalidValueError(
                    f"dict key {k!r} holds a lone surrogate, which UTF-8 cannot carry"
                )
            out[str(k)] = clean_value(v, depth + 1)
        return out
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        return [clean_value(v, depth + 1) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return check_number(int(value))
    if isinstance(value, float):
        return clean_value(float(value), depth)
    if isinstance(value, str):
        return clean_value(str(value), depth)
    raise InvalidValueError(f"a {kind.__name__} cannot be stored: values must be JSON")


#: Ints strictly between minus this and this take at most 19 characters as JSON.
_FLAT_INT = 10**18
_FLAT_LOW = -_FLAT_INT  # (made once, as ``INT_LOW``)


def clean_flat_dict(value: dict[Any, Any], depth: int) -> tuple[dict[str, Any], int] | None:
    """``clean_value(value, depth)`` of a dict (exactly a dict) in its common case, a
    session's: ``depth`` below ``MAX_DEPTH`` and every member an ASCII str key with an int of
    at most 18 digits, an ASCII str, a bool or None. Returns the private copy and the most
    characters its JSON text can take (each character of a str escapes to at most 6, an int
    takes at most 19, each member at most 6 more for quotes, colon and comma), so a caller
    need not encode it to see that it fits a frame. None when it is not that case: then
    ``clean_value`` decides (and refuses what it must)."""
    if depth >= MAX_DEPTH:
        return None
    out = value.copy()  # (copied in C, then checked: the caller may change its dict later)
    chars = 0
    for k, v in out.items():
        if type(k) is not str or not k.isascii():
            return None
        inner = type(v)
        if inner is int:
            # (A one-digit int first, as ``Collective.set`` tests it: two of the interpreter's
            # fast compares, not two with the 18-digit bounds.)
            if not ((v < 0x3FFFFFFF and v > -0x3FFFFFFF) or _FLAT_LOW < v < _FLAT_INT):
                return None
        elif inner is str:
            if not v.isascii():
                return None
            chars += len(v)
        elif inner is not bool and v is not None:
            return None
        chars += len(k)
    return out, 6 * chars + 25 * len(out) + 2


def check_amount(amount: object) -> int | float:
    """An INCREMENT amount: an int or finite float, never a bool."""
    if type(amount) is int:
        return check_number(amount)
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise InvalidValueError(
            f"increment amount must be an int or float, not {type(amount).__name__}"
        )
    if isinstance(amount, int):
        return check_number(int(amount))
    return check_number(float(amount))


#: The longest ttl accepted, in seconds (about ten years; the wire refuses longer ones).
MAX_TTL = 10 * 365 * 24 * 3600


def check_ttl(ttl: object) -> int:
    """A ttl in seconds (a positive finite int or float, not a bool, at most ``MAX_TTL``),
    as whole milliseconds (at least 1); ``InvalidValueError`` otherwise."""
    if type(ttl) is int and 0 < ttl <= MAX_TTL:
        return ttl * 1000  # the common ttl, whole seconds: no float rounding
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidValueError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidValueError(f"ttl must be a positive finite number of seconds, not {ttl!r}")
    if ttl > MAX_TTL:
        raise InvalidValueError(f"ttl {ttl!r} is longer than {MAX_TTL} seconds (10 years)")
    return max(1, round(ttl * 1000))


def parse_address(address: object) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, ``(host, port)`` or ``{"host": h, "port": p}``."""
    if isinstance(address, dict):
        host, port = address.get("host"), address.get("port")
    elif isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address
    elif isinstance(address, str):
        text = address.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep or not is_ascii_digits(port_text):
            raise ValueError(f"address {address!r} is not host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_text)
    else:
        raise ValueError(f"address {address!r} is not host:port, (host, port) or a dict")
    if not isinstance(host, str) or not host:
        raise ValueError(f"address {address!r} has no host")
    if isinstance(port, str) and is_ascii_digits(port):
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"address {address!r} has no valid port (1-65535)")
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_members(
    local: object, peers: Iterable[object], advertise: object = None
) -> tuple[tuple[str, int], tuple[str, int], list[tuple[str, int]]]:
    """``(local, advertise, peers)`` parsed; the peers lose this member's own addresses and
    repeats, keeping their order (so ``peers`` may list every member, as in collective.js)."""
    local_address = parse_address(local)
    advertised = local_address if advertise is None else parse_address(advertise)
    others: list[tuple[str, int]] = []
    for peer in peers:
        address = parse_address(peer)
        if address not in (local_address, advertised) and address not in others:
            others.append(address)
    return local_address, advertised, others


#: The range of every option given in seconds: shorter would keep the hub busy with timers
#: and retries, longer is a mistake (a year is already far past any sane timeout).
MIN_SECONDS = 0.001
MAX_SECONDS = 365 * 24 * 3600.0
#: The most any option counted in bytes may say (1 TiB).
MAX_BYTES = 1 << 40


def is_ascii_digits(text: str) -> bool:
    """True for a non-empty run of 0-9 only: ``str.isdigit`` also accepts other scripts'
    digits and superscripts, which a port or count must not be."""
    return text.isascii() and text.isdigit()


def check_seconds(name: str, number: object, least: float = MIN_SECONDS) -> float:
    """``number`` as a float, or ``ValueError`` naming option ``name`` unless it is an int or
    float (not a bool), finite, from ``least`` to ``MAX_SECONDS``."""
    if (
        not isinstance(number, (int, float))
        or isinstance(number, bool)
        or not least <= number <= MAX_SECONDS  # (False for NaN)
    ):
        raise ValueError(
            f"{name} must be a number of seconds from {least:g} to {MAX_SECONDS:g}, not {number!r}"
        )
    return float(number)


def check_positive(**numbers: object) -> None:
    """``check_seconds`` for each option given, with the default least (``MIN_SECONDS``)."""
    for name, number in numbers.items():
        check_seconds(name, number)


def check_sizes(**sizes: tuple[object, int, int]) -> None:
    """``ValueError`` naming the first option (given as ``name=(value, least, most)``) that is
    not an int (not a bool) from ``least`` to ``most``."""
    for name, (size, least, most) in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or not least <= size <= most:
            raise ValueError(f"{name} must be an int from {least} to {most}, not {size!r}")
