"""Benchmark: decoder speed on a real capture, clean and after capture gaps (the boundary hunt).

    sudo .venv/bin/python bench/resync.py capture OUT.pcap [--size-mib 32] [--prefix n13b]
    .venv/bin/python bench/resync.py measure CAPTURE.pcap [--drop 0.003] [--burst 1] [--seed 1] [--repeat 3]

``capture``: a lab (its own prefix), node a serving alone, tcpdump in a's namespace on eth0 (both legs:
client <-> 10.77.0.1 and 10.77.0.1 <-> backend, SMB and NFS) while smbclient put/get and nfs-cp (v3)
put/get copy one random file through 10.77.0.1; the capture is kept, the lab goes down.

``measure``: reads every frame of the capture into memory first (so file reading is not timed), then
times :class:`protocols.pipeline.Pipeline` over (1) all frames, (2) the same frames with a random
``--drop`` fraction of the TCP frames that carry payload removed (``--burst`` consecutive frames per
drop, like a kernel queue overflow). It prints MB of frames per second both ways, by wall clock and
by CPU time of this process (best of ``--repeat``; on a machine others load, the CPU figure is the
one to compare), the gaps and resyncs the decoders went through, and checks that the messages decoded
after the gaps are the clean decode's messages (each decoded message event with a gap-free stream
region must appear in the clean run). One JSON line per run with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def load_frames(path: str) -> list[tuple[bytes, float]]:
    from capture.pcapfile import read_capture

    with open(path, "rb") as f:
        return [(p.data, p.ts) for p in read_capture(f)]


def _payload_len(frame: bytes) -> int:
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return 0
    ihl = (frame[14] & 0xF) * 4
    total = int.from_bytes(frame[16:18], "big")
    doff = (frame[14 + ihl + 12] >> 4) * 4
    return max(0, total - ihl - doff)


def drop_frames(frames: list, fraction: float, burst: int, seed: int) -> tuple[list, int]:
    """The frames with random runs of ``burst`` payload-carrying frames removed; and how many went."""
    rng = random.Random(seed)
    out, dropped, skip = [], 0, 0
    for f in frames:
        if _payload_len(f[0]) and (skip or rng.random() < fraction / burst):
            skip = (skip or burst) - 1
            dropped += 1
            continue
        out.append(f)
    return out, dropped


def run_pipeline(frames: list) -> tuple[float, "object", list, float]:
    from protocols.frames import LINKTYPE_ETHERNET
    from protocols.pipeline import Pipeline

    p = Pipeline(zero_copy=True)
    events = []
    feed = p.feed_frame
    t0, c0 = time.perf_counter(), time.process_time()
    for buf, ts in frames:
        events += feed(buf, ts, LINKTYPE_ETHERNET)
    events += p.close()
    return time.perf_counter() - t0, p, events, time.process_time() - c0


def message_events(events: list) -> list[tuple[str, str]]:
    """The decoded protocol messages (SMB2/RPC), as comparable values."""
    from protocols.rpc import RpcCall, RpcReply
    from protocols.smb2 import Smb2Request, Smb2Response

    return [(str(key), repr(ev)) for key, ev in events
            if isinstance(ev, (Smb2Request, Smb2Response, RpcCall, RpcReply))]


def unmatched(clean_events: list, gap_events: list) -> list:
    """Messages decoded after gaps that the clean decode of the same stream does not have.

    A response whose request was lost in a gap cannot carry it (and an RPC reply without its call
    cannot decode its body): those are compared on what they do carry."""
    from protocols.rpc import RpcReply
    from protocols.smb2 import Smb2Response

    def weak(key, ev):
        if isinstance(ev, Smb2Response):
            return (str(key), "smb", ev.command, ev.message_id, ev.session_id, ev.status)
        return (str(key), "rpc", ev.xid, ev.accepted, ev.status)

    full = set(message_events(clean_events))
    partial = {weak(k, e) for k, e in clean_events if isinstance(e, (Smb2Response, RpcReply))}
    out = []
    for key, ev in gap_events:
        if (str(key), repr(ev)) in full or not message_events([(key, ev)]):
            continue
        if isinstance(ev, Smb2Response) and ev.request is None or isinstance(ev, RpcReply) and ev.call is None:
            if weak(key, ev) in partial:
                continue
        out.append((str(key), repr(ev)))
    return out


def measure(args) -> int:
    frames = load_frames(args.capture)
    nbytes = sum(len(f[0]) for f in frames)
    runs = [run_pipeline(frames) for _ in range(args.repeat)]
    best_clean, cpu_clean = min(r[0] for r in runs), min(r[3] for r in runs)
    _t, clean_p, clean_events, _c = runs[-1]
    lossy, dropped = drop_frames(frames, args.drop, args.burst, args.seed)
    lossy_bytes = sum(len(f[0]) for f in lossy)
    runs = [run_pipeline(lossy) for _ in range(args.repeat)]
    best_gap, cpu_gap = min(r[0] for r in runs), min(r[3] for r in runs)
    _t, gap_p, gap_events, _c = runs[-1]
    clean_set = set(message_events(clean_events))
    after = message_events(gap_events)
    foreign = unmatched(clean_events, gap_events)
    c = gap_p.counters
    res = {"capture": args.capture, "frames": len(frames), "MB": round(nbytes / 1e6, 1),
           "clean_s": round(best_clean, 3), "clean_MB_per_s": round(nbytes / best_clean / 1e6, 1),
           "clean_MB_per_cpu_s": round(nbytes / cpu_clean / 1e6, 1),
           "drop": args.drop, "burst": args.burst, "seed": args.seed, "dropped_frames": dropped,
           "gap_s": round(best_gap, 3), "gap_MB_per_s": round(lossy_bytes / best_gap / 1e6, 1),
           "gap_MB_per_cpu_s": round(lossy_bytes / cpu_gap / 1e6, 1),
           "gaps": c["gaps"], "gap_bytes": c["gap_bytes"], "smb_errors": c["smb_errors"],
           "nfs_errors": c["nfs_errors"], "messages_clean": len(clean_set), "messages_after_gaps": len(after),
           "messages_not_in_clean": len(foreign), "loadavg": open("/proc/loadavg").read().split()[:3]}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>22}: {v}")
        for e in foreign[:5]:
            print("  not in the clean decode:", e[1][:300])
    return 1 if foreign else 0


def capture(args) -> int:
    from driver import Bench, NodeProcess, copies, random_file

    out = Path(args.out).resolve()
    with Bench("resync", args.prefix) as bench:
        lab = bench.up()
        a = bench.started(NodeProcess(lab, "a", log=bench.work / "a.log"))
        a.start()
        src = random_file(bench.work / "src.bin", args.size_mib << 20)
        tcpdump = lab.popen(lab.ns_a, ["tcpdump", "-i", "eth0", "-s", "0", "-B", "262144", "--immediate-mode",
                                       "-w", str(out), "tcp and host 10.77.0.1 and (port 445 or port 2049)"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            copies(lab, lab.addresses.service_a, src, f"resync-{time.time():.0f}.bin", bench.work / "back.bin")
            time.sleep(0.5)
        finally:
            tcpdump.send_signal(signal.SIGINT)
            _o, err = tcpdump.communicate(timeout=30)
        print(err.strip())
    print(f"capture: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("out")
    c.add_argument("--size-mib", type=int, default=32)
    c.add_argument("--prefix", default="n13b")
    m = sub.add_parser("measure")
    m.add_argument("capture")
    m.add_argument("--drop", type=float, default=0.003)
    m.add_argument("--burst", type=int, default=1)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--repeat", type=int, default=3)
    m.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cmd == "capture":
        if os.geteuid() != 0:
            print("capture needs root (network namespaces)")
            return 1
        return capture(args)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
