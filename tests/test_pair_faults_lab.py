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


def test_sigterm_moves_the_address_with_its_connections_and_exits(lab, pair, tmp_path):  # noqa: F811
    """Issue 11 item 3 (was issue 8 item 10's drain): a SIGTERM'd node in a pair moves its address and its
    live connections to the peer (TCP_REPAIR) and exits at once; a transfer running through it goes on
    through the peer, byte-identical, and new clients are served by the peer. (Without a sync link it
    drains as a lone node does: proxy.handback.leave.)"""
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
        st = b.wait_for(serving(host, "b"), 3, "b serving a's address")
        handed_over = time.monotonic() - stopped_at
        assert a.proc.wait(5) == 0
        exited = time.monotonic() - stopped_at
        # the move's record is written when the move-in finishes, which may be just after the role flips
        move = b.wait_for(lambda s: s["pair"].get("last_move"), 3, "b's record of the move")["pair"]["last_move"]
        assert move["direction"] == "in" and move["moved"] >= 1 and move["failed"] == 0, move
        (tmp_path / "new.txt").write_bytes(b"a new client after the move\n")
        smb_put(lab, host, tmp_path / "new.txt", "drain-new-client.txt", timeout=10).check()
        stdout, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-2000:]
        assert sha256_of(out) == sha256_of(src)
    finally:
        if client.poll() is None:
            client.kill()
    print(f"SIGTERM: b serving after {handed_over * 1000:.0f} ms, a exited after {exited * 1000:.0f} ms; move {move}")
    assert handed_over < 1.0, handed_over
    assert exited < 2.0, exited
    assert "moved 10.77.0.1 here" in (lab.root / "pair-b.log").read_text()
    assert lab.run(lab.ns_a, ["ip", "link", "show", "pp-drain"], capture_output=True).returncode != 0
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")


def test_sigterm_in_a_stateful_pair_moves_too_and_resets_nothing(lab, stateful_pair):  # noqa: F811
    """The same planned stop in stateful mode: the connection moves live to the standby, nothing is reset."""
    a, b = stateful_pair
    host = lab.addresses.service_a
    (lab.smb_share_path / "drain-stateful.bin").write_bytes(b"s" * (6 << 20))
    out = lab.root / "drain-stateful.out"
    client = slow_get(lab, host, "drain-stateful.bin", out, 3 << 20)
    try:
        assert wait_for(lambda: out.exists() and out.stat().st_size > (512 << 10), timeout=30)
        a.signal(signal.SIGTERM)
        b.wait_for(serving(host, "b"), 3, "b serving a's address")
        assert a.proc.wait(5) == 0
        # the move's and the takeover's records are written as each finishes, possibly just after the
        # role flips (reading them at the flip failed about 1 run in 4)
        st = b.wait_for(lambda s: s["pair"]["takeovers"] and s["pair"].get("last_move"), 3,
                        "b's records of the move and the takeover")
        _, stderr = client.communicate(timeout=30)
        assert client.returncode == 0, stderr[-2000:]
        assert out.read_bytes() == b"s" * (6 << 20)
        assert st["pair"]["takeovers"][-1]["clients_reset"] == 0
        assert st["pair"]["last_move"]["moved"] >= 1 and st["pair"]["last_move"]["failed"] == 0
    finally:
        if client.poll() is None:
            client.kill()
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")
