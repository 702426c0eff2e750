"""Benchmark: moving live TCP connections between two nodes with proxy.tcprepair (results: bench/TCPREPAIR.md).

    sudo .venv/bin/python bench/tcprepair.py --prefix q8 [--connections 100] [--json FILE]

The lab is the one of tests/test_tcprepair.py: node namespaces a and b and a client namespace c on a
bridge, service address 10.98.1.1 on a (namespaces ``<prefix>tr-<pid>-*``, deleted at the end, also on
errors). A move is what issue 11 will do: remove the address from a (nothing reaches a's sockets any
more), freeze each socket, serialise (``to_wire`` + msgpack), close silently; unpack (``from_wire``),
``restore_quiet`` on b; add the address on b; one gratuitous ARP from b; ``go_live`` each socket. The
address and the ARP go through handles opened beforehand (pyroute2, a packet socket), as a node holds them.

1. ``idle``: N connections, each with 1 KiB each way exchanged and 1 KiB unread in the server socket,
   moved together. Per connection: freeze, serialise, deserialise, restore (median, p99); the whole move
   from address removal to the last socket live. Then every connection is checked (the unread KiB and a
   fresh echo both ways).
2. ``busy``: one connection streaming from the server (32 KiB a millisecond) to a client process that
   records every gap over 1 ms between two reads, moved in the middle right after a 256 KiB burst; the
   stall is the gap that contains the end of the move. Variants:
   ``as-is`` (bytes still in flight at the freeze are booked as sent; the remote's answer to go_live's
   window probe acknowledges them) and ``drain`` (writes stop and the holder waits until
   ``unacknowledged()`` is 0 before removing the address). The client checks count and sha256 of every byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prefix", required=True, help="lab prefix (namespaces <prefix>tr-<pid>-*)")
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--busy-seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5, help="busy moves per variant")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args()


ARGS = _args()
os.environ["PAIRPROXY_TEST_LAB"] = ARGS.prefix

import msgpack  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402

from proxy import tcprepair  # noqa: E402
from proxy.arp import gratuitous_arp  # noqa: E402
from proxy.tcprepair import TcpSocketState  # noqa: E402
from tests.test_snooper import in_netns  # noqa: E402
from tests.test_tcprepair import SERVICE, Namespaces, nodes_lab  # noqa: E402

PORT = 6000


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return {"median_ms": ms(statistics.median(values)), "p99_ms": ms(p99), "max_ms": ms(values[-1]),
            "total_ms": ms(sum(values))}


def listen(ns_name: str, port: int, backlog: int = 1024) -> socket.socket:
    with in_netns(ns_name):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((SERVICE, port))
        ls.listen(backlog)
    return ls


class Node:
    """A node's kernel handles, made once inside its namespace (as the node process would hold them): a
    netlink socket for the address and a packet socket for the gratuitous ARP."""

    def __init__(self, ns_name: str, mac: str) -> None:
        with in_netns(ns_name):
            self.ipr = IPRoute()
            self.arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
            self.arp.bind(("eth0", 0x0806))
        self.index = self.ipr.link_lookup(ifname="eth0")[0]
        self.garp = gratuitous_arp(mac, SERVICE)

    def address(self, op: str) -> None:
        self.ipr.addr(op, index=self.index, address=SERVICE, prefixlen=24)

    def announce(self) -> None:
        self.arp.send(self.garp)

    def close(self) -> None:
        self.ipr.close()
        self.arp.close()


class Mover:
    """One move a -> b of a list of server sockets, timed per step."""

    def __init__(self, ns: Namespaces, macs: dict[str, str]) -> None:
        self.ns, self.macs = ns, macs
        self.t: dict[str, list[float]] = {"freeze": [], "serialise": [], "deserialise": [], "restore": []}
        self.wire_bytes: list[int] = []
        self.a, self.b = Node(ns["a"], macs["a"]), Node(ns["b"], macs["b"])

    def move(self, socks: list[socket.socket]) -> tuple[list[socket.socket], float]:
        b = self.ns["b"]
        start = time.perf_counter()
        self.a.address("del")
        blobs = []
        for s in socks:
            t0 = time.perf_counter()
            state = tcprepair.freeze(s)
            t1 = time.perf_counter()
            blob = msgpack.packb(state.to_wire(), use_bin_type=True)
            t2 = time.perf_counter()
            tcprepair.close_silently(s)
            blobs.append(blob)
            self.t["freeze"].append(t1 - t0)
            self.t["serialise"].append(t2 - t1)
            self.wire_bytes.append(len(blob))
        new = []
        with in_netns(b):
            for blob in blobs:
                t0 = time.perf_counter()
                state = TcpSocketState.from_wire(msgpack.unpackb(blob, raw=False))
                t1 = time.perf_counter()
                new.append(tcprepair.restore_quiet(state))
                t2 = time.perf_counter()
                self.t["deserialise"].append(t1 - t0)
                self.t["restore"].append(t2 - t1)
        self.b.address("add")
        self.b.announce()
        live = [r.go_live() for r in new]
        return live, time.perf_counter() - start

    def move_back_address(self) -> None:
        self.b.address("del")
        self.a.address("add")
        self.a.announce()
        self.a.close()
        self.b.close()


def idle(ns: Namespaces, macs: dict[str, str], count: int) -> dict:
    ls = listen(ns["a"], PORT)
    clients, servers = [], []
    with in_netns(ns["c"]):
        for _ in range(count):
            c = socket.create_connection((SERVICE, PORT), timeout=5)
            clients.append(c)
            s, _ = ls.accept()
            servers.append(s)
    ls.close()
    for c, s in zip(clients, servers):
        c.sendall(b"q" * 1024)
        s.sendall(b"r" * 1024)
        assert c.recv(2048, socket.MSG_WAITALL) == b"r" * 1024
        assert s.recv(1024, socket.MSG_WAITALL) == b"q" * 1024
        c.sendall(b"u" * 1024)  # left unread in the server socket
    time.sleep(0.2)
    mover = Mover(ns, macs)
    servers, whole = mover.move(servers)
    for i, (c, s) in enumerate(zip(clients, servers)):
        c.settimeout(5)
        s.settimeout(5)
        assert s.recv(1024, socket.MSG_WAITALL) == b"u" * 1024, i
        msg = f"after the move {i}".encode()
        c.sendall(msg)
        assert s.recv(len(msg), socket.MSG_WAITALL) == msg
        s.sendall(msg[::-1])
        assert c.recv(len(msg), socket.MSG_WAITALL) == msg[::-1]
    for c, s in zip(clients, servers):
        c.close()
        s.close()
    mover.move_back_address()
    return {"connections": count, "whole_move_ms": ms(whole), "wire_bytes_median": statistics.median(mover.wire_bytes),
            **{k: summary(v) for k, v in mover.t.items()}}


CLIENT = r"""
import hashlib, json, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print("connected", flush=True)
h = hashlib.sha256(); n = 0; last = None; gaps = []
while True:
    d = c.recv(1 << 16)
    now = time.monotonic()
    if not d:
        break
    if last is not None and now - last > 0.001:
        gaps.append((last, now - last))
    last = now; n += len(d); h.update(d)
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "gaps": gaps}))
"""


def busy(ns: Namespaces, macs: dict[str, str], variant: str, seconds: float, port: int) -> dict:
    ls = listen(ns["a"], port)
    proc = subprocess.Popen(["ip", "netns", "exec", ns["c"], sys.executable, "-c", CLIENT, SERVICE, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected", proc.stderr.read()
        s, _ = ls.accept()
        ls.close()
        s.setblocking(False)
        block = os.urandom(1 << 20)
        digest = hashlib.sha256()
        sent = 0

        def write_for(duration: float) -> None:
            nonlocal sent
            end = time.monotonic() + duration
            while time.monotonic() < end:
                off = sent % len(block)
                chunk = block[off:off + 32 * 1024]
                try:
                    n = s.send(chunk)
                except BlockingIOError:
                    n = 0
                digest.update(chunk[:n])
                sent += n
                time.sleep(0.001)

        mover = Mover(ns, macs)  # opening its handles takes tens of ms: not part of the move
        write_for(seconds / 2)
        s.setblocking(True)
        s.sendall(block[:256 * 1024])  # a burst just before the move: bytes in flight at the freeze
        digest.update(block[:256 * 1024])
        sent += 256 * 1024
        s.setblocking(False)
        wait = 0.0
        in_flight = tcprepair.unacknowledged(s)
        if variant == "drain":
            t0 = time.perf_counter()
            while tcprepair.unacknowledged(s) and time.perf_counter() - t0 < 0.05:
                time.sleep(0.0002)
            wait = time.perf_counter() - t0
        (s,), whole = mover.move([s])
        move_end = time.monotonic()
        s.setblocking(False)
        write_for(seconds / 2)
        s.setblocking(True)
        s.shutdown(socket.SHUT_WR)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        s.close()
        mover.move_back_address()
        print(variant, got, file=sys.stderr)
        # the stall: the client's read gap (>1 ms) that contains the end of the move (CLOCK_MONOTONIC is one
        # clock for every namespace); the longest other gap shows what the machine's load alone does
        stall = max((g for t, g in got["gaps"] if t <= move_end <= t + g), default=0.0)
        elsewhere = max((g for t, g in got["gaps"] if not t <= move_end <= t + g), default=0.0)
        got.pop("gaps")
        ok = got["bytes"] == sent and got["sha256"] == digest.hexdigest()
        return {"variant": variant, "bytes_ok": ok, "bytes": sent, "in_flight_before_move": in_flight,
                "drain_wait_ms": ms(wait), "whole_move_ms": ms(whole),
                "client_stall_ms": ms(stall), "client_max_gap_elsewhere_ms": ms(elsewhere),
                "queue_bytes_moved": mover.wire_bytes[0]}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (namespaces, TCP_REPAIR)", file=sys.stderr)
        return 1
    ns = Namespaces()
    results: dict = {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        macs = nodes_lab(ns)
        results["idle_1"] = idle(ns, macs, 1)
        results[f"idle_{ARGS.connections}"] = idle(ns, macs, ARGS.connections)
        results["busy"] = [busy(ns, macs, v, ARGS.busy_seconds, PORT + 1 + i)
                           for i, v in enumerate(["as-is", "drain"] * ARGS.rounds)]
        for v in ("as-is", "drain"):
            stalls = [b["client_stall_ms"] for b in results["busy"] if b["variant"] == v]
            results[f"busy_{v}_stall_ms"] = {"median": statistics.median(stalls), "max": max(stalls),
                                             "all_bytes_ok": all(b["bytes_ok"] for b in results["busy"])}
    finally:
        ns.down()
    text = json.dumps(results, indent=1)
    print(text)
    if ARGS.json:
        Path(ARGS.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
