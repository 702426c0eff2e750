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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deploy.lab import Lab  # noqa: E402
from deploy.lab.clients import (NodeProcess, Transfer, nfs_get, nfs_put, random_file, sha256_of,  # noqa: E402
                                smb_get, smb_put)
from deploy.lab.core import LabError  # noqa: E402

HAPROXY_PORTS = (445, 2049, 111, 20048)
THROUGHPUT = ("smb_write", "smb_read", "nfs_write", "nfs_read")
LATENCY = ("smb_echo_raw", "smb_echo", "smb_open", "nfs_null")
TARGET_THROUGHPUT = 0.9
TARGET_LATENCY = 1.2
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str = "") -> None:
    print(text, flush=True)


def cpu_seconds(pid: int | None) -> float | None:
    """utime+stime of a whole process (all threads) from /proc."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy(seconds: float) -> float:
    """Percent of all CPUs busy over ``seconds`` (from /proc/stat): how loaded the machine is."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(v), v[3] + v[4]
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def smbclient_rate(output: str) -> float | None:
    """smbclient's own rate in MB/s (it prints KiB/s as 'kb/s' for put, 'KiloBytes/sec' for get)."""
    m = re.search(r"\(([\d.]+) (?:kb/s|KiloBytes/sec)\)", output)
    return float(m.group(1)) * 1024 / 1e6 if m else None


# --------------------------------------------------------------------------------------- haproxy
class HAProxy:
    """haproxy in the foreground (-db) in the lab's node-b namespace, bound to the service address b."""

    def __init__(self, lab: Lab, threads: int, splice: bool, workdir: Path):
        self.lab = lab
        self.threads = threads
        self.splice = splice
        self.name = f"haproxy-{threads}t" + ("-splice" if splice else "")
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "haproxy.cfg"
        self.log = self.dir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        a = self.lab.addresses
        lines = [
            "global",
            f"    nbthread {self.threads}",
            "    maxconn 1000",
            f"    pidfile {self.dir / 'haproxy.pid'}",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
        ]
        if self.splice:
            lines.append("    option splice-auto")
        for port in HAPROXY_PORTS:
            # like pairproxy: server side leaves from the service address; NFS ports from a
            # privileged source port (the range pairproxy uses, 665-1023) for 'secure' exports
            src = a.service_b if port == 445 else f"{a.service_b}:665-1023"
            lines += [f"listen p{port}",
                      f"    bind {a.service_b}:{port}",
                      f"    server s {a.server}:{port} source {src}"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10) -> "HAProxy":
        self.cfg.write_text(self.config())
        with open(self.log, "ab") as log:
            self.proc = self.lab.popen(self.lab.ns_b, ["haproxy", "-db", "-f", str(self.cfg)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"{self.name} exited with {self.proc.returncode}:\n"
                               + self.log.read_text(errors="replace")[-1500:])
            if set(HAPROXY_PORTS) <= listening_ports(self.lab, self.lab.ns_b, self.lab.addresses.service_b):
                return self
            time.sleep(0.05)
        self.stop()
        raise LabError(f"{self.name} did not listen on {HAPROXY_PORTS} within {timeout:g}s; log {self.log}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def listening_ports(lab: Lab, ns: str, address: str) -> set[int]:
    cp = lab.run(ns, ["ss", "-Hltn"], capture_output=True, text=True)
    ports = set()
    for line in cp.stdout.splitlines():
        f = line.split()
        if len(f) >= 4 and f[3].rsplit(":", 1)[0] == address:
            ports.add(int(f[3].rsplit(":", 1)[1]))
    return ports


# ------------------------------------------------------------------------------------- measuring
class Path_:
    """One way from the client to the servers: a host address and the proxy process (if any)."""

    def __init__(self, name: str, host: str, haproxy: HAProxy | None = None, node: NodeProcess | None = None):
        self.name, self.host, self.haproxy, self.node = name, host, haproxy, node

    @property
    def proxy_pid(self) -> int | None:
        if self.haproxy is not None:
            return self.haproxy.pid
        if self.node is not None:
            return self.node.pid
        return None


def timed_with_cpu(path: Path_, fn, *args) -> tuple[Transfer, float | None]:
    before = cpu_seconds(path.proxy_pid)
    t = fn(*args).check()
    after = cpu_seconds(path.proxy_pid)
    return t, (after - before if before is not None and after is not None else None)


def run_round(lab: Lab, path: Path_, rnd: int, src: Path, src_sha: str, work: Path, ops: int,
              verify: bool, tag: str) -> dict:
    size = src.stat().st_size
    # unique per run too: a kept lab's Ganesha still caches the names an earlier run deleted
    name = f"bench-{tag}-{path.name}-{rnd}.bin"
    out: dict = {"transfers": {}, "cpu_s": {}}
    local = work / f"back-{path.name}.bin"
    try:
        for proto, put, get in (("smb", smb_put, smb_get), ("nfs", nfs_put, nfs_get)):
            t, cpu = timed_with_cpu(path, put, lab, path.host, src, name)
            rec = {"seconds": t.seconds, "mb_s": t.mb_per_s, "proxy_cpu_s": cpu}
            if proto == "smb":
                rec["smbclient_mb_s"] = smbclient_rate(t.output)
            out["transfers"][f"{proto}_write"] = rec
            local.unlink(missing_ok=True)
            t, cpu = timed_with_cpu(path, get, lab, path.host, name, local)
            if t.size != size:
                raise LabError(f"{t.what}: got {t.size} bytes, want {size}")
            rec = {"seconds": t.seconds, "mb_s": t.mb_per_s, "proxy_cpu_s": cpu}
            if proto == "smb":
                rec["smbclient_mb_s"] = smbclient_rate(t.output)
            if verify:
                same = sha256_of(local) == src_sha
                rec["sha256_ok"] = same
                if not same:
                    raise LabError(f"{t.what}: sha256 of the copy differs from the source")
            out["transfers"][f"{proto}_read"] = rec
            local.unlink(missing_ok=True)
            # unique names, removed on the server's file system (Ganesha caches directory entries, so
            # a name is never reused after deleting it behind its back)
            base = lab.smb_share_path if proto == "smb" else lab.nfs_export_path
            (base / name).unlink(missing_ok=True)
        cp = lab.run(lab.ns_client, [sys.executable, str(REPO / "bench" / "_smallops.py"), path.host, str(ops)],
                     capture_output=True, text=True, timeout=300)
        if cp.returncode != 0:
            raise LabError(f"_smallops.py via {path.host} failed: {cp.stderr.strip()[-800:]}")
        out["latency"] = json.loads(cp.stdout)
    finally:
        local.unlink(missing_ok=True)
        for base in (lab.smb_share_path, lab.nfs_export_path):
            (base / name).unlink(missing_ok=True)
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


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


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
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("throughput.py: needs root (network namespaces)")
        return 1
    variants = parse_variants(args.haproxy)
    root = args.root or ("/var/tmp/pairproxy-bench-lab" if args.prefix == "ppb"
                         else f"/var/tmp/pairproxy-bench-lab-{args.prefix}")
    signal.signal(signal.SIGTERM, _terminate)

    lab = Lab(prefix=args.prefix, root=root)
    work = Path(tempfile.mkdtemp(prefix="pairproxy-bench-", dir=args.workdir))
    node: NodeProcess | None = None
    haproxies = [HAProxy(lab, t, s, work) for t, s in variants]
    addr_b_added = False
    started = datetime.datetime.now().astimezone()
    try:
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        busy_before = system_busy(3.0)
        say(f"before the run: load average {' '.join(load_before)}, CPUs {busy_before:.0f}% busy over 3 s "
            f"(anything else on this machine shares the {os.cpu_count()} CPUs with the lab)")
        say(f"lab {lab.prefix} ({root}): up ...")
        lab.up()
        a = lab.addresses
        say(f"source file: {args.size_mib} MiB random in {work}")
        src = random_file(work / "src.bin", args.size_mib << 20)
        src_sha = sha256_of(src)

        node = NodeProcess(lab, "a", log=work / "node-a.log").start()
        say(f"pairproxy node a: pid {node.pid} serving {a.service_a}")
        cp = subprocess.run(["ip", "-n", lab.ns_b, "address", "add", f"{a.service_b}/{a.prefixlen}", "dev", "eth0"],
                            capture_output=True, text=True)
        if cp.returncode != 0:
            raise LabError(f"cannot add {a.service_b} in {lab.ns_b}: {cp.stderr.strip()}")
        addr_b_added = True

        paths = [Path_("direct", a.server), Path_("pairproxy", a.service_a, node=node)]
        paths += [Path_(h.name, a.service_b, haproxy=h) for h in haproxies]
        results: dict[str, list[dict]] = {p.name: [] for p in paths}
        tag = os.urandom(4).hex()
        for rnd in range(args.rounds):
            for path in paths:
                if path.haproxy is not None:
                    path.haproxy.start()
                try:
                    t0 = time.monotonic()
                    r = run_round(lab, path, rnd, src, src_sha, work, args.ops, verify=(rnd == 0), tag=tag)
                finally:
                    if path.haproxy is not None:
                        path.haproxy.stop()
                results[path.name].append(r)
                tr = r["transfers"]
                lat = r["latency"]
                say(f"round {rnd + 1}/{args.rounds} {path.name:<18} "
                    + " ".join(f"{m}={tr[m]['mb_s']:.0f}" for m in THROUGHPUT) + " MB/s  "
                    + " ".join(f"{m}={lat[m]['median_us']:.0f}" for m in LATENCY) + " us"
                    + (" sha256 ok" if rnd == 0 else "") + f"  ({time.monotonic() - t0:.1f} s)")

        node_status = node.status()
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        busy_after = system_busy(3.0)
        say(f"after the run: load average {' '.join(load_after)}, CPUs {busy_after:.0f}% busy over 3 s")
        table = medians(results)
        ref = haproxies[0].name
        say()
        say(f"medians over {args.rounds} round(s), {args.size_mib} MiB transfers, {args.ops} small ops per series; "
            f"targets against {ref}")
        verdicts = print_table(table, ref)
        say()
        say("targets: " + ", ".join(f"{v['metric']} {v['ratio']:.2f}x {'PASS' if v['pass'] else 'MISS'}"
                                    for v in verdicts))
        if args.json:
            doc = {
                "date": started.isoformat(timespec="seconds"),
                "command": " ".join([".venv/bin/python", "bench/throughput.py", *sys.argv[1:]]),
                "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()},
                "git_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                             text=True).stdout.strip(),
                "loadavg_before": load_before, "loadavg_after": load_after,
                "cpu_busy_pct_before": busy_before, "cpu_busy_pct_after": busy_after,
                "size_mib": args.size_mib, "rounds": args.rounds, "ops": args.ops,
                "reference": ref, "medians": table, "targets": verdicts, "rounds_raw": results,
                "pairproxy_status": node_status,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            say(f"numbers written to {args.json}")
        return 0
    except (LabError, subprocess.TimeoutExpired) as exc:
        say(f"throughput.py: {exc}")
        return 1
    except KeyboardInterrupt:
        say("throughput.py: interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for h in haproxies:
            h.stop()
        if node is not None:
            node.stop()
        if addr_b_added:
            subprocess.run(["ip", "-n", lab.ns_b, "address", "del", f"{lab.addresses.service_b}/"
                            f"{lab.addresses.prefixlen}", "dev", "eth0"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_lab:
            try:
                lab.down()
            except LabError as exc:
                say(f"throughput.py: lab down: {exc}")
        else:
            say(f"lab {lab.prefix} left up (--keep-lab); tear down: pairproxy lab down --prefix {lab.prefix}")


if __name__ == "__main__":
    sys.exit(main())
