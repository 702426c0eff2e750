"""Many TCP clients in one process, for connection-count and connection-rate tests (lab).

Each connection sends one request and checks the answer: an ONC RPC NULL call (``--rpc PROG:VERS``,
e.g. 100003:3 for NFSv3; the reply must be MSG_ACCEPTED/SUCCESS with the call's xid) or, without
``--rpc``, 16 random bytes that an echo server sends back.

    short HOST PORT COUNT PARALLEL   COUNT fresh connections, PARALLEL at a time: connect, request,
                                     answer, close (this side closes first, as NFS clients do)
    hold HOST PORT COUNT             open COUNT connections, one request each, keep them open; print
                                     a JSON line, wait for a line on stdin, then one more request on
                                     each and a clean close (shutdown, wait for the other side's EOF)
    echo-server HOST PORT            an echo server (selectors) that prints "ready"

Non-blocking sockets with selectors, so thousands of connections cost one process; the descriptor
limit is raised to the hard limit first. Results are JSON lines on stdout: counts, seconds, and the
first few distinct errors.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time
from collections import Counter

PROG_VERS: tuple[int, int] | None = None


def raise_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def request(xid: int) -> bytes:
    if PROG_VERS is None:
        return xid.to_bytes(4, "big") + os.urandom(12)
    prog, vers = PROG_VERS
    body = struct.pack(">IIIIIIIIII", xid, 0, 2, prog, vers, 0, 0, 0, 0, 0)
    return struct.pack(">I", 0x80000000 | len(body)) + body


def answer_ok(req: bytes, data: bytes) -> bool | None:
    """True/False once ``data`` holds a whole answer, None while it is incomplete."""
    if PROG_VERS is None:
        return None if len(data) < len(req) else data[:len(req)] == req
    if len(data) < 4:
        return None
    length = struct.unpack(">I", data[:4])[0] & 0x7FFFFFFF
    if len(data) < 4 + length:
        return None
    xid, mtype, stat, _flavor, vlen = struct.unpack(">IIIII", data[4:24])
    accept = struct.unpack(">I", data[24 + vlen:28 + vlen])[0]
    return xid == struct.unpack(">I", req[4:8])[0] and mtype == 1 and stat == 0 and accept == 0


class Conn:
    __slots__ = ("sock", "req", "buf", "state", "started")

    def __init__(self, host: str, port: int, xid: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.req = request(xid)
        self.buf = b""
        self.state = "connecting"
        self.started = time.monotonic()
        err = self.sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))


def _error_name(exc: BaseException | str) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return str(exc)[:80]


def run_round(sel: selectors.DefaultSelector, conns: list[Conn], timeout: float, close: bool,
              errors: Counter) -> int:
    """Drive ``conns`` through connect (if needed), one request and its answer; optionally a clean
    close. Returns how many succeeded; failed ones are closed and counted in ``errors``."""
    ok = 0
    pending: set[Conn] = set()
    for c in conns:
        if c.state != "connecting":
            c.state = "sending"
        sel.register(c.sock, selectors.EVENT_WRITE, c)
        pending.add(c)
    deadline = time.monotonic() + timeout

    def finish(c: Conn, state: str) -> None:
        sel.unregister(c.sock)
        pending.discard(c)
        c.state = state

    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            c = key.data
            try:
                if c.state == "connecting":
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    c.state = "sending"
                if c.state == "sending":
                    c.sock.sendall(c.req)  # 16-44 bytes: fits any send buffer
                    c.buf = b""
                    c.state = "reading"
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                data = c.sock.recv(65536)
                if c.state == "reading":
                    if not data:
                        raise OSError("EOF before the answer")
                    c.buf += data
                    verdict = answer_ok(c.req, c.buf)
                    if verdict is None:
                        continue
                    if not verdict:
                        raise OSError("wrong answer")
                    if not close:
                        finish(c, "idle")
                        ok += 1
                        continue
                    c.sock.shutdown(socket.SHUT_WR)
                    c.state = "closing"
                elif c.state == "closing":
                    if data:
                        raise OSError("data after the answer")
                    finish(c, "closed")
                    c.sock.close()
                    ok += 1
            except (OSError, ValueError) as exc:
                errors[_error_name(exc)] += 1
                finish(c, "failed")
                c.sock.close()
    for c in list(pending):
        errors["timeout in " + c.state] += 1
        finish(c, "failed")
        c.sock.close()
    return ok


def cmd_short(host: str, port: int, count: int, parallel: int) -> dict:
    sel = selectors.DefaultSelector()
    errors: Counter = Counter()
    ok = 0
    started = time.monotonic()
    done = 0
    while done < count:
        batch = []
        for i in range(min(parallel, count - done)):
            try:
                batch.append(Conn(host, port, done + i + 1))
            except OSError as exc:
                errors[_error_name(exc)] += 1
        done += min(parallel, count - done)
        ok += run_round(sel, batch, 10, True, errors)
    seconds = time.monotonic() - started
    return {"ok": ok, "failed": count - ok, "seconds": round(seconds, 3),
            "per_second": round(count / seconds, 1), "errors": dict(errors.most_common(5))}


def cmd_hold(host: str, port: int, count: int) -> None:
    sel = selectors.DefaultSelector()
    errors: Counter = Counter()
    started = time.monotonic()
    conns: list[Conn] = []
    ok = 0
    for start in range(0, count, 500):  # in steps, so the listen backlog never overflows
        batch = []
        for i in range(start, min(count, start + 500)):
            try:
                batch.append(Conn(host, port, i + 1))
            except OSError as exc:
                errors[_error_name(exc)] += 1
        ok += run_round(sel, batch, 60, False, errors)
        conns += [c for c in batch if c.state == "idle"]
    print(json.dumps({"open": ok, "failed": count - ok, "seconds": round(time.monotonic() - started, 3),
                      "errors": dict(errors.most_common(5))}), flush=True)
    sys.stdin.readline()
    errors.clear()
    started = time.monotonic()
    for c in conns:
        c.req = request(int.from_bytes(os.urandom(3), "big"))
    again = run_round(sel, conns, 60, True, errors)
    print(json.dumps({"closed_cleanly": again, "failed": len(conns) - again,
                      "seconds": round(time.monotonic() - started, 3),
                      "errors": dict(errors.most_common(5))}), flush=True)


def cmd_echo_server(host: str, port: int) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "c")
                continue
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if data:
                try:
                    key.fileobj.send(data)
                except OSError:
                    pass
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()


def main(argv: list[str]) -> int:
    global PROG_VERS
    raise_limit()
    if "--rpc" in argv:
        i = argv.index("--rpc")
        prog, vers = argv[i + 1].split(":")
        PROG_VERS = (int(prog), int(vers))
        del argv[i:i + 2]
    cmd, host, port, *rest = argv
    if cmd == "short":
        print(json.dumps(cmd_short(host, int(port), int(rest[0]), int(rest[1]))), flush=True)
    elif cmd == "hold":
        cmd_hold(host, int(port), int(rest[0]))
    elif cmd == "echo-server":
        cmd_echo_server(host, int(port))
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
