"""What stateful mode costs in throughput: the same pair, stateless vs stateful, same run.

Run as root from the repository root::

    .venv/bin/python bench/modes.py [--size-mib 512] [--rounds 3] [--prefix ppm]

Each round starts the pair (node b, then a) in one mode, copies a random file through a's address
with smbclient (put, get) and libnfs nfs-cp (NFSv3 put, get), stops the pair, then does the same in
the other mode. In stateful mode the lab's bridge floods (``lab.flood(True)``) and each node's
observer process snoops and decodes both addresses. Prints MB/s per mode (median over rounds) and the
stateful/stateless ratio, plus the snoopers' kernel drops. Everything runs on this machine's cores:
client, servers, both nodes and both observers share them, which a real site would not.
Lab, nodes, copies and cleanup come from bench/driver.py (shared with the other benchmarks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from driver import Bench, LabError, NodeProcess, PairTimings, copies, cpu_seconds, random_file, say, serving, sha256_of

MODES = ("stateless", "stateful")
FLOODED = "flooded"  # a stateless pair on the hub-like bridge: what flooding alone costs, without snooping
METRICS = {"smb_put": "smb_write", "smb_get": "smb_read", "nfs_put": "nfs_write", "nfs_get": "nfs_read"}


def observers(node: NodeProcess) -> list[int]:
    """PIDs of the node's observer child (stateful mode): processes whose parent is the node."""
    pid = node.proc.pid if node.proc else None
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and \
                    b"proxy.observer" in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return out


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def one_round(bench: Bench, mode: str, src: Path, src_sha: str, tag: str,
              timings: PairTimings) -> tuple[dict, list[int]]:
    lab = bench.lab
    bench.flood(mode in ("stateful", FLOODED))
    if mode == FLOODED:
        mode = "stateless"
    cfg = bench.pair_configs(mode, timings)
    a = bench.started(NodeProcess(lab, "a", cfg["a"], log=bench.work / f"{mode}-a.log"))
    b = bench.started(NodeProcess(lab, "b", cfg["b"], log=bench.work / f"{mode}-b.log"))
    host = lab.addresses.service_a
    try:
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving")
        if mode == "stateful":
            for node in (a, b):
                node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 15, "observer")
        nodes = [n.proc.pid for n in (a, b)]
        obs = observers(a) + observers(b)
        cpu0, t0 = (cpu_of(nodes), cpu_of(obs)), time.monotonic()
        done = copies(lab, host, src, f"modes-{tag}.bin", bench.work / "back.bin", expect_sha256=src_sha)
        cpu1, wall = (cpu_of(nodes), cpu_of(obs)), time.monotonic() - t0
        out = {k: done[c].transfer.mb_per_s for k, c in METRICS.items()}
        # CPU seconds of both nodes and of both observers over the four copies (4 x size bytes each way)
        out["cpu"] = f"nodes {cpu1[0] - cpu0[0]:.1f} s, observers {cpu1[1] - cpu0[1]:.1f} s in {wall:.1f} s"
        drops = []
        if mode == "stateful":
            for node in (a, b):
                snoopers = node.status()["pair"]["state_sync"]["snoopers"]
                drops += [s["kernel_drops"] for s in snoopers]
                out.setdefault("paths", []).extend(sorted({s.get("path", "recv") for s in snoopers}))
        out["loadavg"] = loadavg()
        return out, drops
    finally:
        bench.stop_all()
        bench.flood(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefix", default="ppm")
    parser.add_argument("--root", help="lab state directory (default /var/tmp/pairproxy-modes-lab-PREFIX)")
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument("--keep-work", action="store_true", help="keep the node logs")
    parser.add_argument("--flooded", action="store_true",
                        help="also a stateless pair on the flooding bridge: separates what the bridge's "
                             "flooding costs from what snooping and decoding cost")
    parser.add_argument("--heartbeat-ms", type=int, default=20)
    parser.add_argument("--dead-after-ms", type=int, default=100,
                        help="the lab's 100 ms; on a machine loaded by others a longer one keeps a false "
                             "takeover (whose stateful resets end the copies) out of a throughput measurement")
    args = parser.parse_args()
    if os.geteuid() != 0:
        say("modes.py: needs root (network namespaces)")
        return 1
    modes = MODES + ((FLOODED,) if args.flooded else ())
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in modes}
    drops: list[int] = []
    timings = PairTimings.from_ms(args.heartbeat_ms, args.dead_after_ms)
    with Bench("modes", args.prefix, root=args.root, keep_lab=args.keep_lab, keep_work=args.keep_work,
               workdir="/dev/shm") as bench:
        try:
            bench.up()
            src = random_file(bench.work / "src.bin", args.size_mib << 20)
            src_sha = sha256_of(src)
            for r in range(args.rounds):
                for mode in modes:
                    got, d = one_round(bench, mode, src, src_sha, f"{r}-{mode}-{time.time():.0f}", timings)
                    drops += d
                    extra = {k: got.pop(k) for k in ("paths", "loadavg", "cpu") if k in got}
                    for k, v in got.items():
                        results[mode][k].append(v)
                    say(f"round {r + 1}/{args.rounds} {mode:<9} " + " ".join(f"{k}={v:.0f}" for k, v in got.items())
                        + f" MB/s; drops {sum(d)}; snooper path {'/'.join(sorted(set(extra.get('paths', [])))) or '-'}"
                        + f"; {extra['cpu']}; loadavg {extra['loadavg']}")
        except (LabError, subprocess.TimeoutExpired) as exc:
            say(f"modes.py: {exc}")
            return 1
        except KeyboardInterrupt:
            say("modes.py: interrupted; cleaning up")
            return 130
    say(f"\nmedians over {args.rounds} round(s), {args.size_mib} MiB, MB/s")
    fl = args.flooded
    say(f"{'metric':<10} {'stateless':>10} {'stateful':>10} {'ratio':>7}"
        + (f" {'flooded':>10} {'ratio':>7}" if fl else ""))
    for k in METRICS:
        sl, sf = statistics.median(results["stateless"][k]), statistics.median(results["stateful"][k])
        line = f"{k:<10} {sl:>10.0f} {sf:>10.0f} {sf / sl:>7.2f}"
        if fl:
            fd = statistics.median(results[FLOODED][k])
            line += f" {fd:>10.0f} {fd / sl:>7.2f}"
        say(line)
    say(f"snooper kernel drops (all observers, all stateful rounds): {sum(drops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
