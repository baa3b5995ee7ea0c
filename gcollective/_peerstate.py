"""The snapshot a node owes one peer: a named state and the one table of its transitions.

A node that sends a peer its whole state (the peer asked for it, or missed more than the log
holds) owes it until the peer reports ``complete`` in a PROGRESS: a ``sendall`` that
succeeded proves nothing if the connection then broke, so the snapshot is sent again on every
new connection until then. Its frames are built one at a time as the writer sends them (a
*stream*). Two facts, owed or not and streaming or not, make four states:

========================  =====  =========  ===========================================
state                     owed   streaming  meaning
========================  =====  =========  ===========================================
``NONE``                  no     no         catch-up from the log serves the peer
``STREAMING``             yes    yes        frames are being built and handed to the kernel
``OWED``                  yes    no         all sent (or lost with its connection): waiting
                                            for the peer's complete report; a new
                                            connection streams it again
``STREAMING_UNOWED``      no     yes        the peer reported complete (it merged another
                                            member's snapshot) or restarted while ours
                                            streams: the rest goes out, harmlessly
========================  =====  =========  ===========================================

Like h11's ``_state.py``: every change goes through ``next_state``, and a change the table
does not list raises ``LocalProtocolError`` (a bug in the engine, never a peer's doing).
"""

from __future__ import annotations

import enum


class Snapshot(enum.Enum):
    """Where the snapshot this node owes a peer is (see the module docstring)."""

    NONE = "none"
    STREAMING = "streaming"
    OWED = "owed"
    STREAMING_UNOWED = "streaming-unowed"


class Event(enum.Enum):
    """What moves a peer's ``Snapshot`` state."""

    #: A (new) snapshot stream starts: asked for, too far behind for the log, owed on a new
    #: connection, or the outbox could not be encoded.
    START = "start"
    #: The stream's last frame was handed to the writer.
    STREAMED = "streamed"
    #: The connection carrying the stream ended (or its queue overflowed): frames were lost.
    CONNECTION_LOST = "connection-lost"
    #: The peer reported complete: it merged a snapshot, ours or another member's.
    COMPLETE = "complete"
    #: The peer came back as a new incarnation: what the old one was owed means nothing.
    RESTARTED = "restarted"


class LocalProtocolError(RuntimeError):
    """A state change the transition table does not allow: a bug in the engine."""


_S, _E = Snapshot, Event
#: (state, event) -> next state. Anything missing is illegal.
TRANSITIONS: dict[tuple[Snapshot, Event], Snapshot] = {
    # Starting a stream (again) is allowed from anywhere: a new request replaces an old one.
    **{(state, _E.START): _S.STREAMING for state in Snapshot},
    (_S.STREAMING, _E.STREAMED): _S.OWED,
    (_S.STREAMING_UNOWED, _E.STREAMED): _S.NONE,
    (_S.STREAMING, _E.CONNECTION_LOST): _S.OWED,
    (_S.STREAMING_UNOWED, _E.CONNECTION_LOST): _S.NONE,
    (_S.OWED, _E.CONNECTION_LOST): _S.OWED,
    (_S.NONE, _E.CONNECTION_LOST): _S.NONE,
    (_S.STREAMING, _E.COMPLETE): _S.STREAMING_UNOWED,
    (_S.OWED, _E.COMPLETE): _S.NONE,
    (_S.NONE, _E.COMPLETE): _S.NONE,
    (_S.STREAMING_UNOWED, _E.COMPLETE): _S.STREAMING_UNOWED,
    (_S.STREAMING, _E.RESTARTED): _S.STREAMING_UNOWED,
    (_S.OWED, _E.RESTARTED): _S.NONE,
    (_S.NONE, _E.RESTARTED): _S.NONE,
    (_S.STREAMING_UNOWED, _E.RESTARTED): _S.STREAMING_UNOWED,
}

#: States in which the snapshot is owed (catch-up from the log waits for the peer's report).
OWED_STATES = frozenset({Snapshot.STREAMING, Snapshot.OWED})
#: States in which frames of a stream are still to be built.
STREAMING_STATES = frozenset({Snapshot.STREAMING, Snapshot.STREAMING_UNOWED})


def next_state(state: Snapshot, event: Event) -> Snapshot:
    """The state after ``event``, or ``LocalProtocolError`` if the table does not allow it."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"snapshot state {state.value}: {event.value} is not allowed"
        ) from None
