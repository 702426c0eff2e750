"""The pair in the lab under faults and stops of its own machine: a kernel error during takeover, SIGTERM.

Uses the pairs of test_pair_lab.py and test_stateful_lab.py (same fixtures).
"""

from __future__ import annotations

import signal
import time

import pytest

from deploy.lab.clients import random_file, serving, sha256_of, smb_put

from .test_node_lab import slow_get, wait_for
from .test_pair_lab import pair  # noqa: F401  (the fixtures)
from .test_stateful_lab import stateful_pair  # noqa: F401

pytestmark = pytest.mark.lab

A_MAC = "02:77:00:00:00:0a"  # deploy.lab.core.MACS["a"]


def test_kernel_error_during_takeover_is_retried_and_the_survivor_keeps_serving(lab, pair, tmp_path):  # noqa: F811
    """Issue 8 item 8: another interface on b already carries a's MAC, so the takeover's macvlan cannot
    come up (EADDRINUSE). b must not exit: it keeps serving its own address, says so in status and log,
    retries with backoff, and takes over once the conflict is gone."""
    a, b = pair
    host, own = lab.addresses.service_a, lab.addresses.service_b
    conflict = ["ip", "link", "add", "ppconflict", "address", A_MAC, "link", "eth0", "type", "macvlan",
                "mode", "bridge"]
    lab.run(lab.ns_b, conflict, check=True)
    try:
        lab.run(lab.ns_b, ["sysctl", "-qw", "net.ipv6.conf.ppconflict.disable_ipv6=1"], check=True)
        lab.run(lab.ns_b, ["ip", "link", "set", "ppconflict", "arp", "off", "up"], check=True)
        a.kill_hard(link_down=True)
        st = b.wait_for(lambda s: (s["pair"].get("takeover_error") or {}).get("attempts", 0) >= 2, 10,
                        "b retrying the takeover")
        assert b.proc.poll() is None, "b must not exit on a kernel error"
        assert st["pair"]["addresses"][host]["role"] == "retrying"
        assert "Address already in use" in st["pair"]["takeover_error"]["error"]
        assert st["pair"]["addresses"][own]["held_by"] == "b"
        (tmp_path / "x").write_bytes(b"still serving\n")
        smb_put(lab, own, tmp_path / "x", "kernel-error-own.txt", timeout=15).check()
        assert "cannot take over" in (lab.root / "pair-b.log").read_text()
    finally:
        lab.run(lab.ns_b, ["ip", "link", "del", "ppconflict"])
    removed = time.monotonic()
    st = b.wait_for(serving(host, "b"), 5, "b taking over once the conflict is gone")
    assert time.monotonic() - removed < 3, "the backoff is capped"
    assert "takeover_error" not in st["pair"]
    smb_put(lab, host, tmp_path / "x", "kernel-error-taken.txt", timeout=15).check()
    a.link_up()
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")
    b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 5, "b standby")


def test_sigterm_hands_the_address_over_at_once_while_old_connections_drain(lab, pair, tmp_path):  # noqa: F811
    """Issue 8 item 10: a SIGTERM'd node in a pair tells its peer first; the peer serves new clients at
    once, and a transfer that was running through the stopping node finishes there (grace 5 s)."""
    a, b = pair
    host = lab.addresses.service_a
    src = random_file(tmp_path / "src.bin", 8 << 20)
    (lab.smb_share_path / "drain.bin").write_bytes(src.read_bytes())
    out = tmp_path / "out.bin"
    client = slow_get(lab, host, "drain.bin", out, 3 << 20)   # about 3 s
    try:
        assert wait_for(lambda: out.exists() and out.stat().st_size > (512 << 10), timeout=30)
        stopped_at = time.monotonic()
        a.signal(signal.SIGTERM)
        b.wait_for(serving(host, "b"), 3, "b serving a's address for new clients")
        handed_over = time.monotonic() - stopped_at
        assert a.proc.poll() is None, "a must still be draining its old connection"
        (tmp_path / "new.txt").write_bytes(b"a new client during the drain\n")
        smb_put(lab, host, tmp_path / "new.txt", "drain-new-client.txt", timeout=10).check()
        assert a.proc.poll() is None
        stdout, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-2000:]
        assert sha256_of(out) == sha256_of(src)
        assert a.proc.wait(15) == 0
    finally:
        if client.poll() is None:
            client.kill()
    assert handed_over < 1.0, handed_over
    log_b = (lab.root / "pair-b.log").read_text()
    assert "draining 1 connection(s) through here" in log_b or "draining 2 connection(s) through here" in log_b
    # a removed its tunnel when it exited; b removes its own once a's grace time (5 s) is over
    assert lab.run(lab.ns_a, ["ip", "link", "show", "pp-drain"], capture_output=True).returncode != 0
    assert wait_for(lambda: lab.run(lab.ns_b, ["ip", "link", "show", "pp-drain"], capture_output=True).returncode,
                    timeout=8), "b left its drain tunnel behind"
    assert "clsact" not in lab.run(lab.ns_b, ["tc", "qdisc", "show", "dev", "eth0"], capture_output=True,
                                   text=True).stdout
    assert lab.run(lab.ns_a, ["sysctl", "-n", "net.ipv4.conf.eth0.arp_ignore"], capture_output=True,
                   text=True).stdout.strip() == "0"
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")


def test_sigterm_in_a_stateful_pair_drains_too_and_resets_nothing(lab, stateful_pair):  # noqa: F811
    """The same planned stop in stateful mode: the standby passes the old connection on instead of
    resetting it (the leaving node drains it), and serves new clients at once."""
    a, b = stateful_pair
    host = lab.addresses.service_a
    (lab.smb_share_path / "drain-stateful.bin").write_bytes(b"s" * (6 << 20))
    out = lab.root / "drain-stateful.out"
    client = slow_get(lab, host, "drain-stateful.bin", out, 3 << 20)
    try:
        assert wait_for(lambda: out.exists() and out.stat().st_size > (512 << 10), timeout=30)
        a.signal(signal.SIGTERM)
        st = b.wait_for(serving(host, "b"), 3, "b serving a's address")
        assert a.proc.poll() is None
        _, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-2000:]
        assert out.read_bytes() == b"s" * (6 << 20)
        assert a.proc.wait(15) == 0
        assert st["pair"]["takeovers"][-1]["clients_reset"] == 0
    finally:
        if client.poll() is None:
            client.kill()
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")
