"""What stateful mode costs in throughput: the same pair, stateless vs stateful, same run.

Run as root from the repository root::

    .venv/bin/python bench/modes.py [--size-mib 512] [--rounds 3] [--prefix ppm]

Each round starts the pair (node b, then a) in one mode, copies a random file through a's address
with smbclient (put, get) and libnfs nfs-cp (NFSv3 put, get), stops the pair, then does the same in
the other mode. In stateful mode the lab's bridge floods (``lab.flood(True)``) and each node's
observer process snoops and decodes both addresses. Prints MB/s per mode (median over rounds) and the
stateful/stateless ratio, plus the snoopers' kernel drops. Everything runs on this machine's cores:
client, servers, both nodes and both observers share them, which a real site would not.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.lab import Lab  # noqa: E402
from deploy.lab.clients import (NodeProcess, nfs_get, nfs_put, random_file, serving, sha256_of,  # noqa: E402
                                smb_get, smb_put)

MODES = ("stateless", "stateful")
METRICS = ("smb_put", "smb_get", "nfs_put", "nfs_get")


def one_round(lab: Lab, mode: str, src: Path, work: Path, tag: str) -> tuple[dict, list[int]]:
    lab.flood(mode == "stateful")
    a = NodeProcess(lab, "a", pair=True, mode=mode, log=work / f"{mode}-a.log")
    b = NodeProcess(lab, "b", pair=True, mode=mode, log=work / f"{mode}-b.log")
    host = lab.addresses.service_a
    try:
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving")
        if mode == "stateful":
            for node in (a, b):
                node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 15, "observer")
        want = sha256_of(src)
        name = f"modes-{tag}.bin"
        back = work / "back.bin"
        out = {"smb_put": smb_put(lab, host, src, name).check().mb_per_s,
               "smb_get": smb_get(lab, host, name, back).check().mb_per_s}
        assert sha256_of(back) == want, "SMB copy differs"
        out["nfs_put"] = nfs_put(lab, host, src, name).check().mb_per_s
        out["nfs_get"] = nfs_get(lab, host, name, back).check().mb_per_s
        assert sha256_of(back) == want, "NFS copy differs"
        drops = []
        if mode == "stateful":
            for node in (a, b):
                drops += [s["kernel_drops"] for s in node.status()["pair"]["state_sync"]["snoopers"]]
        for d in (lab.smb_share_path, lab.nfs_export_path):
            (d / name).unlink(missing_ok=True)
        return out, drops
    finally:
        a.stop(10)
        b.stop(10)
        lab.flood(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefix", default="ppm")
    parser.add_argument("--keep-lab", action="store_true")
    args = parser.parse_args()
    lab = Lab(prefix=args.prefix, root=f"/var/tmp/pairproxy-modes-lab-{args.prefix}")
    work = Path(tempfile.mkdtemp(prefix="pairproxy-modes-", dir="/dev/shm"))
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in MODES}
    drops: list[int] = []
    try:
        print(f"lab {lab.prefix}: up ...", flush=True)
        lab.up()
        src = random_file(work / "src.bin", args.size_mib << 20)
        for r in range(args.rounds):
            for mode in MODES:
                got, d = one_round(lab, mode, src, work, f"{r}-{mode}-{time.time():.0f}")
                drops += d
                for k, v in got.items():
                    results[mode][k].append(v)
                print(f"round {r + 1}/{args.rounds} {mode:<9} " +
                      " ".join(f"{k}={v:.0f}" for k, v in got.items()) + " MB/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_lab:
            lab.down()
    print(f"\nmedians over {args.rounds} round(s), {args.size_mib} MiB, MB/s")
    print(f"{'metric':<10} {'stateless':>10} {'stateful':>10} {'ratio':>7}")
    for k in METRICS:
        sl, sf = statistics.median(results["stateless"][k]), statistics.median(results["stateful"][k])
        print(f"{k:<10} {sl:>10.0f} {sf:>10.0f} {sf / sl:>7.2f}")
    print(f"snooper kernel drops (all observers, all stateful rounds): {sum(drops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
