"""Planned moves benchmark (issue 11): pairproxy's live moves vs. keepalived+haproxy, in the same run.

    sudo .venv/bin/python bench/moves.py --prefix m11b --json bench/moves-latest.json   # ~3 min

What runs (the lab of tests/test_pair_lab.py, a stateless pair; ``--mode stateful`` for a stateful one):

1. **pairproxy, client stall per move**: bench/_moveprobe.py in the client namespace (an smbprotocol
   client with an open file writing + reading back 512 bytes every 10 ms, and an NFSv3 client sending RPC
   NULL every 10 ms, each on ONE TCP connection, reconnecting if it must) through a's address while the
   address moves ``--moves`` times, alternating ``handover`` and ``handover --back`` (sent straight to the
   node's control socket: the CLI's Python start-up is not part of a move). Per move: the longest gap
   between two successful operations of either client that ended during the move or 200 ms after it,
   errors, reconnects, and both nodes' move records (phases, loop lag).
2. **pairproxy, restart to serving**: a killed (link down), the clients go on through b, a restarts: from
   a's sync link up (the peer answers) to a serving its address with the connections (a's log), and from
   the process start.
3. **pairproxy, 1,000 connections**: bench/_idleprobe.py holds ``--connections`` idle connections through
   a (340 NFS: the NFS service's secure source ports towards the server are 359; the rest SMB, each after
   one NEGOTIATE); one handover and one back: connections moved per second (moved / freeze -> live), and how
   many of the idle connections saw a reset.
4. **pairproxy, a move in the middle of a ``--transfer-mib`` MiB download** (smbclient ``get``): the
   handover once a quarter of the file arrived; the file must arrive byte-identical.
5. **keepalived+haproxy**: the same clients through the VIP; a planned move is keepalived's own way:
   SIGTERM of the master (it drops the VIP with a priority-0 advert: b takes over at once), and back by
   starting it again (preemption). Per move the same stall, errors and reconnects; and restart to serving
   (a's keepalived start -> VIP on a).

The load average is recorded before and after each part (the machine is shared).
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
import threading
import time
from pathlib import Path

from driver import (BENCH, Bench, IdleProbe, KeepalivedNode, LabError, NodeProcess, PairTimings, random_file,
                    run_info, say, serving, sha256_of, standing_by, wait_until)

from deploy.lab.clients import smb_get, smb_put  # noqa: E402
from proxy.control import request  # noqa: E402

MOVE_PROBE = BENCH / "_moveprobe.py"
VIP = "10.77.0.50"
AFTER = 0.2   # a client gap that ends this long after a move's end still counts for it


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class MoveProbe:
    """bench/_moveprobe.py in the client namespace."""

    def __init__(self, lab, host: str, name: str) -> None:
        self.proc = lab.popen(lab.ns_client, [sys.executable, str(MOVE_PROBE), host, lab.smb_share, lab.smb_user,
                                              lab.smb_password, name, "10"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            self.stop()
            raise LabError(f"_moveprobe.py did not start: {self.proc.stderr.read()[-1500:]}")

    def stop(self) -> dict:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
                return json.loads(line) if line else {}
            return {}
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)


def per_move(report: dict, windows: list[tuple[float, float]]) -> list[dict]:
    """Each move's client stall (longest gap ending in its window), errors and reconnects."""
    out = []
    for start, end in windows:
        m: dict = {}
        for kind in ("smb", "nfs"):
            r = report[kind]
            m[f"{kind}_stall_ms"] = max([g for at, g in r["gaps"] if start <= at <= end + AFTER], default=0.0)
            m[f"{kind}_reconnects"] = [c for c in r["reconnects"] if start - 0.05 <= c["at"] <= end + AFTER]
        m["stall_ms"] = max(m["smb_stall_ms"], m["nfs_stall_ms"])
        # a client that never worked again (e.g. SMB: the old session still holds the file open) has no gap
        # that ends: its stall is "not within the run", not 0
        m["recovered"] = all(c["ms"] is not None for c in m["smb_reconnects"] + m["nfs_reconnects"])
        if not m["recovered"]:
            m["stall_ms"] = None
        out.append(m)
    return out


def baseline(report: dict, windows: list[tuple[float, float]]) -> dict:
    """The clients' gaps over 20 ms away from every move (from 1 s after the first move's start to the end):
    what the machine's load alone costs an operation, to read the stalls against."""
    if not windows:
        return {}
    first = windows[0][0]
    out = {}
    for kind in ("smb", "nfs"):
        gaps = [g for at, g in report[kind]["gaps"]
                if at > first and not any(s - 0.05 <= at <= e + AFTER for s, e in windows)]
        out[kind] = {"gaps_over_20ms": len(gaps), "median_ms": round(statistics.median(gaps), 1) if gaps else None,
                     "worst_ms": max(gaps, default=None),
                     "p90_ms": round(sorted(gaps)[int(0.9 * (len(gaps) - 1))], 1) if gaps else None}
    return out


def summary(moves: list[dict], report: dict) -> dict:
    stalls = [m["stall_ms"] for m in moves if m["stall_ms"] is not None]
    reconnects = sum(len(m["smb_reconnects"]) + len(m["nfs_reconnects"]) for m in moves)
    return {"moves": len(moves), "stall_ms_median": round(statistics.median(stalls), 2) if stalls else None,
            "stall_ms_worst": max(stalls, default=None) if all(m["recovered"] for m in moves) else "not recovered",
            "stall_ms_all": [m["stall_ms"] for m in moves], "moves_not_recovered": sum(not m["recovered"] for m in moves),
            "errors": report["smb"]["error_count"] + report["nfs"]["error_count"],
            "mismatches": report["smb"]["mismatches"] + report["nfs"]["mismatches"],
            "reconnects": reconnects, "moves_with_a_reconnect": sum(
                1 for m in moves if m["smb_reconnects"] or m["nfs_reconnects"]),
            "reconnect_ms": [c["ms"] for m in moves for c in m["smb_reconnects"] + m["nfs_reconnects"]],
            "ops": {k: report[k]["ops"] for k in ("smb", "nfs")},
            "never_recovered": sum(1 for m in moves for c in m["smb_reconnects"] + m["nfs_reconnects"] if c["ms"] is None),
            "first_errors": {k: report[k]["errors"] for k in ("smb", "nfs")}}


def handover(node: NodeProcess, back: bool) -> dict:
    return request(node.control_socket, "handover", timeout=30, back=back, timeout_s=20)


def records(giver: NodeProcess, taker: NodeProcess) -> tuple[dict | None, dict | None]:
    """Both sides' record of the move just made (either may end a little after the command returns: the
    giver keeps the address until the taker is live)."""
    out = into = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        out = giver.status()["pair"].get("last_move")
        into = taker.status()["pair"].get("last_move")
        if into and out and into.get("direction") == "in" and into.get("finished") and \
                out.get("direction") == "out" and out.get("finished") and \
                into.get("started_at", 0) >= out.get("started_at", 0) - 1:
            break
        time.sleep(0.02)
    return out, into


def log_time(log: Path, pattern: str, after: float = 0.0) -> float | None:
    """Seconds of the day of the first log line matching ``pattern`` at or after ``after``."""
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) ", line)
        if m and re.search(pattern, line):
            t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
            if t >= after:
                return t
    return None


def seconds_of_day() -> float:
    now = datetime.datetime.now()
    return now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6


# ---------------------------------------------------------------------------------- pairproxy
def run_pairproxy(bench: Bench, args) -> dict:
    lab = bench.lab
    host = lab.addresses.service_a
    bench.flood(args.mode == "stateful")  # as bench/failover.py: a stateful standby snoops its peer's frames
    cfg = bench.pair_configs(args.mode, PairTimings.from_ms(args.heartbeat, args.dead_after))
    a = bench.started(NodeProcess(lab, "a", config=cfg["a"], log=bench.work / "pair-a.log"))
    b = bench.started(NodeProcess(lab, "b", config=cfg["b"], log=bench.work / "pair-b.log"))
    b.start()
    a.start()
    a.wait_for(serving(host, "a"), 10, "a serving")
    b.wait_for(standing_by, 10, "b standing by")
    out: dict = {"timings_ms": {"heartbeat": args.heartbeat, "dead_after": args.dead_after}}

    # 1. client stall per move
    out["load_before"] = load()
    probe = MoveProbe(lab, host, "moves.bin")
    windows, moved = [], []
    try:
        time.sleep(0.5)
        for i in range(args.moves):
            back = i % 2 == 1
            start = time.monotonic()
            answer = handover(a, back)
            end = time.monotonic()
            windows.append((start, end))
            giver, taker = (b, a) if back else (a, b)
            o, n = records(giver, taker)
            moved.append({"to": taker.node, "changed": answer.get("changed"), "out": o, "in": n})
            time.sleep(args.pause)
    finally:
        report = probe.stop()
    moves = per_move(report, windows)
    for m, r in zip(moves, moved):
        m.update(r)
        say(f"  move to {r['to']}: stall {m['stall_ms']} ms (smb {m['smb_stall_ms']}, nfs {m['nfs_stall_ms']}), "
            f"freeze->live {(r['in'] or {}).get('freeze_to_live_ms')} ms, reconnects "
            f"{len(m['smb_reconnects']) + len(m['nfs_reconnects'])}")
    out["moves"] = moves
    out["summary"] = summary(moves, report)
    out["summary"]["away_from_moves"] = baseline(report, windows)
    out["summary"]["freeze_to_live_ms"] = [(m["in"] or {}).get("freeze_to_live_ms") for m in moves]
    out["summary"]["outcomes"] = [(m["out"] or {}).get("outcome") for m in moves]
    out["summary"]["loop_lag_ms_worst"] = max([(m[s] or {}).get("loop_lag_ms") or 0 for m in moves for s in ("out", "in")],
                                              default=None)
    out["load_after"] = load()
    say(f"pairproxy: {json.dumps({k: v for k, v in out['summary'].items() if k != 'stall_ms_all'})}")
    b.wait_for(standing_by, 10, "b standing by after the moves")

    # 3. 1,000 connections
    if args.connections:
        out["bulk"] = {"load_before": load()}
        # the NFS service binds secure source ports towards the server (665-1023: 359 of them): the rest are SMB
        nfs = min(args.connections, 340)
        idle = bench.started(IdleProbe(lab, host, smb=args.connections - nfs, nfs=nfs)).start(timeout=180)
        out["bulk"]["connections"] = {"smb": args.connections - nfs, "nfs": nfs}
        time.sleep(1.0)
        bulk_started = time.monotonic()
        bulk = []
        for back in (False, True):
            handover(a, back)
            giver, taker = (b, a) if back else (a, b)
            o, n = records(giver, taker)
            rate = round(n["moved"] / (n["freeze_to_live_ms"] / 1000), 1) if n.get("freeze_to_live_ms") else None
            bulk.append({"to": taker.node, "moved": n["moved"], "failed": o["failed"] + n["failed"],
                         "freeze_to_live_ms": n["freeze_to_live_ms"], "giver_pause_ms": o["pause_ms"],
                         "state_bytes": o["state_bytes"], "per_second": rate, "phases_out": o.get("phases_ms"),
                         "phases_in": n.get("phases_ms"), "loop_lag_ms": [o.get("loop_lag_ms"), n.get("loop_lag_ms")],
                         "outcome": o.get("outcome")})
            say(f"  {args.connections} connections to {taker.node}: {n['moved']} moved, freeze->live "
                f"{n['freeze_to_live_ms']} ms = {rate} connections/s; loop lag {o.get('loop_lag_ms')} / "
                f"{n.get('loop_lag_ms')} ms")
            time.sleep(1.0)
        out["bulk"]["moves"] = bulk
        ended = idle.ended()
        out["bulk"]["idle_connections_ended"] = len(ended)
        out["bulk"]["idle_ended_events"] = {f"{e['p']} {e['ev']}": sum(1 for x in ended if (x['p'], x['ev']) == (e['p'], e['ev']))
                                            for e in ended}
        out["bulk"]["idle_ended_at_s"] = sorted({round(e["t"] - bulk_started, 1) for e in ended})[:50]
        bench.stop(idle)
        out["bulk"]["load_after"] = load()
        b.wait_for(standing_by, 10, "b standing by after the bulk moves")

    # 4. a move in the middle of a large download
    if args.transfer_mib:
        src = random_file(bench.work / "big.bin", args.transfer_mib << 20)
        put = smb_put(lab, host, src, "move-big.bin")
        if put.returncode != 0:
            raise LabError(f"upload for the transfer test failed: {put}")
        local = bench.work / "big-back.bin"
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(t=smb_get(lab, host, "move-big.bin", local)))
        t.start()
        wait_until(lambda: local.exists() and local.stat().st_size >= (args.transfer_mib << 20) // 4, 60,
                   "a quarter of the download")
        at = local.stat().st_size
        handover(a, False)
        t.join(300)
        tr = result.get("t")
        move = b.status()["pair"]["last_move"]
        out["transfer"] = {"mib": args.transfer_mib, "moved_at_bytes": at, "returncode": tr.returncode if tr else None,
                           "seconds": tr.seconds if tr else None, "identical": sha256_of(local) == sha256_of(src),
                           "move": {k: move.get(k) for k in ("moved", "failed", "freeze_to_live_ms", "state_bytes")},
                           "load": load()}
        say(f"  {args.transfer_mib} MiB download moved at {at} bytes: identical {out['transfer']['identical']}, "
            f"{out['transfer']['move']}")
        handover(a, True)
        b.wait_for(standing_by, 10, "b standing by after the transfer")

    # 2. restart to serving (last: it kills a)
    probe = MoveProbe(lab, host, "restart.bin")
    try:
        time.sleep(0.3)
        a.kill_hard(link_down=True)
        b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "holding", 10, "b holding a's address")
        time.sleep(0.5)
        a.link_up()
        started = seconds_of_day()
        a.start()
        a.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "serving" and s["pair"].get("last_move"), 15,
                   "a serving again")
        time.sleep(0.3)
    finally:
        report = probe.stop()
    link_up = log_time(a.log, r"sync link to b up", started)
    live = log_time(a.log, r"moved \S+ in: ", started)
    last = a.status()["pair"]["last_move"]
    out["restart"] = {"process_start_to_serving_ms": round((live - started) * 1000, 1) if live else None,
                      "peer_answers_to_serving_ms": round((live - link_up) * 1000, 1) if live and link_up else None,
                      "moved": last.get("moved"), "phases_in": last.get("phases_ms"),
                      "client_errors": report["smb"]["error_count"] + report["nfs"]["error_count"],
                      "client_reconnects": len(report["smb"]["reconnects"]) + len(report["nfs"]["reconnects"]),
                      "load": load()}
    say(f"  restart: {out['restart']}")
    bench.stop(a)
    bench.stop(b)
    return out


# ---------------------------------------------------------------------------------- keepalived
def run_keepalived(bench: Bench, args) -> dict:
    lab = bench.lab
    ka_a = KeepalivedNode(lab, "a", 150, VIP, bench.work / "ka")
    ka_b = KeepalivedNode(lab, "b", 100, VIP, bench.work / "ka")
    out: dict = {"load_before": load()}
    ka_a.remove_vip()
    ka_b.remove_vip()
    bench.started(ka_a).start()
    wait_until(ka_a.has_vip, 10, "keepalived a MASTER")
    bench.started(ka_b).start()
    time.sleep(0.3)
    probe = MoveProbe(lab, VIP, "ka-moves.bin")
    windows, restart = [], []
    try:
        time.sleep(0.5)
        for i in range(args.moves):
            start = time.monotonic()
            if i % 2 == 0:   # a -> b: a's keepalived stops (priority-0 advert)
                ka_a.keepalived.terminate()
                ka_a.keepalived.wait(5)
                wait_until(lambda: ka_b.has_vip() and not ka_a.has_vip(), 10, "VIP on b")
            else:            # b -> a: a's keepalived starts again and preempts
                ka_a.keepalived = None
                t0 = time.monotonic()
                ka_a.start()
                wait_until(lambda: ka_a.has_vip() and not ka_b.has_vip(), 10, "VIP back on a")
                restart.append(round((time.monotonic() - t0) * 1000, 1))
            windows.append((start, time.monotonic()))
            time.sleep(args.pause)
    finally:
        report = probe.stop()
    moves = per_move(report, windows)
    for m in moves:
        say(f"  keepalived move: stall {m['stall_ms']} ms, reconnects {len(m['smb_reconnects']) + len(m['nfs_reconnects'])}")
    out["moves"] = moves
    out["summary"] = summary(moves, report)
    out["summary"]["away_from_moves"] = baseline(report, windows)
    out["restart_to_serving_ms"] = restart  # keepalived+haproxy start -> VIP on a (polled every 5 ms)
    out["load_after"] = load()
    say(f"keepalived+haproxy: {json.dumps({k: v for k, v in out['summary'].items() if k != 'stall_ms_all'})}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="ppm", help="lab prefix (default ppm)")
    ap.add_argument("--moves", type=int, default=20, help="moves per system (default 20)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between moves (default 0.5)")
    ap.add_argument("--heartbeat", type=float, default=50.0, help="pair heartbeat, ms (default 50)")
    ap.add_argument("--dead-after", type=float, default=500.0,
                    help="pair dead_after, ms (default 500: the lab's 100 flaps at load 12-14 with or without moves)")
    ap.add_argument("--connections", type=int, default=1000, help="idle connections for the bulk move (0: skip)")
    ap.add_argument("--transfer-mib", type=int, default=64, help="download moved mid-way, MiB (0: skip)")
    ap.add_argument("--systems", default="pairproxy,keepalived")
    ap.add_argument("--mode", default="stateless", choices=("stateless", "stateful"),
                    help="the pair's mode (default stateless)")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("moves.py: needs root (network namespaces)")
        return 1
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    started = datetime.datetime.now().astimezone()
    results: dict = {"run": run_info("moves.py", started), "args": vars(args)}
    with Bench("moves", args.prefix, default_prefix="ppm", keep_work=args.keep_logs) as bench:
        lab = bench.up()
        for ns in (lab.ns_a, lab.ns_b):
            bench.sysctl(ns, "net.ipv4.ip_nonlocal_bind", "1")
            bench.links_up_at_end(ns, ("eth0", "sync0"))
            bench.defer(bench.at_end_in, ns, ["ip", "addr", "del", f"{VIP}/{lab.addresses.prefixlen}", "dev", "eth0"])
        try:
            if "pairproxy" in systems:
                results["pairproxy"] = run_pairproxy(bench, args)
            if "keepalived" in systems:
                results["keepalived"] = run_keepalived(bench, args)
        finally:
            if args.keep_logs:
                say(f"logs: {bench.work}")
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
                say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
