"""Two clients that must not notice a live move (issue 11 lab test): each on ONE TCP connection.

usage: move_clients.py SERVER SHARE USER PASSWORD NAME [INTERVAL_MS]

* smb: smbprotocol (smbclient) with NAME open; every INTERVAL_MS it writes 512 random bytes at offset 0,
  flushes, reads them back and compares;
* nfs: raw ONC RPC NULL calls to NFSv3 (program 100003 version 3) over one TCP socket, every INTERVAL_MS,
  each reply's xid checked.

Prints ``{"ready": true, "smb_port": P, "nfs_port": P}`` once both connections are up, then runs until
a line arrives on standard input and prints one JSON line: ops, errors (the first few), mismatches, the
longest gap between two successful operations of each client (ms) and when it ended (monotonic clock,
to line up with the moves), and the local ports at the end (a reconnect would show a new one).
"""

import json
import os
import socket
import struct
import sys
import threading
import time

import smbclient
from smbclient._pool import ClientConfig  # noqa: F401 (the pool keeps one connection per server)


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


class Stats:
    def __init__(self) -> None:
        self.ops = 0
        self.errors: list[str] = []
        self.mismatches = 0
        self.last_ok = time.monotonic()
        self.worst_gap = 0.0
        self.worst_at = 0.0
        self.gaps: list[tuple[float, float]] = []   # (end, ms) of every gap over 20 ms

    def ok(self) -> None:
        now = time.monotonic()
        gap = now - self.last_ok
        if gap > self.worst_gap:
            self.worst_gap, self.worst_at = gap, now
        if gap > 0.02:
            self.gaps.append((round(now, 4), round(gap * 1000, 2)))
        self.last_ok = now
        self.ops += 1

    def report(self) -> dict:
        return {"ops": self.ops, "errors": self.errors[:5], "error_count": len(self.errors),
                "mismatches": self.mismatches, "worst_gap_ms": round(self.worst_gap * 1000, 2),
                "worst_gap_at": round(self.worst_at, 4), "gaps": self.gaps[-1000:]}


def nfs_null(xid: int) -> bytes:
    body = struct.pack(">IIIIIIIIII", xid, 0, 2, 100003, 3, 0, 0, 0, 0, 0)
    return struct.pack(">I", 0x80000000 | len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        out += chunk
    return out


def main() -> int:
    server, share, user, password, name = sys.argv[1:6]
    interval = float(sys.argv[6]) / 1000 if len(sys.argv) > 6 else 0.01
    stop = threading.Event()
    smb, nfs = Stats(), Stats()
    smbclient.register_session(server, username=user, password=password)
    handle = smbclient.open_file(rf"\\{server}\{share}\{name}", mode="wb+")
    nsock = socket.create_connection((server, 2049), timeout=30)
    nsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = next(iter(smbclient._pool._SMB_CONNECTIONS.values()))  # the one connection to the server
    smb_sock = conn.transport._sock
    ports = lambda: {"smb_port": smb_sock.getsockname()[1] if smb_sock.fileno() >= 0 else None,  # noqa: E731
                     "nfs_port": nsock.getsockname()[1] if nsock.fileno() >= 0 else None}

    def smb_loop() -> None:
        while not stop.is_set():
            data = os.urandom(512)
            try:
                handle.seek(0)
                handle.write(data)
                handle.flush()
                handle.seek(0)
                back = handle.read(512)
                if back != data:
                    smb.mismatches += 1
                else:
                    smb.ok()
            except Exception as exc:
                smb.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                time.sleep(0.5)
            time.sleep(interval)

    def nfs_loop() -> None:
        xid = 1
        while not stop.is_set():
            xid += 1
            try:
                nsock.sendall(nfs_null(xid))
                mark = struct.unpack(">I", recv_exact(nsock, 4))[0]
                reply = recv_exact(nsock, mark & 0x7FFFFFFF)
                rxid, mtype, stat = struct.unpack(">III", reply[:12])
                if rxid != xid or mtype != 1 or stat != 0:
                    nfs.mismatches += 1
                else:
                    nfs.ok()
            except Exception as exc:
                nfs.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                time.sleep(0.5)
            time.sleep(interval)

    threads = [threading.Thread(target=smb_loop, daemon=True), threading.Thread(target=nfs_loop, daemon=True)]
    for t in threads:
        t.start()
    say(ready=True, **ports())
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(35)
    say(smb=smb.report(), nfs=nfs.report(), connections=len(smbclient._pool._SMB_CONNECTIONS), **ports())
    try:
        handle.close()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
