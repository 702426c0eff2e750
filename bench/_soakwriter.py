"""Continuous writer for bench/soak.py; runs inside the lab's client namespace.

usage: _soakwriter.py smb HOST SHARE USER PASSWORD --token T [--size 131072] [--interval-ms 50]
       _soakwriter.py nfs HOST URL_PREFIX --token T [--size 131072] [--interval-ms 50]

Writes file after file with known content through HOST and reads each back, comparing sha256, like a
user's job that must not lose a byte across failovers and hand-backs:

* ``smb``: smbprotocol's high-level API on one session kept open across operations (a failover
  breaks it: the error is counted, the connection cache reset and the session opened again, counted
  as a reconnect);
* ``nfs``: libnfs ``nfs-cp`` (NFSv3) put, then get into /dev/shm; every operation is a new client.

Every operation is one JSON line on stdout (times: time.monotonic(), one clock for the machine)::

    {"i": 7, "s": START, "e": END, "ok": 1, "name": "soak-smb-T-7.bin", "sha": HEX, "bytes": N}
    {"i": 8, "s": START, "e": END, "ok": 0, "stage": "write"|"read"|"compare", "err": "..."}

``ok: 1`` means: written, closed without error, read back, and the read-back sha256 equals the written
one. ``stage: compare`` (read back differs) is a corruption, never a retry-able error. A failed
operation writes the next file under a new name (an interrupted create may have left the old one).
Each operation has a watchdog (``--op-timeout``) so a client waiting on a lost reply moves on.
Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time


class OpTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise OpTimeout("operation timeout")


#: record mark + RPC reply header + READ3resok up to the data: what the wrong read-backs had inside
READ_REPLY_HEADER = 132


def _mark_start(got: bytes, mark: bytes, diff: int, lo: int) -> int | None:
    """Where a record mark starts whose first differing byte is ``diff``: up to 3 bytes before it, as
    the bytes the mark replaced may equal its first bytes (``want[x] == 0x80`` one time in 256), not
    before ``lo``; None when no mark (or the start of one, at the end of ``got``) is there."""
    for p in range(max(lo, diff - len(mark) + 1), diff + 1):
        if got[p:p + len(mark)] == mark[:len(got) - p]:
            return p
    return None


def _first_diff(a: bytes, b: bytes) -> int | None:
    """The first offset where ``a`` and ``b`` differ, over ``a``'s length (``b`` at least as long)."""
    return next((k for k in range(len(a)) if a[k] != b[k]), None)


def reconnect_splices(want: bytes, got: bytes) -> list[int] | None:
    """Where ``got`` is what libnfs makes of a READ reply record cut by resets (bench/SOAK.md, "The
    wrong NFS read-backs"): the record is filled up, from where the cut left it, with the next reply to
    the same READ, which may be cut again. So ``got`` (the record after its own 132-byte header) is
    ``want``'s first X bytes, then reply after reply from its start: a record mark
    (one fragment of this READ's size), the rest of a READ reply header, ``want`` from its start,
    each possibly cut short (also inside its header) by the next. The length of each piece, in order
    (the first is X), or None when ``got`` is not of that shape (a hole, foreign bytes, bytes shifted)."""
    mark = (0x80000000 | (len(want) + READ_REPLY_HEADER - 4)).to_bytes(4, "big")
    if len(got) > len(want):
        return None
    x = _first_diff(got, want)
    if x is None:
        return None
    pos = _mark_start(got, mark, x, 0)
    if pos is None:
        return None
    pieces = [pos]
    while pos < len(got):
        # the next reply: its header, unless cut inside it (another record mark there starts the next)
        # (a mark may start up to 3 bytes before the header's end and stick out past it)
        cut = got.find(mark, pos + 1, pos + READ_REPLY_HEADER + len(mark) - 1)
        if cut >= 0:
            pieces.append(cut - pos)
            pos = cut
            continue
        body = pos + READ_REPLY_HEADER
        d = _first_diff(got[body:], want)
        if d is None:
            pieces.append(len(got) - pos)
            return pieces
        nxt = _mark_start(got, mark, body + d, body)
        if nxt is None:
            return None
        pieces.append(nxt - pos)
        pos = nxt
    return pieces


def _evidence(want: bytes, got: bytes, got_sha: str, recent: list) -> dict:
    """What a wrong read-back looks like: where it starts to differ, how much differs (per 4 KiB
    block), zeros, and whether it is (the start or end of) one of this writer's earlier files."""
    n = min(len(want), len(got))
    first = next((k for k in range(n) if want[k] != got[k]), n if len(want) != len(got) else None)
    blocks = [b for b in range(0, n, 4096) if want[b:b + 4096] != got[b:b + 4096]]
    ev = {"got_sha": got_sha, "got_len": len(got), "first_diff": first, "bad_4k_blocks": len(blocks),
          "bad_block_ranges": [blocks[0], blocks[-1]] if blocks else None, "zero_bytes": got.count(0),
          "got_head": got[:32].hex(), "want_head": want[:32].hex()}
    ev["reconnect_splices"] = reconnect_splices(want, got)
    if first is not None:  # where the bytes after the first difference come from, if from this file
        after = got[first + READ_REPLY_HEADER:first + READ_REPLY_HEADER + 64]
        ev["after_header_at"] = want.find(after) if len(after) == 64 else None
        ev["at_first_diff"] = got[first:first + READ_REPLY_HEADER].hex()
    ev["same_as_earlier_file"] = [name for name, sha, head, tail in recent if sha == got_sha]
    ev["starts_like_earlier_file"] = [name for name, sha, head, tail in recent if got[:64] == head]
    ev["ends_like_earlier_file"] = [name for name, sha, head, tail in recent if got[-64:] == tail]
    return ev


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("proto", choices=("smb", "nfs"))
    ap.add_argument("host")
    ap.add_argument("rest", nargs="+", help="smb: SHARE USER PASSWORD; nfs: URL_PREFIX")
    ap.add_argument("--token", required=True)
    ap.add_argument("--size", type=int, default=128 << 10)
    ap.add_argument("--interval-ms", type=float, default=50.0)
    ap.add_argument("--op-timeout", type=float, default=10.0)
    args = ap.parse_args()
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, _alarm)
    out = sys.stdout
    tmp = f"/dev/shm/soak-{args.proto}-{args.token}"
    if args.proto == "smb":
        import smbclient
        share, user, password = args.rest[:3]
        session = {"up": False}

        def connect() -> None:
            smbclient.register_session(args.host, username=user, password=password, connection_timeout=3)
            session["up"] = True

        def reset() -> None:
            session["up"] = False
            try:
                smbclient.reset_connection_cache()
            except Exception:  # a broken connection may fail to close; it is dropped anyway
                pass

        def write(name: str, data: bytes) -> None:
            if not session["up"]:
                connect()
            with smbclient.open_file(rf"\\{args.host}\{share}\{name}", mode="wb") as f:
                f.write(data)

        def read(name: str) -> bytes:
            with smbclient.open_file(rf"\\{args.host}\{share}\{name}", mode="rb") as f:
                return f.read()
    else:
        prefix = args.rest[0]

        def reset() -> None:
            pass

        def nfs_cp(src: str, dst: str) -> None:
            cp = subprocess.run(["nfs-cp", src, dst], capture_output=True, text=True, timeout=args.op_timeout)
            if cp.returncode:
                raise OSError(f"nfs-cp exit {cp.returncode}: {(cp.stdout + cp.stderr).strip()[-200:]}")

        def write(name: str, data: bytes) -> None:
            with open(tmp + ".src", "wb") as f:
                f.write(data)
            nfs_cp(tmp + ".src", f"{prefix.rstrip('/')}/{name}?version=3")

        def read(name: str) -> bytes:
            if os.path.exists(tmp + ".back"):
                os.unlink(tmp + ".back")  # nfs-cp does not truncate an existing local file
            nfs_cp(f"{prefix.rstrip('/')}/{name}?version=3", tmp + ".back")
            with open(tmp + ".back", "rb") as f:
                return f.read()

    i = 0
    recent: list[tuple[str, str, bytes, bytes]] = []   # (name, sha256, head, tail) of this writer's last files
    reconnects = 0
    had_error = False
    try:
        while not stop:
            start = time.monotonic()
            name = f"soak-{args.proto}-{args.token}-{i}.bin"
            data = os.urandom(args.size)
            want = hashlib.sha256(data).hexdigest()
            rec: dict = {"i": i, "s": round(start, 6), "name": name}
            stage = "write"
            signal.setitimer(signal.ITIMER_REAL, args.op_timeout)
            try:
                if had_error and args.proto == "smb":
                    reconnects += 1
                    rec["reconnect"] = reconnects
                write(name, data)
                stage = "read"
                back = read(name)
                signal.setitimer(signal.ITIMER_REAL, 0)
                stage = "compare"
                got = hashlib.sha256(back).hexdigest()
                if got != want:
                    rec.update(ok=0, stage="compare", err=f"read back {len(back)} bytes, sha256 {got[:16]}",
                               sha=want, bytes=args.size, evidence=_evidence(data, back, got, recent))
                    with open(f"{tmp}.bad-{i}", "wb") as f:   # kept for a look (bench/SOAK.md)
                        f.write(back)
                else:
                    rec.update(ok=1, sha=want, bytes=args.size)
                recent.append((name, want, data[:64], data[-64:]))
                del recent[:-200]
                had_error = False
            except (Exception, OpTimeout) as exc:  # any client failure: count it, reconnect, go on
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec.update(ok=0, stage=stage, err=f"{type(exc).__name__}: {str(exc)[:160]}")
                had_error = True
                reset()
            rec["e"] = round(time.monotonic(), 6)
            out.write(json.dumps(rec, separators=(",", ":")) + "\n")
            out.flush()
            i += 1
            pause = args.interval_ms / 1000 - (time.monotonic() - start) if rec["ok"] else 0.02
            if pause > 0 and not stop:
                time.sleep(pause)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for suffix in (".src", ".back"):
            try:
                os.unlink(tmp + suffix)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
