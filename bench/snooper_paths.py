"""Benchmark: the snooper's CPU per frame on its two read paths, TPACKET_V3 ring vs recv.

    sudo .venv/bin/python bench/snooper_paths.py [--mib 1024] [--rounds 3] [--prefix n13b]

Two namespaces joined by a veth pair (``PREFIX-spa``/``-spb``, removed at the end); a TCP sender in one
pushes ``--mib`` MiB to a receiver in the other while a Snooper in this process watches the receiver's
end, with a callback that only counts (so what is measured is the read path, not the decoders). CPU
seconds of this process (utime+stime, ``getrusage``) per frame and per GB, the frames and the kernel
drops, per path and round, interleaved (ring, recv, ring, ...). Traffic stays inside the namespaces.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capture.snooper import Snooper  # noqa: E402

CLONE_NEWNET = 0x40000000
A, B, PORT = "10.98.0.1", "10.98.0.2", 5445
TRAFFIC = r"""
import socket, sys
mode = sys.argv[1]
if mode == "serve":
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((sys.argv[2], int(sys.argv[3]))); ls.listen(1); print("ready", flush=True)
    c, _ = ls.accept(); n = 0
    while d := c.recv(1 << 20):
        n += len(d)
    print(n, flush=True)
else:
    c = socket.create_connection((sys.argv[2], int(sys.argv[3]))); chunk = b"\xab" * (1 << 20)
    for _ in range(int(sys.argv[4])):
        c.sendall(chunk)
    c.close()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def one(ns_a: str, ns_b: str, path: str, mib: int, block: int) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns_a}", os.O_RDONLY)
    frames = [0]

    def on_frame(frame, ts):
        frames[0] += 1

    try:
        libc.setns(target, CLONE_NEWNET)
        sn = Snooper("va", [A], [PORT], on_frame, rcvbuf=64 << 20, ring=path == "ring", block_size=block)
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)
    srv = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-c", TRAFFIC, "serve", A, str(PORT)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        with sn:
            async with trio.open_nursery() as nursery:
                await nursery.start(sn.run)
                c0, t0 = cpu(), time.monotonic()
                await trio.to_thread.run_sync(subprocess.run, ["ip", "netns", "exec", ns_b, sys.executable, "-c",
                                                               TRAFFIC, "send", A, str(PORT), str(mib)])
                last = -1
                while sn.counters["frames"] != last:
                    last = sn.counters["frames"]
                    await trio.sleep(0.2)
                c1, t1 = cpu(), time.monotonic() - 0.2
                nursery.cancel_scope.cancel()
            st = sn.stats()
        got = int(srv.communicate(timeout=30)[0].strip())
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    n = max(st["frames"], 1)
    return {"path": path, "block_KiB": block >> 10 if path == "ring" else None, "frames": st["frames"], "MB": round(st["bytes"] / 1e6), "received_MB": round(got / 1e6),
            "kernel_drops": st["kernel_drops"], "cpu_s": round(c1 - c0, 3), "wall_s": round(t1 - t0, 2),
            "cpu_us_per_frame": round((c1 - c0) / n * 1e6, 2),
            "cpu_s_per_GB": round((c1 - c0) / (st["bytes"] / 1e9), 3), "loadavg": open("/proc/loadavg").read().split()[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix", default="n13b")
    ap.add_argument("--block-kib", default="256", help="ring block sizes to try, comma-separated (KiB)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)")
        return 1
    ns_a, ns_b = f"{args.prefix}-spa", f"{args.prefix}-spb"
    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("-n", ns_a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", ns_b)
        ip("-n", ns_a, "addr", "add", f"{A}/24", "dev", "va")
        ip("-n", ns_b, "addr", "add", f"{B}/24", "dev", "vb")
        for ns, dev in ((ns_a, "va"), (ns_b, "vb")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        for r in range(args.rounds):
            for path, block in [("ring", int(k) << 10) for k in args.block_kib.split(",")] + [("recv", 1 << 18)]:
                print(json.dumps({"round": r + 1, **trio.run(one, ns_a, ns_b, path, args.mib, block)}), flush=True)
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
