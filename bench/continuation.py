"""Continuation benchmark (issue 10): an established SMB session and an established NFS connection across
the death of the node that proxies them; pairproxy's stateful pair vs. its stateless pair and keepalived
(VRRPv3) + haproxy, in the same run.

    sudo .venv/bin/python bench/continuation.py [--runs 10] [--setups stateful,stateless,keepalived]
        [--switch nodes] [--prefix c10b] [--json FILE]

Per run, setup and protocol, in its own lab (prefix ``c10b``): the client (deploy/lab/scripts/smb_loop.py:
smbprotocol with a session, a tree and an open file; deploy/lab/scripts/nfs_loop.py: NFSv3 on one TCP
connection) writes 64 KiB and reads it back every 10 ms for 4 s; 1.5 s in, node a dies (its link down,
then SIGKILL of its processes). Recorded: the client's longest round (the stall across the death), its
error if any (the client never reconnects: an error is what a reconnecting application would have to
handle) and how long after the death it came (``error_after_s``: how long the application waited to
learn that it must reconnect), whether the SMB session id stayed the same, read-backs that differed, and
pairproxy's takeover record (continued or reset). pairproxy runs the lab's pair configs (heartbeat 20 ms,
dead_after 100 ms): stateful on a switch flooding only the nodes' ports (``--switch hub`` for the hub),
stateless on the lab's learning switch (its standby needs nothing of the peer's frames); keepalived as
bench/failover.py runs it (``advert_int 0.01``, haproxy ``mode tcp`` on the VIP, 445 and 2049; the NFS
client mounts from the server's own mountd, haproxy passes only 2049).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.driver import (Bench, KeepalivedNode, LabError, NodeProcess, PairTimings, say, serving, standing_by, stats,  # noqa: E402
                          wait_until, run_info)
from deploy.lab import nodeconfigs  # noqa: E402
from deploy.lab.clients import SCRIPTS, takeover_settled  # noqa: E402

VIP = "10.77.0.50"
#: what one run compares: pairproxy's two modes, then keepalived + haproxy
SETUPS = ("stateful", "stateless", "keepalived")
SECONDS, KILL_AT = 4.0, 1.5
HUNG_AFTER = 15.0  # a client still waiting this long after its loop's end is hung (smbprotocol waits 60 s)


def client(lab, protocol: str, host: str, name: str, mount_host: str | None = None) -> subprocess.Popen:
    if protocol == "smb":
        argv = [str(SCRIPTS / "smb_loop.py"), host, lab.smb_share, lab.smb_user, lab.smb_password, name, str(SECONDS)]
    else:
        argv = [str(SCRIPTS / "nfs_loop.py"), host, str(lab.nfs_export_path), name, str(SECONDS), "65536", "0.01"]
        if mount_host:
            argv.append(mount_host)
    return lab.popen(lab.ns_client, [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, ready: dict) -> dict:
    try:
        out, err = proc.communicate(timeout=SECONDS + HUNG_AFTER)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"hung: no answer within {HUNG_AFTER:g} s after the loop's end", "same_session": None}
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    result = lines[-1] if lines and lines[-1].get("done") else {"error": f"no result: {err[-300:]}"}
    result["same_session"] = result.get("session_id") == ready.get("session_id") if "session_id" in ready else None
    return result


def error_after(result: dict, killed_at: float) -> dict:
    """``result`` with ``error_after_s``: from the death to the client's error (None: no error, or hung)."""
    failed_at = result.get("failed_at")
    result["error_after_s"] = None if failed_at is None else round(failed_at - killed_at, 3)
    return result


def run_pairproxy(bench: Bench, i: int, protocol: str, mode: str) -> dict:
    lab = bench.lab
    a = bench.started(NodeProcess(lab, "a", pair=True, mode=mode, log=bench.work / f"a-{i}-{mode}-{protocol}.log"))
    b = bench.started(NodeProcess(lab, "b", pair=True, mode=mode, log=bench.work / f"b-{i}-{mode}-{protocol}.log"))
    try:
        b.start()
        a.start()
        a.wait_for(serving(lab.addresses.service_a, "a"), 15, "a serving")
        b.wait_for(standing_by, 15, "b standing by")
        if mode == "stateful":
            for node in (a, b):
                node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 15, "observer running")
        proc = client(lab, protocol, lab.addresses.service_a, f"bench-{mode}-{protocol}-{i}.bin")
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            return {"error": "client did not start: " + proc.stderr.read()[-300:]}
        time.sleep(KILL_AT)
        load = os.getloadavg()[0]
        before = {n.node: n.status()["pair"]["takeovers_total"] for n in (a, b)}  # false takeovers so far
        killed_at = a.kill_hard(link_down=True)
        b.wait_for(serving(lab.addresses.service_a, "b"), 10, "b holding a's address")
        result = error_after(finish(proc, ready), killed_at)
        # the takeover's counts once every connection of a's is decided (continued after the address)
        t = b.wait_for(takeover_settled(lab.addresses.service_a, "b"), 10, "b's takeover settled")["pair"]["takeovers"][-1]
        result.update(load=round(load, 2), false_takeovers_before_kill=before, silence_ms=t["silence_ms"],
                      address_moved_ms=t["address_moved_ms"], continued=t["connections_continued"],
                      reset=t["clients_reset"],
                      resets=[{"client": c["client"], "reason": c["reason"]} for c in t["connections"] if not c["continued"]])
        return result
    finally:
        bench.stop(a)
        bench.stop(b)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])


def run_keepalived(bench: Bench, i: int, protocol: str) -> dict:
    lab = bench.lab
    ka_a = bench.started(KeepalivedNode(lab, "a", 150, VIP, bench.work / f"ka{i}-{protocol}"))
    ka_b = bench.started(KeepalivedNode(lab, "b", 100, VIP, bench.work / f"ka{i}-{protocol}"))
    try:
        ka_a.start()
        wait_until(ka_a.has_vip, 10, "keepalived a MASTER")
        ka_b.start()
        time.sleep(0.3)
        proc = client(lab, protocol, VIP, f"bench-ka-{protocol}-{i}.bin", mount_host=lab.addresses.server)
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            return {"error": "client did not start: " + proc.stderr.read()[-300:]}
        time.sleep(KILL_AT)
        load = os.getloadavg()[0]
        killed_at = ka_a.kill_hard()
        result = error_after(finish(proc, ready), killed_at)
        result.update(load=round(load, 2))
        return result
    finally:
        bench.stop(ka_a)
        bench.stop(ka_b)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])


ECHO_PORT = 7777


def echo_configs(bench: Bench, timings: PairTimings) -> dict[str, Path]:
    """The lab's stateful pair configs with one more service: a plain TCP echo on 7777 (the lab server's
    tcp_clients.py echo-server), so thousands of idle connections cost the file servers nothing. Each
    node gets its own state directory (a peer hello persisted by the lab's configs lacks the echo service,
    and a standby snoops the ports of the hello it starts with)."""
    lab = bench.lab
    out = {}
    for n in ("a", "b"):
        config = lab.node_config(n, pair=True, mode="stateful", timings=timings)
        config["service"].append({"name": "echo", "protocol": "tcp", "port": ECHO_PORT,
                                  "backend": f"{lab.addresses.server}:{ECHO_PORT}"})
        state = bench.work / f"state-{n}"
        state.mkdir(exist_ok=True)
        config["node"].update(state_dir=str(state), control=str(state / "control.sock"))
        out[n] = nodeconfigs.write_toml(bench.work / "configs" / f"scale-{n}.toml", config)
    return out


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def slow_poll(node: NodeProcess, predicate, timeout: float, what: str, step: float = 0.5) -> dict:
    """``node.wait_for`` at a slower pace: a status with thousands of connections costs the node (and
    its observer) tens of milliseconds each, and 50 a second are a load of their own."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = node.status()
        except LabError:  # (a status of thousands of connections on a loaded machine may take over 5 s)
            st = None
        if st is not None and predicate(st):
            return st
        if time.monotonic() > deadline:
            raise LabError(f"node {node.node}: {what} not reached within {timeout:g}s")
        time.sleep(step)


def run_scale(bench: Bench, i: int, idle: int, timings: PairTimings) -> dict:
    """``idle`` idle connections (tcp_clients.py hold: one echo each, then nothing) and one busy one
    (deploy/lab/scripts/busy_echo.py: 64 bytes echoed every 2 ms) through a; a dies; when did b continue the busy one
    and all of them (its takeover record, from the death verdict), did the busy client see an error, did
    every idle one answer one more echo and close cleanly afterwards."""
    lab = bench.lab
    configs = echo_configs(bench, timings)
    a = bench.started(NodeProcess(lab, "a", config=configs["a"], log=bench.work / f"scale-a-{idle}-{i}.log"))
    b = bench.started(NodeProcess(lab, "b", config=configs["b"], log=bench.work / f"scale-b-{idle}-{i}.log"))
    host = lab.addresses.service_a
    held = busy = None
    try:
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving")
        b.wait_for(standing_by, 15, "b standing by")
        for node in (a, b):
            node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 15, "observer running")
        st0 = b.status()
        false_before = st0["pair"]["takeovers_total"]
        rss_before = ((st0["pair"]["state_sync"].get("continuation") or {}).get("observer_rss"), rss(b.pid))
        held = lab.popen(lab.ns_client, [sys.executable, str(SCRIPTS / "tcp_clients.py"), "hold", host, str(ECHO_PORT),
                                         str(idle)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        opened = json.loads(held.stdout.readline() or "{}")
        if opened.get("open") != idle:
            return {"error": f"idle connections not opened: {opened}"}
        busy = lab.popen(lab.ns_client, [sys.executable, str(SCRIPTS / "busy_echo.py"), host,
                                         str(ECHO_PORT), "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not json.loads(busy.stdout.readline() or "{}").get("ready"):
            return {"error": "busy client did not start: " + busy.stderr.read()[-300:]}

        def all_continuable(s: dict) -> bool:
            c = s["pair"]["state_sync"].get("continuation") or {}
            return c.get("continuable") == idle + 1

        waited = time.monotonic()
        st = slow_poll(b, all_continuable, 120, f"b able to continue all {idle + 1}", step=max(0.5, idle / 1000))
        summary_before = st["pair"]["state_sync"].get("continuation")
        time.sleep(max(0.5, idle / 1000))  # the status poll's own cost passes
        load = os.getloadavg()[0]
        false_takeovers = st["pair"]["takeovers_total"] - false_before
        rss_after = (summary_before.get("observer_rss"), rss(b.pid))
        memory = {"observer_rss_before": rss_before[0], "observer_rss_after": rss_after[0],
                  "node_rss_before": rss_before[1], "node_rss_after": rss_after[1],
                  "bytes_kept": summary_before.get("bytes_kept")}
        if None not in (rss_before[0], rss_after[0]):
            memory["observer_bytes_per_connection"] = round((rss_after[0] - rss_before[0]) / (idle + 1))
        memory["node_bytes_per_connection"] = round((rss_after[1] - rss_before[1]) / (idle + 1))
        a.kill_hard(link_down=True)
        killed_wall = time.time()

        time.sleep(3.0)  # the takeover, the rest of the connections, then the resets: until the count stays
        last, t = -1, {}
        while True:
            st = slow_poll(b, lambda s: bool(s["pair"]["takeovers"]), 30, "a takeover record", step=1.0)
            t = st["pair"]["takeovers"][-1]
            if t.get("all_continued_ms") is not None and t["connections_continued"] == last:
                break
            last = t["connections_continued"]
            time.sleep(1.0)
        busy.terminate()
        bout = busy.communicate(timeout=30)[0]
        bres = [json.loads(line) for line in bout.splitlines() if line.startswith("{") and "done" in line]
        held.stdin.write("\n")
        held.stdin.flush()
        closed = json.loads(held.stdout.readline() or "{}")
        brec = bres[-1] if bres else {"error": "busy client: no result"}
        gaps = [g for g in brec.get("gaps", []) if g[1] >= killed_wall - 0.05]
        return {"idle": idle, "load": round(load, 2), "false_takeovers_before_kill": false_takeovers,
                "summary_before": summary_before, "standby_memory": memory,
                "sync_wait_s": round(time.monotonic() - waited, 2),
                "silence_ms": t["silence_ms"], "address_moved_ms": t["address_moved_ms"],
                "first_continued_ms": t.get("first_continued_ms"), "all_continued_ms": t.get("all_continued_ms"),
                "continued": t["connections_continued"], "reset": t["clients_reset"],
                "phases_ms": t.get("phases_ms"),
                "first_record": (t["connections"] or [{}])[0],
                "reasons": sorted({c["reason"] for c in t["connections"] if not c["continued"]}),
                "busy_error": brec.get("error"), "busy_wrong": brec.get("wrong"), "busy_rounds": brec.get("rounds"),
                "busy_gap_ms": [round((g[1] - g[0]) * 1000, 1) for g in gaps],
                "busy_back_after_kill_ms": round((gaps[0][1] - killed_wall) * 1000, 1) if gaps else None,
                "idle_closed_cleanly": closed.get("closed_cleanly"), "idle_failed": closed.get("failed"),
                "idle_errors": closed.get("errors")}
    finally:
        for proc in (busy, held):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        bench.stop(a)
        bench.stop(b)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])


def main_scale(args) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    results: list = []
    with Bench("continuation-scale", prefix=args.prefix, default_prefix="c10b", keep_work=args.keep_logs) as bench:
        lab = bench.up()
        for ns in (lab.ns_a, lab.ns_b):
            bench.sysctl(ns, "net.ipv4.ip_nonlocal_bind", "1")
        echo = lab.popen(lab.ns_server, [sys.executable, str(SCRIPTS / "tcp_clients.py"), "echo-server",
                                         lab.addresses.server, str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
        bench.defer(lambda: (echo.kill(), echo.wait()))
        if echo.stdout.readline().strip() != "ready":
            raise SystemExit("echo server did not start")
        bench.defer(lambda: lab.ns_switch in lab.existing_namespaces() and lab.flood(False))
        lab.flood(args.switch)
        for i in range(args.runs):
            for idle in [int(n) for n in args.scale.split(",")]:
                r = run_scale(bench, i, idle, PairTimings(args.heartbeat, args.dead_after))
                results.append(r)
                say(f"run {i} idle {idle}: {json.dumps(r)}")
    doc = {"info": run_info("continuation.py", started), "args": vars(args), "results": results}
    Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=10, help="runs per setup and protocol (default 10)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="comma-separated, of: " + ", ".join(SETUPS) + " (default: all, in this order)")
    parser.add_argument("--switch", default="nodes", choices=("nodes", "hub"),
                        help="the stateful pair's switch: flooding only the nodes' ports (default), or a hub")
    parser.add_argument("--prefix", default="c10b", help="the lab's name prefix (its namespaces and links)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "continuation-latest.json"),
                        help="where the raw results go (default bench/continuation-latest.json)")
    parser.add_argument("--scale", default=None,
                        help="instead: idle connections plus a busy one, e.g. 1,100,1000,5000 (verdict to all continued)")
    parser.add_argument("--heartbeat", default="50ms", help="--scale: the pair's heartbeat")
    parser.add_argument("--dead-after", default="500ms", help="--scale: the pair's dead_after")
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' logs (their directory "
                        "is printed at the end; removed otherwise)")
    args = parser.parse_args()
    if args.scale:
        if args.json == parser.get_default("json"):
            args.json = str(Path(__file__).parent / "continuation-scale-latest.json")
        return main_scale(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        parser.error(f"--setups: {', '.join(unknown) or 'none given'}: not a setup (one of {', '.join(SETUPS)})")
    results: dict = {s: {"smb": [], "nfs": []} for s in setups}
    with Bench("continuation", prefix=args.prefix, default_prefix="c10b", keep_work=args.keep_logs) as bench:
        lab = bench.up()
        for ns in (lab.ns_a, lab.ns_b):
            bench.sysctl(ns, "net.ipv4.ip_nonlocal_bind", "1")
        bench.defer(lambda: lab.ns_switch in lab.existing_namespaces() and lab.flood(False))
        for i in range(args.runs):
            for setup in setups:
                if setup == "stateful":
                    bench.lab.flood(args.switch)
                for protocol in ("smb", "nfs"):
                    if setup == "keepalived":
                        r = run_keepalived(bench, i, protocol)
                    else:
                        r = run_pairproxy(bench, i, protocol, setup)
                    results[setup][protocol].append(r)
                    say(f"run {i} {setup} {protocol}: stall {r.get('longest_round_s')} s, error {r.get('error')} "
                        f"(after {r.get('error_after_s')} s), same session {r.get('same_session')}, "
                        f"continued {r.get('continued')}, load {r.get('load')}")
                if setup == "stateful":
                    bench.lab.flood(False)
    summary = {}
    for setup, per in results.items():
        for protocol, runs in per.items():
            ok = [r for r in runs if r.get("error") is None]
            summary[f"{setup}/{protocol}"] = {
                "runs": len(runs), "errors": len(runs) - len(ok),
                "stall_s": stats([r.get("longest_round_s") for r in ok]),
                "error_after_s": stats([r.get("error_after_s") for r in runs if r.get("error_after_s") is not None]),
                "hung": sum(1 for r in runs if str(r.get("error", "")).startswith("hung")),
                "mismatches": sum(r.get("mismatches") or 0 for r in runs),
                "session_changed": sum(1 for r in runs if r.get("same_session") is False),
                "load": stats([r.get("load") for r in runs])}
    doc = {"info": run_info("continuation.py", started), "args": vars(args), "summary": summary,
           "results": results}
    Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    say(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
