"""Soak benchmark (issue 8): many failover and hand-back cycles under continuous SMB and NFS writes.

    sudo .venv/bin/python bench/soak.py [--cycles 200] [--modes stateless,stateful]
        [--heartbeat 10] [--dead-after 40] [--size 131072] [--writer-interval-ms 50]
        [--max-minutes-per-mode M] [--prefix r3] [--json FILE] [--keep-lab] [--keep-logs]

Per mode: a fresh pair (the lab's pair configs with ``--heartbeat``/``--dead-after`` as config values;
default the lab's 20/100 ms; the issue's quick check used 10/40), the service bridge in flood mode for
``stateful`` (as bench/failover.py), then in the client namespace, running through every cycle:

* writers (bench/_soakwriter.py): an SMB writer (smbprotocol, one session, reconnect on error) and an
  NFS writer (libnfs ``nfs-cp``, NFSv3) through **each** service address (a's 10.77.0.1, b's
  10.77.0.2): write a file of random bytes, read it back, compare sha256. After each cycle this script
  reads every file a writer reported as verified straight from the server's folder, compares its
  sha256 again and deletes it. Lost/corrupted = a verified file whose read-back or on-disk copy
  differs or is missing; a failed (and retried) operation is counted as an error, not a loss.
* around each death and each hand-back (not in between: its smbd forks cost a fair share of 2
  cores), the failover probe (bench/_failprobe.py) on a's address: new SMB2 NEGOTIATE and NFS NULL
  connections every 20 ms, every 5 ms while anything looks wrong;
* the ARP watch (bench/_arpwatch.py): "who has" both service addresses every ``--arp-interval-ms``;
  replies from two MACs within one sample window = two hosts answering ARP for one address.

One cycle: node a dies (service link down, then SIGKILL: a dead machine, as ``NodeProcess.kill_hard``
and bench/failover.py); **takeover** = death -> end of the first probe operation started after the death
that succeeded, per protocol (b's own view too: silence, address moved, first client); a comes back
(``pairproxy cleanup`` as a reboot would, link up, ``pairproxy run``); **hand-back** = restart -> a
serves its address and b stands by again, plus the longest gap between successful probe operations
meanwhile; then the checks: b's takeover count up by exactly one, a never took over, and the leak
counts (macvlans and IPv4 addresses in each node namespace, open descriptors, trio tasks
(``status.tasks``) and child processes of node b, which lives through all cycles; a's after each
restart) equal to what they were before cycle 1.

Output: a line per cycle, then per mode percentiles of cycles 1-20 vs the last 20 and totals; ``--json``
writes everything (per cycle, with b's status sizes over the cycles to show what grows).
Always stops what it started and tears the lab down (unless ``--keep-lab``), also on errors and Ctrl-C.
Exit code 0 whether the targets pass or miss (a measurement); 1 only if something broke.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from driver import (PROTOS, Bench, LabError, NodeProcess, PairTimings, Probe, ms, run_info, say, serving,
                    standing_by, system_busy, wait_until)
from driver import JsonLinesProcess

BENCH = Path(__file__).resolve().parent
WRITER = BENCH / "_soakwriter.py"
ARPWATCH = BENCH / "_arpwatch.py"
MACS = {"02:77:00:00:00:0a": "a", "02:77:00:00:00:0b": "b"}
#: how long a node may take to start: a Python start took up to 26 s at load 20-48 (other helpers' work)
START_S = 90.0
#: sha256 -> which writer's file had these bytes (to name the source of a wrong read-back)
SOAK_SHAS: dict[str, str] = {}


# ------------------------------------------------------------------------------ client processes
class Writer(JsonLinesProcess):
    """bench/_soakwriter.py: one JSON line per write+read-back operation."""

    def __init__(self, bench: Bench, proto: str, host: str, size: int, interval_ms: float) -> None:
        lab = bench.lab
        self.token = f"{proto}-{host.split('.')[-1]}-{os.urandom(3).hex()}"
        rest = ([lab.smb_share, lab.smb_user, lab.smb_password] if proto == "smb"
                else [lab.nfs_url(host, "", 3).split("?")[0]])
        super().__init__(lab, [str(WRITER), proto, host, *rest, "--token", self.token, "--size", str(size),
                               "--interval-ms", str(interval_ms)])
        self.proto, self.host = proto, host
        self.folder = lab.smb_share_path if proto == "smb" else lab.nfs_export_path
        self.ops: list[dict] = []
        self.checked = 0            # ops[:checked] had their files checked on disk
        self.disk_ok = 0
        self.disk_bad: list[str] = []

    def start(self) -> "Writer":
        self._spawn()
        return self

    def _record(self, rec: dict) -> None:
        self.ops.append(rec)
        if rec.get("ok") and rec.get("sha"):
            SOAK_SHAS[rec["sha"]] = f"{self.proto}@{self.host} {rec['name']}"

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.ops)

    def check_disk(self) -> None:
        """Each newly verified file: sha256 on the server's disk again, then delete it."""
        ops = self.snapshot()
        for rec in ops[self.checked:]:
            path = self.folder / rec["name"]
            if rec["ok"]:
                try:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:
                    digest = None
                if digest == rec["sha"]:
                    self.disk_ok += 1
                else:
                    self.disk_bad.append(rec["name"])
            elif rec.get("stage") == "compare":
                # read back differs: is the server's copy right (a read-path problem) or not (lost bytes)?
                try:
                    rec["disk_sha_matches"] = hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha"]
                except OSError as exc:
                    rec["disk_sha_matches"] = f"unreadable: {exc}"
                # whose bytes came back: any file any writer wrote this run (SOAK_SHAS: all writers)
                got = (rec.get("evidence") or {}).get("got_sha")
                rec["got_is_file_of"] = SOAK_SHAS.get(got) if got else None
            path.unlink(missing_ok=True)
        self.checked = len(ops)

    def remove_all(self) -> None:
        """The writer's files on the server, and its temporary files if it was killed mid-operation."""
        for path in [*self.folder.glob(f"soak-{self.proto}-{self.token}-*.bin"),
                     *Path("/dev/shm").glob(f"soak-{self.proto}-{self.token}.*")]:
            if ".bad-" not in path.name:   # a wrong read-back's bytes stay for a look
                path.unlink(missing_ok=True)

    def totals(self) -> dict:
        ops = self.snapshot()
        ok = [r for r in ops if r["ok"]]
        corrupt = [r for r in ops if r.get("stage") == "compare"]
        errors: dict[str, int] = {}
        for r in ops:
            if not r["ok"] and r.get("stage") != "compare":
                key = f"{r['stage']}: {r['err'].split(':')[0]}"
                errors[key] = errors.get(key, 0) + 1
        return {"proto": self.proto, "host": self.host, "ops": len(ops), "verified_ops": len(ok),
                "bytes_verified": sum(r["bytes"] for r in ok),
                "corrupted_read_back": len(corrupt), "corrupted_bytes": sum(r["bytes"] for r in corrupt),
                "corrupted_records": corrupt,
                "disk_checked_ok": self.disk_ok, "disk_bad": self.disk_bad,
                "failed_ops": sum(errors.values()), "errors": errors,
                "reconnects": max([r.get("reconnect", 0) for r in ops] + [0])}


class ArpWatch(JsonLinesProcess):
    """bench/_arpwatch.py: owner changes, conflicts, and a summary at the end."""

    def __init__(self, bench: Bench, addresses: list[str], interval_ms: float) -> None:
        lab = bench.lab
        super().__init__(lab, [str(ARPWATCH), "eth0", lab.addresses.client, *addresses,
                               "--interval-ms", str(interval_ms)])
        self.events: list[dict] = []
        self.summary: dict | None = None

    def start(self) -> "ArpWatch":
        self._spawn()
        return self

    def _record(self, rec: dict) -> None:
        if "summary" in rec:
            self.summary = rec["summary"]
        else:
            self.events.append(rec)

    def since(self, t: float) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e["t"] >= t]


# ------------------------------------------------------------------------------ kernel and process counts
def ns_objects(bench: Bench, ns: str) -> dict:
    """Macvlans and IPv4 addresses (``dev address/len``, loopback left out) in one namespace."""
    lab = bench.lab
    links = json.loads(lab.run(ns, ["ip", "-j", "-d", "link", "show"], capture_output=True, text=True).stdout or "[]")
    macvlans = sorted(f"{link['ifname']} {link.get('address')}" for link in links
                      if link.get("linkinfo", {}).get("info_kind") == "macvlan")
    addrs = json.loads(lab.run(ns, ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True).stdout or "[]")
    addresses = sorted(f"{i['ifname']} {x['local']}/{x['prefixlen']}" for i in addrs if i["ifname"] != "lo"
                       for x in i.get("addr_info", []))
    return {"macvlans": macvlans, "addresses": addresses}


def holds(bench: Bench, ns: str, address: str) -> bool:
    """``address`` is on an interface in ``ns`` (seen from the kernel: costs the node nothing)."""
    out = bench.lab.run(ns, ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return f" {address}/" in out


def light_probe(lab, host: str, args) -> Probe:
    """bench/_failprobe.py at a gentler rate than failover.py's: on 2 shared cores its default
    (every 5 ms while troubled, 40 in flight) made smbd's listen queue overflow (the node logged
    "backend unavailable: no answer within 3s" and SMB clients stalled for seconds after a hand-back)."""
    probe = Probe(lab, host)
    probe.argv += ["--interval-ms", str(args.probe_interval_ms), "--max-inflight", str(args.probe_inflight)]
    return probe


def server_neigh(bench: Bench, address: str) -> str:
    """The file server's neighbour entry for ``address`` (which MAC its replies go to)."""
    lab = bench.lab
    out = lab.run(lab.ns_server, ["ip", "neigh", "show", address], capture_output=True, text=True).stdout.strip()
    for mac, node in MACS.items():
        out = out.replace(mac, f"{mac}({node})")
    return out


def children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return sorted(out)


def proc_numbers(pid: int) -> dict:
    """Descriptors, RSS (KiB), CPU seconds of one process; None where it is gone.

    RSS is also split as the kernel counts it: ``rss_anon_kib`` (heap: what a leak grows) and
    ``rss_file_kib`` (mapped pages, among them a snooper's TPACKET_V3 ring, which the process touches
    block by block until it has wrapped once: growth there is bounded by the ring's size)."""
    out: dict = {"fds": None, "rss_kib": None, "rss_anon_kib": None, "rss_file_kib": None, "cpu_s": None}
    fields = {"VmRSS:": "rss_kib", "RssAnon:": "rss_anon_kib", "RssFile:": "rss_file_kib"}
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = fields.get(line.split(":", 1)[0] + ":")
            if key:
                out[key] = int(line.split()[1])
        stat = Path(f"/proc/{pid}/stat").read_text()
        f = stat[stat.rindex(")") + 2:].split()
        out["cpu_s"] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return out


def by_server(conns: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in conns:
        ip = c.get("server", "?").rsplit(":", 1)[0]
        out[ip] = out.get(ip, 0) + 1
    return out


def node_numbers(node: NodeProcess) -> dict:
    """Leak-relevant numbers of one running node: its process, its children, its status sizes."""
    st = node.status()
    pid = node.pid
    kids = children(pid)
    kid_numbers = [proc_numbers(k) for k in kids]  # each child's /proc read once
    pair = st.get("pair") or {}
    sync = pair.get("state_sync") or {}
    out = {"pid": pid, **proc_numbers(pid), "tasks": st.get("tasks"), "children": len(kids),
           "children_cpu_s": round(sum(n["cpu_s"] or 0 for n in kid_numbers), 2),
           "children_rss_kib": sum(n["rss_kib"] or 0 for n in kid_numbers),
           "children_rss_anon_kib": sum(n["rss_anon_kib"] or 0 for n in kid_numbers),
           "children_rss_file_kib": sum(n["rss_file_kib"] or 0 for n in kid_numbers),
           "children_fds": sum(n["fds"] or 0 for n in kid_numbers),
           "connections": len(st.get("connections", [])),
           "connections_by_server": by_server(st.get("connections", [])),
           "status_bytes": len(json.dumps(st)),
           "takeovers_total": pair.get("takeovers_total"),
           "resume_records": len(pair.get("resume") or []),
           "snapshots_requested": sync.get("snapshots_requested"),
           "observer_timeouts": sync.get("observer_timeouts"),
           "connections_active": sum(s["connections_active"] for s in st.get("services", [])
                                     + pair.get("peer_services", []))}
    return out


# ------------------------------------------------------------------------------ measurements
def first_success_after(records: list[dict], proto: str, at: float) -> float | None:
    ends = [r["e"] for r in records if r["p"] == proto and r["ok"] and r["s"] >= at]
    return min(ends) - at if ends else None


def longest_gap(records: list[dict], proto: str, start: float, end: float) -> float | None:
    ends = sorted(r["e"] for r in records if r["p"] == proto and r["ok"] and start <= r["e"] <= end)
    return max((b - a for a, b in zip(ends, ends[1:])), default=None)


def pct(values: list[float | None]) -> dict:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"n": 0}

    def q(p: float) -> float:
        return vals[min(len(vals) - 1, max(0, round(p / 100 * (len(vals) - 1))))]
    return {"n": len(vals), "min": vals[0], "p50": statistics.median(vals), "p90": q(90), "p99": q(99),
            "max": vals[-1], "missing": len(values) - len(vals)}


# ------------------------------------------------------------------------------ one mode
def run_mode(bench: Bench, mode: str, args, out: dict) -> dict:
    """One mode's cycles, recorded into ``out`` as they happen (so a failure keeps what was measured)."""
    lab = bench.lab
    host_a, host_b = lab.addresses.service_a, lab.addresses.service_b
    cfg = bench.pair_configs(mode, PairTimings.from_ms(args.heartbeat, args.dead_after))
    logs = {n: bench.work / f"{mode}-{n}.log" for n in ("a", "b")}
    bench.flood(mode == "stateful")
    lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"], check=True)
    out.update({"mode": mode, "config": {n: str(p) for n, p in cfg.items()}, "cycles": []})
    a = bench.started(NodeProcess(lab, "a", config=cfg["a"], log=logs["a"]))
    b = bench.started(NodeProcess(lab, "b", config=cfg["b"], log=logs["b"]))
    writers: list[Writer] = []
    t_mode = time.monotonic()
    try:
        b.start(timeout=START_S)
        a.start(timeout=START_S)
        a.wait_for(serving(host_a, "a"), START_S, "a serving its address")
        b.wait_for(serving(host_b, "b"), 30, "b serving its address")
        b.wait_for(standing_by, 30, "b standing by, link up")
        if mode == "stateful":
            b.wait_for(lambda s: s["pair"].get("state_sync", {}).get("in_sync"), 15, "b's view of a in sync")
        arp = bench.started(ArpWatch(bench, [host_a, host_b], args.arp_interval_ms)).start()
        for proto in PROTOS:
            for host in (host_a, host_b):
                writers.append(bench.started(Writer(bench, proto, host, args.size, args.writer_interval_ms)).start())
        time.sleep(1.0)
        for w in writers:   # a loaded machine (load 10-14 from other work) needs up to ~10 s for the first
            first = time.monotonic()
            while not any(r["ok"] for r in w.snapshot()) and time.monotonic() - first < 20:
                time.sleep(0.5)
            if not any(r["ok"] for r in w.snapshot()):
                raise LabError(f"writer {w.proto} via {w.host}: no verified operation before cycle 1: "
                               f"{w.snapshot()[-1:] or w._stderr()}")
        base = {"a": ns_objects(bench, lab.ns_a), "b": ns_objects(bench, lab.ns_b),
                "node_b": node_numbers(b), "node_a": node_numbers(a)}
        out["baseline"] = base
        say(f"[{mode}] baseline: a {base['a']}, b {base['b']}; b fds {base['node_b']['fds']} tasks "
            f"{base['node_b']['tasks']} children {base['node_b']['children']}; a fds {base['node_a']['fds']} "
            f"tasks {base['node_a']['tasks']}")
        takeovers_b = base["node_b"]["takeovers_total"]
        deadline = t_mode + args.max_minutes_per_mode * 60 if args.max_minutes_per_mode else None
        for n in range(1, args.cycles + 1):
            if deadline and time.monotonic() > deadline:
                say(f"[{mode}] time budget of {args.max_minutes_per_mode:g} min used: stopping after {n - 1} cycles")
                out["stopped_early"] = f"time budget: {n - 1} of {args.cycles} cycles"
                break
            c: dict = {"cycle": n}
            t0 = time.monotonic()
            errs_before = {id(w): len([r for r in w.snapshot() if not r["ok"]]) for w in writers}
            # --- death and takeover (a probe only around it: at 50 new SMB connections a second it
            # costs smbd forks, a fair share of 2 cores)
            probe = bench.started(light_probe(lab, host_a, args)).start()
            probe.wait_ok(3, timeout=60)   # flaps under load (false takeovers) can last a while
            died = a.kill_hard(link_down=True)
            if args.poll_status:
                b.wait_for(serving(host_a, "b"), 10, f"cycle {n}: b holding a's address")
            else:
                wait_until(lambda: holds(bench, lab.ns_b, host_a), 30, f"cycle {n}: b holding a's address")
            probe.wait(lambda: all(probe.oks(p, died) for p in PROTOS), 30, f"cycle {n}: a client served after the death")
            recs = bench.stop(probe)
            c["takeover_s"] = {p: first_success_after(recs, p, died) for p in PROTOS}
            st = b.status()["pair"]
            c["node"] = st["takeovers"][-1] if st["takeovers"] else None
            c["takeovers_b_new"] = st["takeovers_total"] - takeovers_b
            takeovers_b = st["takeovers_total"]
            # --- hand-back
            probe = bench.started(light_probe(lab, host_a, args)).start()
            probe.wait_ok(3, timeout=60)   # flaps under load (false takeovers) can last a while
            time.sleep(args.hold_s)
            back = time.monotonic()
            a.link_up()
            a.start(timeout=START_S)
            a_up = time.monotonic()
            a.wait_for(serving(host_a, "a"), START_S, f"cycle {n}: a serving again")
            if not args.poll_status:
                wait_until(lambda: not holds(bench, lab.ns_b, host_a), START_S, f"cycle {n}: b without a's address")
            b.wait_for(lambda s: s["pair"]["addresses"][host_a]["role"] == "standby", START_S, f"cycle {n}: b standby")
            done = time.monotonic()
            c["server_neigh_at_handback"] = server_neigh(bench, host_a)
            probe.wait(lambda: all(probe.oks(p, done) for p in PROTOS), 60, f"cycle {n}: a client served after hand-back")
            time.sleep(0.1)
            recs = bench.stop(probe)
            c["restart_to_serving_s"] = done - back
            c["a_start_s"] = a_up - back          # cleanup + link up + process start (Python, loaded machine)
            c["handback_s"] = done - a_up         # a answering -> a serving, b standby (status polls: +20 ms)
            c["handback_gap_s"] = {p: longest_gap(recs, p, back - 0.1, time.monotonic()) for p in PROTOS}
            c["handback_served_s"] = {p: first_success_after(recs, p, done) for p in PROTOS}
            # --- checks
            now_a, now_b = ns_objects(bench, lab.ns_a), ns_objects(bench, lab.ns_b)
            c["leaks"] = {k: v for k, v in (("a", now_a), ("b", now_b)) if v != base[k]}
            c["b"] = node_numbers(b)
            c["a"] = node_numbers(a)
            c["takeovers_a"] = c["a"]["takeovers_total"]
            c["arp"] = [{"ip": e["conflict"], "after_death_s": round(e["t"] - died, 4),
                         "phase": "hand-back" if e["t"] >= back else "takeover"}
                        for e in arp.since(t0) if "conflict" in e]
            c["arp_owner_changes"] = [(round(e["t"] - died, 4), e["owner"], MACS.get(e["mac"], e["mac"]))
                                      for e in arp.since(t0) if "owner" in e and e["owner"] == host_a]
            for w in writers:
                w.check_disk()
            c["writer_errors"] = {f"{w.proto}@{w.host}": len([r for r in w.snapshot() if not r["ok"]]) - errs_before[id(w)]
                                  for w in writers}
            # each failed operation, its times from the death (the restart at "back_s", both nodes
            # settled at "done_s"): which moment of the cycle a client noticed
            c["back_s"], c["done_s"] = round(back - died, 4), round(done - died, 4)
            c["failed_ops"] = [{"writer": f"{w.proto}@{w.host}", "stage": r.get("stage"), "err": r.get("err"),
                                "start_s": round(r["s"] - died, 4), "end_s": round(r["e"] - died, 4)}
                               for w in writers
                               for r in [r for r in w.snapshot() if not r["ok"]][errs_before[id(w)]:]]
            c["seconds"] = time.monotonic() - t0
            out["cycles"].append(c)
            node = c["node"] or {}
            flags = []
            if c["leaks"]:
                flags.append(f"LEAK {c['leaks']}")
            if c["arp"]:
                flags.append(f"ARP CONFLICT x{len(c['arp'])} ({c['arp'][0]} .. {c['arp'][-1]})")
            for f in c["failed_ops"][:4]:
                flags.append(f"FAILED {f['writer']} {f['stage']} {f['start_s']:+.2f}..{f['end_s']:+.2f} s: {(f['err'] or '')[-80:]}")
            if c["takeovers_b_new"] != 1 or c["takeovers_a"]:
                flags.append(f"TAKEOVERS b+{c['takeovers_b_new']} a {c['takeovers_a']}")
            say(f"[{mode}] {n:3d}: takeover smb {ms(c['takeover_s']['smb'])} nfs {ms(c['takeover_s']['nfs'])} ms "
                f"(b: silence {node.get('silence_ms')} moved {node.get('address_moved_ms')} first client "
                f"{node.get('first_client_ms')} resets {node.get('clients_reset')}/{node.get('backend_connections_reset')}), "
                f"hand-back {ms(c['restart_to_serving_s'])} ms (a up {ms(c['a_start_s'])} + {ms(c['handback_s'])}) gap smb {ms(c['handback_gap_s']['smb'])} "
                f"nfs {ms(c['handback_gap_s']['nfs'])} served smb {ms(c['handback_served_s']['smb'])} nfs "
                f"{ms(c['handback_served_s']['nfs'])} (srv neigh {c['server_neigh_at_handback']}); b fds {c['b']['fds']} tasks {c['b']['tasks']} "
                f"kids {c['b']['children']} conns {c['b']['connections_by_server']} rss {c['b']['rss_kib']} "
                f"kid-rss {c['b']['children_rss_kib']}; writer errors {sum(c['writer_errors'].values())} "
                f"{' '.join(flags)} [{c['seconds']:.1f} s]")
        # --- the end: stop the clients, totals
        out["end"] = {"a": ns_objects(bench, lab.ns_a), "b": ns_objects(bench, lab.ns_b),
                      "node_b": node_numbers(b), "node_a": node_numbers(a)}
        for w in writers:
            bench.stop(w)
            w.check_disk()
        bench.stop(arp)
        out["writers"] = [w.totals() for w in writers]
        out["arp_summary"] = arp.summary
        out["arp_events"] = arp.events[-400:]
        out["duration_s"] = time.monotonic() - t_mode
    finally:
        if writers and "writers" not in out:
            out["writers"] = [w.totals() for w in writers]
        bench.stop_all()
        for w in writers:
            w.remove_all()
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"], check=True)
    return out


# ------------------------------------------------------------------------------ summary
SERIES = {
    "takeover_smb": lambda c: c["takeover_s"]["smb"],
    "takeover_nfs": lambda c: c["takeover_s"]["nfs"],
    "b_silence": lambda c: c["node"] and c["node"]["silence_ms"] and c["node"]["silence_ms"] / 1000,
    "b_address_moved": lambda c: c["node"] and c["node"]["address_moved_ms"] and c["node"]["address_moved_ms"] / 1000,
    "b_first_client": lambda c: c["node"] and c["node"]["first_client_ms"] and c["node"]["first_client_ms"] / 1000,
    "restart_to_serving": lambda c: c["restart_to_serving_s"],
    "a_start": lambda c: c["a_start_s"],
    "handback": lambda c: c["handback_s"],
    "handback_gap_smb": lambda c: c["handback_gap_s"]["smb"],
    "handback_gap_nfs": lambda c: c["handback_gap_s"]["nfs"],
    "handback_served_smb": lambda c: c["handback_served_s"]["smb"],
    "handback_served_nfs": lambda c: c["handback_served_s"]["nfs"],
    "cycle_seconds": lambda c: c["seconds"],
}
GROWTH = ["fds", "tasks", "children", "connections", "status_bytes", "rss_kib", "rss_anon_kib", "rss_file_kib",
          "children_rss_kib", "children_rss_anon_kib", "children_rss_file_kib",
          "children_fds", "cpu_s", "children_cpu_s", "resume_records", "connections_active"]


def summarise(res: dict) -> dict:
    cyc = res.get("cycles", [])
    first, last = cyc[:20], cyc[-20:]
    s: dict = {"cycles": len(cyc)}
    for key, f in SERIES.items():
        s[key] = {"first20": pct([f(c) for c in first]), "last20": pct([f(c) for c in last]),
                  "all": pct([f(c) for c in cyc])}
    if cyc:
        s["node_b_growth"] = {k: {"before": res["baseline"]["node_b"].get(k), "after_cycle_1": cyc[0]["b"].get(k),
                                  "after_last": cyc[-1]["b"].get(k)} for k in GROWTH}
        s["node_a_after_restart"] = {k: {"first": cyc[0]["a"].get(k), "last": cyc[-1]["a"].get(k)}
                                     for k in ("fds", "tasks", "children")}
        s["clients_reset"] = {"first": (cyc[0]["node"] or {}).get("clients_reset"),
                              "last": (cyc[-1]["node"] or {}).get("clients_reset")}
    ws = res.get("writers", [])
    s["writers"] = {"bytes_verified": sum(w["bytes_verified"] for w in ws),
                    "verified_ops": sum(w["verified_ops"] for w in ws),
                    "corrupted_read_back": sum(w["corrupted_read_back"] for w in ws),
                    "disk_checked_ok": sum(w["disk_checked_ok"] for w in ws),
                    "disk_bad": sum(len(w["disk_bad"]) for w in ws),
                    "failed_ops": sum(w["failed_ops"] for w in ws),
                    "reconnects": sum(w["reconnects"] for w in ws)}
    s["cycles_with_leaks"] = [c["cycle"] for c in cyc if c["leaks"]]
    s["arp_conflicts"] = sum(len(c["arp"]) for c in cyc)
    s["arp_summary_conflicts"] = (res.get("arp_summary") or {}).get("conflicts")
    s["false_takeovers"] = sum(abs(c["takeovers_b_new"] - 1) + (c["takeovers_a"] or 0) for c in cyc)
    end, base = res.get("end"), res.get("baseline")
    if res.get("error"):
        s["error"] = res["error"]
    if end and base:
        s["leaks_at_end"] = {k: {"before": base[k], "after": end[k]} for k in ("a", "b") if base[k] != end[k]}
        s["node_b_before_after"] = {k: [base["node_b"].get(k), end["node_b"].get(k)]
                                    for k in ("fds", "tasks", "children", "rss_kib", "connections")}
    return s


def print_summary(mode: str, s: dict) -> None:
    say(f"\n[{mode}] {s['cycles']} cycles; ms: p50 / p90 / max for cycles 1-20 | last 20 | all")
    for key in SERIES:
        def cell(p: dict) -> str:
            return "-" if not p.get("n") else f"{ms(p['p50'])} / {ms(p['p90'])} / {ms(p['max'])}"
        say(f"  {key:20s} {cell(s[key]['first20']):>24s} | {cell(s[key]['last20']):>24s} | {cell(s[key]['all']):>24s}")
    w = s["writers"]
    say(f"  writers: {w['verified_ops']} files verified ({w['bytes_verified'] / 1e6:.1f} MB) read back and "
        f"{w['disk_checked_ok']} on disk; corrupted read back {w['corrupted_read_back']}, bad on disk {w['disk_bad']}; "
        f"failed ops {w['failed_ops']}, SMB reconnects {w['reconnects']}")
    say(f"  ARP conflicts {s['arp_conflicts']} (summary {s['arp_summary_conflicts']}); cycles with leaks "
        f"{s['cycles_with_leaks'] or 'none'}; false takeovers {s['false_takeovers']}")
    if "node_b_growth" in s:
        say("  node b: " + ", ".join(f"{k} {v['before']}->{v['after_cycle_1']}->{v['after_last']}"
                                     for k, v in s["node_b_growth"].items()))
    if s.get("leaks_at_end"):
        say(f"  LEAKS at end: {s['leaks_at_end']}")


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--modes", default="stateless,stateful")
    ap.add_argument("--heartbeat", type=float, default=20.0, help="ms (default 20, the lab's)")
    ap.add_argument("--dead-after", type=float, default=100.0, help="ms (default 100, the lab's)")
    ap.add_argument("--size", type=int, default=128 << 10, help="bytes per written file (default 128 KiB)")
    ap.add_argument("--writer-interval-ms", type=float, default=250.0, help="at most one op per writer per this")
    ap.add_argument("--probe-interval-ms", type=float, default=10.0, help="probe rate while troubled (default 10)")
    ap.add_argument("--probe-inflight", type=int, default=8, help="probe attempts in flight per protocol (default 8)")
    ap.add_argument("--poll-status", action="store_true",
                    help="wait for b's takeover and release by polling its status every 20 ms (as failover.py); "
                         "default: watch b's addresses with `ip addr` and ask its status once per step "
                         "(a stateful node's status carries its tables: polling it loads the node)")
    ap.add_argument("--arp-interval-ms", type=float, default=5.0)
    ap.add_argument("--hold-s", type=float, default=0.2, help="b holds a's address this long before a returns")
    ap.add_argument("--max-minutes-per-mode", type=float, default=0, help="stop a mode's cycles after this (0: no limit)")
    ap.add_argument("--prefix", default="pps")
    ap.add_argument("--root")
    ap.add_argument("--json")
    ap.add_argument("--keep-lab", action="store_true")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("stateless", "stateful") for m in modes):
        raise SystemExit(f"soak.py: --modes: stateless and/or stateful, not {args.modes!r}")
    if os.geteuid() != 0:
        say("soak.py: needs root (network namespaces)")
        return 1
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    doc = run_info("soak.py", started)
    doc["machine"]["loadavg_before"] = os.getloadavg()
    doc["machine"]["busy_percent_before"] = round(system_busy(1.0), 1)
    doc["settings"] = {k: v for k, v in vars(args).items() if k not in ("json",)}
    doc["modes"] = {}
    cpu0 = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    with Bench("soak", args.prefix, default_prefix="pps", root=args.root, keep_lab=args.keep_lab,
               keep_work=args.keep_logs or args.keep_lab) as bench:
        try:
            lab = bench.up()
            for ns in (lab.ns_a, lab.ns_b):
                bench.links_up_at_end(ns, ("eth0", "sync0"))
            for mode in modes:
                res = doc["modes"][mode] = {}
                try:
                    run_mode(bench, mode, args, res)
                except LabError as exc:
                    say(f"[{mode}] FAILED: {exc}")
                    res["error"] = str(exc)
                res["summary"] = summarise(res)
                res["loadavg_after"] = os.getloadavg()
                print_summary(mode, res["summary"])
                if args.json:
                    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
            cpu1 = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
            d = [int(y) - int(x) for x, y in zip(cpu0, cpu1)]
            doc["machine"]["busy_percent_during"] = round(100 * (1 - (d[3] + d[4]) / max(1, sum(d))), 1)
            doc["machine"]["loadavg_after"] = os.getloadavg()
            doc["duration_s"] = round(time.monotonic() - t_start, 1)
            say(f"\nmachine busy during the run: {doc['machine']['busy_percent_during']} % of 2 cores; "
                f"load average before {doc['machine']['loadavg_before']}, after {doc['machine']['loadavg_after']}")
            if args.json:
                Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
                say(f"numbers written to {args.json}")
            return 0
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            say(f"soak.py: {exc}")
            if args.json and doc["modes"]:
                Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
            return 1
        except KeyboardInterrupt:
            say("soak.py: interrupted; cleaning up")
            return 130


if __name__ == "__main__":
    sys.exit(main())
