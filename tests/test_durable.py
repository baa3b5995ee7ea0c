"""Durability (``data_dir``): a member killed, even with all the others at once, comes back
with everything it applied, from its own directory, before it serves (issue 22)."""

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from cluster import (
    ROOT,
    HubTicks,
    NodeProcess,
    converged,
    free_port,
    free_ports,
    wait_for,
    wait_until,
)

from gcollective import Collective, DataDirError
from gcollective._durable import DATABASE, ROOT_LEAVES

KEYS = 2000  # per member
HITS = 300  # increments of one shared counter, per member


def everything_written(nodes):
    """Every member's writer has put all it applied on disk."""
    return all(n.call("stats")["data_dir"]["unwritten_frames"] == 0 for n in nodes)


def write_then_kill_all(tmp_path):
    """Three members with a data_dir each write keys and hit one counter; once all of it
    is applied everywhere and on every disk, all three are SIGKILLed at once. Returns the
    ports, the directories and the tree's digest before the kill."""
    ports = free_ports(3)
    dirs = [str(tmp_path / f"member{i}") for i in range(3)]
    nodes = [NodeProcess(port, ports, data_dir=d) for port, d in zip(ports, dirs)]
    try:
        for node in nodes:
            node.start()
        for i, node in enumerate(nodes):
            node.call("write_keys", prefix=f"p{i}", count=KEYS)
            node.call("incr_many", key="hits", count=HITS)
        nodes[1].call("delete", key="p0.7")
        wait_until(lambda: converged(nodes, leaves=3 * KEYS), timeout=60, what="converged")
        wait_until(lambda: everything_written(nodes), timeout=30, what="on disk")
        digest = nodes[0].summary()["digest"]
    finally:
        for node in nodes:
            node.proc.kill()  # all at once: no flush, no goodbye
        for node in nodes:
            node.proc.wait(10)
    return ports, dirs, digest


def restart(port, ports, data_dir, made):
    node = NodeProcess(port, ports, data_dir=data_dir)
    made.append(node)
    node.start(timeout=2)
    return node


def check_whole(node, digest):
    """The member holds exactly the state from before the kill."""
    summary = node.summary()
    assert summary["leaves"] == 3 * KEYS
    assert summary["digest"] == digest
    assert node.call("get", key="hits")["value"] == 3 * HITS  # each increment once
    assert node.call("get", key="p0.7")["value"] is None  # the delete too


def test_whole_cluster_killed_at_once_comes_back_from_disk(tmp_path):
    ports, dirs, digest = write_then_kill_all(tmp_path)
    made = []
    try:
        # One at a time, each alone at first: what it holds came from its own directory.
        for port, data_dir in zip(ports, dirs):
            node = restart(port, ports, data_dir, made)
            check_whole(node, digest)
        wait_until(lambda: converged(made, leaves=3 * KEYS), timeout=60, what="converged")
        assert made[0].summary()["digest"] == digest
        # New writes after the restart replicate as usual (and the counter goes on).
        made[2].call("incr", key="hits")
        wait_until(
            lambda: all(n.call("get", key="hits")["value"] == 3 * HITS + 1 for n in made),
            timeout=30,
            what="the increment after the restart",
        )
    finally:
        for node in made:
            node.stop()


def test_member_whose_directory_was_lost_catches_up_from_the_others(tmp_path):
    ports, dirs, digest = write_then_kill_all(tmp_path)
    shutil.rmtree(dirs[2])
    made = []
    try:
        for port, data_dir in zip(ports[:2], dirs[:2]):
            check_whole(restart(port, ports, data_dir, made), digest)
        lost = restart(ports[2], ports, dirs[2], made)
        wait_until(lambda: converged(made, leaves=3 * KEYS), timeout=60, what="caught up")
        check_whole(lost, digest)
    finally:
        for node in made:
            node.stop()


def started(data_dir, **options):
    node = Collective(f"127.0.0.1:{free_port()}", data_dir=data_dir, **options)
    node.start(timeout=0.5)
    return node


def stopped_with_data(data_dir):
    node = started(data_dir)
    node.set("kept", {"a": 1})
    node.incr("count", 5)
    node.stop()


def test_restart_in_process_and_stop_writes_what_is_pending(tmp_path):
    data_dir = str(tmp_path / "data")
    stopped_with_data(data_dir)  # stop() right after the writes: it writes them
    node = started(data_dir)
    try:
        assert node.get("kept") == {"a": 1}
        assert node.get("count") == 5
        assert node.stats()["data_dir"]["restored_frames"] > 0
    finally:
        node.stop()


def test_corrupt_database_is_refused_and_left_as_it_was(tmp_path):
    data_dir = str(tmp_path / "data")
    stopped_with_data(data_dir)
    database = os.path.join(data_dir, DATABASE)
    with open(database, "r+b") as file:
        file.write(b"this is not an SQLite header, nor a page")
    with open(database, "rb") as file:
        before = file.read()
    with pytest.raises(DataDirError, match="not a readable gcollective database"):
        started(data_dir)
    with open(database, "rb") as file:
        assert file.read() == before  # never wiped, never rewritten
    # The refused start left the directory free: with the file moved away, it starts empty.
    os.rename(database, str(tmp_path / "bad"))
    node = started(data_dir)
    assert node.get("kept") is None
    node.stop()


def test_foreign_directory_and_foreign_database_are_refused(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataDirError, match=r"notes\.txt.*not a gcollective data directory"):
        started(str(foreign))
    assert os.listdir(foreign) == ["notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    connection = sqlite3.connect(str(other / DATABASE))
    connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    connection.execute("INSERT INTO meta VALUES ('format', 'something else')")
    connection.commit()
    connection.close()
    with pytest.raises(DataDirError, match="format version"):
        started(str(other))
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(DataDirError, match="cannot be used"):
        started(str(a_file))
    assert a_file.read_text() == "mine"


def test_second_process_on_one_directory_is_refused(tmp_path):
    data_dir = str(tmp_path / "data")
    port = free_port()
    holder = NodeProcess(port, [], data_dir=data_dir)
    try:
        holder.start(timeout=0.5)
        holder.call("set", key="x", value=1)
        with pytest.raises(
            DataDirError, match=f"in use by another process \\(pid {holder.proc.pid}"
        ):
            started(data_dir)
        holder.call("set", key="y", value=2)  # the holder is unharmed
    finally:
        holder.stop()
    node = started(data_dir)  # free once the holder stopped
    try:
        assert node.get("x") == 1 and node.get("y") == 2
    finally:
        node.stop()


FORKING = textwrap.dedent(
    """
    import os, signal, sys, time
    from gevent import monkey
    monkey.patch_all()
    import gcollective
    node = gcollective.start("127.0.0.1:%d", [], timeout=0.5, data_dir=sys.argv[1])
    node.set("before", 1)
    child = os.fork()
    if child == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # (the test reads the parent's output to its end)
        os.dup2(devnull, 2)
        time.sleep(60)  # a worker that outlives its parent's node
        os._exit(0)
    node.set("after", 2)
    node.stop()
    print(child, flush=True)
    """
)


def test_a_forked_child_holds_nothing_of_the_parents_directory(tmp_path):
    """A child forked from a process with a node keeps neither its lock nor its database:
    once the parent stops, another process takes the directory, with all of it."""
    data_dir = str(tmp_path / "data")
    script = FORKING % free_port()
    parent = subprocess.run(
        [sys.executable, "-c", script, data_dir],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.split()[-1])
    try:
        os.kill(child, 0)  # still alive, with its copy of the parent's descriptors
        node = started(data_dir)
        try:
            assert node.get("before") == 1 and node.get("after") == 2
        finally:
            node.stop()
    finally:
        os.kill(child, 9)


def test_options_are_checked_and_off_by_default(tmp_path):
    with pytest.raises(ValueError, match="fsync must be one of"):
        Collective("127.0.0.1:1", data_dir=str(tmp_path), fsync="sometimes")
    with pytest.raises(TypeError, match="data_dir must be a path"):
        Collective("127.0.0.1:1", data_dir=3)
    node = started(None)
    try:
        node.set("x", 1)
        assert node.stats()["data_dir"] is None
    finally:
        node.stop()
    assert os.listdir(tmp_path) == []


def test_a_start_that_cannot_bind_leaves_the_directory_free(tmp_path):
    data_dir = str(tmp_path / "data")
    stopped_with_data(data_dir)
    holder = started(None)
    node = Collective(holder.local, data_dir=data_dir)
    try:
        with pytest.raises(OSError):
            node.start(timeout=0.5)
        again = started(data_dir)  # (as a gunicorn worker trying the next slot does)
        assert again.get("count") == 5
        again.stop()
    finally:
        holder.stop()


def test_checkpoints_keep_the_table_proportional_to_the_tree_not_the_history(tmp_path, monkeypatch):
    """One key overwritten 60,000 times: the history is megabytes of frames, the tree one
    key; checkpoints delete the history (with a small threshold, to see several)."""
    import gevent

    from gcollective import _durable

    monkeypatch.setattr(_durable, "CHECKPOINT_MIN_BYTES", 64 * 1024)
    data_dir = str(tmp_path / "data")
    node = started(data_dir)

    def stored() -> int:
        connection = sqlite3.connect(os.path.join(data_dir, DATABASE))
        try:
            return connection.execute("SELECT SUM(LENGTH(frame)) FROM frames").fetchone()[0]
        finally:
            connection.close()

    try:
        for i in range(60_000):
            node.set("hot", {"n": i, "pad": "x" * 40})
            if i % 500 == 0:
                gevent.sleep(0.001)  # an app serving requests: the writer gets its turns
        history = node.stats()["data_dir"]["written_bytes"]
        assert history > 3_000_000  # about 60,000 x 60 bytes
        # Once the writer has caught up: at most the last checkpoint (a few hundred bytes)
        # and what came since (up to the threshold). Sampled as the loop ends, the table
        # also holds what came while the last checkpoint ran, which on a loaded machine
        # (or with a faster loop) reached a quarter of the history (1.1 of 4.1 MB).
        wait_for(lambda: stored() < history / 4, timeout=10, what="the table proportional")
        assert node.stats()["data_dir"]["checkpoints"] >= 3
    finally:
        node.stop()
    node = started(data_dir)
    try:
        assert node.get("hot") == {"n": 59_999, "pad": "x" * 40}
    finally:
        node.stop()


def _since_last_checkpoint(reader: sqlite3.Connection) -> tuple[int, int]:
    """(bytes of the last whole checkpoint's SNAPSHOT and ROOT_LEAVES frames, bytes of OPS
    frames after it), read from the table as a restore would replay it."""
    rows = reader.execute("SELECT SUBSTR(frame, 1, 5), LENGTH(frame) FROM frames ORDER BY id")
    checkpoint, snapshot, appended = 0, 0, 0
    for kind, size in rows:
        if kind.startswith(b"[3,"):  # SNAPSHOT_END: the checkpoint before it is whole
            checkpoint, snapshot, appended = snapshot, 0, 0
        elif kind.startswith(b"[2,") or kind == b"[%d," % ROOT_LEAVES:
            snapshot += size
        else:
            appended += size
    return checkpoint, appended


def test_a_checkpoint_comes_before_a_quarter_of_its_bytes_was_appended(tmp_path, monkeypatch):
    """A restore replays the last checkpoint, then every OPS frame appended since, each
    operation applied (a byte of them costs about twice a checkpoint's): the next checkpoint
    comes once a quarter of the last one's bytes was appended, not as many (a 2,000,000-key
    member took 23 s to restore, issue 22's target is 5 s). Overwrites of a tree of 20,000
    keys, the table read while they go on."""
    import gevent

    from gcollective import _durable

    monkeypatch.setattr(_durable, "CHECKPOINT_MIN_BYTES", 16 * 1024)
    data_dir = str(tmp_path / "data")
    node = started(data_dir)
    reader = sqlite3.connect(os.path.join(data_dir, DATABASE))
    worst = 0.0
    try:
        for i in range(200_000):
            node.set(f"k{i % 20_000}", i)
            if i % 250 == 0:
                gevent.sleep(0.001)  # an app serving requests: the writer gets its turns
                checkpoint, appended = _since_last_checkpoint(reader)
                if i >= 40_000 and checkpoint:  # (the tree whole in the checkpoints)
                    worst = max(worst, appended / checkpoint)
        assert node.stats()["data_dir"]["checkpoints"] >= 4
    finally:
        reader.close()
        node.stop()
    # A quarter, and what a loaded machine's writer appends while a checkpoint is written.
    assert 0 < worst < 0.6, worst


def test_a_checkpoint_lets_timers_run_between_its_frames(tmp_path, monkeypatch):
    """A checkpoint builds the member's snapshot frame by frame in the hub; between two
    frames the hub turns its loop, timers included (a member's flushes, heartbeats, an app's
    timeouts), not only greenlets already ready: the longest a 1 ms timer waits stays about
    a frame's work, not a whole 4 MiB chunk of frames (0.2-0.5 s at 2,000,000 keys)."""
    import gevent

    from gcollective import _snapshots

    # (Frames of 256 KiB: a 4 MiB chunk is 16 of them, each a few ms of work.)
    monkeypatch.setattr(_snapshots, "SNAPSHOT_FRAME_BYTES", 256 * 1024)
    node = started(str(tmp_path / "data"))
    try:
        for i in range(100_000):  # (a checkpoint of about 5 MB: 21 frames)
            node.set(f"k{i}", i)
            if i % 5000 == 0:
                gevent.sleep(0.001)
        wait_until(lambda: not node.stats()["data_dir"]["unwritten_frames"], sleep=gevent.sleep)
        checkpoints = node.stats()["data_dir"]["checkpoints"]
        ticks = HubTicks()
        node._durable._since_checkpoint = 1 << 62  # (due now)
        wait_until(
            lambda: node.stats()["data_dir"]["checkpoints"] > checkpoints,
            timeout=60,
            sleep=gevent.sleep,
        )
        longest = ticks.longest()
    finally:
        node.stop()
    assert longest < 0.1, sorted(ticks.gaps)[-5:]


@pytest.mark.parametrize("fsync,synchronous", [("always", 2), ("interval", 1), ("never", 0)])
def test_fsync_policy_is_sqlite_synchronous_and_each_restarts(tmp_path, fsync, synchronous):
    data_dir = str(tmp_path / "data")
    node = started(data_dir, fsync=fsync)
    try:
        connection = node._durable._connection
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        node.incr("n", 3)
    finally:
        node.stop()
    node = started(data_dir, fsync=fsync)
    try:
        assert node.get("n") == 3 and node.stats()["data_dir"]["fsync"] == fsync
    finally:
        node.stop()


def test_command_line_node_takes_data_dir_and_refuses_a_foreign_one(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    command = [sys.executable, "-m", "gcollective", "node", "--local", f"127.0.0.1:{free_port()}"]
    refused = subprocess.run(
        [*command, "--data-dir", str(foreign)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert refused.returncode == 1
    assert "not a gcollective data directory" in refused.stderr
    assert os.listdir(foreign) == ["notes.txt"]
