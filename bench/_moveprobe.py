"""Clients for bench/moves.py: like deploy/lab/scripts/move_clients.py, but a client that loses its
connection reconnects (as a real SMB/NFS client does) and says so. Runs in the lab's client namespace.

usage: _moveprobe.py SERVER SHARE USER PASSWORD NAME [INTERVAL_MS]

* smb: smbprotocol with NAME open; every INTERVAL_MS write 512 random bytes at offset 0, flush, read back;
  on an error: drop the connection, log on again, reopen the file (a reconnect);
* nfs: ONC RPC NULL calls (NFSv3) on one TCP socket every INTERVAL_MS; on an error: a new socket.

Prints ``{"ready": true, ...}`` once both are up, then runs until a line arrives on standard input and
prints one JSON line per client: ops, errors, reconnects with the time each took (first error to the first
success on the new connection), and every gap over 20 ms between two successes (monotonic clock).
"""

import json
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "lab", "scripts"))

import smbclient  # noqa: E402

from move_clients import Stats, nfs_null, recv_exact  # noqa: E402


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


class Client(Stats):
    def __init__(self) -> None:
        super().__init__()
        self.reconnects: list[dict] = []   # {"at": first error, "ms": error -> first success again}
        self.broken_at: float | None = None

    def ok(self) -> None:
        super().ok()
        if self.broken_at is not None:
            self.reconnects[-1]["ms"] = round((time.monotonic() - self.broken_at) * 1000, 2)
            self.broken_at = None

    def error(self, exc: Exception) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        if self.broken_at is None:
            self.broken_at = time.monotonic()
            self.reconnects.append({"at": round(self.broken_at, 4), "ms": None})

    def report(self) -> dict:
        out = super().report()
        out["reconnects"] = self.reconnects
        return out


def main() -> int:
    server, share, user, password, name = sys.argv[1:6]
    interval = float(sys.argv[6]) / 1000 if len(sys.argv) > 6 else 0.01
    path = rf"\\{server}\{share}\{name}"
    stop = threading.Event()
    smb, nfs = Client(), Client()

    def smb_open():
        smbclient.register_session(server, username=user, password=password, connection_timeout=5)
        return smbclient.open_file(path, mode="wb+")

    def nfs_open() -> socket.socket:
        s = socket.create_connection((server, 2049), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    state = {"smb": smb_open(), "nfs": nfs_open()}

    def smb_loop() -> None:
        while not stop.is_set():
            data = os.urandom(512)
            try:
                if state["smb"] is None:
                    state["smb"] = smb_open()
                handle = state["smb"]
                handle.seek(0)
                handle.write(data)
                handle.flush()
                handle.seek(0)
                if handle.read(512) != data:
                    smb.mismatches += 1
                else:
                    smb.ok()
            except Exception as exc:
                smb.error(exc)
                state["smb"] = None
                try:
                    smbclient.reset_connection_cache()
                except Exception:
                    pass
                time.sleep(0.01)
            time.sleep(interval)

    def nfs_loop() -> None:
        xid = 1
        while not stop.is_set():
            xid += 1
            try:
                if state["nfs"] is None:
                    state["nfs"] = nfs_open()
                s = state["nfs"]
                s.sendall(nfs_null(xid))
                mark = struct.unpack(">I", recv_exact(s, 4))[0]
                reply = recv_exact(s, mark & 0x7FFFFFFF)
                rxid, mtype, stat = struct.unpack(">III", reply[:12])
                if rxid != xid or mtype != 1 or stat != 0:
                    nfs.mismatches += 1
                else:
                    nfs.ok()
            except Exception as exc:
                nfs.error(exc)
                try:
                    state["nfs"].close()
                except Exception:
                    pass
                state["nfs"] = None
                time.sleep(0.01)
            time.sleep(interval)

    threads = [threading.Thread(target=smb_loop, daemon=True), threading.Thread(target=nfs_loop, daemon=True)]
    for t in threads:
        t.start()
    say(ready=True, t=time.monotonic())
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(20)
    say(smb=smb.report(), nfs=nfs.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
