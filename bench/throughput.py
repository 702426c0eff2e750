"""Throughput and small-operation latency: direct vs. pairproxy vs. haproxy, in one lab, one run.

Run as root from the repository root::

    .venv/bin/python bench/throughput.py [--size-mib 256] [--rounds 3] [--ops 500] [--prefix ppb]
                                         [--haproxy 1,2,1s] [--keep-lab] [--json FILE]

Paths (same servers, measured interleaved: direct, pairproxy, haproxy..., repeated --rounds times):

* ``direct``     client -> 10.77.0.10 (smbd / ganesha in ``{prefix}-srv``)
* ``pairproxy``  client -> 10.77.0.1, ``pairproxy run -c a.toml`` in ``{prefix}-a``
* ``haproxy-Nt`` client -> 10.77.0.2, haproxy (mode tcp, nbthread N) in ``{prefix}-b``; the script adds
                 10.77.0.2/24 to eth0 there and removes it afterwards. A variant ``Ns`` (e.g. ``1s``)
                 also enables ``option splice-auto``. The *first* variant is the reference for targets.

Metrics per path and round: smbclient put/get and libnfs nfs-cp (NFSv3) put/get of a random file (MB/s =
10^6 bytes per second of the client process's wall time, connection set-up included), CPU seconds the
proxy process used during each transfer, and per-operation latency of SMB2 ECHO, SMB2 CREATE+CLOSE and
NFS NULL RPC (bench/_smallops.py, run in the client namespace). The table shows medians over rounds.

Targets (from the issue): pairproxy throughput >= 0.9 x haproxy, small-op latency <= 1.2 x haproxy.
The script is a measurement: it prints PASS/MISS and exits 0 either way (1 only if something broke).
Lab, node, haproxy, probes, copies and cleanup come from bench/driver.py (shared with the other benchmarks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from driver import (Bench, HAProxy, LabError, NodeProcess, copies, random_file, say, sha256_of,
                    small_ops, run_info, system_busy)

HAPROXY_PORTS = (445, 2049, 111, 20048)
THROUGHPUT = ("smb_write", "smb_read", "nfs_write", "nfs_read")
LATENCY = ("smb_echo_raw", "smb_echo", "smb_open", "nfs_null")
TARGET_THROUGHPUT = 0.9
TARGET_LATENCY = 1.2


def smbclient_rate(output: str) -> float | None:
    """smbclient's own rate in MB/s (it prints KiB/s as 'kb/s' for put, 'KiloBytes/sec' for get)."""
    m = re.search(r"\(([\d.]+) (?:kb/s|KiloBytes/sec)\)", output)
    return float(m.group(1)) * 1024 / 1e6 if m else None


# ------------------------------------------------------------------------------------- measuring
class Route:
    """One way from the client to the servers: a host address and the proxy process (if any)."""

    def __init__(self, name: str, host: str, haproxy: HAProxy | None = None, node: NodeProcess | None = None):
        self.name, self.host, self.haproxy, self.node = name, host, haproxy, node
        self.statuses: list[dict] = []

    @property
    def proxy_pid(self) -> int | None:
        if self.haproxy is not None:
            return self.haproxy.pid
        if self.node is not None:
            return self.node.pid
        return None


def node_config(lab, work: Path, byte_path: str) -> Path:
    """Node a's lab config with ``[node] byte_path`` set."""
    text = lab.node_config_path("a").read_text()
    path = work / f"a-{byte_path}.toml"
    path.write_text(text.replace("[node]\n", f'[node]\nbyte_path = "{byte_path}"\n', 1))
    return path


def run_round(bench: Bench, route: Route, rnd: int, src: Path, ops: int, expect_sha256: str | None,
              tag: str) -> dict:
    lab = bench.lab
    # unique per run too: a kept lab's Ganesha still caches the names an earlier run deleted
    name = f"bench-{tag}-{route.name}-{rnd}.bin"
    out: dict = {"transfers": {}}
    done = copies(lab, route.host, src, name, bench.work / f"back-{route.name}.bin", proxy_pid=route.proxy_pid,
                  expect_sha256=expect_sha256)
    for metric, c in done.items():
        rec = {"seconds": c.transfer.seconds, "mb_s": c.transfer.mb_per_s, "proxy_cpu_s": c.proxy_cpu_s}
        if metric.startswith("smb"):
            rec["smbclient_mb_s"] = smbclient_rate(c.transfer.output)
        if c.sha256_ok is not None:
            rec["sha256_ok"] = c.sha256_ok
        out["transfers"][metric] = rec
    out["latency"] = small_ops(lab, route.host, ops)
    return out


# ------------------------------------------------------------------------------------- reporting
def medians(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for path, rounds in results.items():
        m: dict[str, float] = {}
        for metric in THROUGHPUT:
            m[metric] = statistics.median(r["transfers"][metric]["mb_s"] for r in rounds)
            cpus = [r["transfers"][metric]["proxy_cpu_s"] for r in rounds]
            secs = [r["transfers"][metric]["seconds"] for r in rounds]
            if all(c is not None for c in cpus):
                m[f"{metric}_cpu_pct"] = statistics.median(100 * c / s for c, s in zip(cpus, secs))
                gbs = [r["transfers"][metric]["mb_s"] * r["transfers"][metric]["seconds"] / 1000 for r in rounds]
                m[f"{metric}_cpu_s_per_gb"] = statistics.median(c / g for c, g in zip(cpus, gbs))
            if metric.startswith("smb"):
                m[f"{metric}_smbclient"] = statistics.median(r["transfers"][metric]["smbclient_mb_s"] or 0
                                                             for r in rounds)
        for metric in LATENCY:
            m[f"{metric}_median"] = statistics.median(r["latency"][metric]["median_us"] for r in rounds)
            m[f"{metric}_p99"] = statistics.median(r["latency"][metric]["p99_us"] for r in rounds)
        table[path] = m
    return table


def print_table(table: dict[str, dict[str, float]], ref: str) -> list[dict]:
    """The medians, ratios of pairproxy to every other path, and the targets (against ``ref``)."""
    paths = list(table)
    others = [p for p in paths if p != "pairproxy"]
    others = [ref] + [p for p in others if p != ref]
    rows = [(f"{m} MB/s", m, "thr") for m in THROUGHPUT]
    rows += [(f"{m} MB/s (smbclient rate)", f"{m}_smbclient", None) for m in THROUGHPUT if m.startswith("smb")]
    rows += [(f"{m} med us", f"{m}_median", "lat") for m in LATENCY]
    rows += [(f"{m} p99 us", f"{m}_p99", None) for m in LATENCY]
    rows += [(f"{m} proxy CPU %", f"{m}_cpu_pct", None) for m in THROUGHPUT]
    rows += [(f"{m} proxy CPU s/GB", f"{m}_cpu_s_per_gb", None) for m in THROUGHPUT]
    cw = [max(len(p), 6) + 2 for p in paths]
    rw = [len(f"pp/{o}") + 2 for o in others]
    say(f"{'metric':<28}" + "".join(f"{p:>{w}}" for p, w in zip(paths, cw))
        + "".join(f"{'pp/' + o:>{w}}" for o, w in zip(others, rw)) + f"  target vs {ref}")
    say("-" * (28 + sum(cw) + sum(rw) + 24))
    verdicts = []
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for label, key, kind in rows:
        vals = [table[p].get(key) for p in paths]
        pp = table["pairproxy"].get(key)
        ratios = [pp / table[o][key] if pp is not None and table[o].get(key) else None for o in others]
        r_ref = ratios[0]
        target = ""
        if kind == "thr" and r_ref is not None:
            ok = r_ref >= TARGET_THROUGHPUT
            target = f">= {TARGET_THROUGHPUT}x {'PASS' if ok else 'MISS'}"
            verdicts.append({"metric": key, "ratio": r_ref, "target": f">={TARGET_THROUGHPUT}", "pass": ok})
        elif kind == "lat" and r_ref is not None:
            ok = r_ref <= TARGET_LATENCY
            target = f"<= {TARGET_LATENCY}x {'PASS' if ok else 'MISS'}"
            verdicts.append({"metric": key, "ratio": r_ref, "target": f"<={TARGET_LATENCY}", "pass": ok})
        say(f"{label:<28}" + "".join(f"{fmt(v, '.1f'):>{w}}" for v, w in zip(vals, cw))
            + "".join(f"{fmt(r, '.2f'):>{w}}" for r, w in zip(ratios, rw)) + f"  {target}")
    return verdicts


# ------------------------------------------------------------------------------------------ main
def parse_variants(spec: str) -> list[tuple[int, bool]]:
    out = []
    for tok in spec.split(","):
        tok = tok.strip()
        m = re.fullmatch(r"(\d+)(s?)", tok)
        if not m or int(m.group(1)) < 1:
            raise SystemExit(f"--haproxy: bad variant {tok!r} (want e.g. 1,2,1s)")
        out.append((int(m.group(1)), bool(m.group(2))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of the large-transfer file (MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", type=int, default=500, help="small operations per series")
    ap.add_argument("--prefix", default="ppb", help="lab prefix (default ppb; the tests use ppt, the demo pp)")
    ap.add_argument("--root", help="lab state directory (default /var/tmp/pairproxy-bench-lab[-PREFIX])")
    ap.add_argument("--haproxy", default="1,2,1s",
                    help="haproxy variants: thread counts, suffix s = option splice-auto; first is the "
                         "reference for the targets (default 1,2,1s)")
    ap.add_argument("--workdir", default="/dev/shm", help="where the source and copied files live (tmpfs)")
    ap.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end")
    ap.add_argument("--byte-paths", default="auto,splice",
                    help="pairproxy's [node] byte_path per pairproxy column: the first is 'pairproxy' (the one "
                         "the targets judge), others 'pp-PATH' (default auto,splice)")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("throughput.py: needs root (network namespaces)")
        return 1
    variants = parse_variants(args.haproxy)
    started = datetime.datetime.now().astimezone()
    with Bench("bench", args.prefix, default_prefix="ppb", root=args.root, keep_lab=args.keep_lab,
               workdir=args.workdir) as bench:
        try:
            load_before = Path("/proc/loadavg").read_text().split()[:3]
            busy_before = system_busy(3.0)
            say(f"before the run: load average {' '.join(load_before)}, CPUs {busy_before:.0f}% busy over 3 s "
                f"(anything else on this machine shares the {os.cpu_count()} CPUs with the lab)")
            lab = bench.up()
            a = lab.addresses
            say(f"source file: {args.size_mib} MiB random in {bench.work}")
            src = random_file(bench.work / "src.bin", args.size_mib << 20)
            src_sha = sha256_of(src)

            byte_paths = [p.strip() for p in args.byte_paths.split(",") if p.strip()]
            nodes = [NodeProcess(lab, "a", config=node_config(lab, bench.work, bp), log=bench.work / f"node-a-{bp}.log")
                     for bp in byte_paths]
            bench.add_address(lab.ns_b, a.service_b)
            haproxies = [HAProxy(lab, lab.ns_b, a.service_b, HAPROXY_PORTS, bench.work, threads=t, splice=sp,
                                 source=a.service_b) for t, sp in variants]
            routes = [Route("direct", a.server)]
            routes += [Route("pairproxy" if i == 0 else f"pp-{bp}", a.service_a, node=n)
                       for i, (bp, n) in enumerate(zip(byte_paths, nodes))]
            routes += [Route(h.name, a.service_b, haproxy=h) for h in haproxies]
            results: dict[str, list[dict]] = {r.name: [] for r in routes}
            tag = os.urandom(4).hex()
            for rnd in range(args.rounds):
                for route in routes:
                    if route.haproxy is not None:
                        bench.started(route.haproxy).start()
                    if route.node is not None:
                        bench.started(route.node).start()
                    try:
                        t0 = time.monotonic()
                        r = run_round(bench, route, rnd, src, args.ops, src_sha if rnd == 0 else None, tag)
                        if route.node is not None:
                            st = route.node.status()
                            r["byte_path"] = st.get("byte_path")
                            r["services"] = st.get("services")
                    finally:
                        if route.haproxy is not None:
                            bench.stop(route.haproxy)
                        if route.node is not None:
                            bench.stop(route.node)
                    results[route.name].append(r)
                    if route.node is not None:
                        say(f"  {route.name}: byte path {r.get('byte_path')}")
                    tr = r["transfers"]
                    lat = r["latency"]
                    say(f"round {rnd + 1}/{args.rounds} {route.name:<18} "
                        + " ".join(f"{m}={tr[m]['mb_s']:.0f}" for m in THROUGHPUT) + " MB/s  "
                        + " ".join(f"{m}={lat[m]['median_us']:.0f}" for m in LATENCY) + " us"
                        + (" sha256 ok" if rnd == 0 else "") + f"  ({time.monotonic() - t0:.1f} s)")

            node_status = {r.name: r.statuses for r in routes if r.node is not None}
            load_after = Path("/proc/loadavg").read_text().split()[:3]
            busy_after = system_busy(3.0)
            say(f"after the run: load average {' '.join(load_after)}, CPUs {busy_after:.0f}% busy over 3 s")
            table = medians(results)
            ref = haproxies[0].name
            say()
            say(f"medians over {args.rounds} round(s), {args.size_mib} MiB transfers, {args.ops} small ops per "
                f"series; targets against {ref}")
            verdicts = print_table(table, ref)
            say()
            say("targets: " + ", ".join(f"{v['metric']} {v['ratio']:.2f}x {'PASS' if v['pass'] else 'MISS'}"
                                        for v in verdicts))
            if args.json:
                doc = run_info("throughput.py", started)
                doc.update({
                    "loadavg_before": load_before, "loadavg_after": load_after,
                    "cpu_busy_pct_before": busy_before, "cpu_busy_pct_after": busy_after,
                    "size_mib": args.size_mib, "rounds": args.rounds, "ops": args.ops,
                    "reference": ref, "medians": table, "targets": verdicts, "rounds_raw": results,
                    "pairproxy_status": node_status,
                })
                Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
                say(f"numbers written to {args.json}")
            return 0
        except (LabError, subprocess.TimeoutExpired) as exc:
            say(f"throughput.py: {exc}")
            return 1
        except KeyboardInterrupt:
            say("throughput.py: interrupted; cleaning up")
            return 130


if __name__ == "__main__":
    sys.exit(main())
