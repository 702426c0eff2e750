"""Benchmark: the snooper on node b watching node a's bulk SMB and NFS traffic, and replay speed.

    sudo .venv/bin/python bench/snooper.py [--size-mib 256] [--rcvbuf BYTES] [--prefix pps] [--keep-lab]

What it does (results in bench/SNOOPER.md):

1. the lab ``pps`` (state in /var/tmp/pairproxy-snoop-lab[-PREFIX]), service bridge hub-like (``flood``),
   so pps-b's eth0 receives node a's frames both ways, as a standby on a mirror port would;
2. node a serving; in pps-b a snooper process (this file, ``snoop`` mode) with a Pipeline, filter
   10.77.0.1 ports 445/2049/111/20048;
3. smbclient put/get and nfs-cp put/get (v3) of one random file through 10.77.0.1;
4. from the snooper: frames/s, MB/s, kernel drops, CPU% (utime+stime from /proc over wall time),
   and the SMB session/tree its Pipeline saw for the smbclient connections;
5. the same transfers again under ``tcpdump -w`` in pps-b, then ``pairproxy replay`` of that capture
   timed (MB of capture per second); the capture is deleted.

Everything started is stopped by PID; the bridge is set back to learning; the lab goes down
(lab, node, copies and cleanup from bench/driver.py, shared with the other benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADDRESSES = ["10.77.0.1"]
PORTS = [445, 2049, 111, 20048]


# ------------------------------------------------------------------ the snooper process (in pps-b)
def snoop_main(ifname: str, out: str, rcvbuf: int) -> None:
    """Snooper + Pipeline until SIGTERM; then one JSON line of stats and SMB sessions to ``out``.

    The pipeline forgets a connection when it closes, so each SMB connection's sessions are copied
    out whenever a SESSION_SETUP or TREE_CONNECT response passes (rare: no cost per data frame).
    """
    import trio

    from protocols.pipeline import Pipeline
    from capture.snooper import Snooper

    pipe = Pipeline()
    smb_seen: dict[str, dict] = {}

    def on_frame(frame, ts: float) -> None:
        for key, ev in pipe.feed_frame(frame, ts):
            if type(ev).__name__ == "Smb2Response" and ev.command in (1, 3):  # SESSION_SETUP, TREE_CONNECT
                st = pipe.smb.get(key)
                if st is not None:
                    smb_seen[f"{key.client}-{key.server}"] = {"sessions": st.to_json()["sessions"]}

    async def main() -> None:
        with Snooper(ifname, ADDRESSES, PORTS, on_frame, rcvbuf=rcvbuf) as sn:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(sn.run)
                    print("ready", flush=True)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
            stats = sn.stats()
        snap = pipe.snapshot()
        Path(out).write_text(json.dumps({"snooper": stats, "pipeline": snap["errors"],
                                         "smb_sessions": smb_seen,
                                         "open_connections": len(snap["connections"])}))

    trio.run(main)


# ------------------------------------------------------------------------------ the benchmark
class Child:
    """A process this benchmark started (snooper, tcpdump): killed by PID at the end if still running."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def transfers(bench, src: Path, tag: str) -> list:
    from driver import copies

    done = copies(bench.lab, bench.lab.addresses.service_a, src, f"snoop-{tag}.bin", bench.work / f"get-{tag}.bin",
                  timeout=600)
    return [c.transfer for c in done.values()]


def bench_run(size: int, rcvbuf: int, prefix: str, root: str | None, keep_lab: bool) -> dict:
    from driver import Bench, NodeProcess, cpu_seconds, random_file

    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": platform.uname()._asdict(),
                    "cpus": os.cpu_count(), "size": size, "rcvbuf": rcvbuf}
    with Bench("snoop", prefix, default_prefix="pps", root=root, keep_lab=keep_lab) as bench:
        lab = bench.up()
        bench.flood(True)
        work = bench.work
        capture = work / "snoop-bench.pcap"
        src = random_file(work / "src.bin", size)
        bench.started(NodeProcess(lab, "a")).start()

        # ---- round 1: live snooper
        stats_file = work / "snoop-stats.json"
        snoop = bench.started(Child(lab.popen(lab.ns_b, [sys.executable, __file__, "snoop", "eth0", str(stats_file),
                                                         "--rcvbuf", str(rcvbuf)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)))
        line = snoop.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"snooper did not start: {line} {snoop.proc.stderr.read()[-2000:]}")
        cpu0, t0 = cpu_seconds(snoop.proc.pid), time.monotonic()
        xfers = transfers(bench, src, "live")
        time.sleep(0.5)  # let the queue drain
        cpu1, t1 = cpu_seconds(snoop.proc.pid), time.monotonic()
        snoop.proc.send_signal(signal.SIGTERM)
        snoop.proc.wait(timeout=30)
        if snoop.proc.returncode != 0:
            raise RuntimeError(f"snooper exited {snoop.proc.returncode}: {snoop.proc.stderr.read()[-2000:]}")
        live = json.loads(stats_file.read_text())
        wall = t1 - t0
        busy = sum(x.seconds for x in xfers)
        s = live["snooper"]
        result["live"] = {
            "transfers": [{"what": x.what, "seconds": round(x.seconds, 2), "MB/s": round(x.mb_per_s, 1)}
                          for x in xfers],
            "wall_s": round(wall, 2), "transfer_s": round(busy, 2),
            "frames_per_s": round(s["frames"] / busy), "MB_per_s": round(s["bytes"] / busy / 1e6, 1),
            "cpu_percent": round(100 * (cpu1 - cpu0) / wall, 1),
            **live}

        # ---- round 2: tcpdump capture of the same transfers, then replay
        tcpdump = bench.started(Child(lab.popen(
            lab.ns_b, ["tcpdump", "-i", "eth0", "-s", "0", "-B", "65536", "--immediate-mode",
                       "-w", str(capture), "tcp and host 10.77.0.1 and (port 445 or port 2049)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        time.sleep(1.0)
        transfers(bench, src, "cap")
        time.sleep(0.5)
        tcpdump.proc.send_signal(signal.SIGINT)
        _, err = tcpdump.proc.communicate(timeout=30)
        result["tcpdump"] = [l for l in err.splitlines() if "packets" in l]
        cap_size = capture.stat().st_size
        t0 = time.monotonic()
        rp = subprocess.run([sys.executable, "-m", "proxy.cli", "replay", "--json", str(capture)],
                            capture_output=True, text=True, cwd=ROOT, timeout=1800)
        rt = time.monotonic() - t0
        summary: dict = {}
        try:
            rj = json.loads(rp.stdout)
            summary = {"errors": rj.get("errors") or rj.get("snapshot", {}).get("errors")}
        except ValueError:
            summary = {"stdout_tail": rp.stdout[-500:], "stderr_tail": rp.stderr[-500:]}
        result["replay"] = {"returncode": rp.returncode, "capture_MB": round(cap_size / 1e6, 1),
                            "seconds": round(rt, 2), "MB_per_s": round(cap_size / rt / 1e6, 1), **summary}
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    sp = sub.add_parser("snoop")
    sp.add_argument("ifname")
    sp.add_argument("out")
    sp.add_argument("--rcvbuf", type=int, default=8 << 20)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rcvbuf", type=int, default=128 << 20,
                    help="snooper SO_RCVBUFFORCE (8 MiB, the Snooper default, dropped 22%% here)")
    ap.add_argument("--prefix", default="pps", help="lab prefix (default pps)")
    ap.add_argument("--root", help="lab state directory (default /var/tmp/pairproxy-snoop-lab[-PREFIX])")
    ap.add_argument("--keep-lab", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.cmd == "snoop":
        snoop_main(args.ifname, args.out, args.rcvbuf)
        return
    res = bench_run(args.size_mib << 20, args.rcvbuf, args.prefix, args.root, args.keep_lab)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)


if __name__ == "__main__":
    main()
