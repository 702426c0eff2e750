"""Failover benchmark: pairproxy's stateless pair vs. keepalived (VRRPv3) + haproxy, same lab, same probe.

    sudo .venv/bin/python bench/failover.py [--runs 10] [--prefix ppf] [--json FILE] [--keep-lab]

Each run measures, in its own lab (prefix ``ppf``, root /var/tmp/pairproxy-failover-lab):

* **pairproxy**: ``pairproxy run`` with the lab's pair configs in ``{prefix}-b`` then ``{prefix}-a``
  (heartbeat 20 ms, dead_after 100 ms); clients use a's address 10.77.0.1.
* **keepalived+haproxy**: keepalived 2.2.7 VRRPv3 (``advert_int 0.01``, VIP 10.77.0.50/24 on eth0,
  priority 150 in ns a, 100 in ns b, preempt on) and haproxy 2.6 ``mode tcp`` in both namespaces
  listening on the VIP (``net.ipv4.ip_nonlocal_bind=1`` in the two node namespaces, so the standby's
  haproxy is already bound when the VIP arrives), backends 10.77.0.10:445 / :2049.

The probe (bench/_failprobe.py, in the client namespace) starts a new TCP connection + SMB2 NEGOTIATE
and, separately, a new TCP connection + ONC RPC NULL (NFSv3) every 5 ms while anything looks wrong
(20 ms while all is well), many in flight, each with a 50 ms connect timeout, and logs every attempt
with CLOCK_MONOTONIC timestamps, the clock this script uses too.

Node death (both setups): ``ip link set eth0 down`` in the node's namespace, then SIGKILL of its
processes (pairproxy; or keepalived's VRRP child, keepalived, haproxy). The death time is taken right
after the link went down (as ``NodeProcess.kill_hard``).

Measured per run and protocol:

* ``takeover``: death -> end of the first successful operation that *started* after the death;
* ``handback``: node a restarted (link up + start; for keepalived a's stale VIP removed first, as a
  rebooted machine would have lost it) -> the longest gap between two successive successful
  operations from just before the restart until the hand-back is complete (+0.5 s);
* pairproxy's own view from b's status: ``silence_ms`` (last heartbeat -> declared dead),
  ``address_moved_ms`` (declared dead -> a's address up on b), ``first_client_ms`` (declared dead ->
  first client connection served).

It always stops what it started (nodes, keepalived, haproxy, probes, VIPs, sysctls, link states), also
on errors, Ctrl-C and SIGTERM, and tears the lab down unless ``--keep-lab``. Exit code 0 whether the
targets pass or miss (a measurement); 1 only if something broke.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.lab.clients import NodeProcess  # noqa: E402
from deploy.lab.core import Lab, LabError  # noqa: E402

PROBE = REPO / "bench" / "_failprobe.py"
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
        self.nodes: list[NodeProcess] = []
        self.ka: list[KaNode] = []


def link_up(lab: Lab, ns: str) -> None:
    lab.run(ns, ["ip", "link", "set", "eth0", "up"], check=True)


def measure_event(probe: Probe, at: float) -> dict:
    return {p: first_success_after(probe.snapshot(), p, at) for p in PROTOS}


def run_pairproxy(lab: Lab, st: State, work: Path, i: int) -> dict:
    addr = lab.addresses
    host = addr.service_a
    a = NodeProcess(lab, "a", pair=True, log=work / f"pair-a-{i}.log")
    b = NodeProcess(lab, "b", pair=True, log=work / f"pair-b-{i}.log")
    st.nodes += [a, b]
    out: dict = {}
    try:
        link_up(lab, lab.ns_a)
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving its address")
        b.wait_for(serving(addr.service_b, "b"), 10, "b serving its address")
        b.wait_for(lambda s: standing_by(s) and (s["pair"]["link"].get("rtt_ms") or {}).get("count", 0) > 5,
                   10, "b standing by, link up")
        # --- takeover
        probe = Probe(lab, host).start()
        st.probes.append(probe)
        probe.wait_ok(10)
        time.sleep(0.2)
        died = a.kill_hard(link_down=True)
        b.wait_for(serving(host, "b"), 10, "b holding a's address")
        probe.wait_ok(10, after=died, timeout=10)
        time.sleep(0.2)
        recs = probe.stop()
        st.probes.remove(probe)
        out["takeover_s"] = {p: first_success_after(recs, p, died) for p in PROTOS}
        out["takeover_failed_attempts"] = {p: sum(1 for r in recs if r["p"] == p and not r["ok"] and r["s"] >= died)
                                           for p in PROTOS}
        status = b.status()
        out["node"] = status["pair"]["takeovers"][-1]
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
    finally:
        for n in (a, b):
            n.stop(10)
            st.nodes.remove(n)
        link_up(lab, lab.ns_a)
    return out


def run_keepalived(lab: Lab, st: State, work: Path, i: int) -> dict:
    ka_a = KaNode(lab, "a", 150, work / f"run{i}")
    ka_b = KaNode(lab, "b", 100, work / f"run{i}")
    out: dict = {}
    try:
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
        # --- takeover
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


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def summarise(runs: list[dict]) -> dict:
    summ: dict = {}
    for setup in ("pairproxy", "keepalived"):
        rs = [r[setup] for r in runs if setup in r]
        s: dict = {}
        for p in PROTOS:
            s[f"takeover_{p}"] = stats([r["takeover_s"][p] for r in rs])
            s[f"handback_{p}"] = stats([r["handback"][p]["longest_gap_s"] for r in rs])
        s["handback_restart_to_serving"] = stats([r["handback_restart_to_serving_s"] for r in rs])
        if setup == "pairproxy":
            for k in ("silence_ms", "address_moved_ms", "first_client_ms"):
                s[k] = stats([None if r["node"][k] is None else r["node"][k] / 1000 for r in rs])
            s["silence_plus_moved"] = stats([r["node"]["silence_ms"] / 1000 + r["node"]["address_moved_ms"] / 1000
                                             for r in rs if r["node"]["silence_ms"] is not None
                                             and r["node"]["address_moved_ms"] is not None])
            s["silence_plus_first_client"] = stats([r["node"]["silence_ms"] / 1000 + r["node"]["first_client_ms"] / 1000
                                                    for r in rs if r["node"]["silence_ms"] is not None
                                                    and r["node"]["first_client_ms"] is not None])
        else:
            s["vip_seen_on_b"] = stats([r["vip_seen_on_b_s"] for r in rs])
        summ[setup] = s
    return summ


def table(summ: dict) -> list[str]:
    rows = [("death -> first SMB NEGOTIATE ok", "takeover_smb"),
            ("death -> first NFS NULL ok", "takeover_nfs"),
            ("hand-back: longest SMB gap", "handback_smb"),
            ("hand-back: longest NFS gap", "handback_nfs"),
            ("hand-back: restart -> a serves again", "handback_restart_to_serving")]
    node_rows = [("b: silence (last heartbeat -> dead)", "silence_ms"),
                 ("b: dead -> address up", "address_moved_ms"),
                 ("b: dead -> first client served", "first_client_ms"),
                 ("b: silence + address up", "silence_plus_moved"),
                 ("b: silence + first client", "silence_plus_first_client")]
    p, k = summ["pairproxy"], summ["keepalived"]
    lines = ["| metric (ms) | pairproxy median | pairproxy worst | keepalived+haproxy median | keepalived+haproxy worst |",
             "|---|---:|---:|---:|---:|"]
    for label, key in rows:
        lines.append(f"| {label} | {ms(p[key]['median'])} | {ms(p[key]['worst'])} | "
                     f"{ms(k[key]['median'])} | {ms(k[key]['worst'])} |")
    for label, key in node_rows:
        lines.append(f"| {label} | {ms(p[key]['median'])} | {ms(p[key]['worst'])} | | |")
    lines.append(f"| VIP seen on b (`ip addr` poll, 5 ms) | | | {ms(k['vip_seen_on_b']['median'])} | "
                 f"{ms(k['vip_seen_on_b']['worst'])} |")
    return lines


def verdicts(summ: dict) -> list[dict]:
    p, k = summ["pairproxy"], summ["keepalived"]
    out = []

    def add(name: str, value: float | None, limit: float | None, text: str) -> None:
        ok = value is not None and limit is not None and value <= limit
        out.append({"target": name, "value_ms": None if value is None else round(value * 1000, 1),
                    "limit_ms": None if limit is None else round(limit * 1000, 1), "pass": ok, "text": text})

    add("node takeover < 100 ms (b: silence + address up, worst)", p["silence_plus_moved"]["worst"], 0.1,
        "death ~ last heartbeat -> a's address served by b")
    add("node takeover < 100 ms (b: silence + first client, worst)", p["silence_plus_first_client"]["worst"], 0.1,
        "last heartbeat -> first client connection served by b")
    for proto in PROTOS:
        add(f"client {proto.upper()} death -> first success < 100 ms (median)", p[f"takeover_{proto}"]["median"], 0.1, "")
        add(f"client {proto.upper()} death -> first success < 100 ms (worst)", p[f"takeover_{proto}"]["worst"], 0.1, "")
    for proto in PROTOS:
        for stat in ("median", "worst"):
            add(f"client {proto.upper()} outage <= keepalived ({stat})", p[f"takeover_{proto}"][stat],
                k[f"takeover_{proto}"][stat], "")
    return out


# ------------------------------------------------------------------------------------------- main
def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cleanup(lab: Lab, st: State, sysctl_old: dict[str, str]) -> None:
    for pr in list(st.probes):
        pr.stop()
    for n in list(st.nodes):
        n.stop(10)
    for k in list(st.ka):
        k.stop()
    for ns in (lab.ns_a, lab.ns_b):
        if ns in Lab.existing_namespaces():
            lab.run(ns, ["ip", "addr", "del", f"{VIP}/{lab.addresses.prefixlen}", "dev", "eth0"], capture_output=True)
            lab.run(ns, ["ip", "link", "set", "eth0", "up"], capture_output=True)
            lab.run(ns, ["ip", "link", "set", "sync0", "up"], capture_output=True)
            if ns in sysctl_old:
                lab.run(ns, ["sysctl", "-q", "-w", f"net.ipv4.ip_nonlocal_bind={sysctl_old[ns]}"], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--prefix", default="ppf", help="lab prefix (default ppf)")
    ap.add_argument("--root", help="lab state directory (default /var/tmp/pairproxy-failover-lab[-PREFIX])")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end")
    args = ap.parse_args()
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
    try:
        say(f"lab {lab.prefix} ({root}): up ...")
        lab.up()
        for ns in (lab.ns_a, lab.ns_b):
            cp = lab.run(ns, ["sysctl", "-n", "net.ipv4.ip_nonlocal_bind"], capture_output=True, text=True)
            sysctl_old[ns] = cp.stdout.strip() or "0"
            lab.run(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"], check=True)
        for i in range(args.runs):
            r: dict = {"run": i + 1}
            r["pairproxy"] = run_pairproxy(lab, st, work, i)
            r["keepalived"] = run_keepalived(lab, st, work, i)
            runs.append(r)
            pp, ka = r["pairproxy"], r["keepalived"]
            n = pp["node"]
            say(f"run {i + 1}/{args.runs}: pairproxy takeover smb {ms(pp['takeover_s']['smb'])} "
                f"nfs {ms(pp['takeover_s']['nfs'])} ms (b: silence {n['silence_ms']} moved {n['address_moved_ms']} "
                f"first client {n['first_client_ms']}), hand-back gap smb {ms(pp['handback']['smb']['longest_gap_s'])} "
                f"nfs {ms(pp['handback']['nfs']['longest_gap_s'])} | keepalived takeover smb "
                f"{ms(ka['takeover_s']['smb'])} nfs {ms(ka['takeover_s']['nfs'])}, hand-back gap smb "
                f"{ms(ka['handback']['smb']['longest_gap_s'])} nfs {ms(ka['handback']['nfs']['longest_gap_s'])} ms  "
                f"[{time.monotonic() - t_start:.0f} s]")
        summ = summarise(runs)
        say()
        say(f"{len(runs)} runs; median and worst (ms)")
        for line in table(summ):
            say(line)
        say()
        vs = verdicts(summ)
        for v in vs:
            say(f"{'PASS' if v['pass'] else 'MISS'}  {v['target']}: {v['value_ms']} ms vs {v['limit_ms']} ms")
        if args.json:
            doc = {
                "date": started.isoformat(timespec="seconds"),
                "command": " ".join([".venv/bin/python", "bench/failover.py", *sys.argv[1:]]),
                "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()},
                "git_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                             text=True).stdout.strip(),
                "duration_s": round(time.monotonic() - t_start, 1),
                "summary": summ, "targets": vs, "table": table(summ), "runs": runs,
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
        if not args.keep_lab:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
