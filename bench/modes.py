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

from driver import Bench, LabError, NodeProcess, copies, random_file, say, serving, sha256_of

MODES = ("stateless", "stateful")
METRICS = {"smb_put": "smb_write", "smb_get": "smb_read", "nfs_put": "nfs_write", "nfs_get": "nfs_read"}


def one_round(bench: Bench, mode: str, src: Path, src_sha: str, tag: str) -> tuple[dict, list[int]]:
    lab = bench.lab
    bench.flood(mode == "stateful")
    a = bench.started(NodeProcess(lab, "a", pair=True, mode=mode, log=bench.work / f"{mode}-a.log"))
    b = bench.started(NodeProcess(lab, "b", pair=True, mode=mode, log=bench.work / f"{mode}-b.log"))
    host = lab.addresses.service_a
    try:
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving")
        if mode == "stateful":
            for node in (a, b):
                node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 15, "observer")
        done = copies(lab, host, src, f"modes-{tag}.bin", bench.work / "back.bin", expect_sha256=src_sha)
        out = {k: done[c].transfer.mb_per_s for k, c in METRICS.items()}
        drops = []
        if mode == "stateful":
            for node in (a, b):
                drops += [s["kernel_drops"] for s in node.status()["pair"]["state_sync"]["snoopers"]]
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
    args = parser.parse_args()
    if os.geteuid() != 0:
        say("modes.py: needs root (network namespaces)")
        return 1
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in MODES}
    drops: list[int] = []
    with Bench("modes", args.prefix, root=args.root, keep_lab=args.keep_lab, workdir="/dev/shm") as bench:
        try:
            bench.up()
            src = random_file(bench.work / "src.bin", args.size_mib << 20)
            src_sha = sha256_of(src)
            for r in range(args.rounds):
                for mode in MODES:
                    got, d = one_round(bench, mode, src, src_sha, f"{r}-{mode}-{time.time():.0f}")
                    drops += d
                    for k, v in got.items():
                        results[mode][k].append(v)
                    say(f"round {r + 1}/{args.rounds} {mode:<9} " + " ".join(f"{k}={v:.0f}" for k, v in got.items())
                        + " MB/s")
        except (LabError, subprocess.TimeoutExpired) as exc:
            say(f"modes.py: {exc}")
            return 1
        except KeyboardInterrupt:
            say("modes.py: interrupted; cleaning up")
            return 130
    say(f"\nmedians over {args.rounds} round(s), {args.size_mib} MiB, MB/s")
    say(f"{'metric':<10} {'stateless':>10} {'stateful':>10} {'ratio':>7}")
    for k in METRICS:
        sl, sf = statistics.median(results["stateless"][k]), statistics.median(results["stateful"][k])
        say(f"{k:<10} {sl:>10.0f} {sf:>10.0f} {sf / sl:>7.2f}")
    say(f"snooper kernel drops (all observers, all stateful rounds): {sum(drops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
