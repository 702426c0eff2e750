"""``pairproxy replay CAPTURE``: run the passive decoder over a pcap/pcapng file.

The same :class:`protocols.pipeline.Pipeline` as the standby's snooper, fed from a file instead of a
macvlan: what it prints is what the standby would have known at that moment (``--at``), and its
digest is the one the standby would report.

The capture reader is hand-written (pcap and pcapng, streaming, constant memory): it is several times
faster than scapy's readers on this path, and it knows the byte offset of every record, so a
truncated or corrupt file is reported as "packet N at byte offset X: what", after printing what was
decoded up to there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from protocols.events import ConnKey, ProtocolError
from protocols.pipeline import Pipeline

__all__ = ["add_replay_command", "cmd_replay", "read_capture", "CaptureError", "Packet", "replay",
           "describe_event", "format_tables"]


# ------------------------------------------------------------------------------------ capture files
class CaptureError(Exception):
    """The capture file is corrupt or truncated at ``offset`` (record ``packet``, 1-based)."""

    def __init__(self, what: str, offset: int, packet: int) -> None:
        super().__init__(f"packet {packet} at byte offset {offset}: {what}")
        self.what, self.offset, self.packet = what, offset, packet


@dataclass(slots=True)
class Packet:
    number: int  # 1-based
    ts: float
    linktype: int
    data: bytes
    offset: int  # byte offset of its record in the file


_PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
                b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
PCAPNG_SHB = 0x0A0D0D0A
MAX_RECORD = 256 * 1024 * 1024


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


def _pcap(f: BinaryIO, header: bytes) -> Iterator[Packet]:
    endian, unit = _PCAP_MAGICS[header[:4]]
    rest = _read_exact(f, 20)
    if len(rest) < 20:
        raise CaptureError("pcap file header truncated", 0, 0)
    _vmaj, _vmin, _tz, _sig, _snap, linktype = struct.unpack(endian + "HHiIII", rest)
    linktype &= 0x0FFFFFFF
    rec = struct.Struct(endian + "IIII")
    offset, number = 24, 0
    while True:
        head = _read_exact(f, 16)
        if not head:
            return
        number += 1
        if len(head) < 16:
            raise CaptureError(f"record header truncated ({len(head)} of 16 bytes)", offset, number)
        sec, frac, incl, _orig = rec.unpack(head)
        if incl > MAX_RECORD:
            raise CaptureError(f"record claims {incl} bytes (corrupt header)", offset, number)
        data = _read_exact(f, incl)
        if len(data) < incl:
            raise CaptureError(f"packet data truncated ({len(data)} of {incl} bytes)", offset, number)
        yield Packet(number, sec + frac * unit, linktype, data, offset)
        offset += 16 + incl


def _pcapng(f: BinaryIO, first: bytes) -> Iterator[Packet]:
    offset, number = 0, 0
    endian = "<"
    interfaces: list[tuple[int, float]] = []  # (linktype, seconds per tick)
    head = first
    while True:
        if len(head) < 8:
            if not head:
                return
            raise CaptureError(f"block header truncated ({len(head)} of 8 bytes)", offset, number + 1)
        btype_raw = head[:4]
        if btype_raw == b"\x0a\x0d\x0d\x0a":
            bom = _read_exact(f, 4)
            if len(bom) < 4:
                raise CaptureError("section header truncated", offset, number + 1)
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">" if bom == b"\x1a\x2b\x3c\x4d" else ""
            if not endian:
                raise CaptureError(f"bad pcapng byte-order magic {bom.hex()}", offset, number + 1)
            interfaces = []
            btype, blen = PCAPNG_SHB, struct.unpack(endian + "I", head[4:8])[0]
            body = bom + _read_exact(f, max(0, blen - 12))
        else:
            btype, blen = struct.unpack(endian + "II", head)
            if blen < 12 or blen % 4 or blen > MAX_RECORD:
                raise CaptureError(f"block length {blen} is invalid (corrupt block)", offset, number + 1)
            body = _read_exact(f, blen - 8)
        if len(body) < blen - 8:
            what = "packet data truncated" if btype in (3, 6) else "block truncated"
            raise CaptureError(f"{what} ({len(body) + 8} of {blen} bytes)", offset, number + 1)
        body = body[:-4]  # trailing block length
        if btype == 1:  # interface description
            linktype = struct.unpack_from(endian + "H", body, 0)[0]
            resol = 1e-6
            pos = 8
            while pos + 4 <= len(body):
                code, olen = struct.unpack_from(endian + "HH", body, pos)
                if code == 0:
                    break
                if code == 9 and olen >= 1:  # if_tsresol
                    v = body[pos + 4]
                    resol = 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
                pos += 4 + ((olen + 3) & ~3)
            interfaces.append((linktype, resol))
        elif btype == 6:  # enhanced packet
            number += 1
            if len(body) < 20:
                raise CaptureError("enhanced packet block too short", offset, number)
            ifid, hi, lo, caplen, _orig = struct.unpack_from(endian + "IIIII", body, 0)
            if ifid >= len(interfaces):
                raise CaptureError(f"packet on undeclared interface {ifid}", offset, number)
            if 20 + caplen > len(body):
                raise CaptureError(f"captured length {caplen} exceeds its block", offset, number)
            linktype, resol = interfaces[ifid]
            yield Packet(number, ((hi << 32) | lo) * resol, linktype, body[20:20 + caplen], offset)
        elif btype == 3:  # simple packet
            number += 1
            if not interfaces:
                raise CaptureError("simple packet before any interface", offset, number)
            orig = struct.unpack_from(endian + "I", body, 0)[0]
            yield Packet(number, 0.0, interfaces[0][0], body[4:4 + orig], offset)
        offset += blen
        head = _read_exact(f, 8)


def read_capture(f: BinaryIO) -> Iterator[Packet]:
    """Packets of a pcap or pcapng stream, one at a time. Raises :class:`CaptureError`."""
    first = _read_exact(f, 8)
    if first[:4] in _PCAP_MAGICS:
        f_rest = first[4:]
        # re-assemble: the pcap reader wants the 20 bytes after the magic
        yield from _pcap(_Prefixed(f_rest, f), first[:4])
    elif len(first) >= 4 and struct.unpack("<I", first[:4])[0] == PCAPNG_SHB:
        yield from _pcapng(f, first)
    else:
        raise CaptureError(f"not a pcap or pcapng file (starts with {first[:8].hex() or 'nothing'})", 0, 0)


class _Prefixed:
    """A file whose first bytes were already read."""

    def __init__(self, prefix: bytes, f: BinaryIO) -> None:
        self.prefix, self.f = prefix, f

    def read(self, n: int) -> bytes:
        if self.prefix:
            head, self.prefix = self.prefix[:n], self.prefix[n:]
            return head + (self.f.read(n - len(head)) if n > len(head) else b"")
        return self.f.read(n)


# ------------------------------------------------------------------------------------------ output
def _short(key: ConnKey) -> str:
    return f"{key.client}>{key.server}"


def describe_event(ev: object) -> str:
    """One human line per event (the replay timeline)."""
    name = type(ev).__name__
    if name == "Smb2Request" or name == "Smb2Response":
        f = dict(ev.fields)
        kind = "request " if name == "Smb2Request" else "response"
        parts = [f"SMB2 {ev.name} {kind} mid={ev.message_id}"]
        if name == "Smb2Response":
            parts.append("ok" if ev.status == 0 else f"status=0x{ev.status:08x}")
        if ev.session_id:
            parts.append(f"sid=0x{ev.session_id:x}")
        if ev.tree_id:
            parts.append(f"tid=0x{ev.tree_id:x}")
        if name == "Smb2Response" and ev.request is not None:
            for k in ("name", "share", "user"):
                if k in ev.request.fields and k not in f:
                    f[k] = ev.request.fields[k]
        for k in ("dialects", "dialect", "user", "domain", "share", "name", "file_id", "offset", "length",
                  "count", "ctl_code", "contexts", "pattern", "rename_to", "kind", "malformed"):
            if k in f and f[k] not in ("", [], None):
                v = f[k]
                parts.append(f"{k}={hex(v) if k == 'ctl_code' else v}")
        return " ".join(str(p) for p in parts)
    if name == "Smb2Interim":
        from protocols.smb2 import COMMAND_NAMES
        cmd = COMMAND_NAMES[ev.command] if ev.command < len(COMMAND_NAMES) else ev.command
        return f"SMB2 {cmd} interim mid={ev.message_id} STATUS_PENDING async_id={ev.async_id}"
    if name == "Smb2Notification":
        return f"SMB2 notification command={ev.command} {ev.fields}"
    if name == "Smb2Opaque":
        return f"SMB3 {ev.kind} message {'c>s' if ev.from_client else 's>c'} {ev.length} bytes " \
               f"sid=0x{ev.session_id or 0:x}"
    if name == "Smb1Negotiate":
        return f"SMB1 NEGOTIATE dialects={list(ev.dialects)}"
    if isinstance(ev, ProtocolError):
        return f"PROTOCOL ERROR {ev.what}" + (f" at stream offset {ev.offset}" if ev.offset is not None else "")
    if name == "ConnectionOpened":
        return "TCP opened" + (" (picked up mid-stream)" if ev.mid_stream else "")
    if name == "ConnectionClosed":
        return f"TCP closed ({ev.reason}{', reset' if ev.reset else ''})"
    if name == "Gap":
        return f"TCP gap {'c>s' if ev.from_client else 's>c'} {ev.length} bytes lost"
    text = repr(ev)
    return text if len(text) < 300 else text[:297] + "..."


def format_tables(snap: dict) -> str:
    lines: list[str] = []
    conns = snap["connections"]
    lines.append(f"{len(conns)} live connection{'s' if len(conns) != 1 else ''}")
    for c in conns:
        smb = c.get("smb") or {}
        extra = f"  dialect {smb['dialect']}" if smb.get("dialect") else ""
        flag = "  UNSYNCHRONISED" if c["unsynchronised"] else ""
        lines.append(f"  {c['client']} -> {c['server']}  {c['protocol']}{extra}{flag}")
        for s in c["sessions"]:
            lines.append(f"    session 0x{s['session_id']:016x}  user {s['user'] if s['user'] is not None else '?'}")
            for t in s["trees"]:
                lines.append(f"      tree 0x{t['tree_id']:08x}  {t['share']}")
        for o in smb.get("opens", c["opens"]):
            flags = " ".join(x for x in ("durable" if o.get("durable") else "", "lease" if o.get("lease") else "") if x)
            lines.append(f"    open {o['file_id']}  {o['path'] or '(share root)'}  "
                         f"session 0x{o['session_id']:x} tree 0x{o['tree_id']:x}  {flags}".rstrip())
        if c.get("nfs"):
            lines.append("    nfs " + json.dumps(c["nfs"], sort_keys=True)[:400])
        t = c["tcp"]
        lines.append(f"    tcp next seq c>s {t['client_next_seq']} s>c {t['server_next_seq']}  "
                     f"wscale {t['client_wscale']}/{t['server_wscale']}  mss {t['client_mss']}/{t['server_mss']}"
                     f"  handshake {'seen' if t['handshake_seen'] else 'missed'}")
    nonzero = {k: v for k, v in snap["errors"].items() if v}
    lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in nonzero.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ replay
@dataclass
class ReplayResult:
    pipeline: Pipeline
    packets: int
    first_ts: float | None
    last_ts: float | None
    error: CaptureError | None
    stopped_at: float | None  # --at reached


def _parse_at(text: str) -> tuple[str, float]:
    """('rel', seconds) or ('abs', epoch seconds)."""
    try:
        return "rel", float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--at {text!r}: give seconds from the capture start or an ISO time")
    return "abs", when.timestamp()


def replay(path: str, at: tuple[str, float] | None = None, on_event=None, progress=None) -> ReplayResult:
    """Feed a capture file through a Pipeline. ``on_event(rel_ts, key, event)`` sees every event."""
    pipe = Pipeline()
    first = last = None
    packets = 0
    error = None
    stopped = None
    with open(path, "rb", buffering=1 << 20) as f:
        try:
            for pkt in read_capture(f):
                if first is None:
                    first = pkt.ts
                if at is not None:
                    limit = first + at[1] if at[0] == "rel" else at[1]
                    if pkt.ts > limit:
                        stopped = limit
                        break
                packets += 1
                last = pkt.ts
                events = pipe.feed_frame(pkt.data, pkt.ts, pkt.linktype)
                if on_event is not None:
                    for key, ev in events:
                        on_event(pkt.ts - first, key, ev)
                if progress is not None and packets % 2048 == 0:
                    progress(f.tell())
        except CaptureError as exc:
            error = exc
    return ReplayResult(pipe, packets, first, last, error, stopped)


def cmd_replay(args: argparse.Namespace) -> int:
    """``pairproxy replay``: exit 0, 1 (unreadable, truncated or corrupt capture) or 2 (bad --at)."""
    try:
        return _cmd_replay(args)
    except BrokenPipeError:  # `pairproxy replay --events x.pcap | head`: not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    path = args.capture
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        print(f"replay: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    at = args.at
    if isinstance(at, str):
        try:
            at = _parse_at(at)
        except argparse.ArgumentTypeError as exc:
            print(f"replay: {exc}", file=sys.stderr)
            return 2
    out = sys.stdout
    on_event = None
    if args.events:
        def on_event(rel: float, key: ConnKey, ev: object) -> None:
            if type(ev).__name__ == "Data":
                return
            out.write(f"{rel:12.6f}  {_short(key)}  {describe_event(ev)}\n")
    progress = None
    show_progress = args.progress or (sys.stderr.isatty() and size > 16 << 20)
    started = time.monotonic()
    if show_progress:
        last = [0.0]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.5:
                last[0] = now
                rate = done / max(now - started, 1e-9) / 1e6
                sys.stderr.write(f"\rreplay: {done / 1e6:9.1f} of {size / 1e6:.1f} MB "
                                 f"({100 * done / max(size, 1):5.1f}%), {rate:6.1f} MB/s")
                sys.stderr.flush()
    try:
        result = replay(path, at, on_event, progress)
    except OSError as exc:
        print(f"replay: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if show_progress:
        sys.stderr.write("\n")
    snap = result.pipeline.snapshot()
    digest = result.pipeline.digest(snap)
    if args.json:
        from proxy.status import CaptureInfo, ReplayReport, tables_with_digests, to_json

        tables, digests = tables_with_digests(snap, result.pipeline.digest)
        doc = ReplayReport(connections=tables.connections, errors=tables.errors, digests=digests, capture=CaptureInfo(
            file=path, packets=result.packets, first_ts=result.first_ts, last_ts=result.last_ts,
            stopped_at=result.stopped_at, error=str(result.error) if result.error else None))
        json.dump(to_json(doc), out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        span = (result.last_ts - result.first_ts) if result.first_ts is not None else 0.0
        out.write(f"{path}: {result.packets} packets over {span:.3f} s"
                  + (f", stopped at --at ({result.stopped_at - result.first_ts:.3f} s)"
                     if result.stopped_at is not None else "") + "\n")
        out.write(format_tables(snap) + "\n")
        out.write(f"digest {digest}\n")
    if result.error is not None:
        e = result.error
        if e.packet == 0:
            print(f"replay: {path}: {e.what}", file=sys.stderr)
        else:
            print(f"replay: {path} is truncated or corrupt at packet {e.packet} (byte offset {e.offset}): "
                  f"{e.what}; showing the state after the {result.packets} packets before it",
                  file=sys.stderr)
        return 1
    return 0


def add_replay_command(subparsers) -> argparse.ArgumentParser:
    """Add ``replay`` to a ``pairproxy`` argparse subparsers object (``func=cmd_replay``)."""
    p = subparsers.add_parser(
        "replay", help="decode a pcap/pcapng capture into the standby's connection and session tables",
        description="Run the standby's passive decoder (TCP streams, SMB2/3, ONC RPC/NFS) over a capture "
                    "file and print the connection, session, tree and open tables it ends with, plus the "
                    "state digest the standby would report. Reads pcap and pcapng (tcpdump, tshark, "
                    "Wireshark) in constant memory. Exit status 1 if the file is truncated or corrupt "
                    "(the state decoded up to there is still printed).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pairproxy replay smb.pcap\n  pairproxy replay --events --at 2.5 smb.pcapng\n"
               "  pairproxy replay --json --at 2026-11-26T10:49:44 smb.pcap")
    p.add_argument("capture", metavar="CAPTURE", help="pcap or pcapng file")
    p.add_argument("--json", action="store_true",
                   help="print the tables as JSON (the `status --json` schema: connections, errors, a digest per "
                        "service address; plus \"capture\")")
    p.add_argument("--events", action="store_true",
                   help="print a timeline of protocol events (seconds from the capture start) before the tables")
    p.add_argument("--at", metavar="TIME",
                   help="stop at TIME: seconds from the capture start (e.g. 2.5) or an ISO time "
                        "(e.g. 2026-11-26T10:49:44+00:00)")
    p.add_argument("--progress", action="store_true",
                   help="show progress on stderr (default: only for big files when stderr is a terminal)")
    p.set_defaults(func=cmd_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m proxy.replay``) until the CLI wires the subcommand in."""
    parser = argparse.ArgumentParser(prog="pairproxy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_replay_command(sub)
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
