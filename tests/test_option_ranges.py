"""Every numeric option is a finite number in a sane range, or a ``ValueError`` at once: in
``Collective`` (both protocols), ``start()``, the gunicorn worker's variables and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from cluster import ROOT, free_port

from gcollective import Collective
from gcollective._validate import parse_address

SECONDS = [
    "connect_timeout",
    "send_timeout",
    "backoff_min",
    "backoff_max",
    "sync_interval",
    "handshake_timeout",
    "idle_timeout",
    "down_timeout",
    "clock_skew",
]
SIZES = ["max_frame", "max_queue_bytes", "log_bytes", "max_connections"]
NOT_SECONDS = [math.nan, math.inf, -math.inf, -1, 0, 1e-9, 10**12, True, "1", None]
NOT_SIZES = [math.nan, math.inf, -1, 1.5, 1 << 60, True, "1024", None]


@pytest.mark.parametrize("protocol", ["gcollective", "collective.js"])
@pytest.mark.parametrize("option", SECONDS)
@pytest.mark.parametrize("value", NOT_SECONDS, ids=repr)
def test_bad_seconds_are_refused(protocol, option, value):
    with pytest.raises(ValueError, match=option):
        Collective(f"127.0.0.1:{free_port()}", protocol=protocol, **{option: value})


@pytest.mark.parametrize("protocol", ["gcollective", "collective.js"])
def test_membership_options_are_taken_and_checked_in_both_modes(protocol):
    # (The collective.js mode ignores them, so that one configuration serves both modes.)
    address = f"127.0.0.1:{free_port()}"
    Collective(address, protocol=protocol, max_members=8, resolve_interval=2.5)
    for option, value in [("max_members", 0), ("max_members", 1 << 20), ("resolve_interval", 0)]:
        with pytest.raises(ValueError, match=option):
            Collective(address, protocol=protocol, **{option: value})


@pytest.mark.parametrize("option", SIZES)
@pytest.mark.parametrize("value", NOT_SIZES, ids=repr)
def test_bad_sizes_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        Collective(f"127.0.0.1:{free_port()}", **{option: value})


def test_sane_values_are_taken():
    node = Collective(
        f"127.0.0.1:{free_port()}",
        **{option: 0.5 for option in SECONDS},
        max_frame=1 << 30,
        log_bytes=0,
    )
    assert node.sync_interval == 0.5 and node.max_frame == 1 << 30


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1, 10**12, "5"], ids=repr)
def test_start_refuses_a_bad_timeout_and_starts_nothing(timeout):
    node = Collective(f"127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="timeout"):
        node.start(timeout=timeout)
    assert not node.running
    node.start(timeout=0)  # zero is fine: do not wait for anyone
    node.stop()


@pytest.mark.parametrize(
    "address",
    ["h:\u0663", "h:\u00b2", "h:\uff11\uff12", "h: 80", "h:8_0", ("h", "\u0663"), ("h", "\u00b2")],
    ids=repr,
)
def test_ports_are_ascii_digits(address):
    with pytest.raises(ValueError, match="port"):
        parse_address(address)


def test_the_gunicorn_worker_refuses_bad_numbers():
    pytest.importorskip("gunicorn")
    from gcollective.gunicorn import ConfigError, settings_from_env

    for name, value in [
        ("GCOLLECTIVE_START_TIMEOUT", "nan"),
        ("GCOLLECTIVE_START_TIMEOUT", "1e12"),
        ("GCOLLECTIVE_START_TIMEOUT", "1e-9"),
        ("GCOLLECTIVE_HANDOFF_TIMEOUT", "1e400"),
        ("GCOLLECTIVE_BASE_PORT", "\u0663\u0663\u0663\u0663"),
        ("GCOLLECTIVE_BASE_PORT", "\u00b2"),
        ("GCOLLECTIVE_SLOTS", "\u00b2"),
    ]:
        with pytest.raises(ConfigError) as caught:
            settings_from_env({name: value}, 2, is_local=lambda host: host == "127.0.0.1")
        assert caught.value.variable == name, value


@pytest.mark.parametrize(
    "args",
    [
        ["status", "127.0.0.1:1", "--timeout", "nan"],
        ["status", "127.0.0.1:1", "--timeout", "1e12"],
        ["status", "127.0.0.1:\u0663"],
        ["demo", "--workers", "\u0663"],
        ["demo", "--base-port", "\u00b2"],
    ],
    ids=repr,
)
def test_the_cli_refuses_bad_numbers(args):
    done = subprocess.run(
        [sys.executable, "-m", "gcollective", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr  # argparse's usage error, not a traceback
    assert "Traceback" not in done.stderr
