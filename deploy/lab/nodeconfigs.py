"""The lab's pairproxy node configs, built as data and written as TOML.

A config is a dict shaped like the TOML file (``{"node": {...}, "service": [{...}, ...], "peer":
{...}, "pair": {...}}``); :func:`to_toml` writes it. Anything that varies (the mode, the pair's
``heartbeat``/``dead_after``, the state directory) is a value passed in, never a text substitution, so
a benchmark asking for other timings gets exactly the config it asked for or an error.

Files under the lab's root (:func:`config_name`)::

    a.toml, b.toml                   one node alone             state in node-a/, node-b/
    pair-a.toml, pair-b.toml         a stateless pair           state in pair-node-a/ ...
    stateful-a.toml, stateful-b.toml a stateful pair (needs Lab.flood(True))  state in stateful-node-a/ ...
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .topology import Addresses

__all__ = ["PairTimings", "LAB_TIMINGS", "NODES", "MODES", "node_config", "config_name", "state_dir_name",
           "to_toml", "write_toml"]

NODES = ("a", "b")
MODES = ("stateless", "stateful")
SYNC_PORT = 7400


@dataclass(frozen=True)
class PairTimings:
    """The pair's failure detection, as the [pair] keys take them (durations like "20ms")."""

    heartbeat: str = "20ms"
    dead_after: str = "100ms"

    @classmethod
    def from_ms(cls, heartbeat_ms: float, dead_after_ms: float) -> "PairTimings":
        return cls(heartbeat=_ms(heartbeat_ms), dead_after=_ms(dead_after_ms))


def _ms(value: float) -> str:
    """Milliseconds as a config duration: 20 -> "20ms", 12.5 -> "12.5ms" (never "1e+06ms")."""
    if not value > 0 or math.isinf(value):
        raise ValueError(f"a duration must be a positive number of milliseconds, not {value!r}")
    return f"{value:.3f}".rstrip("0").rstrip(".") + "ms"


#: what the lab's pair configs use: fast enough that a takeover is over in about 0.1 s
LAB_TIMINGS = PairTimings()


def config_name(node: str, pair: bool = False, mode: str = "stateless") -> str:
    """File name of a lab node config (see the module docstring)."""
    _check(node, mode)
    if not pair:
        return f"{node}.toml"
    return f"pair-{node}.toml" if mode == "stateless" else f"stateful-{node}.toml"


def state_dir_name(node: str, pair: bool = False, mode: str = "stateless") -> str:
    _check(node, mode)
    if not pair:
        return f"node-{node}"
    return f"pair-node-{node}" if mode == "stateless" else f"stateful-node-{node}"


def _check(node: str, mode: str) -> None:
    if node not in NODES:
        raise ValueError(f"node must be 'a' or 'b', not {node!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be 'stateless' or 'stateful', not {mode!r}")


def node_config(node: str, addresses: Addresses, state_dir: Path, *, pair: bool = False,
                mode: str = "stateless", key_file: Path | None = None,
                timings: PairTimings = LAB_TIMINGS, grace: str = "5s") -> dict[str, Any]:
    """The config of lab node ``node`` as data: SMB and NFS in front of the lab's servers, and with
    ``pair`` the peer, its sync link and the pair's mode and timings."""
    _check(node, mode)
    a = addresses
    own = {"a": (a.service_a, a.sync_a), "b": (a.service_b, a.sync_b)}
    peer = "b" if node == "a" else "a"
    address, sync = own[node]
    peer_address, peer_sync = own[peer]
    config: dict[str, Any] = {
        "node": {"name": node, "interface": "eth0", "address": f"{address}/{a.prefixlen}",
                 "state_dir": str(state_dir), "control": str(state_dir / "control.sock"), "grace": grace},
        "service": [
            {"name": "smb", "protocol": "smb", "port": 445, "backend": f"{a.server}:445"},
            {"name": "nfs", "protocol": "nfs", "port": 2049, "backend": f"{a.server}:2049",
             "extra_ports": [111, 20048]},
        ],
    }
    if pair:
        if key_file is None:
            raise ValueError("a pair config needs the pair's key_file")
        config["peer"] = {"name": peer, "address": peer_address, "link": f"{peer_sync}:{SYNC_PORT}",
                          "listen": f"{sync}:{SYNC_PORT}", "key_file": str(key_file)}
        config["pair"] = {"mode": mode, "heartbeat": timings.heartbeat, "dead_after": timings.dead_after}
    return config


# ------------------------------------------------------------------------------------ TOML writer
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"TOML keys are strings, not {type(k).__name__} ({k!r})")
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (str, os.PathLike)):
        return _string(os.fspath(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, f"{where}[{i}]") for i, x in enumerate(v)) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x, f'{where}.{k}')}" for k, x in v.items()) + "}"
    raise TypeError(f"{where}: cannot write {type(v).__name__} to TOML ({v!r})")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _table(table: Mapping[str, Any], path: list[str], out: list[str]) -> None:
    # plain keys first: after a [header] every key belongs to that header's table
    for k, v in table.items():
        if not isinstance(v, Mapping) and not _is_table_array(v):
            out.append(f"{_key(k)} = {_value(v, '.'.join(path + [k]))}")
    for k, v in table.items():
        name = path + [k]
        if isinstance(v, Mapping):
            out += ["", f"[{'.'.join(map(_key, name))}]"]
            _table(v, name, out)
        elif _is_table_array(v):
            for item in v:
                out += ["", f"[[{'.'.join(map(_key, name))}]]"]
                _table(item, name, out)


def to_toml(doc: Mapping[str, Any]) -> str:
    """TOML text of ``doc`` (tables, arrays of tables, strings, numbers, booleans, arrays); TypeError
    naming the key for anything TOML cannot hold."""
    out: list[str] = []
    _table(doc, [], out)
    return "\n".join(out).lstrip("\n") + "\n"


def write_toml(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as TOML to ``path`` if its content differs (a running node keeps its file)."""
    text = to_toml(doc)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path
