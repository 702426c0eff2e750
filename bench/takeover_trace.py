"""Where a stateless takeover's time goes, on the wire (issue 12): packet captures around a death.

    sudo .venv/bin/python bench/takeover_trace.py [--runs 5] [--heartbeat 10] [--dead-after 40]
        [--mode stateless] [--prefix ptt] [--json FILE] [--keep-work]

bench/failover.py measures death -> first new client answered and the node's own view (silence,
address up, first client accepted); between "address up" and "first client accepted" it saw 11-12 ms
at 10/40, where keepalived+haproxy answers within a millisecond of the address appearing. This script
runs the same death (both links down, then SIGKILL) with ``tcpdump`` on the client's and on node b's
interface and the failover probe (bench/_failprobe.py) running, then puts on one time line, in ms after
the death:

* b's verdict, its address up and its first accepted client (b's log lines, wall clock ms);
* the first gratuitous ARP for a's address with b's MAC, as the client sees it;
* every SYN the client sends to a's address after the death: when, to which MAC, and when (if) b's
  interface saw it; the first SYN-ACK from a's address (and its source MAC);
* the first answer from a's address that carries data (SMB2 NEGOTIATE response or RPC reply).

Clocks: tcpdump stamps with CLOCK_REALTIME; the death is recorded with both clocks.

``--sched``: also ``perf sched record`` (system-wide, CLOCK_MONOTONIC) across the death, and per run who had
the 2 CPUs from the death to the first data reply and from b's address up to it: milliseconds run per
process (b's node, each of its children, the servers, the client probe, kernel threads), and how long b's
node process waited runnable for a CPU (perf's "sch delay") in those windows.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from driver import Bench, NodeProcess, PairTimings, Probe, run_info, say, serving, standing_by
from failover import MACHINE_LINKS

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from scapy.utils import PcapReader  # noqa: E402

LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ")
EVENTS = {"verdict": "takeover of", "address_up": "serving 10.77.0.1", "first_client": "first client served"}


def log_events(log: Path, day: datetime.date, after: float) -> dict[str, float]:
    """Wall-clock times (epoch s) of b's takeover log lines after ``after``."""
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        h, mi, s, ms_ = map(int, m.groups())
        t = datetime.datetime.combine(day, datetime.time(h, mi, s, ms_ * 1000)).timestamp()
        if t < after - 0.001:
            continue
        for name, text in EVENTS.items():
            if name not in out and text in line:
                out[name] = t
    return out


def packets(path: Path) -> list:
    try:
        with PcapReader(str(path)) as r:
            return list(r)
    except FileNotFoundError:
        return []


def timeline(client_pcap: Path, b_pcap: Path, host: str, died: float, macs: dict[str, str]) -> dict:
    rel = lambda t: round((float(t) - died) * 1000, 2)  # noqa: E731
    out: dict = {"syns": [], "garp": None, "first_synack": None, "first_data_reply": None}
    b_syns = {}
    for p in packets(b_pcap):
        if p.haslayer(TCP) and p[IP].dst == host and p[TCP].flags & 0x02 and not p[TCP].flags & 0x10 \
                and float(p.time) >= died:
            b_syns.setdefault((p[TCP].sport, p[TCP].seq), float(p.time))
    for p in packets(client_pcap):
        if float(p.time) < died:
            continue
        if p.haslayer(ARP) and p[ARP].psrc == host and out["garp"] is None and \
                macs.get(p[ARP].hwsrc.lower()) == "b":
            out["garp"] = {"ms": rel(p.time), "op": int(p[ARP].op)}
        if not p.haslayer(TCP):
            continue
        t = p[TCP]
        if p[IP].dst == host and t.flags & 0x02 and not t.flags & 0x10:
            seen = b_syns.get((t.sport, t.seq))
            out["syns"].append({"ms": rel(p.time), "port": t.dport, "to": macs.get(p[Ether].dst.lower(), p[Ether].dst),
                                "at_b_ms": rel(seen) if seen else None})
        elif p[IP].src == host and t.flags & 0x12 == 0x12 and out["first_synack"] is None:
            out["first_synack"] = {"ms": rel(p.time), "from": macs.get(p[Ether].src.lower(), p[Ether].src),
                                   "port": t.sport}
        elif p[IP].src == host and len(bytes(t.payload)) > 0 and out["first_data_reply"] is None:
            out["first_data_reply"] = {"ms": rel(p.time), "port": t.sport}
    return out


#: one line of ``perf sched timehist``: time, [cpu], task[tid] or task[tid/pid], wait, sch delay, run (ms)
TIMEHIST = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.*?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def process_roles(node_pid: int, named: dict[int, str]) -> dict[int, str]:
    """pid -> a name for the ``--sched`` summary: b's node process and its children, the ``named`` ones
    (this script, the client probe) and their children; others go by their command."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, ppid, args = (line.split(None, 2) + [""])[:3]
        module = re.search(r"-m (\S+)", args)  # a node's children: python -m proxy.observer, proxy.heartbeat
        comm = module[1] if module else Path(args.split()[0]).name if args else "?"
        procs[int(pid)] = (int(ppid), comm)
    roles = dict(named)
    for pid, (ppid, comm) in procs.items():
        if pid == node_pid:
            roles[pid] = "b node"
        elif ppid == node_pid:
            roles[pid] = f"b's {comm}"
        elif ppid in named:
            roles[pid] = f"{named[ppid]}'s child {comm}"
    return roles


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def sched_summary(path: Path, windows: dict[str, tuple[float, float]], roles: dict[int, str],
                  node_pid: int) -> dict:
    """Per window (monotonic seconds): ms run per process group, and b's node's ms runnable but waiting."""
    text = subprocess.run(["perf", "sched", "timehist", "-i", str(path)], capture_output=True, text=True).stdout
    ran = {w: collections.Counter() for w in windows}
    waited = dict.fromkeys(windows, 0.0)
    for line in text.splitlines():
        m = TIMEHIST.match(line)
        if not m:
            continue
        t, comm, tid, pid = float(m[1]), m[3].strip(), int(m[4]), int(m[5] or m[4])
        delay, run = float(m[7]) / 1000, float(m[8]) / 1000
        if pid == 0 or comm.startswith("<idle>") or comm.startswith("swapper"):
            continue
        name = roles.get(pid) or roles.get(tid) or re.sub(r"[/:]\d+.*$", "", comm)
        for w, (start, end) in windows.items():
            ran[w][name] += overlap(t - run, t, start, end) * 1000
            if pid == node_pid:
                waited[w] += overlap(t - run - delay, t - run, start, end) * 1000
    return {w: {"window_ms": round((end - start) * 1000, 1), "b_node_waited_ms": round(waited[w], 2),
                "ran_ms": {k: round(v, 2) for k, v in ran[w].most_common(12) if v >= 0.05}}
            for w, (start, end) in windows.items()}


def one_run(bench: Bench, i: int, mode: str, timings: PairTimings, sched: bool = False) -> dict:
    lab, work = bench.lab, bench.work
    host = lab.addresses.service_a
    cfg = bench.pair_configs(mode, timings)
    logs = {n: work / f"trace-{n}-{i}.log" for n in ("a", "b")}
    bench.flood(mode == "stateful")
    lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
    a = bench.started(NodeProcess(lab, "a", config=cfg["a"], log=logs["a"]))
    b = bench.started(NodeProcess(lab, "b", config=cfg["b"], log=logs["b"]))
    caps = {"client": work / f"client-{i}.pcap", "b": work / f"b-{i}.pcap"}
    sched_file = work / f"sched-{i}.data"
    dumps = []
    recorder = None
    roles: dict[int, str] = {}
    try:
        b.start(60)
        a.start(60)
        a.wait_for(serving(host, "a"), 15, "a serving its address")
        b.wait_for(lambda s: standing_by(s) and (s["pair"]["link"].get("rtt_ms") or {}).get("count", 0) > 5,
                   10, "b standing by, link up")
        for name, ns in (("client", lab.ns_client), ("b", lab.ns_b)):
            dumps.append(lab.popen(ns, ["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-s", "200", "-w", str(caps[name]),
                                        f"arp or host {host}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        probe = bench.started(Probe(lab, host)).start()
        probe.wait_ok(10, timeout=30)
        if sched:
            roles = process_roles(b.pid, {os.getpid(): "this script (polls b's status)",
                                          probe.proc.pid: "client probe", a.pid: "a node"})
            recorder = subprocess.Popen(["perf", "sched", "record", "-k", "CLOCK_MONOTONIC", "-a", "-o",
                                         str(sched_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # perf's start-up (reading every task's state) is not part of the death
        time.sleep(0.2)
        died = a.kill_hard(link_down=True, links=MACHINE_LINKS)
        died_wall = time.time() - (time.monotonic() - died)
        b.wait_for(serving(host, "b"), 10, "b holding a's address", tables=False)
        probe.wait_ok(10, after=died, timeout=30)
        time.sleep(0.2)
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(30)
        recs = bench.stop(probe)
        st = b.status()["pair"]["takeovers"][-1]
    finally:
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
            recorder.wait(5)
        time.sleep(0.3)  # what the kernel holds for tcpdump reaches the file
        for d in dumps:
            d.terminate()
            d.wait(5)
        bench.stop_all()
        lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
    first_ok = {p: next((round((r["e"] - died) * 1000, 1) for r in sorted(recs, key=lambda r: r["e"])
                         if r["p"] == p and r["ok"] and r["s"] >= died), None) for p in ("smb", "nfs")}
    macs = {"02:77:00:00:00:0a": "a", "02:77:00:00:00:0b": "b"}
    ev = log_events(logs["b"], datetime.date.today(), died_wall - 0.5)
    out = {"run": i, "first_ok_ms": first_ok,
           "b_log_ms": {k: round((v - died_wall) * 1000, 1) for k, v in ev.items()},
           "b_status": {k: st.get(k) for k in ("silence_ms", "address_moved_ms", "first_client_ms")},
           "wire": timeline(caps["client"], caps["b"], host, died_wall, macs)}
    if sched:
        reply = (out["wire"]["first_data_reply"] or {}).get("ms")
        up = out["b_log_ms"].get("address_up")
        windows = {}
        if reply is not None:
            windows["death_to_first_reply"] = (died, died + reply / 1000)
            if up is not None and up < reply:
                windows["address_up_to_first_reply"] = (died + up / 1000, died + reply / 1000)
        out["sched"] = sched_summary(sched_file, windows, roles, b.pid) if windows else None
        sched_file.unlink(missing_ok=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", default="stateless", choices=("stateless", "stateful"))
    ap.add_argument("--heartbeat", type=float, default=10.0, help="ms")
    ap.add_argument("--dead-after", type=float, default=40.0, help="ms")
    ap.add_argument("--prefix", default="ptt")
    ap.add_argument("--json")
    ap.add_argument("--keep-work", action="store_true", help="keep the captures and logs (path printed)")
    ap.add_argument("--sched", action="store_true", help="also perf sched record across the death: who ran "
                    "on the CPUs until the first data reply (needs perf)")
    args = ap.parse_args()
    timings = PairTimings.from_ms(args.heartbeat, args.dead_after)
    runs = []
    started = datetime.datetime.now().astimezone()
    with Bench("takeover_trace", args.prefix, default_prefix="ptt", keep_work=args.keep_work) as bench:
        bench.up()
        say(f"captures and logs in {bench.work}")
        for i in range(1, args.runs + 1):
            r = one_run(bench, i, args.mode, timings, sched=args.sched)
            runs.append(r)
            w = r["wire"]
            syns = w["syns"]
            say(f"run {i}: first ok {r['first_ok_ms']}; b log {r['b_log_ms']}; b status {r['b_status']}")
            say(f"   garp {w['garp']}; first syn-ack {w['first_synack']}; first data reply {w['first_data_reply']}")
            after_up = [s for s in syns if s["ms"] >= (r["b_log_ms"].get("address_up") or 0) - 5]
            say(f"   SYNs after the death: {len(syns)}; around/after address up: {after_up[:8]}")
            for w, summary in (r.get("sched") or {}).items():
                say(f"   {w}: {summary}")
    if args.json:
        Path(args.json).write_text(json.dumps({**run_info("takeover_trace.py", started), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
