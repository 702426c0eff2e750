"""`pairproxy lab up|down|status|demo`: a plugin of the main CLI.

pyproject.toml names :func:`register` in the entry point group ``pairproxy.commands``; proxy/cli.py
calls every function of that group with its sub-parsers. So the product never imports the lab (the lab
imports the product: it runs nodes), and an installation without the lab simply has no ``lab`` command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core import Lab, LabError

LAB_HELP = "build, tear down or inspect a network-namespace lab with real Samba and NFS-Ganesha (root)"
LAB_DESCRIPTION = """\
A lab on this machine: namespaces PREFIX-client, PREFIX-a, PREFIX-b (the two pairproxy nodes),
PREFIX-srv (smbd on 10.77.0.10:445, rpcbind + ganesha.nfsd on 2049/111/20048) and PREFIX-sw
(bridges br-svc 10.77.0.0/24 and br-sync 10.77.1.0/24). Node configs are written to DIR/a.toml
and DIR/b.toml. All traffic stays inside these namespaces. Needs root."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default="pp",
                   help="name prefix of the lab's namespaces, e.g. PREFIX-client (default: %(default)s)")
    p.add_argument("--dir", dest="dir", default=None, metavar="DIR",
                   help="lab state directory (default: /var/lib/pairproxy-lab/PREFIX)")


def lab_from_args(args: argparse.Namespace) -> Lab:
    """The Lab named by --prefix/--dir (for other sub-commands such as `lab demo`)."""
    return Lab(prefix=args.prefix, root=Path(args.dir) if args.dir else None)


def _error(msg: str) -> int:
    print(f"pairproxy lab: error: {msg}", file=sys.stderr)
    return 1


def cmd_up(args: argparse.Namespace) -> int:
    try:
        lab = lab_from_args(args)
    except LabError as e:
        return _error(str(e))
    try:
        lab.up()
        lab.flood(args.switch or ("hub" if args.flood else "learning"))
    except LabError as e:
        if set(lab.namespaces) & lab.existing_namespaces():
            e = f"{e}\n(clean up with: pairproxy lab down --prefix {args.prefix}" \
                + (f" --dir {args.dir}" if args.dir else "") + ")"
        return _error(str(e))
    except Exception as e:  # never a traceback
        return _error(f"lab up failed: {type(e).__name__}: {e}")
    a = lab.addresses
    print(f"lab {lab.prefix} is up (state in {lab.root})" + (f"; service bridge: {args.switch or ('hub' if args.flood else 'learning')}"))
    print(f"  client ns {lab.ns_client} ({a.client}); nodes {lab.ns_a} ({a.admin_a}) and "
          f"{lab.ns_b} ({a.admin_b}); server ns {lab.ns_server} ({a.server})")
    print(f"  SMB //{a.server}/{lab.smb_share} user {lab.smb_user}%{lab.smb_password}; "
          f"NFS {lab.nfs_url(a.server, '', 3)}  {lab.nfs_url(a.server, '', 4)}")
    print(f"  node configs: {lab.node_config_path('a')} {lab.node_config_path('b')}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        lab = lab_from_args(args)
        lab.down(purge=args.purge)
    except LabError as e:
        return _error(str(e))
    except Exception as e:  # never a traceback
        return _error(f"lab down failed: {type(e).__name__}: {e}")
    print(f"lab {lab.prefix} is down" + (f" ({lab.root} removed)" if args.purge else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        lab = lab_from_args(args)
        st = lab.status()
    except Exception as e:  # never a traceback
        return _error(f"lab status failed: {e}")
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(f"lab {st['prefix']}: {'up' if st['up'] else 'not (fully) up'}  (state in {st['root']})")
        for ns, present in st["namespaces"].items():
            addrs = st["interfaces"].get(ns, {})
            extra = "  ".join(f"{i}={','.join(v)}" for i, v in addrs.items())
            print(f"  netns {ns:<14} {'present' if present else 'missing':<8} {extra}")
        for name, s in st["servers"].items():
            print(f"  {name:<8} pid {s['pid'] or '-':<8} {'alive' if s['alive'] else 'not running'}")
    return 0 if st["up"] else 3


def add_lab_commands(subparsers) -> argparse._SubParsersAction:
    """Add `lab up|down|status` to the main CLI; returns the lab sub-subparsers (to add e.g. `demo`).

    Extra sub-commands can call `_add_common(parser)`-style options via `add_common_options` and build
    the Lab with `lab_from_args(args)`.
    """
    lab = subparsers.add_parser("lab", help=LAB_HELP, description=LAB_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="{up,down,status,...}")
    lab_sub.required = True

    up = lab_sub.add_parser(
        "up", help="create the namespaces and bridges, start smbd and ganesha, wait until they answer",
        description="Build whatever is missing of the lab (idempotent), (re)start servers that are not "
                    "running and wait until SMB (445) and NFS (2049/111/20048) answer from the client "
                    "namespace. Also writes the node configs a.toml/b.toml (one node), pair-a.toml/"
                    "pair-b.toml (a stateless pair), stateful-a.toml/stateful-b.toml and test files.")
    _add_common(up)
    up.add_argument("--flood", action="store_true",
                    help="make the service bridge hub-like, so each node sees its peer's frames both ways "
                         "(what a stateful pair needs; a site would use a mirror port); without it the "
                         "bridge learns as usual (same as --switch hub)")
    up.add_argument("--switch", choices=("learning", "nodes", "hub"),
                    help="how the service bridge passes the nodes' frames: nodes = only frames destined to "
                         "the nodes flood (learning off on their ports; enough for a stateful pair), hub = "
                         "every frame to every port, learning = the default")
    up.set_defaults(func=cmd_up)

    down = lab_sub.add_parser(
        "down", help="stop the lab's servers and processes, delete its namespaces",
        description="Stop every process the lab started (SIGTERM, then SIGKILL), and anything still "
                    "running in its namespaces, delete the namespaces and the run files. Idempotent.")
    _add_common(down)
    down.add_argument("--purge", action="store_true",
                      help="also delete the whole state directory (configs, share and export data)")
    down.set_defaults(func=cmd_down)

    status = lab_sub.add_parser(
        "status", help="show namespaces, server processes and addresses (exit 0 only if fully up)",
        description="Show which namespaces exist, whether smbd/rpcbind/ganesha are alive, and the "
                    "addresses. Exit status 0 when fully up, 3 otherwise.")
    _add_common(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)
    return lab_sub


add_common_options = _add_common


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point ``pairproxy.commands:lab``: add ``lab up|down|status|demo`` to the main CLI."""
    from .demo import add_demo_command

    add_demo_command(add_lab_commands(subparsers))
