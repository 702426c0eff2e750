"""proxy.rstguard: a killed process's kernel sends its clients no FIN or RST while the guard is in place.

A server process in namespace ``n`` opens the guard for the service address (as a node would at start),
accepts two client connections (one with unread bytes: its close is a RST; one without: a FIN) and is
SIGKILLed. The clients in namespace ``c`` see nothing: no EOF, no reset, even when they send. The guard's
counter shows the segments it dropped. Removing the table the dead process left (``remove_leftover``) lets
the kernel's FIN and resets through, and the clients' connections end: the guard was what kept them. A
close the node marks as its own passes the guard.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy import rstguard
from tests.test_snooper import in_netns
from tests.test_tcprepair import SERVICE, namespaces, pair_lab, tcp_counters  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, nftables)")

ROOT = Path(__file__).resolve().parent.parent
PORT = 5201

SERVER = r"""
import socket, sys, time
from proxy.rstguard import RstGuard
guard = RstGuard(sys.argv[1]).open()          # never closed: the process is killed
ls = socket.socket(); ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(4)
print("ready", flush=True)
conns = [ls.accept()[0] for _ in range(2)]
print("accepted", flush=True)
time.sleep(60)
"""


def _ends_within(sock: socket.socket, seconds: float) -> str:
    """'eof', 'reset' or 'open' after waiting up to ``seconds`` for the connection to end."""
    sock.settimeout(seconds)
    try:
        return "eof" if sock.recv(100) == b"" else "data"
    except TimeoutError:
        return "open"
    except ConnectionResetError:
        return "reset"


def test_killed_process_sends_no_fin_or_rst(namespaces):
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    server = subprocess.Popen(["ip", "netns", "exec", n, sys.executable, "-c", SERVER, SERVICE, str(PORT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        with in_netns(c):
            unread = socket.create_connection((SERVICE, PORT), timeout=5)
            idle = socket.create_connection((SERVICE, PORT), timeout=5)
            before = tcp_counters()
        assert server.stdout.readline().strip() == "accepted"
        unread.sendall(b"x" * 1000)  # left unread: the kernel's close of this one is a RST
        time.sleep(0.1)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=5)

        assert _ends_within(unread, 0.3) == "open"
        assert _ends_within(idle, 0.3) == "open"
        idle.sendall(b"are you there?")  # data for a closed socket: the kernel answers with a RST
        assert _ends_within(idle, 0.3) == "open"
        with in_netns(c):
            assert tcp_counters()["EstabResets"] == before["EstabResets"]
        with in_netns(n):
            assert rstguard.drops(SERVICE) >= 2  # the RST of `unread`, the FIN of `idle` (and more)

            # the guard outlived the process; the next start removes it, and the kernel's segments pass
            assert rstguard.remove_leftover(SERVICE) is True
            assert rstguard.drops(SERVICE) is None
            assert rstguard.remove_leftover(SERVICE) is False
        unread.sendall(b"y")  # no socket there any more: the answer is a reset
        assert _ends_within(unread, 3) in ("reset", "eof")
        assert _ends_within(idle, 3) in ("reset", "eof")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        with in_netns(n):
            rstguard.remove_leftover(SERVICE)


def test_own_close_passes_and_close_removes_the_guard(namespaces):
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    with in_netns(n):
        guard = rstguard.RstGuard(SERVICE).open()
        ls = socket.socket()
        ls.bind((SERVICE, PORT))
        ls.listen(4)
    try:
        with in_netns(c):
            marked = socket.create_connection((SERVICE, PORT), timeout=5)
            unmarked = socket.create_connection((SERVICE, PORT), timeout=5)
        s1, _ = ls.accept()
        s2, _ = ls.accept()
        rstguard.mark_own_close(s1)
        s1.close()
        s2.close()
        assert _ends_within(marked, 2) == "eof"       # the node's own close reaches the client
        assert _ends_within(unmarked, 0.3) == "open"  # an unmarked one does not
        assert guard.dropped() >= 1
    finally:
        with in_netns(n):
            guard.close()
            assert rstguard.drops(SERVICE) is None
        ls.close()
    assert _ends_within(unmarked, 3) == "eof"  # the FIN is retransmitted and now passes
    with pytest.raises(ValueError, match="own_mark"):
        rstguard.RstGuard(SERVICE, own_mark=0)
