"""Failover benchmark: pairproxy's pair (stateless and stateful mode) vs. keepalived (VRRPv3) + haproxy,
same lab, same probes.

    sudo .venv/bin/python bench/failover.py [--runs 10] [--modes stateless,stateful,keepalived]
        [--heartbeat 10] [--dead-after 40[,60,...]] [--extra-runs N] [--idle-cap-ms 5000]
        [--prefix ppf] [--json FILE] [--keep-lab] [--keep-logs]

Setups are **interleaved**: run i measures every setup once, in the order stateless, stateful,
keepalived for the first ``--dead-after`` value, then the pairproxy modes for each further value
(``--extra-runs`` of them; default ``--runs``). ``--heartbeat``/``--dead-after`` other than the lab's
(20/100 ms) are written as config values (``Lab.write_node_config``) to copies of the lab's pair configs
in the bench's temp dir (``config=`` of NodeProcess). Stateful setups run with the lab's bridge in flood mode (``lab.flood(True)``), the
others without.

Each run measures, in its own lab (prefix ``ppf``, root /var/tmp/pairproxy-failover-lab):

* **pairproxy** (stateless / stateful): ``pairproxy run`` with the lab's pair configs (or the copies)
  in ``{prefix}-b`` then ``{prefix}-a``; clients use a's address 10.77.0.1.
* **keepalived+haproxy**: keepalived 2.2.7 VRRPv3 (``advert_int 0.01``, VIP 10.77.0.50/24 on eth0,
  priority 150 in ns a, 100 in ns b, preempt on) and haproxy 2.6 ``mode tcp`` in both namespaces
  listening on the VIP (``net.ipv4.ip_nonlocal_bind=1`` in the two node namespaces, so the standby's
  haproxy is already bound when the VIP arrives), backends 10.77.0.10:445 / :2049.

Lab, probes, nodes, baselines and cleanup come from bench/driver.py (shared with the other
benchmarks).

The probe (bench/_failprobe.py, in the client namespace) starts a new TCP connection + SMB2 NEGOTIATE
and, separately, a new TCP connection + ONC RPC NULL (NFSv3) every 5 ms while anything looks wrong
(20 ms while all is well), many in flight, each with a 50 ms connect timeout, and logs every attempt
with CLOCK_MONOTONIC timestamps, the clock this script uses too.

The idle probe (bench/_idleprobe.py, client namespace) opens 2 connections to :445 (one SMB2
NEGOTIATE each) and 2 to :2049 (one NFS NULL each) before the death and leaves them idle, each
blocking in recv() (no keepalive). ``idle`` = death -> that recv() returned (ECONNRESET/EOF); not
within ``--idle-cap-ms`` (5 s) -> reported as ">5000".

Node death (all setups): the node's service link (eth0) and sync link (sync0) down in one
``ip -batch`` in its namespace, as a dead machine loses both at once, then SIGKILL of its processes
(pairproxy; or keepalived's VRRP child, keepalived, haproxy). The death time is taken right after the
links went down (as ``NodeProcess.kill_hard``). Until 2026-11-28 only eth0 went down: pairproxy's
heartbeats on the sync path went on until the process was gone (8-15 ms), keepalived's (service link
only) stopped at once, a death kinder to keepalived (bench/takeover_trace.py).

Measured per run and protocol:

* ``takeover``: death -> end of the first successful operation that *started* after the death;
* ``outage_attempts``: the attempts begun within 20 ms of the death (their SYNs went to a dead node in
  every setup): how many were answered at all, and when (a stateful pair hands those SYNs to the
  survivor's kernel; elsewhere each waits for the probe's 50 ms connect timeout, as a real client
  would for its 1 s SYN retransmission);
* ``handback``: node a restarted (link up + start; for keepalived a's stale VIP removed first, as a
  rebooted machine would have lost it) -> the longest gap between two successive successful
  operations from just before the restart until the hand-back is complete (+0.5 s);
* pairproxy's own view from b's status: ``silence_ms`` (last heartbeat -> declared dead),
  ``address_moved_ms`` (declared dead -> a's address up on b), ``first_client_ms`` (declared dead ->
  first client connection served);
* false takeovers: b's takeover count beyond the one caused by the kill, before the kill, and a's
  (restarted) takeovers, read before the nodes are stopped; plus "-> suspect" lines in both logs.

It always stops what it started (nodes, keepalived, haproxy, probes, VIPs, sysctls, link states,
bridge flood mode), also on errors, Ctrl-C and SIGTERM, and tears the lab down unless ``--keep-lab``. Exit code 0 whether the
targets pass or miss (a measurement); 1 only if something broke.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from driver import (PROTOS, Bench, IdleProbe, KeepalivedNode, LabError, NodeProcess, PairTimings, Probe, ms,
                    run_info, say, serving, standing_by, stats, wait_until)

VIP = "10.77.0.50"
#: a dead machine loses every link at once: the service link and the sync link, for every setup
MACHINE_LINKS = ("eth0", "sync0")
#: how long a setup may take to serve the probes and (stateful) to be in sync: 10 s used to be plenty;
#: on the shared 2-core machine at load 20-60 (2026-11-27 evening) every pairproxy run missed it
WAIT = 30.0


def first_success_after(records: list[dict], proto: str, at: float) -> float | None:
    """Seconds from ``at`` to the end of the first successful operation that started at or after it."""
    ends = [r["e"] for r in records if r["p"] == proto and r["ok"] and r["s"] >= at]
    return min(ends) - at if ends else None


#: attempts begun this soon after the death sent their SYN to a dead node in every setup (none serves
#: before ~28 ms at 10/30): whether they were answered at all is the outage-SYN handling's doing
OUTAGE_ATTEMPTS_WINDOW = 0.020


def outage_attempts(records: list[dict], proto: str, died: float) -> dict:
    """The attempts begun within OUTAGE_ATTEMPTS_WINDOW of the death: how many, how many were answered
    (stateful mode hands their SYNs to the survivor's kernel; elsewhere they wait for the probe's connect
    timeout), and when the answered ones ended (seconds after the death)."""
    begun = [r for r in records if r["p"] == proto and died <= r["s"] < died + OUTAGE_ATTEMPTS_WINDOW]
    return {"begun": len(begun), "answered": sum(1 for r in begun if r["ok"]),
            "answered_after_s": sorted(r["e"] - died for r in begun if r["ok"])}


def longest_gap(records: list[dict], proto: str, start: float, end: float, ref: float) -> dict:
    """Longest time between two successive successful completions within [start, end], where it
    lies (relative to ``ref``), and the failed attempts in the window by reason."""
    ends = sorted(r["e"] for r in records if r["p"] == proto and r["ok"] and start <= r["e"] <= end)
    reasons: dict[str, int] = {}
    for r in records:
        if r["p"] == proto and not r["ok"] and start <= r["s"] <= end:
            reasons[r.get("err", "?")] = reasons.get(r.get("err", "?"), 0) + 1
    out = {"longest_gap_s": None, "gap_from_s": None, "failed_attempts": sum(reasons.values()),
           "failures": reasons}
    if len(ends) >= 2:
        gap, a = max((b - a, a) for a, b in zip(ends, ends[1:]))
        out["longest_gap_s"], out["gap_from_s"] = gap, a - ref
    return out


# ------------------------------------------------------------------------------------ the runs
@dataclass(frozen=True)
class Setup:
    """One measured setup: a pairproxy mode with a detector setting, or keepalived."""

    kind: str                      # "stateless", "stateful" or "keepalived"
    heartbeat_ms: float | None = None
    dead_after_ms: float | None = None
    runs: int = 10

    @property
    def key(self) -> str:
        if self.kind == "keepalived":
            return "keepalived"
        return f"{self.kind}-hb{self.heartbeat_ms:g}-da{self.dead_after_ms:g}"

    @property
    def label(self) -> str:
        if self.kind == "keepalived":
            return "keepalived+haproxy"
        return f"{self.kind} {self.heartbeat_ms:g}/{self.dead_after_ms:g}"

    @property
    def timings(self) -> PairTimings:
        """The [pair] timings of this setup, as config values."""
        return PairTimings.from_ms(self.heartbeat_ms, self.dead_after_ms)


def count_suspects(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if "-> suspect" in line)
    except OSError:
        return 0

def takeover_phase(bench: Bench, probe: Probe, died: float, out: dict) -> None:
    """After a death: stop the probe; death -> first success per protocol, failed attempts."""
    probe.wait_ok(10, after=died, timeout=WAIT)
    time.sleep(0.2)
    recs = bench.stop(probe)
    out["takeover_s"] = {p: first_success_after(recs, p, died) for p in PROTOS}
    out["takeover_failed_attempts"] = {p: sum(1 for r in recs if r["p"] == p and not r["ok"] and r["s"] >= died)
                                       for p in PROTOS}
    out["outage_attempts"] = {p: outage_attempts(recs, p, died) for p in PROTOS}


def handback_phase(bench: Bench, probe: Probe, back: float, done: float, out: dict) -> None:
    """After a hand-back from ``back`` (restart) to ``done``: stop the probe; the longest gap per protocol."""
    time.sleep(0.5)
    recs = bench.stop(probe)
    out["handback_restart_to_serving_s"] = done - back
    out["handback"] = {p: longest_gap(recs, p, back - 0.1, done + 0.5, back) for p in PROTOS}


def run_pairproxy(bench: Bench, i: int, setup: Setup, idle_cap: float) -> dict:
    lab, work = bench.lab, bench.work
    addr = lab.addresses
    host = addr.service_a
    cfg = bench.pair_configs(setup.kind, setup.timings)
    logs = {n: work / f"{setup.key}-{n}-{i}.log" for n in ("a", "b")}
    stateful = setup.kind == "stateful"
    out: dict = {"config": {n: str(p) for n, p in cfg.items()}}
    bench.flood(stateful)
    lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
    a = bench.started(NodeProcess(lab, "a", config=cfg["a"], log=logs["a"]))
    b = bench.started(NodeProcess(lab, "b", config=cfg["b"], log=logs["b"]))
    try:
        b.start(60)  # a shared, loaded machine: a python start may take many seconds
        a.start(60)
        a.wait_for(serving(host, "a"), 15, "a serving its address")
        b.wait_for(serving(addr.service_b, "b"), 10, "b serving its address")
        b.wait_for(lambda s: standing_by(s) and (s["pair"]["link"].get("rtt_ms") or {}).get("count", 0) > 5,
                   10, "b standing by, link up")
        if stateful:
            b.wait_for(lambda s: s["pair"].get("state_sync", {}).get("in_sync"), WAIT, "b's view of a in sync")
        # --- idle connections, then the takeover
        idle = bench.started(IdleProbe(lab, host)).start()
        locals_ = {r["local"] for r in idle.ready}
        if stateful:
            def b_sees_idle(s: dict) -> bool:
                seen = {c["client"] for c in s.get("connections", []) if c["server"].startswith(host + ":")}
                return locals_ <= seen
            try:
                b.wait_for(b_sees_idle, 5, "b's view holding the idle connections")
                out["idle_seen_by_b"] = True
            except LabError:
                out["idle_seen_by_b"] = False
        probe = bench.started(Probe(lab, host)).start()
        probe.wait_ok(10, timeout=WAIT)
        time.sleep(0.2)
        before = b.status()["pair"]
        out["takeovers_before_kill"] = len(before["takeovers"])
        out["heartbeat_before_kill"] = {p: {k: v.get(k) for k in ("gap_ms", "jitter_ms", "max_gap_ever_ms")}
                                        for p, v in ((before.get("heartbeat") or {}).get("paths") or {}).items()}
        out["loadavg_at_kill"] = os.getloadavg()
        if stateful:
            out["state_sync_at_kill"] = {k: before["state_sync"].get(k) for k in ("in_sync", "compared", "matches",
                                                                                   "snapshots_requested")}
        died = a.kill_hard(link_down=True, links=MACHINE_LINKS)
        # polled every 20 ms during the takeover it measures: without the decoded tables, whose snapshot
        # in b's event loop delayed b's first client by several ms (keepalived's VIP is polled with `ip addr`)
        b.wait_for(serving(host, "b"), 10, "b holding a's address", tables=False)
        takeover_phase(bench, probe, died, out)
        out["idle"] = idle.wait_ended(died, idle_cap)
        bench.stop(idle)
        status = b.status()
        out["node"] = status["pair"]["takeovers"][-1]
        if stateful:
            out["resume"] = status["pair"].get("resume", [])
        # --- hand-back
        probe = bench.started(Probe(lab, host)).start()
        probe.wait_ok(10, timeout=WAIT)
        time.sleep(0.2)
        back = time.monotonic()
        a.link_up(MACHINE_LINKS)
        a.start(60)
        a.wait_for(serving(host, "a"), 20, "a serving again")
        b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 10, "b standby")
        handback_phase(bench, probe, back, time.monotonic(), out)
        # false takeovers: b should have taken over exactly once (the kill), a (restarted) never
        out["takeovers_b"] = len(b.status()["pair"]["takeovers"])
        out["takeovers_a_after_restart"] = len(a.status()["pair"]["takeovers"])
        out["suspect_lines"] = {n: count_suspects(logs[n]) for n in ("a", "b")}
    finally:
        bench.stop_all()
        lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
    return out


def run_keepalived(bench: Bench, i: int, setup: Setup, idle_cap: float) -> dict:
    lab = bench.lab
    out: dict = {}
    bench.flood(False)
    lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
    ka_a = KeepalivedNode(lab, "a", 150, VIP, bench.work / f"run{i}")
    ka_b = KeepalivedNode(lab, "b", 100, VIP, bench.work / f"run{i}")
    try:
        ka_a.remove_vip()
        ka_b.remove_vip()
        bench.started(ka_a).start()
        wait_until(ka_a.has_vip, 10, "keepalived a MASTER (VIP on a)")
        bench.started(ka_b).start()
        time.sleep(0.3)
        if ka_b.has_vip() or not ka_a.has_vip():
            raise LabError("keepalived: VIP not on a alone after b started")
        # --- idle connections, then the takeover
        idle = bench.started(IdleProbe(lab, VIP)).start()
        probe = bench.started(Probe(lab, VIP)).start()
        probe.wait_ok(10, timeout=WAIT)
        time.sleep(0.2)
        died = ka_a.kill_hard(MACHINE_LINKS)
        moved = wait_until(ka_b.has_vip, 10, "VIP on b")
        takeover_phase(bench, probe, died, out)
        out["vip_seen_on_b_s"] = moved - died  # polled every 5 ms with `ip addr`: coarse, an upper bound
        out["idle"] = idle.wait_ended(died, idle_cap)
        bench.stop(idle)
        # --- hand-back (preemption by the higher priority)
        probe = bench.started(Probe(lab, VIP)).start()
        probe.wait_ok(10, timeout=WAIT)
        time.sleep(0.2)
        ka_a.remove_vip()          # a rebooted machine has lost it; SIGKILL left it on a's eth0
        back = time.monotonic()
        lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
        ka_a.start()
        done = wait_until(lambda: ka_a.has_vip() and not ka_b.has_vip(), 10, "VIP back on a only")
        handback_phase(bench, probe, back, done, out)
    finally:
        bench.stop_all()
        lab.set_links(lab.ns_a, MACHINE_LINKS, "up")
    return out


# ---------------------------------------------------------------------------------- reporting
def capped_stats(values: list[float | None], cap: float) -> dict:
    """Median/worst where None means "not within cap" (ranks above every measured value)."""
    if not values:
        return {"n": 0, "median": None, "worst": None, "best": None, "over_cap": 0, "cap": cap}
    inf = float("inf")
    vals = sorted(inf if v is None else v for v in values)
    med = statistics.median(vals)  # inf if the middle lies beyond the cap
    fix = (lambda v: None if v == inf else v)
    return {"n": len(vals), "median": fix(med), "worst": fix(vals[-1]), "best": fix(vals[0]),
            "over_cap": vals.count(inf), "cap": cap,
            "median_over_cap": med == inf, "worst_over_cap": vals[-1] == inf}


def summarise(runs: list[dict], setups: list[Setup], idle_cap: float) -> dict:
    summ: dict = {}
    for setup in setups:
        rs = [r[setup.key] for r in runs if setup.key in r]
        s: dict = {"label": setup.label, "runs": len(rs)}
        for p in PROTOS:
            s[f"takeover_{p}"] = stats([r["takeover_s"][p] for r in rs])
            s[f"handback_{p}"] = stats([r["handback"][p]["longest_gap_s"] for r in rs])
        s["handback_restart_to_serving"] = stats([r["handback_restart_to_serving_s"] for r in rs])
        for p in PROTOS:
            outage = [r["outage_attempts"][p] for r in rs if "outage_attempts" in r]
            s[f"outage_{p}"] = {"begun": sum(o["begun"] for o in outage), "answered": sum(o["answered"] for o in outage)}
            s[f"outage_answered_{p}"] = stats([t for o in outage for t in o["answered_after_s"]])
        idle = [c for r in rs for c in r["idle"]]
        s["idle_notice"] = capped_stats([c["notice_s"] for c in idle], idle_cap)
        for p in PROTOS:
            s[f"idle_notice_{p}"] = capped_stats([c["notice_s"] for c in idle if c["p"] == p], idle_cap)
        s["idle_events"] = {}
        for c in idle:
            ev = c["ev"] if c["notice_s"] is not None else f"none within {idle_cap * 1000:.0f} ms"
            s["idle_events"][ev] = s["idle_events"].get(ev, 0) + 1
        s["idle_ended_before_death"] = sum(1 for c in idle if c["ended_before_death"])
        if setup.kind != "keepalived":
            for k in ("silence_ms", "address_moved_ms", "first_client_ms"):
                s[k] = stats([None if r["node"][k] is None else r["node"][k] / 1000 for r in rs])
            s["silence_plus_moved"] = stats([r["node"]["silence_ms"] / 1000 + r["node"]["address_moved_ms"] / 1000
                                             for r in rs if r["node"]["silence_ms"] is not None
                                             and r["node"]["address_moved_ms"] is not None])
            s["silence_plus_first_client"] = stats([r["node"]["silence_ms"] / 1000 + r["node"]["first_client_ms"] / 1000
                                                    for r in rs if r["node"]["silence_ms"] is not None
                                                    and r["node"]["first_client_ms"] is not None])
            s["clients_reset"] = stats([r["node"].get("clients_reset") for r in rs])
            s["backend_connections_reset"] = stats([r["node"].get("backend_connections_reset") for r in rs])
            s["false_takeovers"] = sum(max(0, r["takeovers_b"] - 1) + r["takeovers_before_kill"]
                                       + r["takeovers_a_after_restart"] for r in rs)
            s["takeovers_b_total"] = sum(r["takeovers_b"] for r in rs)
            s["suspect_lines"] = sum(sum(r["suspect_lines"].values()) for r in rs)
            if setup.kind == "stateful":
                s["idle_seen_by_b"] = sum(1 for r in rs if r.get("idle_seen_by_b"))
        else:
            s["vip_seen_on_b"] = stats([r["vip_seen_on_b_s"] for r in rs])
        summ[setup.key] = s
    return summ


def cell(st: dict, capped: bool = False) -> str:
    if not st or st.get("n", 0) == 0:
        return ""

    def one(v: float | None, over: bool) -> str:
        return f">{st['cap'] * 1000:.0f}" if capped and over else ms(v)

    return (f"{one(st['median'], st.get('median_over_cap', False))} / "
            f"{one(st['worst'], st.get('worst_over_cap', False))}")


def table(summ: dict, setups: list[Setup]) -> list[str]:
    rows = [("death -> first new SMB NEGOTIATE ok", "takeover_smb", False),
            ("death -> first new NFS NULL ok", "takeover_nfs", False),
            ("death -> idle connection ended (all 4)", "idle_notice", True),
            ("… idle SMB connections (2/run)", "idle_notice_smb", True),
            ("… idle NFS connections (2/run)", "idle_notice_nfs", True),
            ("… SMB attempts begun 0-20 ms after the death, answered: death -> answer", "outage_answered_smb", False),
            ("… NFS attempts begun 0-20 ms after the death, answered: death -> answer", "outage_answered_nfs", False),
            ("hand-back: longest SMB gap", "handback_smb", False),
            ("hand-back: longest NFS gap", "handback_nfs", False),
            ("hand-back: restart -> a serves again", "handback_restart_to_serving", False),
            ("b: silence (last heartbeat -> dead)", "silence_ms", False),
            ("b: dead -> address up", "address_moved_ms", False),
            ("b: dead -> first client served", "first_client_ms", False),
            ("b: silence + address up", "silence_plus_moved", False),
            ("b: silence + first client", "silence_plus_first_client", False),
            ("VIP seen on b (`ip addr` poll, 5 ms)", "vip_seen_on_b", False)]
    lines = ["| metric (ms), median / worst | " + " | ".join(s.label for s in setups) + " |",
             "|---|" + "---:|" * len(setups)]
    for label, key, capped in rows:
        lines.append(f"| {label} | " + " | ".join(cell(summ[s.key].get(key, {}), capped) for s in setups) + " |")
    counts = [("runs", lambda s: str(s["runs"])),
              ("attempts begun 0-20 ms after the death: answered / begun (SMB; NFS)",
               lambda s: f"{s['outage_smb']['answered']} / {s['outage_smb']['begun']}; "
                         f"{s['outage_nfs']['answered']} / {s['outage_nfs']['begun']}"),
              ("idle connections: how they ended", lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s["idle_events"].items()))),
              ("b: client / backend connections reset (median)",
               lambda s: "" if "clients_reset" not in s else
               f"{s['clients_reset']['median']:g} / {s['backend_connections_reset']['median']:g}"
               if s["clients_reset"]["n"] else ""),
              ("false takeovers (b's takeovers beyond the kill; a's)",
               lambda s: "" if "false_takeovers" not in s else str(s["false_takeovers"])),
              ("'-> suspect' log lines (a + b, all runs)",
               lambda s: "" if "suspect_lines" not in s else str(s["suspect_lines"]))]
    for label, f in counts:
        lines.append(f"| {label} | " + " | ".join(f(summ[s.key]) for s in setups) + " |")
    return lines


def verdicts(summ: dict, setups: list[Setup]) -> list[dict]:
    out = []
    k = summ.get("keepalived")

    def add(name: str, value: float | None, limit: float | None, text: str = "") -> None:
        ok = value is not None and limit is not None and value <= limit
        out.append({"target": name, "value_ms": None if value is None else round(value * 1000, 1),
                    "limit_ms": None if limit is None else round(limit * 1000, 1), "pass": ok, "text": text})

    for setup in setups:
        if setup.kind == "keepalived":
            continue
        p = summ[setup.key]
        add(f"[{setup.label}] node takeover < 100 ms (b: silence + address up, worst)",
            p["silence_plus_moved"]["worst"], 0.1)
        add(f"[{setup.label}] node takeover < 100 ms (b: silence + first client, worst)",
            p["silence_plus_first_client"]["worst"], 0.1)
        for proto in PROTOS:
            for stat in ("median", "worst"):
                add(f"[{setup.label}] client {proto.upper()} death -> first success < 100 ms ({stat})",
                    p[f"takeover_{proto}"][stat], 0.1)
        for proto in PROTOS:  # issue 12: worst under 60 ms
            add(f"[{setup.label}] client {proto.upper()} death -> first success < 60 ms (worst)",
                p[f"takeover_{proto}"]["worst"], 0.06)
        add(f"[{setup.label}] node: dead -> address up <= 5 ms (median)", p["address_moved_ms"]["median"], 0.005)
        add(f"[{setup.label}] node: dead -> first client <= 10 ms (median)", p["first_client_ms"]["median"], 0.01)
        if k:
            for proto in PROTOS:
                for stat in ("median", "worst"):
                    add(f"[{setup.label}] client {proto.upper()} outage <= keepalived ({stat})",
                        p[f"takeover_{proto}"][stat], k[f"takeover_{proto}"][stat])
    return out

# ------------------------------------------------------------------------------------------- main
def ms_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"not a list of positive milliseconds: {text!r}")
    return vals


def make_setups(args) -> list[Setup]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("stateless", "stateful", "keepalived")]
    if bad or not modes:
        raise SystemExit(f"failover.py: --modes: unknown {bad or 'empty'} (stateless, stateful, keepalived)")
    setups: list[Setup] = []
    for j, da in enumerate(args.dead_after):
        runs = args.runs if j == 0 or args.extra_runs is None else args.extra_runs
        for m in modes:
            if m == "keepalived":
                if j == 0:
                    setups.append(Setup("keepalived", runs=args.runs))
                continue
            if da < 2 * args.heartbeat:
                raise SystemExit(f"failover.py: dead_after {da:g} ms < 2 heartbeats ({args.heartbeat:g} ms)")
            setups.append(Setup(m, args.heartbeat, da, runs))
    return setups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--modes", default="stateless,stateful,keepalived",
                    help="comma list of stateless, stateful, keepalived (default all three)")
    ap.add_argument("--heartbeat", type=float, default=10.0, help="pair heartbeat in ms (default 10, issue 12)")
    ap.add_argument("--dead-after", type=ms_list, default=[40.0],
                    help="pair dead_after in ms; a comma list measures each (default 40, issue 12)")
    ap.add_argument("--extra-runs", type=int, help="runs for the 2nd, 3rd ... --dead-after value (default --runs)")
    ap.add_argument("--idle-cap-ms", type=float, default=5000.0,
                    help="how long to wait for the idle connections to end after the death (default 5000)")
    ap.add_argument("--prefix", default="ppf", help="lab prefix (default ppf)")
    ap.add_argument("--root", help="lab state directory (default /var/tmp/pairproxy-failover-lab[-PREFIX])")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end")
    ap.add_argument("--keep-logs", action="store_true", help="keep the node/keepalived logs (temp dir) at the end")
    args = ap.parse_args()
    setups = make_setups(args)
    idle_cap = args.idle_cap_ms / 1000
    if os.geteuid() != 0:
        say("failover.py: needs root (network namespaces)")
        return 1
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    runs: list[dict] = []
    load_before = os.getloadavg()
    with Bench("failover", args.prefix, default_prefix="ppf", root=args.root, keep_lab=args.keep_lab,
               keep_work=args.keep_logs or args.keep_lab) as bench:
        try:
            say("setups (interleaved per run): " + ", ".join(f"{s.label} x{s.runs}" for s in setups))
            lab = bench.up()
            for ns in (lab.ns_a, lab.ns_b):
                bench.sysctl(ns, "net.ipv4.ip_nonlocal_bind", "1")
                bench.links_up_at_end(ns, ("eth0", "sync0"))
                bench.defer(bench.at_end_in, ns, ["ip", "addr", "del", f"{VIP}/{lab.addresses.prefixlen}", "dev", "eth0"])
            for i in range(max(s.runs for s in setups)):
                r: dict = {"run": i + 1}
                runs.append(r)
                for setup in setups:
                    if i >= setup.runs:
                        continue
                    fn = run_keepalived if setup.kind == "keepalived" else run_pairproxy
                    try:
                        res = fn(bench, i, setup, idle_cap)
                    except LabError as exc:  # one broken run (e.g. a start timing out under load) is recorded
                        say(f"run {i + 1} {setup.label}: FAILED: {exc}")
                        r.setdefault("errors", {})[setup.key] = str(exc)
                        continue
                    res = r[setup.key] = res
                    res["loadavg_after"] = os.getloadavg()
                    idle = sorted(("-" if c["notice_s"] is None else f"{c['notice_s'] * 1000:.0f}") for c in res["idle"])
                    extra = ""
                    if "node" in res:
                        n = res["node"]
                        extra = (f" (b: silence {n['silence_ms']} moved {n['address_moved_ms']} first client "
                                 f"{n['first_client_ms']} resets {n['clients_reset']}/{n['backend_connections_reset']}"
                                 f"; takeovers b {res['takeovers_b']})")
                    if args.json:  # as it goes: a series cut short (time, Ctrl-C) keeps its runs
                        Path(args.json).write_text(json.dumps({"partial": True, "runs": runs,
                                                               "setups": [s.key for s in setups]}) + "\n")
                    say(f"run {i + 1} {setup.label}: takeover smb {ms(res['takeover_s']['smb'])} "
                        f"nfs {ms(res['takeover_s']['nfs'])} ms, idle ended {','.join(idle)} ms{extra}, hand-back gap "
                        f"smb {ms(res['handback']['smb']['longest_gap_s'])} nfs {ms(res['handback']['nfs']['longest_gap_s'])}"
                        f"  [{time.monotonic() - t_start:.0f} s]")
            summ = summarise(runs, setups, idle_cap)
            say()
            say("median / worst (ms)")
            tab = table(summ, setups)
            for line in tab:
                say(line)
            say()
            vs = verdicts(summ, setups)
            for v in vs:
                say(f"{'PASS' if v['pass'] else 'MISS'}  {v['target']}: {v['value_ms']} ms vs {v['limit_ms']} ms")
            if args.json:
                doc = run_info("failover.py", started)
                doc["machine"]["loadavg_before"] = load_before
                doc.update({
                    "duration_s": round(time.monotonic() - t_start, 1),
                    "order": "interleaved: every run measures each setup once, in this order",
                    "setups": [{"key": s.key, "label": s.label, "kind": s.kind, "heartbeat_ms": s.heartbeat_ms,
                                "dead_after_ms": s.dead_after_ms, "runs": s.runs} for s in setups],
                    "idle_cap_ms": args.idle_cap_ms,
                    "summary": summ, "targets": vs, "table": tab, "runs": runs,
                })
                Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
                say(f"numbers written to {args.json}")
            return 0
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            say(f"failover.py: {exc}")
            return 1
        except KeyboardInterrupt:
            say("failover.py: interrupted; cleaning up")
            return 130


if __name__ == "__main__":
    sys.exit(main())
