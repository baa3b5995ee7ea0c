"""``python -m gcollective verify``: do the members that applied the same operations hold
the same data? Compares version vectors and tree digests (``_digest``) asked of each member
over its peer port; never copies the tree."""

from __future__ import annotations

import time
from typing import Any, Callable, TypedDict

from ._clock import stamp_millis

__all__ = ["MAX_DETAIL_BUCKETS", "Report", "compare", "format_report", "verify"]

#: Buckets asked for in detail (every key's digest) when they differ: the differing keys of
#: a few buckets locate a problem; a member missing everything would otherwise send its tree's
#: worth of digests.
MAX_DETAIL_BUCKETS = 16
# Seconds between two rounds while members still catch up.
_ROUND_PAUSE = 0.25

#: Asks the member at an address for its digest reply (``_digest.digest_reply``, as decoded
#: JSON), with every key's digest in the buckets listed.
Query = Callable[[tuple[str, int], list[int]], dict[str, Any]]


class MemberReport(TypedDict):
    """One member's line of a ``Report``."""

    address: str
    node_id: str
    top_level_keys: int
    applied_ops: int
    behind_ops: int
    behind_ms: int
    settled: bool
    digest_seconds: float
    longest_slice_seconds: float


class DifferingKey(TypedDict):
    """A top-level key whose digest differs, and the members that do not hold it at all."""

    key: str
    missing_on: list[str]


class _Detail(TypedDict, total=False):
    # Set by ``verify`` once it asked for the differing buckets in detail (not by ``compare``).
    detailed_buckets: list[int]


class Report(_Detail):
    """The verdict (``verify --json`` prints it as it is)."""

    agree: bool
    same_operations: bool
    diverged: list[list[str]]
    differing_buckets: list[int]
    members: list[MemberReport]
    differing_keys: list[DifferingKey]


def _applied(reply: dict[str, Any]) -> dict[str, int]:
    return {origin: seq for origin, seq, _ in reply["vector"]}


def _behind(replies: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Per member: operations it lacks of what any member applied, and the milliseconds
    between the stamps of the newest such operation and its own newest of the same origin
    (the most of any origin it holds some of)."""
    newest: dict[str, tuple[int, int]] = {}
    for reply in replies:
        for origin, seq, stamp in reply["vector"]:
            if seq > newest.get(origin, (0, 0))[0]:
                newest[origin] = (seq, stamp)
    out = []
    for reply in replies:
        mine = {origin: (seq, stamp) for origin, seq, stamp in reply["vector"]}
        operations, millis = 0, 0
        for origin, (seq, stamp) in newest.items():
            have, at = mine.get(origin, (0, 0))
            if have < seq:
                operations += seq - have
                if have:  # (of an origin it has nothing of, how old its view is is unknown)
                    millis = max(millis, stamp_millis(stamp) - stamp_millis(at))
        out.append((operations, millis))
    return out


def _differing_buckets(replies: list[dict[str, Any]]) -> list[int]:
    columns = zip(*(reply["buckets"] for reply in replies))
    return [index for index, column in enumerate(columns) if len(set(column)) > 1]


def _differing_keys(addresses: list[str], details: list[dict[str, Any]]) -> list[DifferingKey]:
    """Keys whose digest is not the same on every member, with where each is missing."""
    names = sorted(set().union(*(detail["keys"] for detail in details)))
    out: list[DifferingKey] = []
    for name in names:
        digests = [detail["keys"].get(name) for detail in details]
        if len(set(digests)) > 1:
            missing = [a for a, d in zip(addresses, digests) if d is None]
            out.append({"key": name, "missing_on": missing})
    return out


def compare(addresses: list[str], replies: list[dict[str, Any]]) -> Report:
    """The verdict on one round of digest replies (no detail yet)."""
    vectors = [_applied(reply) for reply in replies]
    same_operations = all(vector == vectors[0] for vector in vectors)
    differing = _differing_buckets(replies)
    members: list[MemberReport] = []
    for address, reply, (operations, millis) in zip(addresses, replies, _behind(replies)):
        members.append(
            {
                "address": address,
                "node_id": reply["node_id"],
                "top_level_keys": reply["top_level_keys"],
                "applied_ops": sum(_applied(reply).values()),
                "behind_ops": operations,
                "behind_ms": millis,
                "settled": reply["settled"],
                "digest_seconds": reply["seconds"],
                "longest_slice_seconds": reply["longest_slice_seconds"],
            }
        )
    diverged = _diverged_groups(addresses, vectors, replies)
    return {
        "agree": same_operations and not differing and all(r["settled"] for r in replies),
        "same_operations": same_operations,
        "diverged": diverged,
        "differing_buckets": differing,
        "members": members,
        "differing_keys": [],
    }


def _diverged_groups(
    addresses: list[str], vectors: list[dict[str, int]], replies: list[dict[str, Any]]
) -> list[list[str]]:
    """Groups of members that applied the same operations but hold different data."""
    groups: dict[tuple[tuple[str, int], ...], list[int]] = {}
    for index, vector in enumerate(vectors):
        groups.setdefault(tuple(sorted(vector.items())), []).append(index)
    out = []
    for indexes in groups.values():
        if len({tuple(replies[i]["buckets"]) for i in indexes}) > 1:
            out.append([addresses[i] for i in indexes])
    return out


def verify(
    addresses: list[tuple[str, int]],
    query: Query,
    settle: float,
    describe: Callable[[tuple[str, int]], str],
) -> Report:
    """Ask every member for its digests until they agree or ``settle`` seconds have passed
    (members still catching up, or a key expiring between two answers, agree a moment
    later); then locate the keys that differ, asking for the differing buckets in detail."""
    import gevent

    names = [describe(address) for address in addresses]
    deadline = time.monotonic() + settle
    while True:
        replies = [query(address, []) for address in addresses]
        report = compare(names, replies)
        if report["agree"] or time.monotonic() >= deadline:
            break
        gevent.sleep(_ROUND_PAUSE)
    detail = report["differing_buckets"][:MAX_DETAIL_BUCKETS]
    if detail:
        details = [query(address, detail) for address in addresses]
        report["differing_keys"] = _differing_keys(names, details)
    report["detailed_buckets"] = detail
    return report


def format_report(report: Report) -> str:
    """The verdict for people: one line per member, then what differs."""
    lines = []
    for member in report["members"]:
        behind = (
            "up to date"
            if not member["behind_ops"]
            else f"behind by {member['behind_ops']} ops ({member['behind_ms']} ms of stamps)"
        )
        lines.append(
            f"{member['address']}  node {member['node_id']}  {member['top_level_keys']} keys  "
            f"{member['applied_ops']} ops applied  {behind}"
        )
    for group in report["diverged"]:
        lines.append(
            "DIVERGED: " + ", ".join(group) + " applied the same operations but hold different data"
        )
    keys = report["differing_keys"]
    for entry in keys[:20]:
        where = f" (missing on {', '.join(entry['missing_on'])})" if entry["missing_on"] else ""
        lines.append(f"differs: {entry['key']!r}{where}")
    if len(keys) > 20:
        lines.append(f"... and {len(keys) - 20} more keys")
    others = len(report["differing_buckets"]) - len(report["detailed_buckets"])
    if others > 0:
        lines.append(f"... and the keys of {others} more buckets of keys that differ")
    if report["agree"]:
        lines.append("agree: every member applied the same operations and holds the same data")
    elif report["same_operations"]:
        lines.append("DISAGREE: the members hold different data")
    else:
        lines.append("DISAGREE: the members have not applied the same operations")
    return "\n".join(lines)
