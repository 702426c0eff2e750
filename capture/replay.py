"""``pairproxy replay CAPTURE``: run the passive decoder over a pcap/pcapng file.

The same :class:`protocols.pipeline.Pipeline` as the standby's snooper, fed from a file instead of a
macvlan: what it prints is what the standby would have known at that moment (``--at``), and its
digest is the one the standby would report.

An offline tool over :mod:`protocols` and :mod:`capture.pcapfile`; the node never imports it (the
CLI does, for ``replay`` and for printing ``status`` tables). A truncated or corrupt file is reported
as "packet N at byte offset X: what", after printing what was decoded up to there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

from capture.nfs_text import describe_rpc, nfs_table_lines, nfs_version
from capture.pcapfile import CaptureError, Packet, read_capture
from protocols.events import ConnKey, ProtocolError
from protocols.pipeline import Pipeline

__all__ = ["add_replay_command", "cmd_replay", "read_capture", "CaptureError", "Packet", "replay",
           "describe_event", "format_tables"]


# ------------------------------------------------------------------------------------------ output
def _short(key: ConnKey) -> str:
    return f"{key.client}>{key.server}"


def describe_event(ev: object, latency_ms: float | None = None) -> str:
    """One human line per event (the replay timeline); ``latency_ms``: an RPC reply's, if known."""
    name = type(ev).__name__
    if name in ("RpcCall", "RpcReply"):
        return describe_rpc(ev, latency_ms)
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
        fields = " ".join(f"{k}={v}" for k, v in dict(ev.fields).items() if v not in ("", [], None))
        return f"SMB2 notification command={ev.command} {fields}".rstrip()
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
        if isinstance(c.get("nfs"), dict) and nfs_version(c["nfs"]):
            extra = f"  {nfs_version(c['nfs'])}"
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
        if isinstance(c.get("nfs"), dict):
            lines += nfs_table_lines(c["nfs"])
        t = c["tcp"]
        lines.append(f"    tcp next seq c>s {t['client_next_seq']} s>c {t['server_next_seq']}  "
                     f"wscale {t['client_wscale']}/{t['server_wscale']}  mss {t['client_mss']}/{t['server_mss']}"
                     f"  handshake {'seen' if t['handshake_seen'] else 'missed'}")
    nonzero = {k: v for k, v in snap["errors"].items() if v}
    lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in nonzero.items()))
    return "\n".join(lines)


class EventPrinter:
    """``on_event`` for ``--events``: one line per event, RPC replies with the latency of their call."""

    MAX_PENDING = 65536  # calls remembered for their reply's latency (the oldest are forgotten)

    def __init__(self, out) -> None:
        self.out = out
        self._calls: OrderedDict[tuple[ConnKey, int], float] = OrderedDict()

    def __call__(self, rel: float, key: ConnKey, ev: object) -> None:
        name = type(ev).__name__
        if name == "Data":
            return
        latency = None
        if name == "RpcCall":
            self._calls[(key, ev.xid)] = rel
            if len(self._calls) > self.MAX_PENDING:
                self._calls.popitem(last=False)
        elif name == "RpcReply":
            sent = self._calls.pop((key, ev.xid), None)
            latency = None if sent is None else (rel - sent) * 1e3
        self.out.write(f"{rel:12.6f}  {_short(key)}  {describe_event(ev, latency)}\n")


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
    pipe = Pipeline(zero_copy=True)  # Data events are not kept: no copy of bulk payload
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
        # what is still buffered for the closed pipe must not fail again at exit: point the
        # descriptor at /dev/null (the way Python's documentation advises for SIGPIPE)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
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
        on_event = EventPrinter(out)
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
    except BrokenPipeError:
        raise  # stdout closed (`| head`), not the capture: cmd_replay ends quietly
    except OSError as exc:
        print(f"replay: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if show_progress:
        sys.stderr.write("\n")
    snap = result.pipeline.snapshot()
    digest = result.pipeline.digest(snap)
    if args.json:
        from schema import CaptureInfo, ReplayReport, tables_with_digests, to_json

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
            print(f"replay: {path}: {e}", file=sys.stderr)
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
    """Stand-alone entry (``python -m capture.replay``) until the CLI wires the subcommand in."""
    parser = argparse.ArgumentParser(prog="pairproxy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_replay_command(sub)
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
