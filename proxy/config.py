"""Node configuration: TOML in, validated frozen dataclasses out.

Why a hand-written validator instead of a schema library: the operator must see *every* problem at
once, each on one line that names the key's path (``service[1].backend: ...``), and the checks are
specific to networking (addresses, ports, prefixes) where generic schema errors say little.

``load_config`` is pure (no kernel, no sockets); environment checks (does the interface exist, are we
root) live in :mod:`proxy.preflight`, so a config can be validated on any machine.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("smb", "nfs", "tcp")

#: Ports a ``protocol = "nfs"`` service proxies besides its own when ``extra_ports`` is not given:
#: the portmapper, so that clients which look up MOUNT and NFS ports find them through the node.
#: One portmapper per address: a default port that another service already proxies (an earlier nfs
#: service's default, or any service's explicit port) is left out, so defaults never clash.
DEFAULT_NFS_EXTRA_PORTS = (111,)


class ConfigError(Exception):
    """A config that cannot be used. ``problems`` holds one line per problem, each naming its key path.

    ``values`` holds what *could* be read, by key path (``"peer.key_file"``, ``"service[0].backend"``),
    so that ``check`` can still test the environment for those keys: a typo in one key must not hide
    a key-file problem until the next run.
    """

    def __init__(self, problems: list[str], values: dict[str, Any] | None = None):
        self.problems = problems
        self.values = values or {}
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Endpoint:
    host: ipaddress.IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    protocol: str
    port: int
    backend: Endpoint
    #: Further ports proxied to the same backend host, each to the same port number there
    #: (for NFS: the portmapper and a pinned mountd port).
    extra_ports: tuple[int, ...] = ()
    connect_timeout: float = 3.0
    #: Connect to the backend from a source port below 1024 (None: yes for NFS, whose ``secure``
    #: exports refuse other ports; ``false`` lifts the ceiling of ~360 connections per backend port).
    secure: bool | None = None

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, *self.extra_ports)

    def backend_port(self, port: int) -> int:
        """Where a client's ``port`` goes on the backend host: the main port to ``backend``'s port,
        each extra port to its own number."""
        return self.backend.port if port == self.port else port

    @property
    def privileged_source_port(self) -> bool:
        """NFS servers with ``secure`` exports only accept clients from ports below 1024."""
        return self.protocol == "nfs" if self.secure is None else self.secure


@dataclass(frozen=True)
class NodeConfig:
    name: str
    interface: str
    address: ipaddress.IPv4Interface
    state_dir: Path
    control: Path
    grace: float = 10.0
    log_level: str = "info"
    #: where GET /metrics answers in the Prometheus text format (proxy.metrics); None: not served
    metrics: Endpoint | None = None
    #: how connections' bytes move (proxy.sockmap): "auto" (in the kernel where it can, else splice),
    #: "sockmap" (in the kernel, or the node does not start), "splice" (the splice pump always).
    #: The default stays splice until the kernel relay's two rare faults (bench/BYTEPATH.md) are fixed.
    byte_path: str = "splice"


MODES = ("stateless", "stateful")


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: ipaddress.IPv4Address
    link: Endpoint
    listen: Endpoint
    key_file: Path
    #: UDP port of the liveness probe on the service addresses (see proxy.probe).
    probe_port: int = 7401
    #: UDP port of the heartbeats (proxy.heartbeat), on the sync and on the service addresses alike.
    heartbeat_port: int = 7402
    #: Name of the macvlan carrying the peer's MAC on the service interface.
    macvlan: str = ""


@dataclass(frozen=True)
class PairConfig:
    mode: str = "stateless"
    #: the heartbeat process's interval, and the silence on both paths that makes the peer dead.
    #: 100 ms: the tightest the soaks of bench/FAILOVER.md (2026-11-27, a shared 2-core VM at load
    #: 16-64) ran without a false takeover; 40 ms (the issue 12 goal) had false takeovers there.
    #: `pairproxy check` says when the gaps measured on a machine allow less.
    heartbeat: float = 0.01
    dead_after: float = 0.1
    #: How long a starting node waits to hear from its peer before claiming its own address
    #: (and then only if no other host answers ARP for it).
    claim_wait: float = 1.0
    #: stateful: at most this many bytes per connection and direction a takeover may put back (what one
    #: side sent that the other has not acknowledged); the standby keeps at most twice this per leg
    continue_buffer: int = 4 << 20


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    services: tuple[ServiceConfig, ...] = field(default_factory=tuple)
    peer: PeerConfig | None = None
    pair: PairConfig | None = None
    source: Path | None = None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_duration(value: Any) -> float:
    """``"20ms"``, ``"1.5s"``, ``"2m"`` or a TOML number of seconds -> seconds. Raises ValueError.

    A string without a unit (``"20"``) is refused: whoever quoted it most likely meant
    milliseconds for a heartbeat and seconds for a grace time, and guessing wrong is a silent
    1000x error that surfaces only as a confusing problem on another key.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '20ms' or '5s', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"expected a duration like '20ms' or '5s', got {value!r}")
        if not match.group(2):
            raise ValueError(f"{value!r} needs a unit: '{match.group(1)}ms' or '{match.group(1)}s'?")
        number, unit = float(match.group(1)), match.group(2)
        seconds = number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    else:
        raise ValueError(f"expected a duration like '20ms' or '5s', got {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def parse_endpoint(value: Any) -> Endpoint:
    """``"10.0.2.10:445"`` -> Endpoint. Raises ValueError naming what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'IPv4:PORT' as a string, got {type(value).__name__}")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected 'IPv4:PORT', got {value!r} (no port)")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address") from None
    return Endpoint(address, _port(port))


def _port(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a port number, got {value!r}")
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is outside 1-65535")
    return value


class _Reader:
    """Collects problems while reading tables, so every problem is reported in one go."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.values: dict[str, Any] = {}  # every value that converted cleanly (or its default), by path

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def table(self, doc: dict, key: str, path: str, required: bool = True) -> dict | None:
        if key not in doc:
            if required:
                self.problem(path, "missing table")
            return None
        value = doc[key]
        if not isinstance(value, dict):
            self.problem(path, f"expected a table, got {type(value).__name__}")
            return None
        return value

    def unknown(self, table: dict, allowed: set[str], path: str) -> None:
        for key in table:
            if key not in allowed:
                hint = _closest(key, allowed)
                self.problem(f"{path}.{key}" if path else key,
                             "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))

    def value(self, table: dict, key: str, path: str, convert, default: Any = ..., ) -> Any:
        full = f"{path}.{key}"
        if key not in table:
            if default is ...:
                self.problem(full, "missing")
                return None
            self.values[full] = default
            return default
        try:
            self.values[full] = convert(table[key])
        except ValueError as exc:
            self.problem(full, str(exc))
            return None
        return self.values[full]


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not value:
        raise ValueError("must not be empty")
    return value


def _name(value: Any) -> str:
    value = _string(value)
    if not _NAME.match(value):
        raise ValueError(f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; at most 32)")
    return value


def _ifname(value: Any) -> str:
    value = _string(value)
    if not _IFNAME.match(value):
        raise ValueError(f"{value!r} is not a valid interface name (1-15 characters, no spaces, '/' or ':')")
    return value


def _service_address(value: Any) -> ipaddress.IPv4Interface:
    value = _string(value)
    if "/" not in value:
        raise ValueError(f"expected an address with prefix length like '10.0.0.1/24', got {value!r}")
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 address with prefix: {exc}") from None
    ip = iface.ip
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip == iface.network.broadcast_address \
            and iface.network.prefixlen < 31:
        raise ValueError(f"{ip} cannot be a service address")
    return iface


def _absolute_path(value: Any) -> Path:
    path = Path(_string(value))
    if not path.is_absolute():
        raise ValueError(f"{str(path)!r} must be an absolute path")
    return path


def _one_of(choices: tuple[str, ...], *, lower: bool = False):
    """A converter accepting only ``choices`` (the error lists them)."""
    def convert(value: Any) -> str:
        value = _string(value)
        value = value.lower() if lower else value
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return convert


_protocol = _one_of(PROTOCOLS)


def _port_list(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of ports, got {type(value).__name__}")
    ports = []
    for i, item in enumerate(value):
        try:
            ports.append(_port(item))
        except ValueError as exc:
            raise ValueError(f"[{i}]: {exc}") from None
    return tuple(ports)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _byte_count(value: Any) -> int:
    """A number of bytes: an integer, or a string with KiB/MiB ("4MiB")."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None:
        for unit, factor in (("KiB", 1 << 10), ("MiB", 1 << 20)):
            if text.endswith(unit) and text[:-len(unit)].strip().isdigit():
                value = int(text[:-len(unit)]) * factor
                break
        else:
            raise ValueError(f"expected a number of bytes (e.g. 4194304 or \"4MiB\"), got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a number of bytes (e.g. 4194304 or \"4MiB\"), got {value!r}")
    if value > 1 << 30:
        raise ValueError(f"{value} bytes is over the 1 GiB limit")
    return value


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError("must be greater than zero")
    return seconds


_log_level = _one_of(LOG_LEVELS, lower=True)


_mode = _one_of(MODES)


def _ipv4(value: Any) -> ipaddress.IPv4Address:
    value = _string(value)
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address (without prefix length)") from None


PEER_KEYS = {"name", "address", "link", "listen", "key_file", "probe_port", "heartbeat_port", "macvlan"}
PAIR_KEYS = {"mode", "heartbeat", "dead_after", "claim_wait", "continue_buffer"}
NODE_KEYS = {"name", "interface", "address", "state_dir", "control", "grace", "log_level", "metrics", "byte_path"}
BYTE_PATHS = ("auto", "sockmap", "splice")
SERVICE_KEYS = {"name", "protocol", "port", "backend", "extra_ports", "connect_timeout", "secure"}
TOP_KEYS = {"node", "service", "peer", "pair"}


def _explicit_ports(raw_services: Any) -> set[int]:
    """Every port some service names itself (``port``, ``extra_ports``): defaults must not take them."""
    found: set[int] = set()
    for svc in raw_services if isinstance(raw_services, list) else ():
        if not isinstance(svc, dict):
            continue
        for value in [svc.get("port")] + (svc.get("extra_ports") if isinstance(svc.get("extra_ports"), list) else []):
            try:
                found.add(_port(value))
            except ValueError:
                pass
    return found


def _parse_services(r: _Reader, raw_services: Any, where: str) -> list[ServiceConfig]:
    """The ``[[service]]`` array (or a peer's services from its hello), problems named under ``where``."""
    services: list[ServiceConfig] = []
    if not isinstance(raw_services, list):
        r.problem(where, "expected an array of tables ([[service]])")
        raw_services = []
    elif not raw_services:
        r.problem(where, "no [[service]] defined: a node must proxy at least one service")
    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    explicit = _explicit_ports(raw_services)
    for i, svc in enumerate(raw_services):
        path = f"{where}[{i}]"
        if not isinstance(svc, dict):
            r.problem(path, f"expected a table, got {type(svc).__name__}")
            continue
        r.unknown(svc, SERVICE_KEYS, path)
        protocol = r.value(svc, "protocol", path, _protocol)
        default_extra = tuple(p for p in DEFAULT_NFS_EXTRA_PORTS
                              if p not in ports and p not in explicit) if protocol == "nfs" else ()
        values = dict(
            name=r.value(svc, "name", path, _name),
            protocol=protocol,
            port=r.value(svc, "port", path, _port),
            backend=r.value(svc, "backend", path, parse_endpoint),
            extra_ports=r.value(svc, "extra_ports", path, _port_list, default_extra),
            connect_timeout=r.value(svc, "connect_timeout", path, _positive_duration, 3.0),
        )
        secure = r.value(svc, "secure", path, _bool, None)
        if values["name"] is not None:
            if values["name"] in names:
                r.problem(f"{path}.name", f"{values['name']!r} is already used by {where}[{names[values['name']]}]")
            names.setdefault(values["name"], i)
        if values["port"] is not None and values["extra_ports"] is not None:
            seen_here: set[int] = set()
            for key, port in [("port", values["port"])] + [
                (f"extra_ports[{j}]", p) for j, p in enumerate(values["extra_ports"])
            ]:
                if port in seen_here:
                    r.problem(f"{path}.{key}", f"port {port} is listed twice in this service")
                elif port in ports:
                    r.problem(f"{path}.{key}", f"port {port} is already proxied by {ports[port]}")
                else:
                    ports[port] = f"{path}"
                seen_here.add(port)
        if all(v is not None for v in values.values()):
            services.append(ServiceConfig(**values, secure=secure))

    return services


def service_to_dict(service: ServiceConfig) -> dict:
    """A service as plain data (for the peer's hello), readable back with :func:`services_from_dicts`."""
    d = {"name": service.name, "protocol": service.protocol, "port": service.port,
         "backend": str(service.backend), "extra_ports": list(service.extra_ports),
         "connect_timeout": service.connect_timeout}
    if service.secure is not None:  # only when set: a peer of the previous version rejects unknown keys
        d["secure"] = service.secure
    return d


def services_from_dicts(raw: Any, where: str = "peer.services") -> tuple[ServiceConfig, ...]:
    """Services sent by the peer, validated as strictly as our own config. Raises ConfigError."""
    r = _Reader()
    services = _parse_services(r, raw, where)
    if r.problems:
        raise ConfigError(r.problems)
    return tuple(services)


def parse_config(doc: dict, source: Path | None = None) -> Config:
    """Validate a parsed TOML document. Raises ConfigError with every problem found."""
    r = _Reader()
    r.unknown(doc, TOP_KEYS, "")

    node = None
    node_t = r.table(doc, "node", "node")
    if node_t is not None:
        r.unknown(node_t, NODE_KEYS, "node")
        values = dict(
            name=r.value(node_t, "name", "node", _name),
            interface=r.value(node_t, "interface", "node", _ifname),
            address=r.value(node_t, "address", "node", _service_address),
            state_dir=r.value(node_t, "state_dir", "node", _absolute_path),
            control=r.value(node_t, "control", "node", _absolute_path),
            grace=r.value(node_t, "grace", "node", parse_duration, 10.0),
            log_level=r.value(node_t, "log_level", "node", _log_level, "info"),
        )
        metrics = r.value(node_t, "metrics", "node", parse_endpoint, None)  # optional: None is valid
        byte_path = r.value(node_t, "byte_path", "node", _one_of(BYTE_PATHS, lower=True), "splice")
        if all(v is not None for v in values.values()) and byte_path is not None:
            node = NodeConfig(**values, metrics=metrics, byte_path=byte_path)

    services = _parse_services(r, doc.get("service", []), "service")

    if node is not None:
        for i, svc in enumerate(services):
            if svc.backend.host == node.address.ip:
                r.problem(f"service[{i}].backend", f"{svc.backend} is this node's own service address (a loop)")

    peer, pair = _parse_pair(r, doc, node)
    if r.problems:
        raise ConfigError(r.problems, r.values)
    assert node is not None
    return Config(node=node, services=tuple(services), peer=peer, pair=pair, source=source)


def _parse_pair(r: _Reader, doc: dict, node: NodeConfig | None) -> tuple[PeerConfig | None, PairConfig | None]:
    """[peer] and [pair] come together: a node either has a peer or runs alone."""
    peer_t = r.table(doc, "peer", "peer", required="pair" in doc)
    pair_t = r.table(doc, "pair", "pair", required="peer" in doc)
    if peer_t is None or pair_t is None:
        return None, None
    r.unknown(peer_t, PEER_KEYS, "peer")
    r.unknown(pair_t, PAIR_KEYS, "pair")
    peer_values = dict(
        name=r.value(peer_t, "name", "peer", _name),
        address=r.value(peer_t, "address", "peer", _ipv4),
        link=r.value(peer_t, "link", "peer", parse_endpoint),
        listen=r.value(peer_t, "listen", "peer", parse_endpoint),
        key_file=r.value(peer_t, "key_file", "peer", _absolute_path),
        probe_port=r.value(peer_t, "probe_port", "peer", _port, 7401),
        heartbeat_port=r.value(peer_t, "heartbeat_port", "peer", _port, 7402),
        macvlan=r.value(peer_t, "macvlan", "peer", _ifname, ""),
    )
    pair_values = dict(
        mode=r.value(pair_t, "mode", "pair", _mode, "stateless"),
        heartbeat=r.value(pair_t, "heartbeat", "pair", _positive_duration, PairConfig.heartbeat),
        dead_after=r.value(pair_t, "dead_after", "pair", _positive_duration, PairConfig.dead_after),
        claim_wait=r.value(pair_t, "claim_wait", "pair", parse_duration, 1.0),
        continue_buffer=r.value(pair_t, "continue_buffer", "pair", _byte_count, 4 << 20),
    )
    if None in peer_values.values() or None in pair_values.values():
        return None, None
    if not peer_values["macvlan"]:
        peer_values["macvlan"] = f"pp-{peer_values['name']}"[:15]
    peer, pair = PeerConfig(**peer_values), PairConfig(**pair_values)
    if pair.dead_after < 2 * pair.heartbeat:
        r.problem("pair.dead_after", f"{pair.dead_after * 1000:g}ms must be at least two heartbeats "
                                     f"(pair.heartbeat is {pair.heartbeat * 1000:g}ms), or one late heartbeat "
                                     "is a takeover")
    if pair.heartbeat < 0.001:
        r.problem("pair.heartbeat", f"{pair.heartbeat * 1000:g}ms is below 1ms: no scheduler keeps that "
                                    "rhythm, and every missed beat counts against dead_after")
    if peer.heartbeat_port == peer.probe_port:
        r.problem("peer.heartbeat_port", f"{peer.heartbeat_port} is also peer.probe_port: both listen on the "
                                         "service address, give them different ports")
    if node is not None:
        if peer.name == node.name:
            r.problem("peer.name", f"{peer.name!r} is this node's own name")
        if peer.address == node.address.ip:
            r.problem("peer.address", f"{peer.address} is this node's own service address")
        elif peer.address not in node.address.network:
            r.problem("peer.address", f"{peer.address} is not in this node's service network {node.address.network}")
    if peer.link == peer.listen:
        r.problem("peer.link", f"{peer.link} is this node's own sync endpoint (peer.listen)")
    return peer, pair


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError (also for unreadable or invalid TOML)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(doc, source=path)
