"""The pair in the lab under faults of its own machine: a kernel error during takeover.

Uses the stateless pair of test_pair_lab.py (same fixture).
"""

from __future__ import annotations

import time

import pytest

from deploy.lab.clients import serving, smb_put

from .test_pair_lab import pair  # noqa: F401  (the fixture)

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
