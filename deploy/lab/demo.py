"""``pairproxy lab demo``: real clients through a real node to real servers, with numbers.

What it shows: node a serves its service address; smbclient and libnfs ``nfs-cp`` in the client
namespace copy a file there and back through it; checksums prove the bytes are the same; the same
copies straight to the server give a baseline for the throughput.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .clients import NodeProcess, Transfer, nfs_get, nfs_put, random_file, sha256_of, smb_get, smb_put
from .core import Lab, LabError


def _line(text: str = "") -> None:
    print(text, flush=True)


def _row(path: str, t: Transfer, same: bool | None) -> None:
    check = "" if same is None else ("sha256 ok" if same else "SHA256 MISMATCH")
    _line(f"  {path:<10} {t.what.split(' via ')[0]:<34} {t.size / 2**20:>7.1f} MiB {t.seconds:>7.2f} s "
          f"{t.mb_per_s:>8.1f} MB/s  {check}")


def run_demo(lab: Lab, size_mib: int) -> bool:
    a = lab.addresses
    _line(f"lab {lab.prefix}: bringing it up (namespaces, smbd, rpcbind, ganesha) ...")
    lab.up()
    work = Path(tempfile.mkdtemp(prefix="pairproxy-demo-", dir="/var/tmp"))
    node = NodeProcess(lab, "a")
    ok = True
    try:
        _line(f"starting node a in {lab.ns_a}: service address {a.service_a}, backends on {a.server}")
        node.start()
        src = random_file(work / "demo.bin", size_mib << 20)
        want = sha256_of(src)
        _line(f"test file: {size_mib} MiB of random bytes, sha256 {want[:16]}...")
        _line()
        _line(f"  {'path':<10} {'operation':<34} {'size':>11} {'time':>9} {'throughput':>13}")
        for label, host in (("pairproxy", a.service_a), ("direct", a.server)):
            name = f"demo-{label}.bin"
            t = smb_put(lab, host, src, name).check()
            same = sha256_of(lab.smb_share_path / name) == want
            _row(label, t, same)
            back = work / f"smb-{label}.bin"
            t = smb_get(lab, host, name, back).check()
            same2 = sha256_of(back) == want
            _row(label, t, same2)
            t = nfs_put(lab, host, src, name, 3).check()
            same3 = sha256_of(lab.nfs_export_path / name) == want
            _row(label, t, same3)
            back = work / f"nfs-{label}.bin"
            t = nfs_get(lab, host, name, back, 3).check()
            same4 = sha256_of(back) == want
            _row(label, t, same4)
            ok = ok and same and same2 and same3 and same4
            for d in (lab.smb_share_path, lab.nfs_export_path):
                (d / name).unlink(missing_ok=True)
        _line()
        status = node.status()
        for s in status["services"]:
            _line(f"node a {s['name']}: {s['connections_total']} connections, "
                  f"{s['bytes_to_backend'] / 2**20:.1f} MiB to backend, {s['bytes_to_client'] / 2**20:.1f} MiB "
                  f"to clients, {s['backend_failures']} backend failures")
    finally:
        code = node.stop()
        _line(f"node a stopped (exit {code}); service address removed")
        shutil.rmtree(work, ignore_errors=True)
    _line("demo " + ("passed: every copy byte-identical" if ok else "FAILED: a copy differs"))
    return ok


def cmd_demo(args: argparse.Namespace) -> int:
    from .cli import lab_from_args

    from .pairdemo import run_pair_demo, run_stateful_demo

    lab = lab_from_args(args)
    try:
        ok = True
        if not args.failover_only:
            print("== part 1: one node, real clients, throughput ==", flush=True)
            ok = run_demo(lab, args.size_mib)
        if not args.throughput_only:
            print("\n== part 2: the pair (stateless): node a dies under client load, b takes over, a returns ==",
                  flush=True)
            ok = run_pair_demo(lab) and ok
            print("\n== part 3: the stateful pair: b knows a's sessions, resets a's idle client at once ==",
                  flush=True)
            ok = run_stateful_demo(lab) and ok
    except LabError as exc:
        print(f"pairproxy lab demo: error: {exc}", file=sys.stderr)
        ok = False
    finally:
        if args.down:
            lab.down()
            print(f"lab {lab.prefix} is down")
    return 0 if ok else 1


def add_demo_command(lab_sub: argparse._SubParsersAction) -> None:
    from .cli import add_common_options

    p = lab_sub.add_parser(
        "demo", help="copies through a node with throughput, then a failover of the pair, with numbers",
        description="Bring the lab up (if it is not). Part 1: start node a alone, copy a random file over SMB "
                    "(smbclient) and NFSv3 (nfs-cp) through it and directly to the server, compare checksums, "
                    "print throughput. Part 2: run the pair a+b, keep SMB and NFS clients busy through a's "
                    "address, kill node a (SIGKILL, link down), show b's takeover and the clients' outage, "
                    "restart a and show the hand-back, as a timeline. Part 3: the stateful pair: b's tables "
                    "of a's SMB session, the takeover that resets a's idle client at once, and the resume "
                    "report. Exit 0 when all data is intact and every step worked.")
    add_common_options(p)
    p.add_argument("--size-mib", type=int, default=64, help="size of the test file (default: %(default)s)")
    p.add_argument("--down", action="store_true", help="tear the lab down afterwards")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--throughput-only", action="store_true", help="only part 1 (one node, copies)")
    only.add_argument("--failover-only", action="store_true", help="only parts 2 and 3 (the pair, failover)")
    p.set_defaults(func=cmd_demo)
