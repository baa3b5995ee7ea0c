"""A small WSGI app on gcollective, no framework: a page-hit counter and a session store.

Every worker process (gunicorn with ``gcollective.gunicorn.GeventWorker``, or the plain
processes of ``serve_pywsgi.py``) is a gcollective member, so a hit counted by one worker is
seen by all, and a session created on one worker is there on the next request, whichever
worker serves it.

Routes:
    GET  /            the page: counts a hit, shows the total and who served it
    GET  /hit         counts a hit; JSON ``{"total": <this worker's total after it>, ...}``
    GET  /stats       JSON: total hits, this worker's pid, slot and member address
    GET  /session     JSON of this browser's session (starts one: cookie ``sid``)
    POST /session     merges a JSON object (or a form) into the session
    POST /logout      deletes the session

Sessions live at ``sessions.<sid>`` in the shared tree (``sid``: 32 hex digits).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from html import escape
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

import gcollective

HITS = "hits.total"
SESSION_COOKIE = "sid"
_SID = re.compile(r"^[0-9a-f]{32}$")
_MAX_BODY = 64 * 1024

StartResponse = Callable[..., Any]


def worker_info() -> dict[str, Any]:
    """Who is answering: pid, slot and member address of this process."""
    node = gcollective.default_node()
    slot = os.environ.get("GCOLLECTIVE_WORKER_SLOT")
    host, port = node.local
    return {
        "pid": os.getpid(),
        "slot": int(slot) if slot is not None and slot.isdigit() else None,
        "member": f"{host}:{port}",
        "synced": node.synced,
    }


def _json(start_response: StartResponse, body: Any, status: str = "200 OK", headers=()):
    data = json.dumps(body).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *headers,
        ],
    )
    return [data]


def _session_id(environ: dict[str, Any]) -> str | None:
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and _SID.match(value):
            return value
    return None


def _read_body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return b""
    return environ["wsgi.input"].read(min(length, _MAX_BODY))


def _session_fields(environ: dict[str, Any]) -> dict[str, Any]:
    body = _read_body(environ)
    if environ.get("CONTENT_TYPE", "").startswith("application/json"):
        fields = json.loads(body or b"{}")
        if not isinstance(fields, dict):
            raise ValueError("send a JSON object")
        return fields
    return dict(parse_qsl(body.decode("utf-8", "replace")))


def session(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """GET: the session's data (starting one); POST: merge fields into it."""
    sid = _session_id(environ)
    headers = []
    if sid is None:
        sid = secrets.token_hex(16)
        headers.append(("Set-Cookie", f"{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Lax"))
    if environ["REQUEST_METHOD"] == "POST":
        try:
            fields = _session_fields(environ)
        except ValueError as exc:
            return _json(start_response, {"error": str(exc)}, "400 Bad Request")
        for field, value in fields.items():
            # A tuple key: a field name may contain dots.
            gcollective.set(("sessions", sid, "data", str(field)), value)
    visits = gcollective.incr(("sessions", sid, "visits"))
    data = gcollective.get(("sessions", sid, "data"), {})
    body = {"sid": sid, "visits": visits, "data": data, **worker_info()}
    return _json(start_response, body, headers=headers)


def logout(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Delete the session everywhere."""
    sid = _session_id(environ)
    if sid is not None:
        gcollective.delete(("sessions", sid))
    expire = f"{SESSION_COOKIE}=; Path=/; Max-Age=0"
    return _json(start_response, {"ok": True}, headers=[("Set-Cookie", expire)])


def page(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The hit counter as a page."""
    total = gcollective.incr(HITS)
    info = worker_info()
    html = (
        "<!doctype html><title>gcollective</title>"
        f"<h1>{total} hits</h1>"
        f"<p>Counted by pid {info['pid']}, slot {escape(str(info['slot']))}, "
        f"member {escape(info['member'])}. Reload: another worker may answer, "
        "the count goes on.</p>"
    ).encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(html)))],
    )
    return [html]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "/")
    method = environ["REQUEST_METHOD"]
    if path == "/" and method in ("GET", "HEAD"):
        return page(environ, start_response)
    if path == "/hit":
        return _json(start_response, {"total": gcollective.incr(HITS), **worker_info()})
    if path == "/stats":
        return _json(start_response, {"total": gcollective.get(HITS, 0), **worker_info()})
    if path == "/session" and method in ("GET", "POST"):
        return session(environ, start_response)
    if path == "/logout" and method == "POST":
        return logout(environ, start_response)
    return _json(start_response, {"error": "not found"}, "404 Not Found")


application = app
