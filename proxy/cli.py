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

import trio

from proxy.config import ConfigError, load_config

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


def _load_checked(path: str) -> tuple[object | None, list[str]]:
    """The config, and every problem of it and of this machine (what ``check`` and ``run`` report)."""
    from proxy.preflight import environment_problems

    config, problems = _load(path)
    if config is not None:
        problems = environment_problems(config)
    return config, problems


def cmd_check(args: argparse.Namespace) -> int:
    config, problems = _load_checked(args.config)
    if problems:
        _print_problems(problems)
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
    from proxy.fds import raise_nofile_limit
    from proxy.netplane import NetworkError
    from proxy.node import Node

    config, problems = _load_checked(args.config)
    if problems:
        _print_problems(problems)
        return EXIT_PROBLEM
    _setup_logging(args.log_level or config.node.log_level)
    raise_nofile_limit()  # the usual soft 1024 would cap the node at a few hundred connections
    if config.peer is not None:
        # first thing, before the slow imports: an address a killed run left would make this kernel
        # answer (and reset) clients the peer is serving now
        _remove_leftovers(config)
    key = None
    if config.peer is not None:
        from sync.wire import load_key

        key = load_key(config.peer.key_file)
    node = Node(config, key)
    # Everything imported so far lives as long as the process: keep it out of the collector's scans,
    # so no full collection (20-30 ms here) stalls the loop that sends heartbeats.
    gc.collect()
    gc.freeze()
    try:
        trio.run(node.run)
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
    from proxy.netplane import NetworkError

    config, problems = _load(args.config)
    if problems:
        _print_problems(problems)
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


def format_status(status: dict) -> str:
    lines = [
        f"node {status['node']} (pid {status['pid']}): {status['state']}, "
        f"address {status['address']} on {status['interface']}, up {status['uptime']:.1f}s",
        "",
        f"{'service':<10} {'proto':<5} {'ports':<16} {'backend':<21} {'active':>6} {'total':>7} "
        f"{'to backend':>11} {'to client':>11} {'failed':>6}",
    ]
    for s in status["services"]:
        lines.append(
            f"{s['name']:<10} {s['protocol']:<5} {','.join(map(str, s['ports'])):<16} {s['backend']:<21} "
            f"{s['connections_active']:>6} {s['connections_total']:>7} {_human_bytes(s['bytes_to_backend']):>11} "
            f"{_human_bytes(s['bytes_to_client']):>11} {s['backend_failures']:>6}")
        if s.get("last_backend_error"):
            lines.append(f"{'':<10} last backend error: {s['last_backend_error']}")
    pair = status.get("pair")
    if pair:
        lines += ["", f"pair with {pair['peer']} ({pair['mode']}): peer is {pair['peer_state']}; sync link "
                      f"{pair['link'].get('state')}" + (f" ({pair['link']['refused_reason']})"
                                                         if pair['link'].get('refused_reason') else "")]
        rtt = pair["link"].get("rtt_ms")
        if rtt:
            lines.append(f"heartbeat round trip: last {rtt['last']:.2f} ms, median {rtt['median']:.2f} ms, "
                         f"max {rtt['max']:.2f} ms over {rtt['count']}")
        lines.append(f"{'address':<16} {'owner':<8} {'held by':<8} role")
        for address, a in pair["addresses"].items():
            lines.append(f"{address:<16} {a['owner']:<8} {a['held_by']:<8} {a['role']}")
        for s in pair.get("peer_services", []):
            lines.append(f"  taken over: {s['name']} on {s['address']}: {s['connections_active']} active, "
                         f"{s['connections_total']} total")
        if pair.get("takeovers"):
            t = pair["takeovers"][-1]
            lines.append(f"last takeover of {t['address']} at {t['when']}: silence {t['silence_ms']} ms, "
                         f"address moved {t['address_moved_ms']} ms, first client {t['first_client_ms']} ms "
                         "after detection" + (f", handed back after {t['held_for_s']} s" if t['held_for_s'] else ""))
        sync = pair.get("state_sync")
        if sync:
            behind = sync.get("behind") or {}
            lines.append(f"state sync with {pair['peer']}: " + ("in sync" if sync["in_sync"] else
                         "NOT in sync" if sync["in_sync"] is False else "not compared yet") +
                         f" ({sync['matches']}/{sync['compared']} digests matched; behind: "
                         f"{behind.get('frames', 0)} frames, {behind.get('bytes', 0)} bytes, "
                         f"{behind.get('ms') if behind.get('ms') is not None else '?'} ms)")
            drops = sum(s.get("kernel_drops", 0) for s in sync.get("snoopers", []))
            lines.append(f"snoopers: {sum(s.get('frames', 0) for s in sync.get('snoopers', []))} frames, "
                         f"{drops} dropped by the kernel")
        for r in pair.get("resume", []):
            lines.append(f"resume {r['client']}: {r['verdict']}; reopened {[o['path'] for o in r['reopened']]}, "
                         f"lost {[o['path'] for o in r['lost_opens']]}")
    if "connections" in status:
        from proxy.replay import format_tables

        lines += ["", format_tables(status)]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.control import ControlError, request

    config, problems = _load(args.config)
    if problems:
        _print_problems(problems)
        return EXIT_PROBLEM
    try:
        status = request(config.node.control, "status")
    except ControlError as exc:
        _print_problems([str(exc)])
        return EXIT_PROBLEM
    print(json.dumps(status, indent=2) if args.json else format_status(status))
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
                       description="Validate the config and this machine (privileges, interface, directories). "
                                   "Prints one line per problem naming the key, exits 1 if there is any.")
    with_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cleanup", help="remove what a killed node left in the kernel (address, macvlan)",
                       description="Remove the node's service address and the macvlan with the peer's MAC if a "
                                   "node killed with SIGKILL left them. Run it when the node's process died "
                                   "(systemd ExecStopPost=, see deploy/systemd/): a kernel that keeps the "
                                   "address answers ARP and resets clients the peer serves after its takeover. "
                                   "Do not run it while the node runs.")
    with_config(p)
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("status", help="show a running node's services and counters",
                       description="Ask the running node over its control socket ([node] control) for its "
                                   "services, connection counts, bytes each way and uptime.")
    with_config(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_status)

    from proxy.replay import add_replay_command

    add_replay_command(sub)

    from deploy.lab.cli import add_lab_commands
    from deploy.lab.demo import add_demo_command

    add_demo_command(add_lab_commands(sub))
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
