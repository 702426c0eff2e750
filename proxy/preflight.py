"""Checks of the environment a config will run in: capabilities, interface, addresses, directories,
the key file, and (as warnings) whether the backends and the peer answer.

Kept apart from :mod:`proxy.config` so that a config can be validated anywhere, and so that
``pairproxy check`` and ``pairproxy run`` report exactly the same problems, one line each, each
naming the key it concerns.

The checks work on *values by key path* (``{"peer.key_file": Path(...), ...}``), not on a whole
:class:`~proxy.config.Config`: a config with a typo in one key still has every other key checked, so
``check`` reports everything at once instead of in stages.

Problems vs. warnings: a problem is something ``run`` would fail on (or a pair that would fight over
an address); ``check`` exits 1. A warning is something that may be fine at this moment but deserves a
look: a backend or peer that does not answer now. A node must start while its file server reboots
(it counts the failed connects and serves once the server is back), and systemd runs ``check``
before every start, so an unreachable backend must not stop the node from taking its address.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from proxy.config import Config

#: Capability bits (linux/capability.h) the node needs, and what for (named in `check`'s output).
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
             CAP_NET_RAW: "CAP_NET_RAW"}
#: How long `check` waits for a backend or the peer's sync endpoint to accept a TCP connection.
REACH_TIMEOUT = 1.0


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


def _missing_cap(bit: int, what: str) -> str:
    name = CAP_NAMES[bit]
    return (f"{what} needs {name}, which this process does not have (CapEff in /proc/self/status); run as "
            f"root or grant it (systemd: AmbientCapabilities={name}, see deploy/systemd/)")


def values_of(config: Config) -> dict[str, Any]:
    """``config`` as values by key path, the form the checks take (and ``ConfigError.values`` has)."""
    node = config.node
    values: dict[str, Any] = {f"node.{k}": getattr(node, k) for k in
                              ("name", "interface", "address", "state_dir", "control")}
    for i, s in enumerate(config.services):
        values.update({f"service[{i}].{k}": getattr(s, k) for k in ("name", "protocol", "port", "backend",
                                                                    "extra_ports")})
    if config.peer is not None:
        values.update({f"peer.{k}": getattr(config.peer, k) for k in ("name", "address", "link", "listen",
                                                                      "key_file", "macvlan")})
    if config.pair is not None:
        values.update({f"pair.{k}": getattr(config.pair, k) for k in ("mode", "heartbeat", "dead_after")})
    return values


def _services(values: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(index, {key: value}) of every service that has any readable key."""
    found: dict[int, dict[str, Any]] = {}
    for path, value in values.items():
        if path.startswith("service["):
            index, key = path[len("service["):].split("].", 1)
            found.setdefault(int(index), {})[key] = value
    return sorted(found.items())


def _host_addresses(ipr: IPRoute) -> set[str]:
    return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def environment_problems(config: Config | dict[str, Any]) -> list[str]:
    """Every problem that would stop the config from running here, one line each.

    Takes a whole :class:`Config` or the values by key path that could be read from a config with
    problems (:attr:`proxy.config.ConfigError.values`)."""
    values = values_of(config) if isinstance(config, Config) else config
    problems: list[str] = []
    problems += _capability_problems(values)
    problems += _network_problems(values)
    problems += _key_problems(values)
    problems += _directory_problems(values)
    problems += _peer_hello_findings(values)[0]
    return problems


def _capability_problems(values: dict[str, Any]) -> list[str]:
    problems = []
    if not _has_cap(CAP_NET_ADMIN):
        problems.append("node.address: " + _missing_cap(CAP_NET_ADMIN, "adding the service address"))
    if not _has_cap(CAP_NET_RAW):
        problems.append("node.interface: " + _missing_cap(CAP_NET_RAW, "announcing the address (gratuitous ARP)"))
    if not _has_cap(CAP_NET_BIND_SERVICE):
        for i, svc in _services(values):
            for key, port in [("port", svc.get("port"))] + [
                    (f"extra_ports[{j}]", p) for j, p in enumerate(svc.get("extra_ports") or ())]:
                if port is not None and port < 1024:
                    problems.append(f"service[{i}].{key}: " + _missing_cap(CAP_NET_BIND_SERVICE, f"port {port}"))
            if svc.get("protocol") == "nfs":
                problems.append(f"service[{i}].protocol: " + _missing_cap(
                    CAP_NET_BIND_SERVICE, "nfs (it connects to the backend from ports below 1024)"))
    return problems


def _network_problems(values: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    interface, address = values.get("node.interface"), values.get("node.address")
    listen, link = values.get("peer.listen"), values.get("peer.link")
    with IPRoute() as ipr:
        if interface is not None:
            links = ipr.link_lookup(ifname=interface)
            if not links:
                names = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
                problems.append(f"node.interface: no interface {interface!r} in this network namespace "
                                f"(there are: {', '.join(names)})")
            else:
                if not ipr.get_links(links[0])[0]["flags"] & 1:  # IFF_UP
                    problems.append(f"node.interface: {interface} is down")
                macvlan = values.get("peer.macvlan")
                found = ipr.link_lookup(ifname=macvlan) if macvlan else []
                if found:
                    from proxy.netplane import not_our_macvlan

                    why = not_our_macvlan(ipr, found[0], links[0])
                    if why:
                        problems.append(f"peer.macvlan: {macvlan} exists and {why} on {interface}; the node "
                                        "would have to remove it at start (choose another name)")
                if address is not None:
                    for addr in ipr.get_addr(family=socket.AF_INET):
                        if addr.get_attr("IFA_ADDRESS") == str(address.ip) and addr["index"] != links[0]:
                            other = ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME")
                            problems.append(f"node.address: {address.ip} is already on another interface "
                                            f"({other})")
        local = _host_addresses(ipr)
    if listen is not None and not listen.host.is_unspecified and str(listen.host) not in local:
        problems.append(f"peer.listen: {listen.host} is not an address of this host, so the sync link cannot "
                        f"listen there (this host has: {', '.join(sorted(local))})")
    if link is not None and str(link.host) in local and (listen is None or link.host != listen.host):
        problems.append(f"peer.link: {link.host} is an address of this host; link is the peer's sync "
                        "endpoint (swapped with peer.listen?)")
    return problems


def _key_problems(values: dict[str, Any]) -> list[str]:
    key_file = values.get("peer.key_file")
    if key_file is None:
        return []
    from sync.wire import key_permission_problem, load_key

    try:
        load_key(key_file)
    except ValueError as exc:
        return [f"peer.key_file: {exc}"]
    loose = key_permission_problem(key_file)
    return [f"peer.key_file: {loose}"] if loose else []


def _directory_problems(values: dict[str, Any]) -> list[str]:
    from proxy.control import control_path_problem

    problems = []
    state_dir, control = values.get("node.state_dir"), values.get("node.control")
    for key, path in (("node.state_dir", state_dir), ("node.control", control.parent if control else None)):
        if path is not None:
            why = _directory_problem(path)
            if why:
                problems.append(f"{key}: {why}")
    if control is not None:
        why = control_path_problem(control)
        if why:
            problems.append(f"node.control: {why}")
    return problems


def _directory_problem(path: Path) -> str | None:
    """None if ``path`` is (or can be made) a directory this process can write in, else why not.

    Tried, not guessed from mode bits (read-only mounts, ProtectSystem=, capabilities): the missing
    folders are made, a file is created and removed in the deepest one, and what was made is removed
    again, so ``check`` leaves the machine as it found it.
    """
    made: list[Path] = []
    try:
        missing = []
        probe = path
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} exists and is not a directory"
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        test = path / f".pairproxy-check-{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as exc:
        return f"cannot create or write {path}: {exc.strerror or exc}"
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass
    return None


def _peer_hello_findings(values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, warnings) from the peer's last hello (saved in state_dir) against our addresses.

    Two nodes that both call one address their own fight over it (one stays ``yielded`` forever): a
    problem. A peer address that differs from what the peer last said may be a re-addressed pair
    (both files changed on purpose): a warning."""
    state_dir, address = values.get("node.state_dir"), values.get("node.address")
    if state_dir is None or address is None or "peer.name" not in values:
        return [], []
    from sync.link import PEER_HELLO_FILE, load_peer_hello

    hello = load_peer_hello(state_dir) or {}
    try:
        theirs = ipaddress.IPv4Interface(hello.get("address", "")).ip
    except ValueError:
        return [], []
    saved = Path(state_dir) / PEER_HELLO_FILE
    if theirs == address.ip:
        return [f"node.address: {address.ip} is also the address peer {hello.get('name')} serves as its own "
                f"(its last hello): swapped with peer.address on one of the nodes? (if both nodes were "
                f"changed on purpose, remove {saved})"], []
    if values.get("peer.address") is not None and theirs != values["peer.address"]:
        return [], [f"peer.address: {values['peer.address']} but peer {hello.get('name')} said its address is "
                    f"{theirs} (its last hello, {saved}); fine if both nodes were changed on purpose"]
    return [], []


def environment_warnings(config: Config | dict[str, Any], timeout: float = REACH_TIMEOUT) -> list[str]:
    """What may be fine but deserves a look, one line each naming the key (``check`` prints them and
    still exits 0): the peer's last hello disagreeing with peer.address, and what does not answer."""
    values = values_of(config) if isinstance(config, Config) else config
    return _peer_hello_findings(values)[1] + jitter_warnings(values) + reachability_warnings(values, timeout)


def jitter_warnings(config: Config | dict[str, Any]) -> list[str]:
    """pair.dead_after against the heartbeat gaps the node measured in its last run (issue 12), saved
    in ``state_dir/heartbeat-jitter.json`` every 10 s while it runs; nothing before the first run."""
    from proxy.heartbeat import JITTER_FILE
    from sync.heartbeat import jitter_warning

    values = values_of(config) if isinstance(config, Config) else config
    state_dir, dead_after = values.get("node.state_dir"), values.get("pair.dead_after")
    if state_dir is None or dead_after is None:
        return []
    try:
        measured = json.loads((Path(state_dir) / JITTER_FILE).read_text())
    except (OSError, ValueError):
        return []
    warning = jitter_warning(float(dead_after), measured) if isinstance(measured, dict) else None
    return [warning] if warning else []


def _answers(host: str, port: int, timeout: float) -> str | None:
    """None if ``host:port`` accepts a TCP connection within ``timeout``, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def reachability_warnings(config: Config | dict[str, Any], timeout: float = REACH_TIMEOUT) -> list[str]:
    """Backends (each port the config sends there) and the peer's sync endpoint that do not accept a
    TCP connection now, one line each naming the key. Tried in parallel, so at most ``timeout``.

    Connects from this host's own address, not the service address (which the node adds later), so a
    firewall that only lets the service addresses through shows here as a false warning."""
    values = values_of(config) if isinstance(config, Config) else config
    targets: list[tuple[str, str, int]] = []
    for i, svc in _services(values):
        backend = svc.get("backend")
        if backend is None:
            continue
        targets.append((f"service[{i}].backend", str(backend.host), backend.port))
        for j, port in enumerate(svc.get("extra_ports") or ()):
            targets.append((f"service[{i}].extra_ports[{j}]", str(backend.host), port))
    link = values.get("peer.link")
    if link is not None:
        targets.append(("peer.link", str(link.host), link.port))
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        results = list(pool.map(lambda t: _answers(t[1], t[2], timeout), targets))
    warnings = []
    for (key, host, port), why in zip(targets, results):
        if why is None:
            continue
        if key == "peer.link":
            warnings.append(f"peer.link: {host}:{port} does not answer ({why}); fine if the peer is not running "
                            "yet, else compare with the peer's listen (a wrong port leaves a half-working link)")
        else:
            warnings.append(f"{key}: backend {host}:{port} does not answer ({why}); the node will start and "
                            "count failed connects until it does")
    return warnings
