"""The ``pairproxy`` command line.

Every command returns an exit code; problems are printed as one line each (``KEY.PATH: what is
wrong``) on standard error, never as a traceback, because operators read them in a terminal or a
journal and must know at once which key to fix.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

import trio

from proxy.config import ConfigError, load_config

if TYPE_CHECKING:
    from proxy.status import NodeStatus

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
pairproxy: a pair of proxy nodes in front of NFS and SMB file servers.

Each node owns a service address that clients mount from and proxies every TCP
connection on its services' ports to the backend file server.
"""

EPILOG = """\
examples:
  pairproxy check -c /etc/pairproxy/a.toml     validate config and environment
  pairproxy run -c /etc/pairproxy/a.toml       run the node in the foreground
  pairproxy status -c /etc/pairproxy/a.toml    ask the running node how it is
  pairproxy handover -c /etc/pairproxy/a.toml  move the address and its connections to the peer, live
  pairproxy lab up && pairproxy lab demo       try it in a network-namespace lab (root)
"""


def _print_problems(problems: list[str]) -> None:
    for line in problems:
        print(f"pairproxy: {line}", file=sys.stderr)


def _load(path: str) -> tuple[object | None, list[str]]:
    try:
        return load_config(path), []
    except ConfigError as exc:
        return None, exc.problems


def _load_checked(path: str) -> tuple[object | None, list[str], dict]:
    """The config, every problem of it and of this machine (what ``check`` and ``run`` report), and
    the values by key path that could be read. The machine is checked for every readable key even
    when others have problems, so that all problems show at once."""
    from proxy.preflight import environment_problems, values_of

    try:
        config = load_config(path)
    except ConfigError as exc:
        config, problems, values = None, exc.problems, exc.values
    else:
        problems, values = [], values_of(config)
    return config, problems + environment_problems(values), values


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.preflight import environment_warnings

    config, problems, values = _load_checked(args.config)
    _print_problems(problems)
    _print_problems([f"warning: {w}" for w in environment_warnings(values)])
    if problems:
        return EXIT_PROBLEM
    print(f"{args.config}: ok (node {config.node.name}, {len(config.services)} service(s))")
    return EXIT_OK


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.control import ControlError
    from proxy.instance import AlreadyRunning, InstanceLock
    from proxy.fds import raise_nofile_limit
    from proxy.netplane import NetworkError
    from proxy.node import Node

    config, problems, _ = _load_checked(args.config)
    if problems:
        _print_problems(problems)
        return EXIT_PROBLEM
    # Before any kernel change: a second run of a live node must not remove that node's address.
    # Held until the process ends (the kernel drops it even on SIGKILL).
    instance = InstanceLock(config)
    try:
        instance.acquire()
    except (AlreadyRunning, OSError) as exc:
        _print_problems([f"cannot run: {exc}"])
        return EXIT_PROBLEM
    _setup_logging(args.log_level or config.node.log_level)
    raise_nofile_limit()  # the usual soft 1024 would cap the node at a few hundred connections
    if config.peer is not None:
        # first thing, before the slow imports: an address a killed run left would make this kernel
        # answer (and reset) clients the peer is serving now
        try:
            _remove_leftovers(config)
        except (NetworkError, OSError) as exc:
            _print_problems([f"cannot run: {exc}"])
            return EXIT_PROBLEM
    key = None
    if config.peer is not None:
        from sync.wire import load_key

        key = load_key(config.peer.key_file)
    from proxy import loopwatch

    try:
        instruments = loopwatch.from_environment()
    except ValueError as exc:
        _print_problems([str(exc)])
        return EXIT_PROBLEM
    node = Node(config, key)
    # Everything imported so far lives as long as the process: keep it out of the collector's scans,
    # so no full collection (20-30 ms here) stalls the loop that sends heartbeats.
    gc.collect()
    gc.freeze()
    try:
        trio.run(node.run, instruments=instruments)
    except (ControlError, NetworkError, OSError, ExceptionGroup) as exc:
        expected, rest = _flatten(exc).split((ControlError, NetworkError, OSError))
        if rest is not None:
            raise
        _print_problems([f"cannot run: {e}" for e in expected.exceptions])
        return EXIT_PROBLEM
    return EXIT_OK


def _flatten(exc: BaseException) -> BaseExceptionGroup:
    """Every leaf exception of a (possibly nested) group, as one flat group."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    return BaseExceptionGroup("errors", leaves)


def _remove_leftovers(config) -> list[str]:
    from proxy.netplane import remove_leftovers

    removed = remove_leftovers(config.node.interface, config.node.address,
                               config.peer.macvlan if config.peer else None)
    for what in removed:
        logging.getLogger("pairproxy.node").warning("removed %s left by an earlier run", what)
    return removed


def cmd_cleanup(args: argparse.Namespace) -> int:
    from proxy.instance import running_node
    from proxy.netplane import NetworkError

    config, problems = _load(args.config)
    if problems:
        _print_problems(problems)
        return EXIT_PROBLEM
    running = running_node(config)
    if running and not args.force:
        # its address is live: removing it would cut off the node's clients while it says "serving"
        _print_problems([f"cleanup: {running}; stop it first (cleanup is for a node that died), "
                         "or --force"])
        return EXIT_PROBLEM
    try:
        removed = _remove_leftovers(config)
    except (NetworkError, OSError) as exc:
        _print_problems([f"cleanup: {exc}"])
        return EXIT_PROBLEM
    print(f"removed: {', '.join(removed)}" if removed else "nothing left behind")
    return EXIT_OK


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ms(value: float | None, unit: str = "ms") -> str:
    """A timing for people: "n/a" where there is none (not "None ms")."""
    return "n/a" if value is None else f"{value:g} {unit}"


def format_status(status: NodeStatus) -> str:
    """``pairproxy status`` for a person, from the typed status (:class:`proxy.status.NodeStatus`)."""
    from capture.replay import format_tables
    from proxy.status import to_json

    lines = [
        f"node {status.node} (pid {status.pid}): {status.state}, "
        f"address {status.address} on {status.interface}, up {status.uptime:.1f}s",
    ]
    if status.byte_path is not None:
        bp = status.byte_path
        lines.append(f"byte path: {bp.path} (configured {bp.configured}"
                     + (f"; {bp.reason}" if bp.reason else "")
                     + f"); {bp.relayed_sockets // 2} connections in the kernel relay, "
                       f"{bp.handed_to_splice} handed to splice")
    lines += [
        "",
        f"{'service':<10} {'proto':<5} {'ports':<16} {'backend':<21} {'active':>6} {'total':>7} "
        f"{'to backend':>11} {'to client':>11} {'failed':>6}",
    ]
    for s in status.services:
        lines.append(
            f"{s.name:<10} {s.protocol:<5} {','.join(map(str, s.ports)):<16} {s.backend:<21} "
            f"{s.connections_active:>6} {s.connections_total:>7} {_human_bytes(s.bytes_to_backend):>11} "
            f"{_human_bytes(s.bytes_to_client):>11} {s.backend_failures:>6}")
        if s.last_backend_error:
            lines.append(f"{'':<10} last backend error: {s.last_backend_error}")
        if s.fd_limit_paused:
            lines.append(f"{'':<10} NOT ACCEPTING: near the file descriptor limit (new clients wait in the backlog)")
        if s.source_ports_exhausted:
            lines.append(f"{'':<10} {s.source_ports_exhausted} clients refused: no free source port below 1024 "
                         f"(secure = false lifts the limit where the export allows it)")
        if s.pairings_late:
            lines.append(f"{'':<10} {s.pairings_late} new connections relayed before the peer was told of them "
                         f"(a busy node): not continuable had this node died then")
    pair = status.pair
    if pair:
        link = pair.link
        lines += ["", f"pair with {pair.peer} ({pair.mode}): peer is {pair.peer_state}; sync link {link.state}"
                      + (f" ({link.refused_reason})" if link.refused_reason else "")]
        if pair.detector is not None and pair.detector.misconfigured:
            lines.append(f"PEER MISCONFIGURED (alive, not taken over): {pair.detector.misconfigured}")
        if link.peer_refusal is not None:
            lines.append(f"peer refused the sync link ({link.peer_refusal.kind}, {link.peer_refusal.ago:.1f} s ago): "
                         f"{link.peer_refusal.reason}")
        if pair.own_address_stuck is not None:
            stuck = pair.own_address_stuck
            lines.append(f"OWN ADDRESS NOT SERVED ({stuck.role} for {stuck.for_s:.0f} s): {stuck.reason}")
        if pair.address_mismatch and (pair.own_address_stuck is None or
                                      pair.own_address_stuck.reason != pair.address_mismatch):
            lines.append(f"ADDRESSES DO NOT MATCH: {pair.address_mismatch}")
        if link.dial_problem:
            lines.append(f"SYNC LINK PROBLEM: {link.dial_problem}")
        elif link.state != "connected" and link.last_dial_error:
            lines.append(f"dialling {link.dial}: {link.dial_failures} failed, last: {link.last_dial_error}")
        if pair.takeover_error is not None:
            lines.append(f"TAKEOVER FAILING (attempt {pair.takeover_error.attempts}, retrying): "
                         f"{pair.takeover_error.error}")
        rtt = link.rtt_ms
        if rtt:
            lines.append(f"heartbeat round trip: last {rtt.last:.2f} ms, median {rtt.median:.2f} ms, "
                         f"max {rtt.max:.2f} ms over {rtt.count}")
        else:
            lines.append("heartbeat round trip: n/a (no heartbeat answered yet)")
        hb = pair.heartbeat
        if hb is not None:
            how = "SCHED_FIFO" if hb.realtime else f"not real-time ({hb.realtime_problem})"
            how += ", memory locked" if hb.memory_locked else f", memory not locked ({hb.memory_problem})"
            lines.append(f"heartbeat process {hb.pid}: {how}" + (", PAUSED (node stopped, or its loop hung)" if hb.paused else "")
                         + (f", {hb.failed}" if hb.failed else ""))
            for name, p in sorted(hb.paths.items()):
                gap, jit = p.gap_ms, p.jitter_ms
                lines.append(f"  {name:<8} {'up' if p.up else 'SILENT':<6} received {p.received}"
                             + (f", gap p50/p99/max {gap.p50:.1f}/{gap.p99:.1f}/{gap.max:.1f} ms" if gap else "")
                             + (f", jitter p50/p99/max {jit.p50:.2f}/{jit.p99:.2f}/{jit.max:.2f} ms" if jit else "")
                             + (f", rejected {p.rejected}" if p.rejected else "")
                             + (f", unauthenticated {p.unauthenticated}" if p.unauthenticated else ""))
        lines.append(f"{'address':<16} {'owner':<8} {'held by':<8} role")
        for address, a in pair.addresses.items():
            lines.append(f"{address:<16} {a.owner:<8} {a.held_by:<8} {a.role}")
        for s in pair.peer_services:
            lines.append(f"  taken over: {s.name} on {s.address}: {s.connections_active} active, "
                         f"{s.connections_total} total")
            if s.last_backend_error:
                lines.append(f"    last backend error: {s.last_backend_error}")
        if pair.takeovers:
            t = pair.takeovers[-1]
            lines.append(f"last takeover of {t.address} at {t.when} ({pair.takeovers_total} in all): silence "
                         f"{_ms(t.silence_ms)}, address moved {_ms(t.address_moved_ms)}, first client "
                         f"{_ms(t.first_client_ms)} after detection"
                         + (f", handed back after {t.held_for_s:g} s" if t.held_for_s is not None else ""))
            if t.connections:
                lines.append(f"  {t.connections_continued} of {len(t.connections)} connection(s) continued, the rest reset")
                for c in t.connections[:20]:
                    lines.append(f"    {c.client}: " + ("continued" if c.continued else f"reset: {c.reason}"))
        if pair.move_in_progress:
            lines.append(f"MOVING {pair.move_in_progress} (live move under way)")
        m = pair.last_move
        if m is not None:
            lines.append(f"last move: {m.address} {m.direction}, {m.moved} of {m.connections} connection(s) live, "
                         f"{m.failed} cut, pause {_ms(m.pause_ms)}"
                         + (f", CALLED OFF: {m.thawed} connection(s) kept here" if m.outcome == "thawed" else "")
                         + (", GIVEN UP: the restored connections were dropped" if m.outcome == "given_up" else "")
                         + (f", freeze to live {_ms(m.freeze_to_live_ms)}" if m.freeze_to_live_ms is not None else ""))
        sync = pair.state_sync
        if sync:
            behind = sync.behind
            lines.append(f"state sync with {pair.peer}: " + ("in sync" if sync.in_sync else
                         "NOT in sync" if sync.in_sync is False else "not compared yet") +
                         f" ({sync.matches}/{sync.compared} digests matched"
                         + (f"; behind: {behind.frames} frames, {behind.bytes} bytes, {_ms(behind.ms)})"
                            if behind else ")"))
            paths = "/".join(sorted({s.path for s in sync.snoopers})) or "-"
            lines.append(f"observer {sync.observer} (reading: {paths}); "
                         f"{sum(s.kernel_drops for s in sync.snoopers)} frames dropped by "
                         f"the kernel; frames seen, per address:")
            views = {"own_address": "own address", "peer_address": f"{pair.peer}'s address",
                     "peer_backend": f"{pair.peer}'s backend connections"}
            for s in sync.snoopers:
                whose = "it" if s.view == "own_address" else pair.peer
                refused = sum(s.segments_refused.values())
                lines.append(f"  {s.address or '?':<15} {views.get(s.view, s.view)}: {s.frames} frames, "
                             f"{s.frames_to} to {whose}, {s.frames_from} from {whose}"
                             + (f"; {refused} segments refused (out of window {s.out_of_window}, RST in window "
                                f"{s.rst_challenged}, RST out of window {s.rst_out_of_window}, SYN on a live "
                                f"connection {s.syn_challenged})" if refused else ""))
            if sync.sight_detail:
                lines.append(("" if sync.sight == "nothing" else "this node ") + sync.sight_detail)
            cont = sync.continuation
            if cont is not None:
                why = "; ".join(f"{n} {reason}" for reason, n in sorted(cont.not_continuable.items()))
                lines.append(f"a takeover now would continue {cont.continuable} of {pair.peer}'s {cont.connections} "
                             f"connection(s) ("
                             + (f"{cont.inferred} paired from the frames, {pair.peer}'s word not yet here; "
                                if cont.inferred else "") + f"{cont.bytes_kept} bytes kept"
                             + (f", observer {cont.observer_rss / 1048576:.1f} MiB resident" if cont.observer_rss else "")
                             + ")" + (f"; not: {why}" if why else ""))
        for r in pair.resume or []:
            lines.append(f"resume {r.client}: {r.verdict}; reopened {[o.path for o in r.reopened]}, "
                         f"lost {[o.path for o in r.lost_opens]}")
    decoded = [c for c in status.connections if c.tcp is not None]
    if decoded:
        lines += ["", format_tables({"connections": [to_json(c) for c in decoded], "errors": status.errors})]
    proxied = [c for c in status.connections if c.tcp is None and c.proxied is not None]
    if proxied or not decoded:
        lines += ["", f"{len(proxied)} proxied connection{'s' if len(proxied) != 1 else ''}"
                      + (" (not decoded)" if decoded else "")]
        for c in proxied:
            p = c.proxied
            service = f" (service {p.service})" if p.service != c.protocol else ""
            lines.append(f"  {c.client} -> {c.server}  {c.protocol}{service}  backend "
                         f"{p.backend_source or '?'} -> {p.backend}  {_human_bytes(p.bytes_to_backend)} to backend, "
                         f"{_human_bytes(p.bytes_to_client)} to client, {p.age_s:.1f} s")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.control import ControlError, request
    from proxy.status import NodeStatus, SchemaError, from_json

    config, problems = _load(args.config)
    if problems:
        _print_problems(problems)
        return EXIT_PROBLEM
    try:
        # the decoded tables are a stateful node's costly part, answered in its event loop: left out when
        # asked (frequent polling) and for metrics, which use none of them
        light = args.no_tables or args.prometheus
        raw = request(config.node.control, "status", **({"tables": False} if light else {}))
    except ControlError as exc:
        if args.prometheus:  # a scraper (textfile collector) learns that the node is down
            from proxy.metrics import render

            print(render(None), end="")
        _print_problems([str(exc)])
        return EXIT_PROBLEM
    if args.json:
        print(json.dumps(raw, indent=2))
        return EXIT_OK
    try:
        status = from_json(NodeStatus, raw, strict=False)  # a newer node may say more than this CLI knows
    except SchemaError as exc:
        _print_problems([f"the node's status does not fit this pairproxy's schema: {exc}"])
        return EXIT_PROBLEM
    if args.prometheus:
        from proxy.metrics import render

        print(render(status), end="")
    else:
        print(format_status(status))
    return EXIT_OK


def cmd_handover(args: argparse.Namespace) -> int:
    from proxy.control import ControlError, request

    config, problems = _load(args.config)
    if problems:
        _print_problems(problems)
        return EXIT_PROBLEM
    try:
        reply = request(config.node.control, "handover", timeout=args.timeout + 5, back=args.back,
                        timeout_s=args.timeout)
    except ControlError as exc:
        _print_problems([str(exc)])
        return EXIT_PROBLEM
    move = reply.get("move")
    what = "back to this node" if args.back else "to the peer"
    if not reply.get("changed"):
        print(f"own address: {reply.get('own_role')} (nothing moved)")
        return EXIT_OK if reply.get("own_role") == ("serving" if args.back else "handed_over") else EXIT_PROBLEM
    line = f"own address moved {what}; now {reply.get('own_role')}"
    if move:
        line += (f": {move['moved']} of {move['connections']} connection(s) moved live, {move['failed']} cut, "
                 f"pause {_ms(move.get('pause_ms'))}")
        if move.get("freeze_to_live_ms") is not None:
            line += f", freeze to live {_ms(move['freeze_to_live_ms'])}"
    print(line)
    for failure in (move or {}).get("failures") or []:
        print(f"  cut: {failure}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairproxy", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", required=True, metavar="FILE", help="the node's TOML config")

    p = sub.add_parser("run", help="run a node in the foreground",
                       description="Check the config and environment, add the node's service address, "
                                   "proxy every service until SIGTERM/SIGINT, then stop accepting, let open "
                                   "connections finish for [node] grace, and undo every kernel change. "
                                   "A second signal cuts open connections at once.")
    with_config(p)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="overrides [node] log_level")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config and the environment",
                       description="Validate the config and try on this machine what run will need "
                                   "(capabilities, interface, listen address, directories, key file), and "
                                   "whether the backends and the peer answer. Prints one line per problem "
                                   "naming the key, all at once, and exits 1 if there is any; a backend or "
                                   "peer that does not answer is a warning (the node starts anyway).")
    with_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cleanup", help="remove what a killed node left in the kernel (address, macvlan)",
                       description="Remove the node's service address and the macvlan with the peer's MAC if a "
                                   "node killed with SIGKILL left them. Run it when the node's process died "
                                   "(systemd ExecStopPost=, see deploy/systemd/): a kernel that keeps the "
                                   "address answers ARP and resets clients the peer serves after its takeover. "
                                   "Refuses while the node runs (its control socket answers or it holds its "
                                   "lock in state_dir), unless --force.")
    with_config(p)
    p.add_argument("--force", action="store_true",
                   help="remove them even though a node seems to run (its clients are cut off)")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("status", help="show a running node's services and counters",
                       description="Ask the running node over its control socket ([node] control) for its "
                                   "services, connections, bytes each way, backend failures and uptime; in a "
                                   "pair also the addresses, the peer, the sync link and the last takeover.")
    with_config(p)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON for scripts (the schema of proxy/status.py)")
    form.add_argument("--prometheus", action="store_true",
                      help="print Prometheus metrics (text exposition format); 'pairproxy_up 0' if the node "
                           "does not answer")
    p.add_argument("--no-tables", action="store_true",
                   help="stateful: leave out the decoded connection and session tables and their digests "
                        "(the costly part, answered in the node's event loop); for polling often")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("handover", help="move this node's address and its live connections to the peer",
                       description="Planned maintenance without a reconnect: the running node moves its own "
                                   "service address to the peer together with every open connection (TCP_REPAIR: "
                                   "the clients notice nothing) and keeps running, serving nothing for it "
                                   "(role handed_over). --back asks the peer to move it back the same way. "
                                   "A connection that cannot move is cut, as a takeover would, and named.")
    with_config(p)
    p.add_argument("--back", action="store_true", help="ask the peer to move the address back to this node")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the move to end (default 10)")
    p.set_defaults(func=cmd_handover)

    from capture.replay import add_replay_command

    add_replay_command(sub)

    # Commands from plugins (entry point group "pairproxy.commands", e.g. `pairproxy lab` from
    # deploy.lab): the product never imports its lab, the lab registers itself when installed.
    from importlib.metadata import entry_points

    for plugin in entry_points(group="pairproxy.commands"):
        try:
            plugin.load()(sub)
        except Exception as exc:  # a broken plugin must not take `run`/`status` down with it
            print(f"pairproxy: command {plugin.name!r} ({plugin.value}) unavailable: {exc}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`pairproxy status | head`): nothing to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
