"""Fuzzing the passive decoders: malformed input is counted, never raised (issue 8, "Fuzzing").

Targets (each a function of one ``bytes`` input; any exception escaping it is a crash):

``tcp``     the input as a sequence of frames (2-byte length + frame) through ``parse_link`` and a
            :class:`TcpTracker` (small buffer bounds, so give-ups and gaps happen too)
``smb2``    an SMB2 byte stream: records (direction/gap flag byte, 2-byte length, bytes) into an
            :class:`Smb2Decoder` and its events into an :class:`SmbSessionTable`
``rpc``     the same record format into an :class:`RpcDecoder` (portmapper, MOUNT, NFSv3, NFSv4
            bodies) and its events into an :class:`NfsStateTable`
``pcap``    the input as a capture file through :func:`read_capture` (only :class:`CaptureError`
            may come out), every packet through a :class:`Pipeline`

Two engines. ``atheris`` (coverage-guided libFuzzer, ``pip install atheris``) runs one target per
process; the driver (``--all``) runs each in a child, takes the runs from libFuzzer's "Done N runs"
line and the child's peak RSS from ``wait4``. ``mutate`` (no dependencies) mutates seeds taken from
the real captures in ``tests/fixtures`` (bit flips, interesting integers, splices, truncations): the
test suite runs it for a few seconds per target. Seeds for both come from the same fixtures.

    .venv/bin/python bench/fuzz_protocols.py --all --runs 1000000 --write bench/FUZZ.md
    .venv/bin/python bench/fuzz_protocols.py --target smb2 --engine mutate --runs 20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load() -> None:
    """Import the code under test (inside ``atheris.instrument_imports`` for the atheris engine)."""
    global CaptureError, read_capture, ConnKey, LINKTYPE_ETHERNET, FrameError, parse_link, NfsStateTable
    global Pipeline, RpcDecoder, Smb2Decoder, SmbSessionTable, Data, TcpTracker, KEY
    from capture.pcapfile import CaptureError, read_capture
    from protocols.events import ConnKey
    from protocols.frames import LINKTYPE_ETHERNET, FrameError, parse_link
    from protocols.nfs_state import NfsStateTable
    from protocols.pipeline import Pipeline
    from protocols.rpc import RpcDecoder
    from protocols.smb2 import Smb2Decoder
    from protocols.smb_state import SmbSessionTable
    from protocols.tcpstream import Data, TcpTracker
    KEY = ConnKey("10.0.0.1", 40000, "10.0.0.2", 445)


FIXTURES = ROOT / "tests" / "fixtures"
MAX_LEN = 2048


# ------------------------------------------------------------------------------------ input formats
def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(flags, chunk) records: flags byte, 2-byte big-endian length, chunk (cut at the end)."""
    pos = 0
    while pos + 3 <= len(data):
        flags, n = data[pos], struct.unpack_from(">H", data, pos + 1)[0]
        yield flags, data[pos + 3:pos + 3 + n]
        pos += 3 + n


def to_records(chunks: list[tuple[bool, bytes]]) -> bytes:
    out = bytearray()
    for from_client, chunk in chunks:
        for i in range(0, len(chunk), 0xFFFF):
            piece = chunk[i:i + 0xFFFF]
            out += bytes([1 if from_client else 0]) + struct.pack(">H", len(piece)) + piece
    return bytes(out)


# ------------------------------------------------------------------------------------------ targets
def target_tcp(data: bytes) -> None:
    t = TcpTracker([445, 2049], ooo_limit=4096, ooo_max_segments=16, max_connections=8)
    now = 0.0
    for flags, frame in records(data):
        seg = parse_link(frame, LINKTYPE_ETHERNET if flags & 1 == 0 else 101)  # 101: raw IP
        now += (flags >> 4) * 10.0
        if seg is None or isinstance(seg, FrameError):
            continue
        t.feed(seg, now)
        if flags & 2:
            t.expire(now)
    t.close_all()


def _app(decoder, table, data: bytes) -> None:
    for flags, chunk in records(data):
        from_client = bool(flags & 1)
        events = decoder.gap(from_client, len(chunk) or 1) if flags & 2 else decoder.feed(from_client, chunk)
        for ev in events:
            table.apply(KEY, ev)
    decoder.unsynchronised  # noqa: B018 -- a property that must not raise either
    table.to_json()


def target_smb2(data: bytes) -> None:
    _app(Smb2Decoder(midstream=bool(data[:1] and data[0] & 4)), SmbSessionTable(), data)


def target_rpc(data: bytes) -> None:
    table = NfsStateTable()
    _app(RpcDecoder(midstream=bool(data[:1] and data[0] & 4)), table, data)
    table.to_json(KEY)
    table.summary()


def target_pcap(data: bytes) -> None:
    pipe = Pipeline()
    try:
        for pkt in read_capture(io.BytesIO(data)):
            pipe.feed_frame(pkt.data, pkt.ts, pkt.linktype)
    except CaptureError:
        pass
    pipe.close()
    pipe.digest()
    if pipe.counters["decoder_exceptions"]:
        raise AssertionError(f"a decoder raised inside the pipeline: {pipe.counters}")


TARGETS: dict[str, Callable[[bytes], None]] = {"tcp": target_tcp, "smb2": target_smb2, "rpc": target_rpc,
                                                "pcap": target_pcap}


# -------------------------------------------------------------------------------------------- seeds
def _fixture_packets(name: str):
    with open(FIXTURES / name, "rb") as f:
        return list(read_capture(f))


def seeds(target: str) -> list[bytes]:
    """Inputs built from the real captures, in the target's input format."""
    files = sorted(p.name for p in FIXTURES.glob("*.pcap*"))
    out: list[bytes] = []
    if target == "pcap":
        out = [(FIXTURES / f).read_bytes()[:MAX_LEN] for f in files]
    elif target == "tcp":
        for f in files:
            frames = [(True, p.data) for p in _fixture_packets(f)]
            out.append(to_records([(False, d) for _, d in frames])[:MAX_LEN])
    else:
        want = {"smb2": "smb", "rpc": "nfs"}[target]
        for f in files:
            if not f.startswith(want):
                continue
            t = TcpTracker([445, 2049])
            chunks: list[tuple[bool, bytes]] = []
            for p in _fixture_packets(f):
                seg = parse_link(p.data, p.linktype)
                if seg is None or isinstance(seg, FrameError):
                    continue
                chunks += [(e.from_client, e.data) for e in t.feed(seg, p.ts) if isinstance(e, Data)]
            blob = to_records(chunks)
            out += [blob[i:i + MAX_LEN] for i in range(0, min(len(blob), 8 * MAX_LEN), MAX_LEN)]
    return [s for s in out if s] or [b"\0" * 16]


# ---------------------------------------------------------------------------------- mutation engine
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 64, 4096]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        if not b:
            b += rng.randbytes(rng.randint(1, 64))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            v = rng.choice(_INTERESTING)
            fmt = rng.choice([">I", "<I", ">H", "<H", "B"])
            v &= (1 << (8 * struct.calcsize(fmt))) - 1
            b[i:i + struct.calcsize(fmt)] = struct.pack(fmt, v)
        elif op == 3:
            del b[i:i + rng.randint(1, 64)]
        elif op == 4:
            b[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == 5:
            other = rng.choice(pool)
            j = rng.randrange(len(other))
            b[i:] = other[j:j + rng.randint(1, 512)]
        else:
            b = b[:i]
    return bytes(b[:MAX_LEN])


def run_mutate(target: str, runs: int, seed: int = 1, seconds: float | None = None) -> dict:
    """Run ``target`` on ``runs`` mutated inputs (or until ``seconds``); crashes are collected."""
    fn, pool = TARGETS[target], seeds(target)
    rng = random.Random(seed)
    crashes: list[dict] = []
    start = time.monotonic()
    done = 0
    for done in range(1, runs + 1):
        data = pool[done % len(pool)] if done <= len(pool) else mutate(rng, rng.choice(pool), pool)
        try:
            fn(data)
        except Exception as exc:  # the point of the exercise: record, keep going
            if len(crashes) < 20:
                crashes.append({"input": data.hex(), "error": f"{type(exc).__name__}: {exc}"})
            else:
                crashes.append({})
        if seconds is not None and time.monotonic() - start > seconds:
            break
    return {"target": target, "engine": "mutate", "runs": done, "crashes": len(crashes),
            "crash_examples": [c for c in crashes if c][:3], "seconds": round(time.monotonic() - start, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# ----------------------------------------------------------------------------------- atheris engine
def run_atheris(target: str, argv: list[str]) -> None:
    """In this process: libFuzzer over ``target`` (never returns)."""
    import atheris

    with atheris.instrument_imports(include=["protocols", "capture"]):
        _load()
    fn = TARGETS[target]
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def drive_atheris(target: str, runs: int, workdir: Path) -> dict:
    """One child process per target; its runs from libFuzzer's summary, its peak RSS from wait4."""
    corpus = workdir / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds(target)):
        (corpus / f"seed-{i}").write_bytes(s)
    cmd = [sys.executable, __file__, "--target", target, "--engine", "atheris", "--",
           f"-runs={runs}", f"-max_len={MAX_LEN}", "-rss_limit_mb=2048", "-timeout=10",
           f"-artifact_prefix={workdir}/crash-{target}-", str(corpus)]
    start = time.monotonic()
    log = open(workdir / f"{target}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    text = log.read()
    done = re.findall(r"Done (\d+) runs", text)
    crashed = "Uncaught Python exception" in text or "ERROR: libFuzzer" in text
    return {"target": target, "engine": "atheris", "runs": int(done[-1]) if done else None,
            "crashes": 1 if crashed or proc.returncode else 0, "exit": proc.returncode,
            "seconds": round(time.monotonic() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "log_tail": text[-1500:] if crashed or proc.returncode else None,
            "command": " ".join(cmd[1:])}


def write_report(results: list[dict], path: Path, command: str) -> None:
    lines = ["# Fuzzing the passive decoders", "",
             "Issue 8, \"Fuzzing\": every target gets malformed input that must be counted, never raised.",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on the shared 2-core lab machine.", "",
             "Command(s):", "", *[f"    {c}" for c in command.split(" ; ")], "",
             "| target | engine | inputs | uncaught exceptions | peak RSS (MiB) | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['target']} | {r['engine']} | {r['runs']:,} | {r['crashes']} | {r['peak_rss_mib']} | "
                     f"{r['seconds']} |")
    lines += ["", "Targets: see the docstring of `bench/fuzz_protocols.py`. Seeds are the real captures in",
              "`tests/fixtures`. Each atheris target runs in its own process (peak RSS is that process's,",
              "`wait4`), with libFuzzer's `-rss_limit_mb=2048` and `-max_len=2048`. The test suite runs the",
              "mutation engine for a few seconds per target (`tests/test_fuzz.py`).", ""]
    for r in results:
        if r.get("log_tail"):
            lines += [f"## {r['target']}: crash", "", "```", r["log_tail"], "```", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", help="one target or several, comma-separated: " + ", ".join(sorted(TARGETS)))
    ap.add_argument("--all", action="store_true", help="every target, each in its own process")
    ap.add_argument("--engine", choices=["atheris", "mutate"], default=None,
                    help="default: atheris if it imports, else mutate")
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", metavar="FILE", help="write the results as Markdown (e.g. bench/FUZZ.md)")
    ap.add_argument("--json-out", metavar="FILE", help="append each result as a JSON line")
    ap.add_argument("--merge", nargs="+", metavar="JSONL", help="only write --write from earlier --json-out files")
    ap.add_argument("libfuzzer", nargs="*", help="after --: libFuzzer arguments (atheris engine, one target)")
    args = ap.parse_args()
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "mutate"
    if args.target and not args.all and engine == "atheris" and args.libfuzzer:
        run_atheris(args.target, args.libfuzzer)  # the child of drive_atheris
        return 0
    if args.merge:
        results = [json.loads(line) for f in args.merge for line in Path(f).read_text().splitlines() if line]
        write_report(results, Path(args.write), " ; ".join(sorted({r["command"] for r in results})))
        return 1 if any(r["crashes"] for r in results) else 0
    _load()
    targets = sorted(TARGETS) if args.all else (args.target or "").split(",")
    if targets == [""] or not set(targets) <= set(TARGETS):
        ap.error(f"give --all or --target from {sorted(TARGETS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="pairproxy-fuzz-") as tmp:
        for t in targets:
            r = drive_atheris(t, args.runs, Path(tmp)) if engine == "atheris" else run_mutate(t, args.runs, args.seed)
            r.setdefault("command", "cd " + str(ROOT) + " && .venv/bin/python " +
                         " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
            print(json.dumps(r), flush=True)
            if args.json_out:
                with open(args.json_out, "a") as out:
                    out.write(json.dumps(r) + "\n")
            results.append(r)
    if args.write:
        write_report(results, Path(args.write), results[0]["command"])
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
