"""Fuzz sync/wire.py's SyncSession.receive_data (issue 8, "Fuzzing"): bytes from a hostile peer.

usage: .venv/bin/python bench/fuzz_wire.py [--runs 1000000] [--engine atheris|random] [--json FILE]

One input drives one fresh session the way sync.link does. Its first byte picks what the peer is:

* a stranger: the input is the raw byte stream (bad preambles, impossible lengths, garbage);
* a peer that knows the preamble but not the key: ``MAGIC`` + nonce, then the input;
* a peer *with the key*: valid preamble, then frames whose payload, length, sequence number and
  MAC-validity come from the input, so msgpack's decoder and the seq/replay checks see arbitrary,
  authenticated bytes (a fuzzer cannot forge a MAC, so without this the deep paths go unvisited).

The input's next bytes split the stream into chunks (one TCP segment or many). Checked for every
input, besides "no exception escapes": the events of a call that breaks the session hold nothing
but Rejected (issue 8.1); every Ready can be answered with seal() (as the link does); a broken
session ignores further input; buffered bytes stay below ``max_frame`` + one chunk + a header.
Violations and exceptions are counted, not raised, so one run reports them all.

Engine: atheris (coverage-guided libFuzzer; ``pip install atheris`` into the venv) if importable,
else a seeded random mutator over valid streams. The recorded result is bench/FUZZ-WIRE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hashlib  # noqa: E402
import hmac  # noqa: E402

from sync import wire  # noqa: E402
from sync.wire import MAGIC, NONCE_SIZE, Message, Ready, Rejected, SyncSession  # noqa: E402

KEY = b"fuzzing key, 32 bytes long......"
ME, PEER = "a", "b"
MY_NONCE, PEER_NONCE = b"\x01" * NONCE_SIZE, b"\x02" * NONCE_SIZE
MAX_FRAME = 64 * 1024  # the link's limit before the hello; keeps one input's worst case small

_PEER_KEY = wire._direction_key(KEY, PEER, ME, PEER_NONCE, MY_NONCE)  # what the peer seals with


class Violation(Exception):
    """An invariant of the session broke (not an exception of the session itself)."""


def _frames(data: bytes) -> bytes:
    """Authenticated-looking frames built from ``data`` (the peer holds the key)."""
    out, pos, seq = bytearray(), 0, 0
    while pos < len(data):
        ctl = data[pos]
        size = data[pos + 1] if pos + 1 < len(data) else 0
        payload = data[pos + 2:pos + 2 + size]
        pos += 2 + size
        use_seq = seq if ctl & 3 else max(0, seq - 1 - (ctl >> 4))  # mostly in order, sometimes replays
        mac = hmac.new(_PEER_KEY, struct.pack("!Q", use_seq) + payload, hashlib.sha256).digest()
        if ctl & 4 == 0 and ctl & 8:
            mac = bytes([mac[0] ^ 1]) + mac[1:]  # a corrupted MAC
        frame = struct.pack("!Q", use_seq) + mac + payload
        length = len(frame)
        if ctl & 0xC0 == 0xC0:
            length = (length + (ctl & 0x3F) * 4099) & 0xFFFFFFFF  # a lying length
        out += struct.pack("!I", length) + frame
        seq = use_seq + 1
    return bytes(out)


def stream_and_cuts(data: bytes) -> tuple[bytes, list[int]]:
    """What the peer sends and where TCP cut it, both from one fuzz input."""
    if not data:
        return b"", []
    kind, data = data[0] % 3, data[1:]
    ncuts = data[0] % 8 if data else 0
    cuts = sorted(set(data[1:1 + ncuts]))
    body = data[1 + ncuts:]
    if kind == 0:
        stream = body
    elif kind == 1:
        stream = MAGIC + PEER_NONCE + body
    else:
        stream = MAGIC + PEER_NONCE + _frames(body)
    scale = max(1, len(stream) // 256 + 1)
    return stream, [c * scale for c in cuts if 0 < c * scale < len(stream)]


def check_input(data: bytes) -> int:
    """Run one input; raise Violation if an invariant broke. Returns the number of events."""
    stream, cuts = stream_and_cuts(data)
    session = SyncSession(KEY, me=ME, peer=PEER, nonce=MY_NONCE, max_frame=MAX_FRAME)
    chunks = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)])]
    total = 0
    for chunk in chunks:
        was_broken = session.broken
        events = session.receive_data(chunk)
        total += len(events)
        if was_broken and events:
            raise Violation("a broken session handed out events")
        for event in events:
            if not isinstance(event, (Ready, Message, Rejected)):
                raise Violation(f"unknown event {event!r}")
        if session.broken and not was_broken:
            if not any(isinstance(e, Rejected) and e.broken for e in events):
                raise Violation("the session broke without a broken Rejected")
            if any(not isinstance(e, Rejected) for e in events):
                raise Violation(f"a call that broke the session handed out {events!r}")
        for event in events:
            if isinstance(event, Ready):
                session.seal({"type": "hello", "name": ME})  # what the link does; must not raise
            elif isinstance(event, Message):
                if not isinstance(event.body, dict) or event.body.get("type") != event.type:
                    raise Violation(f"message without its type: {event!r}")
        if session.buffered > MAX_FRAME + len(chunk) + 4 + len(MAGIC) + NONCE_SIZE:
            raise Violation(f"{session.buffered} bytes buffered after a chunk of {len(chunk)}")
    return total


class Tally:
    def __init__(self, runs: int, engine: str):
        self.runs, self.engine = runs, engine
        self.inputs = self.exceptions = self.violations = self.events = 0
        self.first_failures: list[str] = []
        self.started = time.monotonic()

    def one(self, data: bytes) -> None:
        self.inputs += 1
        try:
            self.events += check_input(data)
        except Violation as exc:
            self.violations += 1
            self._keep(data, f"Violation: {exc}")
        except Exception:  # what the fuzzer is looking for: counted, kept, and the run goes on
            self.exceptions += 1
            self._keep(data, traceback.format_exc(limit=4))

    def _keep(self, data: bytes, what: str) -> None:
        if len(self.first_failures) < 10:
            self.first_failures.append(f"input {data.hex()[:200]}: {what}")

    def result(self) -> dict:
        seconds = time.monotonic() - self.started
        return {
            "target": "sync.wire.SyncSession.receive_data",
            "engine": self.engine,
            "inputs": self.inputs,
            "uncaught_exceptions": self.exceptions,
            "invariant_violations": self.violations,
            "events": self.events,
            "seconds": round(seconds, 1),
            "inputs_per_second": round(self.inputs / seconds) if seconds else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "failures": self.first_failures,
            "python": sys.version.split()[0],
            "command": f".venv/bin/python bench/fuzz_wire.py --runs {self.runs} --engine {self.engine}",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def seeds() -> list[bytes]:
    """Valid-ish starting points for the random engine (and atheris' corpus)."""
    msgs = [b"\x81\xa4type\xa5hello", b"\x82\xa4type\xa9heartbeat\xa4sent\xcb" + b"\x00" * 8, b"\x90", b"\xc1"]
    out = [b"\x00" + b"\x00" + b"GET / HTTP/1.1\r\n\r\n", b"\x01\x00" + b"\x00\x00\x00\x30" + b"\x00" * 40]
    for m in msgs:
        out.append(b"\x02\x02\x05\x09" + bytes([1, len(m)]) + m + bytes([1, len(m)]) + m)
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.3 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.5:
            b[rng.randint(0, len(b)):rng.randint(0, len(b))] = rng.randbytes(rng.randint(1, 40))
        elif op < 0.65 and len(b) > 2:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 16)]
        elif op < 0.8:
            b += rng.randbytes(rng.randint(1, 300))
        elif op < 0.9:
            i = rng.randint(0, len(b))
            b[i:i] = struct.pack("!I", rng.choice([0, 1, 39, 40, 41, 65536, 65537, 1 << 20, 0xFFFFFFFF]))
        else:
            b[:1] = bytes([rng.randrange(3)])
    return bytes(b[:4096])


def run_random(tally: Tally, runs: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    corpus = seeds()
    for i in range(runs):
        data = rng.randbytes(rng.randint(0, 200)) if i % 5 == 0 else mutate(rng, rng.choice(corpus))
        tally.one(data)
        if i % 97 == 0 and len(corpus) < 2000:
            corpus.append(data)


def run_atheris(tally: Tally, runs: int, result_path: Path | None) -> None:
    import atheris

    corpus_dir = Path(os.environ.get("FUZZ_CORPUS", "/tmp/fuzz-wire-corpus"))
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds()):
        (corpus_dir / f"seed-{i}").write_bytes(s)

    def one(data: bytes) -> None:
        tally.one(data)
        if tally.inputs % 100_000 == 0:
            print(f"{tally.inputs} inputs, {tally.exceptions} exceptions, {tally.violations} violations",
                  flush=True)
        if tally.inputs >= runs:  # libFuzzer exits from C: write the result while Python still runs
            finish(tally, result_path)
            os._exit(0 if not (tally.exceptions or tally.violations) else 1)

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-runs={runs + 10}", "-max_len=4096", "-rss_limit_mb=1024", str(corpus_dir)],
                  one)
    atheris.Fuzz()


def finish(tally: Tally, result_path: Path | None) -> dict:
    result = tally.result()
    text = json.dumps(result, indent=1)
    print(text)
    if result_path is not None:
        result_path.write_text(text + "\n")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--engine", choices=("atheris", "random"), default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the result here (e.g. bench/FUZZ-WIRE.json)")
    args = ap.parse_args()
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    tally = Tally(args.runs, engine)
    if engine == "atheris":
        run_atheris(tally, args.runs, args.json)
    run_random(tally, args.runs)
    result = finish(tally, args.json)
    return 0 if not (result["uncaught_exceptions"] or result["invariant_violations"]) else 1


if __name__ == "__main__":
    sys.exit(main())
