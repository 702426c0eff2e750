"""ARP watch for bench/soak.py; runs inside the lab's client namespace.

usage: _arpwatch.py DEV CLIENT_IP ADDRESS [ADDRESS ...] [--interval-ms 5]

Asks "who has ADDRESS?" for every address every ``interval`` ms from DEV (an AF_PACKET socket, so the
client's own ARP cache is neither used nor changed) and collects the replies addressed to this client.
A *sample window* is the time between two rounds of requests; if replies from two different MACs for
one address arrive within one window, two hosts answer ARP for that address at that moment: a
``conflict`` line. When the MAC answering for an address changes, an ``owner`` line. Gratuitous ARPs
(sender address = target address) are counted per MAC. Lines (times: time.monotonic())::

    {"owner": "10.77.0.1", "t": T, "mac": "02:77:00:00:00:0b"}
    {"conflict": "10.77.0.1", "t": T, "macs": ["02:...:0a", "02:...:0b"]}
    {"summary": {"windows": N, "replies": {...}, "silent_windows": {...}, "conflicts": {...}, "garp": {...}}}

The summary comes at SIGTERM/SIGINT, then the script exits.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ARP = 0x0806


def mac_text(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dev")
    ap.add_argument("client_ip")
    ap.add_argument("addresses", nargs="+")
    ap.add_argument("--interval-ms", type=float, default=5.0)
    args = ap.parse_args()
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind((args.dev, ETH_P_ARP))
    s.setblocking(False)
    my_mac = s.getsockname()[4][:6]
    my_ip = socket.inet_aton(args.client_ip)
    targets = {socket.inet_aton(a): a for a in args.addresses}
    requests = [b"\xff" * 6 + my_mac + struct.pack("!H", ETH_P_ARP)
                + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + my_mac + my_ip + b"\0" * 6 + t
                for t in targets]
    interval = args.interval_ms / 1000
    out = sys.stdout
    windows = 0
    replies = {a: {} for a in args.addresses}           # address -> mac -> count
    silent = {a: 0 for a in args.addresses}              # windows without any reply
    conflicts = {a: 0 for a in args.addresses}
    garp: dict[str, int] = {}
    owner: dict[str, str | None] = {a: None for a in args.addresses}
    window: dict[str, set[str]] = {a: set() for a in args.addresses}
    window_start = time.monotonic()

    def close_window(now: float) -> None:
        nonlocal windows
        windows += 1
        for a, macs in window.items():
            if not macs:
                silent[a] += 1
            elif len(macs) > 1:
                conflicts[a] += 1
                out.write(json.dumps({"conflict": a, "t": round(window_start, 6), "macs": sorted(macs)}) + "\n")
            elif owner[a] not in macs:
                owner[a] = next(iter(macs))
                out.write(json.dumps({"owner": a, "t": round(window_start, 6), "mac": owner[a]}) + "\n")
            macs.clear()
        out.flush()

    next_round = time.monotonic()
    first = True
    while not stop:
        now = time.monotonic()
        if now >= next_round:
            if not first:
                close_window(now)
            first = False
            window_start = now
            for req in requests:
                try:
                    s.send(req)
                except OSError:
                    pass
            next_round = now + interval
        try:
            r, _, _ = select.select([s], [], [], max(0.0, next_round - time.monotonic()))
        except InterruptedError:
            continue
        if not r:
            continue
        while True:
            try:
                frame = s.recv(128)
            except (BlockingIOError, InterruptedError):
                break
            if len(frame) < 42 or frame[12:14] != b"\x08\x06":
                continue
            op = struct.unpack("!H", frame[20:22])[0]
            sha, spa, tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
            if spa == tpa and spa in targets:
                key = f"{targets[spa]} {mac_text(sha)}"
                garp[key] = garp.get(key, 0) + 1
                continue
            if op != 2 or tpa != my_ip or tha != my_mac or spa not in targets:
                continue
            a, m = targets[spa], mac_text(sha)
            window[a].add(m)
            replies[a][m] = replies[a].get(m, 0) + 1
    out.write(json.dumps({"summary": {"windows": windows, "interval_ms": args.interval_ms, "replies": replies,
                                      "silent_windows": silent, "conflicts": conflicts, "garp": garp}}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
