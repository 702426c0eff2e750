"""A busy connection for the continuation scale benchmark (bench/continuation.py --scale) and its lab test
(tests/test_continuation_lab.py); runs in the lab's client namespace.

usage: busy_echo.py HOST PORT SECONDS [INTERVAL]

One TCP connection to an echo server (deploy/lab/scripts/tcp_clients.py echo-server, through the node):
every INTERVAL seconds (default 0.002) 64 bytes out, the same 64 bytes back, checked. Never reconnects:
an error ends the run. Prints ``{"ready": true}`` once connected, then one JSON line at the end (after SECONDS, or at SIGTERM)::

    {"done": true, "rounds": N, "error": null|"...", "wrong": 0,
     "gaps": [[start, end], ...]}     (wall clock, time.time(): every round longer than 20 ms)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


class Stop(Exception):
    """SIGTERM: end the run and print the result."""


def _stop(signum, frame):
    raise Stop()


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.002
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    print(json.dumps({"ready": True}), flush=True)
    rounds, wrong, gaps, error = 0, 0, [], None
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            started = time.time()
            req = rounds.to_bytes(8, "big") + os.urandom(56)
            sock.sendall(req)
            got = b""
            while len(got) < len(req):
                chunk = sock.recv(len(req) - len(got))
                if not chunk:
                    raise OSError("EOF from the server")
                got += chunk
            done = time.time()
            wrong += got != req
            rounds += 1
            if done - started > 0.02:
                gaps.append([round(started, 4), round(done, 4)])
            time.sleep(interval)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Stop:
        pass
    print(json.dumps({"done": True, "rounds": rounds, "error": error, "wrong": wrong, "gaps": gaps}), flush=True)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
