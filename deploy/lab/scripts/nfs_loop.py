"""An NFSv3 client on one TCP connection that writes a block and reads it back, again and again (issue 10).

usage: nfs_loop.py SERVER EXPORT_PATH NAME SECONDS [BLOCK] [EVERY] [MOUNT_HOST]
Hand-written ONC RPC (record marking, AUTH_UNIX as root): MOUNT (port 20048) for the export's root
handle, then on one connection to port 2049: CREATE NAME, and every EVERY seconds (default 0.01) WRITE
BLOCK bytes (default 64 KiB) of fresh random data at offset 0 with FILE_SYNC and READ them back
(MOUNT_HOST: ask that host's mountd instead, for proxies that pass only port 2049). The
client never reconnects: a broken connection is an error. Prints ``{"ready": true, "local_port": N}``,
then after SECONDS (or at SIGUSR1) one JSON line: rounds, errors, read-backs that differed, the longest round,
and when the error came (``failed_at``, CLOCK_MONOTONIC).
"""

import json
import os
import signal
import socket
import struct
import sys
import time

NFS_PROGRAM, NFS_V3 = 100003, 3
MOUNT_PROGRAM, MOUNT_V3 = 100005, 3
CREATE, WRITE, READ = 8, 7, 6
FILE_SYNC = 2


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def opaque(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data + b"\0" * (-len(data) % 4)


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u32(self) -> int:
        (v,) = struct.unpack_from("!I", self.data, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        (v,) = struct.unpack_from("!Q", self.data, self.pos)
        self.pos += 8
        return v

    def opaque(self) -> bytes:
        n = self.u32()
        v = self.data[self.pos:self.pos + n]
        self.pos += n + (-n % 4)
        return v

    def skip(self, n: int) -> None:
        self.pos += n

    def post_op_attr(self) -> None:
        if self.u32():
            self.skip(84)   # fattr3

    def wcc_data(self) -> None:
        if self.u32():
            self.skip(24)   # wcc_attr
        self.post_op_attr()


class RpcConnection:
    """One TCP connection, calls one at a time."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.xid = int.from_bytes(os.urandom(4), "big")

    def call(self, prog: int, vers: int, proc: int, args: bytes) -> Reader:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        cred = struct.pack("!I", 0) + opaque(b"lab") + struct.pack("!III", 0, 0, 0)  # stamp, name, uid, gid, gids
        msg = struct.pack("!IIIIII", self.xid, 0, 2, prog, vers, proc) + struct.pack("!I", 1) + opaque(cred) + \
            struct.pack("!II", 0, 0) + args
        self.sock.sendall(struct.pack("!I", 0x80000000 | len(msg)) + msg)
        while True:
            reply = self._record()
            r = Reader(reply)
            if r.u32() == self.xid:
                break
        if r.u32() != 1 or r.u32() != 0:
            raise RuntimeError("RPC call denied")
        r.u32()
        r.opaque()  # verifier
        accept = r.u32()
        if accept != 0:
            raise RuntimeError(f"RPC accept_stat {accept}")
        return r

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by the server")
            buf += chunk
        return bytes(buf)

    def _record(self) -> bytes:
        out = bytearray()
        while True:
            (mark,) = struct.unpack("!I", self._exact(4))
            out += self._exact(mark & 0x7FFFFFFF)
            if mark & 0x80000000:
                return bytes(out)


def main() -> int:
    server, export, name, seconds = sys.argv[1:5]
    block = int(sys.argv[5]) if len(sys.argv) > 5 else 64 * 1024
    every = float(sys.argv[6]) if len(sys.argv) > 6 else 0.01
    mount = RpcConnection(sys.argv[7] if len(sys.argv) > 7 else server, 20048)
    r = mount.call(MOUNT_PROGRAM, MOUNT_V3, 1, opaque(export.encode()))
    if r.u32() != 0:
        raise RuntimeError("MOUNT refused")
    root = r.opaque()
    mount.sock.close()
    nfs = RpcConnection(server, 2049)
    sattr = struct.pack("!IIIIIII", 1, 0o644, 0, 0, 0, 0, 0)  # mode 644; uid, gid, size, times unchanged
    r = nfs.call(NFS_PROGRAM, NFS_V3, CREATE, opaque(root) + opaque(name.encode()) + struct.pack("!I", 0) + sattr)
    status = r.u32()
    if status != 0:
        raise RuntimeError(f"CREATE failed: NFS status {status}")
    if not r.u32():
        raise RuntimeError("CREATE returned no file handle")
    fh = r.opaque()
    say(ready=True, local_port=nfs.sock.getsockname()[1])
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    rounds = mismatches = 0
    longest, longest_at, error, failed_at = 0.0, None, None, None
    start = time.monotonic()
    while time.monotonic() - start < float(seconds) and not stop:
        t0 = time.monotonic()
        data = os.urandom(block)
        try:
            r = nfs.call(NFS_PROGRAM, NFS_V3, WRITE, opaque(fh) + struct.pack("!QII", 0, block, FILE_SYNC) + opaque(data))
            status = r.u32()
            if status != 0:
                raise RuntimeError(f"WRITE failed: NFS status {status}")
            r = nfs.call(NFS_PROGRAM, NFS_V3, READ, opaque(fh) + struct.pack("!QI", 0, block))
            status = r.u32()
            if status != 0:
                raise RuntimeError(f"READ failed: NFS status {status}")
            r.post_op_attr()
            r.u32()  # count
            r.u32()  # eof
            back = r.opaque()
        except Exception as exc:  # the test wants to know what the client saw, whatever it was
            error = f"{type(exc).__name__}: {exc}"[:300]
            failed_at = time.monotonic()
            break
        rounds += 1
        if back != data:
            mismatches += 1
        took = time.monotonic() - t0
        if took > longest:
            longest, longest_at = took, round(t0 - start, 3)
        time.sleep(max(0.0, every - took))
    say(done=True, rounds=rounds, mismatches=mismatches, error=error, longest_round_s=round(longest, 3),
        longest_at_s=longest_at, local_port=nfs.sock.getsockname()[1], failed_at=failed_at)
    nfs.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
