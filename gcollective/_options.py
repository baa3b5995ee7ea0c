"""Checks of the security options a ``Collective`` takes (the rest are checked by
``_validate``'s helpers in ``Collective.__init__``)."""

from __future__ import annotations

import os
from typing import Any

from ._validate import check_seconds

#: The shortest ``resolve_interval``: resolving a name more often would only load its DNS
#: server (a member found a tenth of a second sooner gains nothing).
MIN_RESOLVE_INTERVAL = 0.1
#: The most ``max_members`` may say (a full mesh of that many is far past what one runs).
MAX_MEMBERS_LIMIT = 1 << 16


def _check_secret(secret: Any) -> bytes | None:
    """The secret as bytes (str is UTF-8), or ``None``; ``TypeError`` / ``ValueError`` if it
    cannot be one. Never put the secret itself in a message."""
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    elif isinstance(secret, (bytes, bytearray)):
        secret = bytes(secret)
    else:
        raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")
    if not secret:
        raise ValueError("secret must not be empty (pass None for no authentication)")
    return bytes(secret)


def _check_tls_files(certfile: Any, keyfile: Any, cafile: Any) -> dict[str, Any] | None:
    """The TLS options as ``_tls``'s context builders take them, or ``None`` without TLS.

    All or nothing: half a TLS configuration is a mistake, never a request for no TLS.
    """
    given = {"certfile": certfile, "keyfile": keyfile, "cafile": cafile}
    if all(value is None for value in given.values()):
        return None
    for name, value in given.items():
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path, not {type(value).__name__}")
    missing = [name for name in ("certfile", "cafile") if given[name] is None]
    if missing:
        raise ValueError(
            f"TLS needs certfile (this member's certificate) and cafile (the collective's "
            f"CA), and keyfile unless the key is in certfile; missing: {', '.join(missing)}"
        )
    return given


def check_security(
    secret: Any, certfile: Any, keyfile: Any, cafile: Any, check_hostname: Any
) -> tuple[bytes | None, dict[str, Any] | None]:
    """The secret (as bytes) and the TLS files of a member's options, checked
    (``TypeError`` / ``ValueError`` for a bad one, never naming the secret)."""
    checked_secret = _check_secret(secret)
    tls_files = _check_tls_files(certfile, keyfile, cafile)
    if type(check_hostname) is not bool:
        raise TypeError(f"check_hostname must be a bool, not {type(check_hostname).__name__}")
    if check_hostname and tls_files is None:
        raise ValueError("check_hostname needs TLS (certfile, keyfile and cafile)")
    return checked_secret, tls_files


def check_resolve_interval(resolve_interval: Any) -> float:
    """``resolve_interval`` (seconds between two resolutions of a DNS name in ``peers``) as a
    float, or ``ValueError`` unless it is a number from 0.1 s to a year."""
    return check_seconds("resolve_interval", resolve_interval, MIN_RESOLVE_INTERVAL)
