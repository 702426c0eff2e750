"""Idle-connection probe for bench/failover.py; runs inside the lab's client namespace.

usage: _idleprobe.py HOST [--smb 2] [--nfs 2]

Opens ``--smb`` TCP connections to HOST:445 and does one SMB2 NEGOTIATE on each, and ``--nfs``
connections to HOST:2049 with one ONC RPC NULL (NFSv3) on each (the requests and reply checks of
bench/_failprobe.py), then keeps them idle: one thread per socket blocks in ``recv()``. No
SO_KEEPALIVE, no timeouts: an idle socket learns that the other end is gone only from a packet
(RST/FIN) that reaches it. One JSON line on stdout per event (times: time.monotonic(), seconds)::

    {"ready": [{"i": 0, "p": "smb", "local": "10.77.0.100:40000"}, ...], "t": T}
    {"i": 0, "p": "smb", "t": T, "ev": "reset"}         (or "eof", "data", "error: ...")

Exits on SIGTERM/SIGINT (or with status 1 when a connection cannot be set up).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _failprobe import PORTS, nfs_null, nfs_reply_ok, smb_negotiate, smb_reply_ok  # noqa: E402

_out_lock = threading.Lock()


def emit(rec: dict) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(rec, separators=(",", ":")) + "\n")
        sys.stdout.flush()


def open_one(proto: str, host: str, xid: int) -> socket.socket:
    s = socket.create_connection((host, PORTS[proto]), timeout=3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(smb_negotiate() if proto == "smb" else nfs_null(xid))
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed before the reply")
        buf += chunk
        ok = smb_reply_ok(buf) if proto == "smb" else nfs_reply_ok(buf, xid)
        if ok is not None:
            if not ok:
                raise OSError("bad reply")
            break
    s.settimeout(None)  # from now on: block in recv() until the peer (or a RST) says something
    return s


def watch(i: int, proto: str, s: socket.socket) -> None:
    try:
        data = s.recv(65536)
        ev = "data" if data else "eof"
    except ConnectionResetError:
        ev = "reset"
    except OSError as exc:
        ev = f"error: {exc.strerror or exc}"
    emit({"i": i, "p": proto, "t": round(time.monotonic(), 6), "ev": ev})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("--smb", type=int, default=2)
    ap.add_argument("--nfs", type=int, default=2)
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    socks: list[tuple[str, socket.socket]] = []
    xid = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
    try:
        for proto, n in (("smb", args.smb), ("nfs", args.nfs)):
            for _ in range(n):
                xid = (xid + 1) & 0x7FFFFFFF
                socks.append((proto, open_one(proto, args.host, xid)))
    except OSError as exc:
        print(f"idle probe: setting up a connection failed: {exc}", file=sys.stderr)
        return 1
    ready = []
    for i, (proto, s) in enumerate(socks):
        ip, port = s.getsockname()[:2]
        ready.append({"i": i, "p": proto, "local": f"{ip}:{port}"})
        threading.Thread(target=watch, args=(i, proto, s), daemon=True).start()
    emit({"ready": ready, "t": round(time.monotonic(), 6)})
    while not stop.wait(0.2):
        pass
    for _, s in socks:  # RST, so the server side does not keep them
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
