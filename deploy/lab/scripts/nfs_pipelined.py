"""An NFS client that never stops sending (issue 11 lab test): a segment reaches the server every few ms.

usage: nfs_pipelined.py SERVER [INTERVAL_MS] [LIMIT_S]

ONC RPC NULL calls (NFSv3) on ONE TCP connection, one every INTERVAL_MS (default 2) whether or not the
earlier ones were answered, so that any window in which the server side drops segments (a live move's
lock) catches some of them. Prints ``{"ready": true, "port": P}`` once connected, then runs until a line
arrives on standard input (or LIMIT_S, default 60) and prints one JSON line: calls sent, replies, the
calls never answered, answered twice or never sent (by xid: the server may answer out of order), the longest gap between two replies (ms), the local port, and this network namespace's
TcpExt counters TCPTimeouts (retransmission timeouts) and TCPLossProbes over the run.
"""

import json
import socket
import struct
import sys
import threading
import time


def netstat(names: tuple[str, ...]) -> dict[str, int]:
    lines = open("/proc/net/netstat").read().splitlines()
    out: dict[str, int] = {}
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            out.update({k: int(v) for k, v in zip(head.split()[1:], values.split()[1:]) if k in names})
    return out


def null_call(xid: int) -> bytes:
    body = struct.pack(">IIIIIIIIII", xid, 0, 2, 100003, 3, 0, 0, 0, 0, 0)
    return struct.pack(">I", 0x80000000 | len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data


def main() -> int:
    server = sys.argv[1]
    interval = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.002
    limit = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    counters = ("TCPTimeouts", "TCPLossProbes")
    sock = socket.create_connection((server, 2049), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = sock.getsockname()[1]
    before = netstat(counters)
    stop = threading.Event()
    state = {"sent": 0, "replies": 0, "duplicates": 0, "error": None, "worst_gap": 0.0, "worst_at": 0.0}
    answered: set[int] = set()

    def send_loop() -> None:
        xid = 1
        try:
            while not stop.is_set():
                sock.sendall(null_call(xid))
                state["sent"] = xid
                xid += 1
                time.sleep(interval)
        except OSError as exc:
            state["error"] = state["error"] or f"send: {exc}"

    def recv_loop() -> None:
        last = time.monotonic()
        try:
            while state["replies"] < state["sent"] or not stop.is_set():
                mark = struct.unpack(">I", recv_exact(sock, 4))[0]
                reply = recv_exact(sock, mark & 0x7FFFFFFF)
                state["replies"] += 1
                xid = struct.unpack(">I", reply[:4])[0]
                if xid in answered:
                    state["duplicates"] += 1
                answered.add(xid)
                now = time.monotonic()
                if now - last > state["worst_gap"]:
                    state["worst_gap"], state["worst_at"] = now - last, now
                last = now
        except (OSError, ConnectionError) as exc:
            if not stop.is_set() or state["replies"] < state["sent"]:
                state["error"] = state["error"] or f"receive: {exc}"

    receiver = threading.Thread(target=recv_loop, daemon=True)
    receiver.start()
    print(json.dumps({"ready": True, "port": port}), flush=True)
    sender = threading.Thread(target=send_loop, daemon=True)
    sender.start()
    waiter = threading.Thread(target=sys.stdin.readline, daemon=True)
    waiter.start()
    waiter.join(limit)
    stop.set()
    sender.join(5)
    receiver.join(5)
    after = netstat(counters)
    unanswered = len(set(range(1, state["sent"] + 1)) - answered)
    print(json.dumps({"sent": state["sent"], "replies": state["replies"], "unanswered": unanswered,
                      "duplicates": state["duplicates"], "unknown": len(answered - set(range(1, state["sent"] + 1))),
                      "error": state["error"], "worst_gap_ms": round(state["worst_gap"] * 1000, 2),
                      "worst_gap_at": round(state["worst_at"], 4), "port": port,
                      "port_at_end": sock.getsockname()[1],
                      **{k: after.get(k, 0) - before.get(k, 0) for k in counters}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
