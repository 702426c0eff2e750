"""The byte paths side by side on loopback, one proxy process per path: round trips and bulk, and the
proxy process's CPU per message and per GB.

Run as root from the repository root (sockmap needs CAP_BPF)::

    .venv/bin/python bench/bytepath_ab.py [--rounds 5] [--ops 2000] [--mib 256] [--json FILE]

Per round and path (paths interleaved: direct, sockmap, splice, ...): ``--ops`` sequential 64-byte
round trips through the proxy to an echo server (median, p99), then ``--mib`` MiB one way to a sink
(MB/s). The proxy is a ServiceProxy (proxy.dataplane) in a child process with ``byte_path`` fixed;
its CPU (utime+stime of that process) is read from /proc around each series. The kernel's work for a
relayed segment runs in softirq and kworker context, which the proxy's CPU does not include: the
system-wide CPU seconds over the series are reported too (the machine is shared: read them as a
comparison between paths in the same run, not as absolutes). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")

CHILD = r"""
import ipaddress, logging, os, sys, trio
logging.basicConfig(level=os.environ.get("AB_LOG", "WARNING"), format="%(relativeCreated)d %(message)s")
from proxy import sockmap
from proxy.config import Endpoint, ServiceConfig
from proxy.dataplane import ServiceProxy
path, port, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bp = sockmap.choose(path)
lo = ipaddress.IPv4Address("127.0.0.1")
svc = ServiceConfig(name="ab", protocol="tcp", port=port, backend=Endpoint(lo, backend), secure=False)
proxy = ServiceProxy(svc, lo, byte_path=bp)
async def main():
    proxy.open_listeners()
    print(bp.path, flush=True)
    async with trio.open_nursery() as n:
        await proxy.accept_loop(n)
trio.run(main)
"""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def system_cpu_s() -> float:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(f[3]) + int(f[4])
    return (sum(map(int, f[:8])) - idle) / CLK


def servers() -> tuple[int, int]:
    """An echo server and a sink, each a thread per connection."""
    def serve(handler) -> int:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)

        def loop():
            while True:
                c, _ = ls.accept()
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=handler, args=(c,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
        return ls.getsockname()[1]

    def echo(c):
        while d := c.recv(65536):
            c.sendall(d)
        c.close()

    def sink(c):
        while c.recv(1 << 20):
            pass
        c.sendall(b"k")
        c.close()
    return serve(echo), serve(sink)


def round_trips(port: int, ops: int) -> list[float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    out = []
    for i in range(ops + 50):
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < 64:
            got += len(s.recv(64 - got))
        if i >= 50:
            out.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return out


def bulk(port: int, mib: int) -> float:
    s = socket.create_connection(("127.0.0.1", port))
    chunk = b"y" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(mib):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b"k"
    dt = time.perf_counter() - t0
    s.close()
    return (mib << 20) / dt / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    echo_port, sink_port = servers()
    procs: dict[str, tuple[subprocess.Popen, int, int]] = {}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        for path in ("sockmap", "splice"):
            pe, ps = free_port(), free_port()
            env = dict(os.environ, PYTHONPATH=str(REPO))
            p1 = subprocess.Popen([sys.executable, "-c", CHILD, path, str(pe), str(echo_port)], env=env,
                                  stdout=subprocess.PIPE, text=True)
            p2 = subprocess.Popen([sys.executable, "-c", CHILD, path, str(ps), str(sink_port)], env=env,
                                  stdout=subprocess.PIPE, text=True)
            got = (p1.stdout.readline().strip(), p2.stdout.readline().strip())
            if got != (path, path):
                raise SystemExit(f"{path}: the proxy runs {got}")
            procs[path] = (p1, pe, ps)
            procs[path + "-bulk"] = (p2, pe, ps)
        rows: dict[str, list[dict]] = {"direct": [], "sockmap": [], "splice": []}
        for rnd in range(args.rounds):
            for path in rows:
                if path == "direct":
                    pid_rt = pid_bulk = None
                    rt_port, bulk_port = echo_port, sink_port
                else:
                    pid_rt, pid_bulk = procs[path][0].pid, procs[path + "-bulk"][0].pid
                    rt_port, bulk_port = procs[path][1], procs[path][2]
                c0, s0 = (cpu_s(pid_rt) if pid_rt else 0.0), system_cpu_s()
                lat = round_trips(rt_port, args.ops)
                c1, s1 = (cpu_s(pid_rt) if pid_rt else 0.0), system_cpu_s()
                b0, t0 = (cpu_s(pid_bulk) if pid_bulk else 0.0), system_cpu_s()
                mbs = bulk(bulk_port, args.mib)
                b1, t1 = (cpu_s(pid_bulk) if pid_bulk else 0.0), system_cpu_s()
                gb = (args.mib << 20) / 1e9
                r = {"median_us": statistics.median(lat), "p99_us": sorted(lat)[int(0.99 * len(lat))],
                     "proxy_cpu_us_per_msg": (c1 - c0) * 1e6 / (2 * args.ops),
                     "system_cpu_us_per_rt": (s1 - s0) * 1e6 / args.ops,
                     "bulk_mb_s": mbs, "proxy_cpu_s_per_gb": (b1 - b0) / gb, "system_cpu_s_per_gb": (t1 - t0) / gb}
                rows[path].append(r)
                print(f"round {rnd + 1} {path:<8} rt median {r['median_us']:.1f} us p99 {r['p99_us']:.1f} us, "
                      f"proxy CPU {r['proxy_cpu_us_per_msg']:.1f} us/msg; bulk {mbs:.0f} MB/s, proxy CPU "
                      f"{r['proxy_cpu_s_per_gb']:.2f} s/GB, system {r['system_cpu_s_per_gb']:.2f} s/GB", flush=True)
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in rows.items()}
        print(f"\nmedians over {args.rounds} rounds; load average before {' '.join(load_before)}, after {' '.join(load_after)}")
        keys = list(med["direct"])
        print(f"{'metric':<24}" + "".join(f"{p:>12}" for p in med) + f"{'sockmap/splice':>16}")
        for k in keys:
            sm, sp = med["sockmap"][k], med["splice"][k]
            print(f"{k:<24}" + "".join(f"{med[p][k]:>12.2f}" for p in med) + f"{(sm / sp if sp else 0):>16.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"rounds": rows, "medians": med, "ops": args.ops, "mib": args.mib,
                                                   "loadavg_before": load_before, "loadavg_after": load_after,
                                                   "kernel": os.uname().release}, indent=2) + "\n")
    finally:
        for p, _, _ in procs.values():
            p.terminate()
            p.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
