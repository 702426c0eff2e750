"""How long setting up the observer's capture rings stalls a SCHED_FIFO process on the same CPU.

Why: a stateful node's observer opens three TPACKET_V3 rings of 128 MiB at start; on this kernel the
setup runs in one stretch the scheduler cannot preempt, and a heartbeat process sharing the CPU falls
silent meanwhile (the cause of stateful start-up false takeovers, issue 12). Run as root:

    .venv/bin/python bench/ring_stall.py [--rounds 5] [--ring-mib 128] [--views 3]

Prints, per round, the ring setup time and the worst wake-up delay of a SCHED_FIFO probe pinned to the
same CPU sleeping 1 ms at a time (its normal worst: well under 1 ms), then the same with the probe on
the other CPU. Opens packet sockets on loopback only; sends nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import time


def probe(cpu: int, seconds: float, out) -> None:
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    worst, end = 0.0, time.monotonic() + seconds
    out.send("go")
    while time.monotonic() < end:
        t = time.monotonic()
        time.sleep(0.001)
        worst = max(worst, time.monotonic() - t - 0.001)
    out.send(worst)


def open_rings(ring_mib: int, views: int) -> tuple[float, list[socket.socket]]:
    socks = []
    started = time.monotonic()
    for _ in range(views):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        _ring(s, ring_mib << 20)
        socks.append(s)
    return time.monotonic() - started, socks


def _ring(sock: socket.socket, size: int) -> None:
    import struct

    SOL_PACKET, PACKET_VERSION, PACKET_RX_RING, TPACKET_V3 = 263, 10, 5, 2
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    block = 1 << 22
    nr = size // block
    # struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word
    req = struct.pack("IIIIIII", block, nr, 2048, block // 2048 * nr, 50, 0, 0)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ring-mib", type=int, default=128)
    ap.add_argument("--views", type=int, default=3)
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, {args.views} rings of {args.ring_mib} MiB")
    for where, cpu in (("same CPU", 0), ("other CPU", 1)):
        for i in range(args.rounds):
            here, there = multiprocessing.Pipe()
            p = multiprocessing.Process(target=probe, args=(cpu, 1.5, there))
            p.start()
            here.recv()
            time.sleep(0.2)
            took, socks = open_rings(args.ring_mib, args.views)
            worst = here.recv()
            p.join()
            for s in socks:
                s.close()
            print(f"{where:9} round {i + 1}: ring setup {took * 1000:7.1f} ms, probe's worst wake-up delay {worst * 1000:7.1f} ms")
            time.sleep(0.5)


if __name__ == "__main__":
    main()
