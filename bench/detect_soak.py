"""Detection soak (issue 12): a healthy pair under full load for N minutes; count false takeovers.

    sudo .venv/bin/python bench/detect_soak.py [--minutes 30] [--mode stateful] [--heartbeat 10]
        [--dead-after 40] [--size 4194304] [--writers-per-address 1] [--poll-ms 100]
        [--prefix d12s] [--json FILE] [--keep-lab] [--keep-logs]

Nobody is killed. A fresh pair (the lab's pair configs with ``--heartbeat``/``--dead-after`` as config
values; ``stateful`` with the service bridge in flood mode, so both observers decode everything), then
for ``--minutes``:

* bulk writers through **both** service addresses (bench/soak.py's ``Writer``: SMB via smbprotocol and
  NFSv3 via ``nfs-cp``, ``--size`` bytes per file, written, read back and compared, back to back);
* ``pairproxy status`` of both nodes every ``--poll-ms`` over their control sockets (the node answers it
  in its event loop: part of the load the heartbeats must ride out);
* once a minute: both nodes' heartbeat gaps and jitter per path (p50/p99/max over the last minute,
  from status), the heartbeat process's send lateness, the load average.

Counted: takeovers by either node (each is false: nobody died), every poll that saw the peer not
``alive`` (with the state), both nodes' detector facts (``quiet``/``silent``), writer operations and
errors. The machine is shared (other sessions' benchmarks and tests): the load average is recorded
next to every minute, and a takeover under that load is still counted as false.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path

from driver import Bench, KeepalivedNode, LabError, NodeProcess, PairTimings, run_info, say, serving, standing_by
from soak import Writer


VIP = "10.77.0.50"


def _masters(k: KeepalivedNode) -> int:
    try:
        return (k.dir / "keepalived.log").read_text(errors="replace").count("Entering MASTER STATE")
    except OSError:
        return 0


def _count(log: Path, text: str) -> int:
    try:
        return log.read_text(errors="replace").count(text)
    except OSError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--mode", default="stateful", choices=("stateless", "stateful"))
    ap.add_argument("--heartbeat", type=float, default=10.0, help="ms (default 10)")
    ap.add_argument("--dead-after", type=float, default=40.0, help="ms (default 40)")
    ap.add_argument("--size", type=int, default=4 << 20, help="bytes per written file (default 4 MiB)")
    ap.add_argument("--writers-per-address", type=int, default=1, help="per protocol and address (default 1)")
    ap.add_argument("--poll-ms", type=float, default=100.0)
    ap.add_argument("--prefix", default="d12s")
    ap.add_argument("--keepalived", action="store_true",
                    help="also run keepalived (VRRPv3, advert 10 ms, VIP 10.77.0.50) in the two node namespaces "
                         "and count its MASTER transitions: the same load, the same false-verdict question")
    ap.add_argument("--json")
    ap.add_argument("--keep-lab", action="store_true")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("detect_soak.py: needs root")
        return 1
    started = datetime.datetime.now().astimezone()
    timings = PairTimings.from_ms(args.heartbeat, args.dead_after)
    out: dict = {"minutes": [], "not_alive_polls": {"a": {}, "b": {}}, "poll_errors": 0, "polls": 0}
    with Bench("detect-soak", args.prefix, default_prefix="d12s", keep_lab=args.keep_lab,
               keep_work=args.keep_logs or args.keep_lab) as bench:
        try:
            lab = bench.up()
            addr = lab.addresses
            bench.flood(args.mode == "stateful")
            cfg = bench.pair_configs(args.mode, timings)
            nodes = {n: bench.started(NodeProcess(lab, n, config=cfg[n], log=bench.work / f"{n}.log"))
                     for n in ("a", "b")}
            nodes["b"].start(60)  # the shared machine: a python start takes seconds under others' load
            nodes["a"].start(60)
            nodes["a"].wait_for(serving(addr.service_a, "a"), 20, "a serving")
            nodes["b"].wait_for(serving(addr.service_b, "b"), 20, "b serving")
            for n in nodes.values():
                n.wait_for(standing_by, 20, "standing by")
            time.sleep(1.0)
            base = {n: len(nodes[n].status()["pair"]["takeovers"]) for n in nodes}
            kas = {}
            if args.keepalived:
                for ns in (lab.ns_a, lab.ns_b):
                    bench.sysctl(ns, "net.ipv4.ip_nonlocal_bind", "1")
                    bench.defer(bench.at_end_in, ns, ["ip", "addr", "del", f"{VIP}/{addr.prefixlen}", "dev", "eth0"])
                kas = {"a": KeepalivedNode(lab, "a", 150, VIP, bench.work), "b": KeepalivedNode(lab, "b", 100, VIP, bench.work)}
                for k in kas.values():
                    k.remove_vip()
                bench.started(kas["a"]).start(60)
                time.sleep(1.0)
                bench.started(kas["b"]).start(60)
                time.sleep(1.0)
                ka_base = {n: _masters(k) for n, k in kas.items()}
            writers = []
            for host in (addr.service_a, addr.service_b):
                for proto in ("smb", "nfs"):
                    for _ in range(args.writers_per_address):
                        writers.append(bench.started(Writer(bench, proto, host, args.size, 0)).start())
            stop = threading.Event()
            latest: dict[str, dict] = {}

            def poll() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    for n, node in nodes.items():
                        try:
                            st = node.status()
                        except LabError:
                            out["poll_errors"] += 1
                            continue
                        out["polls"] += 1
                        latest[n] = st
                        state = st["pair"]["peer_state"]
                        if state != "alive":
                            seen = out["not_alive_polls"][n]
                            seen[state] = seen.get(state, 0) + 1
                    stop.wait(max(0.0, args.poll_ms / 1000 - (time.monotonic() - t0)))

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            t_start = time.monotonic()
            say(f"soak: {args.mode} {args.heartbeat:g}/{args.dead_after:g} ms for {args.minutes:g} min, "
                f"{len(writers)} writers of {args.size} B, status every {args.poll_ms:g} ms")
            minute = 0
            while time.monotonic() - t_start < args.minutes * 60:
                time.sleep(min(60.0, args.minutes * 60 - (time.monotonic() - t_start)))
                minute += 1
                row: dict = {"minute": minute, "loadavg": os.getloadavg(), "nodes": {}}
                for n in nodes:
                    st = latest.get(n)
                    if st is None:
                        continue
                    pair = st["pair"]
                    hb = pair.get("heartbeat") or {}
                    row["nodes"][n] = {
                        "takeovers": len(pair["takeovers"]) - base[n], "peer_state": pair["peer_state"],
                        "facts": (pair.get("detector") or {}).get("facts"),
                        "paths": {p: {k: v.get(k) for k in ("gap_ms", "jitter_ms", "max_gap_ever_ms", "received",
                                                             "rejected", "stale")}
                                  for p, v in (hb.get("paths") or {}).items()},
                        "send_late_ms": hb.get("send_late_ms"), "max_send_late_ever_ms": hb.get("max_send_late_ever_ms"),
                        "own_stalls": hb.get("own_stalls"), "max_own_stall_ms": hb.get("max_own_stall_ms"),
                        "realtime": hb.get("realtime"), "memory_locked": hb.get("memory_locked")}
                ops = {w.token: (sum(1 for r in w.snapshot() if r["ok"]), sum(1 for r in w.snapshot() if not r["ok"]))
                       for w in writers}
                row["writer_ops_ok_err"] = ops
                for w in writers:   # verified files checked on the server's disk and deleted: the disk stays empty
                    w.check_disk()
                if kas:
                    row["keepalived_master_transitions"] = {n: _masters(k) - ka_base[n] for n, k in kas.items()}
                row["took_over_log_lines"] = {n: _count(nodes[n].log, "took over ") for n in nodes}
                out["minutes"].append(row)
                gaps = " ".join(
                    f"{n}:{p} max {((v.get('gap_ms') or {}).get('max') or 0):.0f}"
                    for n, r in row["nodes"].items() for p, v in r["paths"].items())
                say(f"minute {minute}: load {row['loadavg'][0]:.1f}, takeovers (log) {row['took_over_log_lines']}"
                    + (f", keepalived MASTER {row['keepalived_master_transitions']}" if kas else "")
                    + f", status (last answered) takeovers {({n: r['takeovers'] for n, r in row['nodes'].items()})}, not-alive polls "
                    f"{out['not_alive_polls']}, gaps (ms) {gaps}, writer ok {sum(o for o, _ in ops.values())} "
                    f"err {sum(e for _, e in ops.values())}")
            stop.set()
            poller.join(5)
            final = {}
            for n in nodes:  # a node too busy to answer keeps its last answer; the log counts anyway
                try:
                    final[n] = nodes[n].status()["pair"]
                except LabError:
                    final[n] = (latest.get(n) or {}).get("pair") or {"takeovers": [], "heartbeat": None, "detector": None}
            out["took_over_log_lines"] = {n: _count(nodes[n].log, "took over ") for n in nodes}
            out["dead_verdict_log_lines"] = {n: _count(nodes[n].log, "-> dead:") for n in nodes}
            out["stale_verdicts_dropped"] = {n: _count(nodes[n].log, "death verdict dropped") for n in nodes}
            out["heartbeat_pauses"] = {n: _count(nodes[n].log, "heartbeats were stopped") for n in nodes}
            say(f"from the logs: takeovers {out['took_over_log_lines']}, dead verdicts {out['dead_verdict_log_lines']}, "
                f"stale verdicts dropped {out['stale_verdicts_dropped']}, heartbeat pauses {out['heartbeat_pauses']}")
            out["false_takeovers"] = {n: len(final[n]["takeovers"]) - base[n] for n in nodes}
            if kas:
                # a is the master from the start: every MASTER transition after that is a false verdict
                out["keepalived_master_transitions"] = {n: _masters(k) - ka_base[n] for n, k in kas.items()}
                say(f"keepalived (advert 10 ms) MASTER transitions during the soak: {out['keepalived_master_transitions']}")
            out["takeover_records"] = {n: final[n]["takeovers"] for n in nodes}
            out["final_heartbeat"] = {n: final[n].get("heartbeat") for n in nodes}
            out["final_detector"] = {n: final[n].get("detector") for n in nodes}
            for w in writers:
                bench.stop(w)
                w.check_disk()
                w.remove_all()
            out["writers"] = {w.token: {"ok": sum(1 for r in w.ops if r["ok"]),
                                        "errors": sum(1 for r in w.ops if not r["ok"]),
                                        "bytes": sum(r.get("bytes", 0) for r in w.ops if r["ok"]),
                                        "disk_ok": w.disk_ok, "disk_bad": w.disk_bad} for w in writers}
            say(f"false takeovers: {out['false_takeovers']}; not-alive polls: {out['not_alive_polls']}; "
                f"polls {out['polls']} (errors {out['poll_errors']})")
            if args.json:
                doc = run_info("detect_soak.py", started)
                doc["args"] = vars(args)
                doc.update(out)
                Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
                say(f"numbers written to {args.json}")
            return 0
        except (LabError, OSError) as exc:
            say(f"detect_soak.py: {exc}")
            return 1
        except KeyboardInterrupt:
            say("detect_soak.py: interrupted; cleaning up")
            return 130


if __name__ == "__main__":
    sys.exit(main())
