"""``gcollective.set`` (the default node's, what a gunicorn worker's app calls) takes the node's
quick way for a plain SET, as ``node.set`` does: its default ``op`` is ``Operation.SET``, an
IntEnum member, which the node's identity test for SET did not take, so every module-level
``set`` went the general way (parse the key, check it, apply it op by op). Real members."""

from __future__ import annotations

import pytest
from cluster import free_port, wait_for

import gcollective
from gcollective import Collective


def test_module_level_set_takes_the_quick_way_and_replicates(monkeypatch):
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    node = gcollective.start(addresses[0], addresses)
    late = None
    try:
        general = []
        original = node._set_otherwise

        def spy(*args, **kwargs):
            general.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(node, "_set_otherwise", spy)
        for number in range(100):
            gcollective.set(f"workers.w.{number}", number)
        gcollective.set("session.s", {"u": 1}, ttl=60)
        assert general == []  # every one the quick way
        # The other operations still go by op, as named or as ints; bad ones are refused.
        gcollective.set("hits", 2, gcollective.INCREMENT)
        gcollective.set("hits", 3, 1)
        gcollective.set("workers.w.0", None, gcollective.DELETE)
        for bad in (True, 7, "0", None):
            with pytest.raises(ValueError, match="op must be"):
                gcollective.set("x", 1, bad)
        assert gcollective.get("hits") == 5
        # A member joining later holds all of it.
        late = Collective(addresses[1], addresses)
        late.start()
        wait_for(lambda: late.snapshot() == node.snapshot())
        assert late.get("workers.w.99") == 99 and late.get("session.s") == {"u": 1}
        assert late.get("workers.w.0") is None and late.get("hits") == 5
    finally:
        if late is not None:
            late.stop()
        gcollective.stop()
