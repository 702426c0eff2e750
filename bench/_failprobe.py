"""Failover probe for bench/failover.py; runs inside the lab's client namespace.

usage: _failprobe.py HOST [--interval-ms 5] [--steady-ms 20] [--slow-ms 15] [--connect-timeout-ms 50]
                          [--reply-timeout-ms 500] [--max-inflight 40] [--protocols smb,nfs]

Starts a *new* operation per protocol every ``steady`` milliseconds while the service answers, and
every ``interval`` milliseconds as soon as something looks wrong (the last attempt failed, or one in
flight is older than ``slow`` ms). Each operation uses a new TCP connection, several are in flight at
once (non-blocking sockets, one selector), so the moment service comes back is seen with ``interval``
resolution even while earlier attempts still hang on a lost SYN. (A steady rate of one SMB NEGOTIATE
every 5 ms, i.e. 200 smbd forks a second, alone kept the 2-core test machine ~85 % busy.)

* ``smb``: connect to HOST:445, SMB2 NEGOTIATE (dialects 2.0.2, 2.1, 3.0, 3.0.2, 3.1.1 with a
  pre-auth integrity context), success = a NEGOTIATE response with STATUS_SUCCESS;
* ``nfs``: connect to HOST:2049, ONC RPC NULL call (program 100003, version 3, procedure 0,
  AUTH_NONE, record marking), success = an accepted reply (MSG_ACCEPTED, SUCCESS) with our xid.

Connecting is given ``connect-timeout`` (a SYN lost to a dead node is not retransmitted by the
kernel before 1 s; a new attempt with a new SYN is cheaper), the reply ``reply-timeout``.
Every attempt's outcome is one JSON line on stdout::

    {"p": "smb", "s": START, "e": END, "ok": 1}            (times: time.monotonic(), seconds)
    {"p": "nfs", "s": START, "e": END, "ok": 0, "err": "connect timeout"}

``time.monotonic()`` is CLOCK_MONOTONIC, one clock for the whole machine (network namespaces do
not have their own), so the benchmark compares these times with its own. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import uuid

PORTS = {"smb": 445, "nfs": 2049}


def smb_negotiate() -> bytes:
    dialects = (0x0202, 0x0210, 0x0300, 0x0302, 0x0311)
    hdr = struct.pack("<4sHHIHHIIQIIQ16s", b"\xfeSMB", 64, 0, 0, 0x0000, 1, 0, 0, 0, 0, 0, 0, b"\0" * 16)
    ctx_offset = 64 + 36 + 2 * len(dialects)
    pad = (-ctx_offset) % 8
    ctx_offset += pad
    # NegotiateContextOffset, NegotiateContextCount, Reserved2 (3.1.1 layout of ClientStartTime)
    body = struct.pack("<HHHHI16sIHH", 36, len(dialects), 1, 0, 0, uuid.uuid4().bytes, ctx_offset, 1, 0)
    body += struct.pack(f"<{len(dialects)}H", *dialects) + b"\0" * pad
    # SMB2_PREAUTH_INTEGRITY_CAPABILITIES: 1 algorithm (SHA-512), 32-byte salt
    data = struct.pack("<HHH", 1, 32, 0x0001) + os.urandom(32)
    body += struct.pack("<HHI", 0x0001, len(data), 0) + data
    pdu = hdr + body
    return struct.pack(">I", len(pdu)) + pdu


def smb_reply_ok(buf: bytes) -> bool | None:
    """None: need more bytes; True/False: a complete reply, good or not."""
    if len(buf) < 4:
        return None
    length = struct.unpack(">I", buf[:4])[0] & 0xFFFFFF
    if len(buf) < 4 + length:
        return None
    pdu = buf[4:4 + length]
    if len(pdu) < 64 or pdu[:4] != b"\xfeSMB":
        return False
    status, command = struct.unpack_from("<IH", pdu, 8)
    return status == 0 and command == 0


def nfs_null(xid: int) -> bytes:
    body = struct.pack(">IIIIIIIIII", xid, 0, 2, 100003, 3, 0, 0, 0, 0, 0)
    return struct.pack(">I", 0x80000000 | len(body)) + body


def nfs_reply_ok(buf: bytes, xid: int) -> bool | None:
    if len(buf) < 4:
        return None
    mark = struct.unpack(">I", buf[:4])[0]
    n = mark & 0x7FFFFFFF
    if len(buf) < 4 + n:
        return None
    rep = buf[4:4 + n]
    if len(rep) < 24:
        return False
    rxid, mtype, reply_stat = struct.unpack(">III", rep[:12])
    if rxid != xid or mtype != 1 or reply_stat != 0:
        return False
    vlen = struct.unpack(">I", rep[16:20])[0]
    if len(rep) < 24 + vlen:
        return False
    return struct.unpack(">I", rep[20 + vlen:24 + vlen])[0] == 0


class Attempt:
    __slots__ = ("proto", "sock", "start", "phase", "deadline", "out", "buf", "xid")

    def __init__(self, proto: str, host: str, connect_timeout: float, xid: int):
        self.proto = proto
        self.start = time.monotonic()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a closed attempt must not linger in the client (RST on close, no TIME_WAIT pile-up)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.phase = "connect"
        self.deadline = self.start + connect_timeout
        self.xid = xid
        self.out = smb_negotiate() if proto == "smb" else nfs_null(xid)
        self.buf = b""
        err = self.sock.connect_ex((host, PORTS[proto]))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--steady-ms", type=float, default=20.0)
    ap.add_argument("--slow-ms", type=float, default=15.0)
    ap.add_argument("--connect-timeout-ms", type=float, default=50.0)
    ap.add_argument("--reply-timeout-ms", type=float, default=500.0)
    ap.add_argument("--max-inflight", type=int, default=40)
    ap.add_argument("--protocols", default="smb,nfs")
    args = ap.parse_args()
    protos = [p for p in args.protocols.split(",") if p]
    interval, steady, slow = args.interval_ms / 1000, args.steady_ms / 1000, args.slow_ms / 1000
    ct, rt = args.connect_timeout_ms / 1000, args.reply_timeout_ms / 1000

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sel = selectors.DefaultSelector()
    inflight: dict[str, set[Attempt]] = {p: set() for p in protos}
    last_start = {p: 0.0 for p in protos}
    last_ok = {p: True for p in protos}
    xid = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
    out = sys.stdout

    def finish(a: Attempt, ok: bool, err: str = "") -> None:
        try:
            sel.unregister(a.sock)
        except (KeyError, ValueError):
            pass
        a.sock.close()
        inflight[a.proto].discard(a)
        last_ok[a.proto] = ok
        rec = {"p": a.proto, "s": round(a.start, 6), "e": round(time.monotonic(), 6), "ok": int(ok)}
        if err:
            rec["err"] = err
        out.write(json.dumps(rec, separators=(",", ":")) + "\n")

    while not stop:
        now = time.monotonic()
        next_start = {}
        for p in protos:
            troubled = not last_ok[p] or any(now - a.start > slow for a in inflight[p])
            next_start[p] = last_start[p] + (interval if troubled else steady)
            if now >= next_start[p] and len(inflight[p]) < args.max_inflight:
                last_start[p] = now
                xid = (xid + 1) & 0x7FFFFFFF
                try:
                    a = Attempt(p, args.host, ct, xid)
                except OSError as exc:
                    rec = {"p": p, "s": round(now, 6), "e": round(time.monotonic(), 6), "ok": 0,
                           "err": f"connect: {exc.strerror or exc}"}
                    out.write(json.dumps(rec, separators=(",", ":")) + "\n")
                else:
                    inflight[p].add(a)
                    sel.register(a.sock, selectors.EVENT_WRITE, a)
                next_start[p] = now + interval
        # wake for the next start (at the fast rate: "troubled" may begin meanwhile) or a deadline
        # (never in the past: at max_inflight this would spin)
        wake = min([max(min(next_start[p], last_start[p] + interval), now + 0.001) for p in protos] +
                   [a.deadline for s in inflight.values() for a in s])
        timeout = max(0.0, wake - time.monotonic())
        try:
            events = sel.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            a: Attempt = key.data
            if a.phase == "connect":
                err = a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(a, False, f"connect: {os.strerror(err)}")
                    continue
                try:
                    a.sock.send(a.out)  # small: fits the empty send buffer in one go
                except OSError as exc:
                    finish(a, False, f"send: {exc.strerror or exc}")
                    continue
                a.phase = "reply"
                a.deadline = time.monotonic() + rt
                sel.modify(a.sock, selectors.EVENT_READ, a)
            else:
                try:
                    chunk = a.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    finish(a, False, f"recv: {exc.strerror or exc}")
                    continue
                if not chunk:
                    finish(a, False, "closed")
                    continue
                a.buf += chunk
                ok = smb_reply_ok(a.buf) if a.proto == "smb" else nfs_reply_ok(a.buf, a.xid)
                if ok is not None:
                    finish(a, ok, "" if ok else "bad reply")
        now = time.monotonic()
        for s in inflight.values():
            for a in [a for a in s if a.deadline <= now]:
                finish(a, False, f"{a.phase} timeout")
        out.flush()
    for s in inflight.values():
        for a in list(s):
            finish(a, False, "stopped")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
