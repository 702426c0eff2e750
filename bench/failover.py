"""Failover benchmark: pairproxy's pair (stateless and stateful mode) vs. keepalived (VRRPv3) + haproxy,
same lab, same probes.

    sudo .venv/bin/python bench/failover.py [--runs 10] [--modes stateless,stateful,keepalived]
        [--heartbeat 20] [--dead-after 100[,60,...]] [--extra-runs N] [--idle-cap-ms 5000]
        [--prefix ppf] [--json FILE] [--keep-lab] [--keep-logs]

Setups are **interleaved**: run i measures every setup once, in the order stateless, stateful,
keepalived for the first ``--dead-after`` value, then the pairproxy modes for each further value
(``--extra-runs`` of them; default ``--runs``). ``--heartbeat``/``--dead-after`` other than the lab's
(20/100 ms) are applied to copies of the lab's pair configs in the bench's temp dir (``config=`` of
NodeProcess). Stateful setups run with the lab's bridge in flood mode (``lab.flood(True)``), the
others without.

Each run measures, in its own lab (prefix ``ppf``, root /var/tmp/pairproxy-failover-lab):

* **pairproxy** (stateless / stateful): ``pairproxy run`` with the lab's pair configs (or the copies)
  in ``{prefix}-b`` then ``{prefix}-a``; clients use a's address 10.77.0.1.
* **keepalived+haproxy**: keepalived 2.2.7 VRRPv3 (``advert_int 0.01``, VIP 10.77.0.50/24 on eth0,
  priority 150 in ns a, 100 in ns b, preempt on) and haproxy 2.6 ``mode tcp`` in both namespaces
  listening on the VIP (``net.ipv4.ip_nonlocal_bind=1`` in the two node namespaces, so the standby's
  haproxy is already bound when the VIP arrives), backends 10.77.0.10:445 / :2049.

The probe (bench/_failprobe.py, in the client namespace) starts a new TCP connection + SMB2 NEGOTIATE
and, separately, a new TCP connection + ONC RPC NULL (NFSv3) every 5 ms while anything looks wrong
(20 ms while all is well), many in flight, each with a 50 ms connect timeout, and logs every attempt
with CLOCK_MONOTONIC timestamps, the clock this script uses too.

The idle probe (bench/_idleprobe.py, client namespace) opens 2 connections to :445 (one SMB2
NEGOTIATE each) and 2 to :2049 (one NFS NULL each) before the death and leaves them idle, each
blocking in recv() (no keepalive). ``idle`` = death -> that recv() returned (ECONNRESET/EOF); not
within ``--idle-cap-ms`` (5 s) -> reported as ">5000".

Node death (all setups): ``ip link set eth0 down`` in the node's namespace, then SIGKILL of its
processes (pairproxy; or keepalived's VRRP child, keepalived, haproxy). The death time is taken right
after the link went down (as ``NodeProcess.kill_hard``).

Measured per run and protocol:

* ``takeover``: death -> end of the first successful operation that *started* after the death;
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
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.lab.clients import NodeProcess  # noqa: E402
from deploy.lab.core import Lab, LabError  # noqa: E402

PROBE = REPO / "bench" / "_failprobe.py"
IDLE_PROBE = REPO / "bench" / "_idleprobe.py"
VIP = "10.77.0.50"
VRID = 77
PROTOS = ("smb", "nfs")


def say(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------ probe
class Probe:
    """bench/_failprobe.py in the client namespace; collects its records in a thread."""

    def __init__(self, lab: Lab, host: str):
        self.lab, self.host = lab, host
        self.records: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "Probe":
        self.proc = self.lab.popen(self.lab.ns_client, [sys.executable, str(PROBE), self.host],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.records.append(rec)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.records)

    def oks(self, proto: str, started_after: float = 0.0) -> list[dict]:
        return [r for r in self.snapshot() if r["p"] == proto and r["ok"] and r["s"] >= started_after]

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise LabError(f"probe exited with {self.proc.returncode}: {err[-800:]}")
            if predicate():
                return
            time.sleep(0.01)
        fails = [r for r in self.snapshot() if not r["ok"]][-3:]
        raise LabError(f"probe via {self.host}: {what} not within {timeout:g}s (last failures: {fails})")

    def wait_ok(self, n: int = 10, after: float = 0.0, timeout: float = 10) -> None:
        self.wait(lambda: all(len(self.oks(p, after)) >= n for p in PROTOS), timeout,
                  f"{n} successes per protocol")

    def stop(self) -> list[dict]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)
        return self.snapshot()


class IdleProbe:
    """bench/_idleprobe.py in the client namespace: K idle connections, and when each one ended."""

    def __init__(self, lab: Lab, host: str, smb: int = 2, nfs: int = 2):
        self.lab, self.host, self.smb, self.nfs = lab, host, smb, nfs
        self.proc: subprocess.Popen | None = None
        self.ready: list[dict] = []
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 10) -> "IdleProbe":
        self.proc = self.lab.popen(self.lab.ns_client, [sys.executable, str(IDLE_PROBE), self.host,
                                                        "--smb", str(self.smb), "--nfs", str(self.nfs)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            err = ""
            if self.proc.poll() is not None and self.proc.stderr:
                err = self.proc.stderr.read()[-800:]
            raise LabError(f"idle probe via {self.host} not ready within {timeout:g}s {err}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "ready" in rec:
                    self.ready = rec["ready"]
                    self._ready.set()
                else:
                    self.events.append(rec)

    def ended(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def notice_times(self, died: float, cap: float) -> list[dict]:
        """Per idle connection: death -> its recv() returned (None: not within ``cap``)."""
        by_i = {e["i"]: e for e in self.ended()}
        out = []
        for r in self.ready:
            e = by_i.get(r["i"])
            dt = None if e is None or e["t"] - died > cap else e["t"] - died
            out.append({"p": r["p"], "local": r["local"], "notice_s": dt, "ev": None if e is None else e["ev"],
                        "ended_before_death": e is not None and e["t"] < died})
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)


def first_success_after(records: list[dict], proto: str, at: float) -> float | None:
    """Seconds from ``at`` to the end of the first successful operation that started at or after it."""
    ends = [r["e"] for r in records if r["p"] == proto and r["ok"] and r["s"] >= at]
    return min(ends) - at if ends else None


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


# ------------------------------------------------------------------------- keepalived + haproxy
def _alive(pid: int, comm: str) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return False
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, ValueError):
        return False


class KaNode:
    """haproxy + keepalived (foreground, our PIDs) in one node namespace."""

    def __init__(self, lab: Lab, node: str, priority: int, work: Path):
        self.lab, self.node, self.priority = lab, node, priority
        self.ns = lab.ns_a if node == "a" else lab.ns_b
        self.dir = work / f"ka-{node}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.haproxy: subprocess.Popen | None = None
        self.keepalived: subprocess.Popen | None = None

    @property
    def vrrp_pid_file(self) -> Path:
        return self.dir / "vrrp.pid"

    def _haproxy_cfg(self) -> str:
        srv = self.lab.addresses.server
        lines = ["global", "    maxconn 2000", f"    pidfile {self.dir / 'haproxy.pid'}",
                 "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 1h",
                 "    timeout server 1h"]
        for port in (445, 2049):
            lines += [f"listen p{port}", f"    bind {VIP}:{port}", f"    server s {srv}:{port}"]
        return "\n".join(lines) + "\n"

    def _keepalived_cfg(self) -> str:
        return f"""global_defs {{
    router_id ppf_{self.node}
    vrrp_version 3
    enable_script_security
}}
vrrp_instance VI_PPF {{
    state BACKUP
    interface eth0
    virtual_router_id {VRID}
    priority {self.priority}
    advert_int 0.01
    virtual_ipaddress {{
        {VIP}/{self.lab.addresses.prefixlen} dev eth0
    }}
}}
"""

    def start(self) -> "KaNode":
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(self._haproxy_cfg())
        with open(self.dir / "haproxy.log", "ab") as log:
            self.haproxy = self.lab.popen(self.ns, ["haproxy", "-db", "-f", str(cfg)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        kcfg = self.dir / "keepalived.conf"
        kcfg.write_text(self._keepalived_cfg())
        self.vrrp_pid_file.unlink(missing_ok=True)
        with open(self.dir / "keepalived.log", "ab") as log:
            self.keepalived = self.lab.popen(
                self.ns, ["keepalived", "-n", "-l", "-D", "-G", "-P", "-R", "-f", str(kcfg),
                          "-p", str(self.dir / "keepalived.pid"), "-r", str(self.vrrp_pid_file),
                          "-c", str(self.dir / "checkers.pid"), "-b", str(self.dir / "bfd.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name, p in (("haproxy", self.haproxy), ("keepalived", self.keepalived)):
                if p.poll() is not None:
                    raise LabError(f"{name} in {self.ns} exited with {p.returncode}; see {self.dir}")
            if self.vrrp_pid() and self.listening():
                return self
            time.sleep(0.02)
        raise LabError(f"keepalived/haproxy in {self.ns} not ready within 10 s; see {self.dir}")

    def vrrp_pid(self) -> int | None:
        try:
            pid = int(self.vrrp_pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid, "keepalived") else None

    def listening(self) -> bool:
        cp = self.lab.run(self.ns, ["ss", "-Hltn"], capture_output=True, text=True)
        ports = {l.split()[3] for l in cp.stdout.splitlines() if len(l.split()) >= 4}
        return {f"{VIP}:445", f"{VIP}:2049"} <= ports

    def has_vip(self) -> bool:
        cp = self.lab.run(self.ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True)
        return f" {VIP}/" in cp.stdout

    def remove_vip(self) -> None:
        self.lab.run(self.ns, ["ip", "addr", "del", f"{VIP}/{self.lab.addresses.prefixlen}", "dev", "eth0"],
                     capture_output=True)

    def kill_hard(self) -> float:
        """Link down, then SIGKILL of keepalived's VRRP child, keepalived and haproxy: a dead machine."""
        self.lab.run(self.ns, ["ip", "link", "set", "eth0", "down"], check=True)
        at = time.monotonic()
        vp = self.vrrp_pid()
        if vp:
            os.kill(vp, signal.SIGKILL)
        for p in (self.keepalived, self.haproxy):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        return at

    def stop(self) -> None:
        """SIGTERM (keepalived then drops the VIP), SIGKILL if it overstays; VRRP child too."""
        vp = self.vrrp_pid()
        for p in (self.keepalived, self.haproxy):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        if vp and _alive(vp, "keepalived"):
            os.kill(vp, signal.SIGKILL)
        self.remove_vip()


# ------------------------------------------------------------------------------------ the runs
def serving(address: str, node: str):
    def check(status: dict) -> bool:
        a = status.get("pair", {}).get("addresses", {}).get(address)
        return bool(a) and a["held_by"] == node and a["role"] in ("serving", "holding")
    return check


def standing_by(status: dict) -> bool:
    pair = status.get("pair", {})
    return all(a["role"] in ("serving", "standby") for a in pair.get("addresses", {}).values()) and \
        pair.get("link", {}).get("state") == "connected"


def wait_until(predicate, timeout: float, what: str, step: float = 0.005) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise LabError(f"{what} not within {timeout:g}s")


class State:
    """Everything started, for cleanup."""

    def __init__(self) -> None:
        self.probes: list[Probe] = []
        self.idle: list[IdleProbe] = []
        self.nodes: list[NodeProcess] = []
        self.ka: list[KaNode] = []
        self.flooding = False


def link_up(lab: Lab, ns: str) -> None:
    lab.run(ns, ["ip", "link", "set", "eth0", "up"], check=True)


def set_flood(lab: Lab, st: State, on: bool) -> None:
    if st.flooding != on:
        lab.flood(on)
        st.flooding = on


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


def pair_configs(lab: Lab, setup: Setup, work: Path) -> dict[str, Path]:
    """The lab's pair configs for the setup's mode, or copies with its heartbeat/dead_after."""
    out = {}
    for node in ("a", "b"):
        src = lab.node_config_path(node, pair=True, mode=setup.kind)
        text = src.read_text()
        new = re.sub(r'(?m)^heartbeat = ".*"$', f'heartbeat = "{setup.heartbeat_ms:g}ms"', text)
        new = re.sub(r'(?m)^dead_after = ".*"$', f'dead_after = "{setup.dead_after_ms:g}ms"', new)
        if new == text:
            out[node] = src
            continue
        if f'heartbeat = "{setup.heartbeat_ms:g}ms"' not in new or f'dead_after = "{setup.dead_after_ms:g}ms"' not in new:
            raise LabError(f"cannot set heartbeat/dead_after in a copy of {src}")
        dst = work / "configs" / f"{setup.key}-{node}.toml"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(new)
        out[node] = dst
    return out


def idle_phase(idle: IdleProbe, died: float, cap: float) -> list[dict]:
    """Wait until every idle connection ended or ``cap`` after the death; stop the idle probe."""
    deadline = died + cap + 0.05
    while time.monotonic() < deadline and len([e for e in idle.ended() if e["t"] >= died]) < len(idle.ready):
        time.sleep(0.01)
    out = idle.notice_times(died, cap)
    idle.stop()
    return out


def count_suspects(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if "-> suspect" in line)
    except OSError:
        return 0


def run_pairproxy(lab: Lab, st: State, work: Path, i: int, setup: Setup, idle_cap: float) -> dict:
    addr = lab.addresses
    host = addr.service_a
    cfg = pair_configs(lab, setup, work)
    logs = {n: work / f"{setup.key}-{n}-{i}.log" for n in ("a", "b")}
    a = NodeProcess(lab, "a", config=cfg["a"], log=logs["a"])
    b = NodeProcess(lab, "b", config=cfg["b"], log=logs["b"])
    stateful = setup.kind == "stateful"
    out: dict = {"config": {n: str(p) for n, p in cfg.items()}}
    idle = None
    try:
        set_flood(lab, st, stateful)
        link_up(lab, lab.ns_a)
        st.nodes += [a, b]
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving its address")
        b.wait_for(serving(addr.service_b, "b"), 10, "b serving its address")
        b.wait_for(lambda s: standing_by(s) and (s["pair"]["link"].get("rtt_ms") or {}).get("count", 0) > 5,
                   10, "b standing by, link up")
        if stateful:
            b.wait_for(lambda s: s["pair"].get("state_sync", {}).get("in_sync"), 10, "b's view of a in sync")
        # --- idle connections, then the takeover
        idle = IdleProbe(lab, host).start()
        st.idle.append(idle)
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
        probe = Probe(lab, host).start()
        st.probes.append(probe)
        probe.wait_ok(10)
        time.sleep(0.2)
        before = b.status()["pair"]
        out["takeovers_before_kill"] = len(before["takeovers"])
        if stateful:
            out["state_sync_at_kill"] = {k: before["state_sync"].get(k) for k in ("in_sync", "compared", "matches",
                                                                                   "snapshots_requested")}
        died = a.kill_hard(link_down=True)
        b.wait_for(serving(host, "b"), 10, "b holding a's address")
        probe.wait_ok(10, after=died, timeout=10)
        time.sleep(0.2)
        recs = probe.stop()
        st.probes.remove(probe)
        out["takeover_s"] = {p: first_success_after(recs, p, died) for p in PROTOS}
        out["takeover_failed_attempts"] = {p: sum(1 for r in recs if r["p"] == p and not r["ok"] and r["s"] >= died)
                                           for p in PROTOS}
        out["idle"] = idle_phase(idle, died, idle_cap)
        st.idle.remove(idle)
        status = b.status()
        out["node"] = status["pair"]["takeovers"][-1]
        if stateful:
            out["resume"] = status["pair"].get("resume", [])
        # --- hand-back
        probe = Probe(lab, host).start()
        st.probes.append(probe)
        probe.wait_ok(10)
        time.sleep(0.2)
        back = time.monotonic()
        a.link_up()
        a.start()
        a.wait_for(serving(host, "a"), 20, "a serving again")
        b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 10, "b standby")
        done = time.monotonic()
        time.sleep(0.5)
        recs = probe.stop()
        st.probes.remove(probe)
        out["handback_restart_to_serving_s"] = done - back
        out["handback"] = {}
        for p in PROTOS:
            out["handback"][p] = longest_gap(recs, p, back - 0.1, done + 0.5, back)
        # false takeovers: b should have taken over exactly once (the kill), a (restarted) never
        out["takeovers_b"] = len(b.status()["pair"]["takeovers"])
        out["takeovers_a_after_restart"] = len(a.status()["pair"]["takeovers"])
        out["suspect_lines"] = {n: count_suspects(logs[n]) for n in ("a", "b")}
    finally:
        if idle is not None and idle in st.idle:
            idle.stop()
            st.idle.remove(idle)
        for n in (a, b):
            if n in st.nodes:
                n.stop(10)
                st.nodes.remove(n)
        link_up(lab, lab.ns_a)
    return out


def run_keepalived(lab: Lab, st: State, work: Path, i: int, setup: Setup, idle_cap: float) -> dict:
    ka_a = KaNode(lab, "a", 150, work / f"run{i}")
    ka_b = KaNode(lab, "b", 100, work / f"run{i}")
    out: dict = {}
    idle = None
    try:
        set_flood(lab, st, False)
        link_up(lab, lab.ns_a)
        ka_a.remove_vip()
        ka_b.remove_vip()
        st.ka.append(ka_a)
        ka_a.start()
        wait_until(ka_a.has_vip, 10, "keepalived a MASTER (VIP on a)")
        st.ka.append(ka_b)
        ka_b.start()
        time.sleep(0.3)
        if ka_b.has_vip() or not ka_a.has_vip():
            raise LabError("keepalived: VIP not on a alone after b started")
        # --- idle connections, then the takeover
        idle = IdleProbe(lab, VIP).start()
        st.idle.append(idle)
        probe = Probe(lab, VIP).start()
        st.probes.append(probe)
        probe.wait_ok(10)
        time.sleep(0.2)
        died = ka_a.kill_hard()
        moved = wait_until(ka_b.has_vip, 10, "VIP on b")
        probe.wait_ok(10, after=died, timeout=10)
        time.sleep(0.2)
        recs = probe.stop()
        st.probes.remove(probe)
        out["takeover_s"] = {p: first_success_after(recs, p, died) for p in PROTOS}
        out["takeover_failed_attempts"] = {p: sum(1 for r in recs if r["p"] == p and not r["ok"] and r["s"] >= died)
                                           for p in PROTOS}
        out["vip_seen_on_b_s"] = moved - died  # polled every 5 ms with `ip addr`: coarse, an upper bound
        out["idle"] = idle_phase(idle, died, idle_cap)
        st.idle.remove(idle)
        # --- hand-back (preemption by the higher priority)
        probe = Probe(lab, VIP).start()
        st.probes.append(probe)
        probe.wait_ok(10)
        time.sleep(0.2)
        ka_a.remove_vip()          # a rebooted machine has lost it; SIGKILL left it on a's eth0
        back = time.monotonic()
        link_up(lab, lab.ns_a)
        ka_a.start()
        wait_until(lambda: ka_a.has_vip() and not ka_b.has_vip(), 10, "VIP back on a only")
        done = time.monotonic()
        time.sleep(0.5)
        recs = probe.stop()
        st.probes.remove(probe)
        out["handback_restart_to_serving_s"] = done - back
        out["handback"] = {}
        for p in PROTOS:
            out["handback"][p] = longest_gap(recs, p, back - 0.1, done + 0.5, back)
    finally:
        if idle is not None and idle in st.idle:
            idle.stop()
            st.idle.remove(idle)
        for k in (ka_a, ka_b):
            k.stop()
            if k in st.ka:
                st.ka.remove(k)
        link_up(lab, lab.ns_a)
    return out


# ---------------------------------------------------------------------------------- reporting
def stats(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "worst": None, "best": None, "missing": len(values)}
    return {"n": len(vals), "median": statistics.median(vals), "worst": max(vals), "best": min(vals),
            "missing": len(values) - len(vals)}


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


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def summarise(runs: list[dict], setups: list[Setup], idle_cap: float) -> dict:
    summ: dict = {}
    for setup in setups:
        rs = [r[setup.key] for r in runs if setup.key in r]
        s: dict = {"label": setup.label, "runs": len(rs)}
        for p in PROTOS:
            s[f"takeover_{p}"] = stats([r["takeover_s"][p] for r in rs])
            s[f"handback_{p}"] = stats([r["handback"][p]["longest_gap_s"] for r in rs])
        s["handback_restart_to_serving"] = stats([r["handback_restart_to_serving_s"] for r in rs])
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
        if k:
            for proto in PROTOS:
                for stat in ("median", "worst"):
                    add(f"[{setup.label}] client {proto.upper()} outage <= keepalived ({stat})",
                        p[f"takeover_{proto}"][stat], k[f"takeover_{proto}"][stat])
    return out


# ------------------------------------------------------------------------------------------- main
def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cleanup(lab: Lab, st: State, sysctl_old: dict[str, str]) -> None:
    for pr in list(st.probes):
        pr.stop()
    for ip in list(st.idle):
        ip.stop()
    for n in list(st.nodes):
        n.stop(10)
    for k in list(st.ka):
        k.stop()
    if st.flooding and lab.ns_switch in Lab.existing_namespaces():
        try:
            lab.flood(False)
            st.flooding = False
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            say(f"failover.py: flood off: {exc}")
    for ns in (lab.ns_a, lab.ns_b):
        if ns in Lab.existing_namespaces():
            lab.run(ns, ["ip", "addr", "del", f"{VIP}/{lab.addresses.prefixlen}", "dev", "eth0"], capture_output=True)
            lab.run(ns, ["ip", "link", "set", "eth0", "up"], capture_output=True)
            lab.run(ns, ["ip", "link", "set", "sync0", "up"], capture_output=True)
            if ns in sysctl_old:
                lab.run(ns, ["sysctl", "-q", "-w", f"net.ipv4.ip_nonlocal_bind={sysctl_old[ns]}"], capture_output=True)


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
    ap.add_argument("--heartbeat", type=float, default=20.0, help="pair heartbeat in ms (default 20, the lab's)")
    ap.add_argument("--dead-after", type=ms_list, default=[100.0],
                    help="pair dead_after in ms; a comma list measures each (default 100, the lab's)")
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
    root = args.root or ("/var/tmp/pairproxy-failover-lab" if args.prefix == "ppf"
                         else f"/var/tmp/pairproxy-failover-lab-{args.prefix}")
    signal.signal(signal.SIGTERM, _terminate)
    lab = Lab(prefix=args.prefix, root=root)
    work = Path(tempfile.mkdtemp(prefix="pairproxy-failover-", dir="/var/tmp"))
    st = State()
    sysctl_old: dict[str, str] = {}
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    runs: list[dict] = []
    load_before = os.getloadavg()
    try:
        say(f"lab {lab.prefix} ({root}): up ...; setups (interleaved per run): "
            + ", ".join(f"{s.label} x{s.runs}" for s in setups))
        lab.up()
        for ns in (lab.ns_a, lab.ns_b):
            cp = lab.run(ns, ["sysctl", "-n", "net.ipv4.ip_nonlocal_bind"], capture_output=True, text=True)
            sysctl_old[ns] = cp.stdout.strip() or "0"
            lab.run(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"], check=True)
        for i in range(max(s.runs for s in setups)):
            r: dict = {"run": i + 1}
            runs.append(r)
            for setup in setups:
                if i >= setup.runs:
                    continue
                fn = run_keepalived if setup.kind == "keepalived" else run_pairproxy
                res = r[setup.key] = fn(lab, st, work, i, setup, idle_cap)
                idle = sorted(("-" if c["notice_s"] is None else f"{c['notice_s'] * 1000:.0f}") for c in res["idle"])
                extra = ""
                if "node" in res:
                    n = res["node"]
                    extra = (f" (b: silence {n['silence_ms']} moved {n['address_moved_ms']} first client "
                             f"{n['first_client_ms']} resets {n['clients_reset']}/{n['backend_connections_reset']}"
                             f"; takeovers b {res['takeovers_b']})")
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
            doc = {
                "date": started.isoformat(timespec="seconds"),
                "command": " ".join([".venv/bin/python", "bench/failover.py", *sys.argv[1:]]),
                "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version(), "loadavg_before": load_before},
                "git_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                             text=True).stdout.strip(),
                "duration_s": round(time.monotonic() - t_start, 1),
                "order": "interleaved: every run measures each setup once, in this order",
                "setups": [{"key": s.key, "label": s.label, "kind": s.kind, "heartbeat_ms": s.heartbeat_ms,
                            "dead_after_ms": s.dead_after_ms, "runs": s.runs} for s in setups],
                "idle_cap_ms": args.idle_cap_ms,
                "summary": summ, "targets": vs, "table": tab, "runs": runs,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            say(f"numbers written to {args.json}")
        return 0
    except (LabError, subprocess.SubprocessError, OSError) as exc:
        say(f"failover.py: {exc}")
        return 1
    except KeyboardInterrupt:
        say("failover.py: interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup(lab, st, sysctl_old)
        if not args.keep_lab:
            try:
                lab.down()
            except LabError as exc:
                say(f"failover.py: lab down: {exc}")
        else:
            say(f"lab {lab.prefix} left up (--keep-lab); logs in {work}")
        if args.keep_logs and not args.keep_lab:
            say(f"logs kept in {work}")
        elif not args.keep_lab:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
