"""Checks of the environment a valid config will run in: privileges, interface, directories.

Kept apart from :mod:`proxy.config` so that a config can be validated anywhere, and so that
``pairproxy check`` and ``pairproxy run`` report exactly the same problems, one line each, each
naming the key it concerns.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyroute2 import IPRoute

from proxy.config import Config

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return -1 if os.geteuid() == 0 else 0


def _has_cap(bit: int) -> bool:
    return bool(_effective_caps() & (1 << bit))


def _writable_dir_problem(path: Path) -> str | None:
    """None if ``path`` is (or can be made) a writable directory, else why not."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} exists and is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def environment_problems(config: Config) -> list[str]:
    """Every problem that would stop ``config`` from running here, one line each."""
    problems: list[str] = []
    node = config.node
    if not _has_cap(CAP_NET_ADMIN):
        problems.append("node.address: adding the service address needs root (CAP_NET_ADMIN)")
    low_ports = [(i, p) for i, s in enumerate(config.services) for p in s.ports if p < 1024]
    nfs = [i for i, s in enumerate(config.services) if s.privileged_source_port]
    if (low_ports or nfs) and not _has_cap(CAP_NET_BIND_SERVICE):
        for i, port in low_ports:
            problems.append(f"service[{i}]: port {port} needs root (CAP_NET_BIND_SERVICE)")
        for i in nfs:
            problems.append(f"service[{i}].protocol: nfs connects from ports below 1024, which needs "
                            "root (CAP_NET_BIND_SERVICE)")

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=node.interface)
        if not links:
            names = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
            problems.append(f"node.interface: no interface {node.interface!r} in this network namespace "
                            f"(there are: {', '.join(names)})")
        else:
            link = ipr.get_links(links[0])[0]
            if not link["flags"] & 1:  # IFF_UP
                problems.append(f"node.interface: {node.interface} is down")
            for addr in ipr.get_addr(family=2):
                if addr.get_attr("IFA_ADDRESS") == str(node.address.ip) and addr["index"] != links[0]:
                    other = ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME")
                    problems.append(f"node.address: {node.address.ip} is already on another interface ({other})")

    if config.peer is not None:
        from sync.wire import key_permission_problem, load_key

        try:
            load_key(config.peer.key_file)
        except ValueError as exc:
            problems.append(f"peer.key_file: {exc}")
        else:
            loose = key_permission_problem(config.peer.key_file)
            if loose:
                problems.append(f"peer.key_file: {loose}")

    for key, path in (("node.state_dir", node.state_dir), ("node.control", node.control.parent)):
        why = _writable_dir_problem(path)
        if why:
            problems.append(f"{key}: {why}")
    return problems
