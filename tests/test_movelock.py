"""proxy.movelock: while a move's lock is engaged, no TCP segment reaches a socket of the address.

Server namespace ``n`` holds SERVICE with a listener and one established connection from namespace ``c``.
Prepared only, the lock drops only new clients' SYNs (held and handed on). Engaged, the client's bytes do not arrive (they are dropped on
arrival, counted, and the server's socket sees nothing), a new connection is not answered; released, the
client's retransmission arrives (nothing was lost for good, nothing was reset). What the lock drops is
also copied to the lock (NFLOG), and delivered from the copy it arrives at once, long before the client's
own retransmission (>= 200 ms). A table a killed node left is removed by ``remove_leftover``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from proxy import movelock, tcprepair
from tests.test_snooper import in_netns
from tests.test_tcprepair import SERVICE, namespaces, pair_lab  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, nftables)")

PORT = 5301


def _readable_within(sock: socket.socket, seconds: float) -> bytes | None:
    sock.settimeout(seconds)
    try:
        return sock.recv(100)
    except TimeoutError:
        return None


def test_an_engaged_lock_keeps_every_segment_away_and_loses_none(namespaces):
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    with in_netns(n):
        listener = socket.create_server((SERVICE, PORT))
    with in_netns(c):
        client = socket.create_connection((SERVICE, PORT), timeout=5)
    served, _ = listener.accept()
    lock = None
    try:
        with in_netns(n):
            lock = movelock.MoveLock(SERVICE).prepare()
        client.sendall(b"before")
        assert _readable_within(served, 2) == b"before"     # prepared only: nothing dropped
        with in_netns(n):
            lock.engage()
        client.sendall(b"during")
        assert _readable_within(served, 0.5) is None        # dropped on arrival ...
        assert lock.dropped() >= 1
        with in_netns(c):
            probe = socket.socket()
            probe.settimeout(0.5)
            with pytest.raises((TimeoutError, socket.timeout)):
                probe.connect((SERVICE, PORT))              # ... a new client too (no reset either)
            probe.close()
        with in_netns(n):
            lock.close()
        assert _readable_within(served, 5) == b"during"     # ... and resent by the client once unlocked
        served.sendall(b"still one connection")
        assert _readable_within(client, 2) == b"still one connection"
    finally:
        if lock is not None:
            with in_netns(n):
                lock.close()
        for s in (client, served, listener):
            s.close()


def test_a_dropped_segment_delivered_from_the_locks_copy_needs_no_retransmission(namespaces):
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    with in_netns(n):
        listener = socket.create_server((SERVICE, PORT))
    with in_netns(c):
        client = socket.create_connection((SERVICE, PORT), timeout=5)
    served, _ = listener.accept()
    lock = None
    try:
        client.sendall(b"warm")                              # an RTT estimate: the client's timers are minimal
        assert _readable_within(served, 2) == b"warm"
        with in_netns(n):
            lock = movelock.MoveLock(SERVICE).open()
        sent_at = time.monotonic()
        client.sendall(b"request")
        time.sleep(0.02)
        copies = lock.take_dropped()
        assert lock.dropped() == 1 and len(copies) == 1 and copies[0].endswith(b"request")
        with in_netns(n):
            assert lock.release() == []
            lock = None
            assert movelock.deliver(copies) == 1
        assert _readable_within(served, 1) == b"request"
        while tcprepair.unacknowledged(client) and time.monotonic() - sent_at < 1:
            time.sleep(0.001)
        # the client's own retransmission would come 200 ms (tail loss probe: 2 RTT + 200 ms) after its send
        assert tcprepair.unacknowledged(client) == 0 and time.monotonic() - sent_at < 0.15
        served.sendall(b"answer")
        assert _readable_within(client, 2) == b"answer"
        assert client.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_INFO, 104)[2] == 0  # tcpi_retransmits
    finally:
        if lock is not None:
            with in_netns(n):
                lock.close()
        for s in (client, served, listener):
            s.close()


def test_a_prepared_lock_holds_new_clients_and_hands_their_syn_on(namespaces):
    """A move closes its listeners right after preparing the lock and freezes much later (hundreds of
    ms under load): a new client's SYN meanwhile must not be answered with a reset (no listener) but
    held, copied, and delivered to whoever listens after the move, where the handshake completes at
    once instead of after the client's 1 s SYN retransmission (bench/soak.py: libnfs failed at once)."""
    import select

    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    lock = listener = None
    with in_netns(c):
        probe = socket.socket()
    try:
        with in_netns(n):
            lock = movelock.MoveLock(SERVICE).prepare()     # nobody listens: as after stop_accepting
        probe.setblocking(False)
        sent_at = time.monotonic()
        assert probe.connect_ex((SERVICE, PORT)) in (115, 11)   # EINPROGRESS
        time.sleep(0.1)
        copies = lock.take_dropped()
        assert lock.dropped() == 1 and len(copies) == 1
        assert copies[0][(copies[0][0] & 0x0F) * 4 + 13] & 0x12 == 0x02     # the client's SYN
        assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0    # no reset: still connecting
        with in_netns(n):
            assert lock.release() == []
            lock = None
            listener = socket.create_server((SERVICE, PORT))
            assert movelock.deliver(copies) == 1
        _, writable, _ = select.select([], [probe], [], 0.9)
        assert writable and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert time.monotonic() - sent_at < 0.9          # before the client's own retransmission (1 s)
        served, _ = listener.accept()
        served.close()
    finally:
        if lock is not None:
            with in_netns(n):
                lock.close()
        for s in (probe, listener):
            if s is not None:
                s.close()


def test_a_lock_left_behind_is_removed(namespaces):
    pair_lab(namespaces)
    with in_netns(namespaces["n"]):
        lock = movelock.MoveLock(SERVICE).open()
        lock._nft.close()
        lock._nft = None                                    # as if the process had been killed
        assert movelock.remove_leftover(SERVICE) is True
        assert movelock.remove_leftover(SERVICE) is False


def _arp_answers(namespaces) -> set[str]:
    """MACs answering an ARP request for SERVICE, asked from the client namespace."""
    import trio

    from proxy.arp import who_has

    out = subprocess.run(["ip", "-n", namespaces["c"], "-j", "link", "show", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    mac = json.loads(out)[0]["address"]
    with in_netns(namespaces["c"]):
        return trio.run(lambda: who_has("eth0", mac, SERVICE, timeout=0.4, tries=2))


def test_a_silenced_lock_answers_no_arp_for_the_address_until_released(namespaces):
    """From the move's go on the giver keeps the address (locked) while the peer announces it: its
    kernel must not answer ARP for it meanwhile (two owners: an ARP conflict). Prepared and engaged, the
    lock leaves ARP alone; silenced, nobody answers; released, the address answers again."""
    pair_lab(namespaces)
    assert _arp_answers(namespaces), "the address answers ARP before any lock"
    with in_netns(namespaces["n"]):
        lock = movelock.MoveLock(SERVICE).open()
    try:
        assert _arp_answers(namespaces), "an engaged lock (no silence yet) leaves ARP alone"
        with in_netns(namespaces["n"]):
            assert lock.silence_arp() is True
        assert _arp_answers(namespaces) == set()
        with in_netns(namespaces["n"]):
            assert lock.arp_dropped() >= 1
    finally:
        with in_netns(namespaces["n"]):
            lock.release()
    assert _arp_answers(namespaces), "released: the address answers again"
    with in_netns(namespaces["n"]):
        assert movelock.remove_leftover(SERVICE) is False  # release removed both tables


def test_a_silence_left_behind_is_removed(namespaces):
    pair_lab(namespaces)
    with in_netns(namespaces["n"]):
        lock = movelock.MoveLock(SERVICE).open()
        lock.silence_arp()
        for nft in (lock._nft, lock._arp):
            nft.close()
        lock._nft = lock._arp = None                        # as if the process had been killed
    assert _arp_answers(namespaces) == set()
    with in_netns(namespaces["n"]):
        assert movelock.remove_leftover(SERVICE) is True
        assert movelock.remove_leftover(SERVICE) is False
    assert _arp_answers(namespaces)
