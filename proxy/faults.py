"""Test-only fault injection from a node's environment.

Each knob makes one rare failure happen on purpose, on chosen connections, so that a lab test can show
what the pair does then (tests/test_continuation_lab.py). Unset, nothing is injected. A bad value stops
the node with the variable named: a test must never pass because its fault silently did not happen."""

from __future__ import annotations

import os

__all__ = ["WITHHOLD_PAIRINGS", "UNREAD_ORIGINS", "client_ports", "NO_PORTS"]

#: "LOW-HIGH": client ports whose connections' pairings this node never tells its peer (nor holds their
#: first bytes for), as if every such message were lost on the way: the peer must place them from the
#: frames alone (proxy.continuation.ContinuationBook._infer)
WITHHOLD_PAIRINGS = "PAIRPROXY_WITHHOLD_PAIRINGS"
#: "LOW-HIGH": client ports whose connections' stream origins this node does not read, as if the read
#: had failed (proxy.dataplane.ServiceProxy._origins_anchor): their pairings carry no anchor, and a
#: standby that missed their handshakes cannot continue them
UNREAD_ORIGINS = "PAIRPROXY_UNREAD_ORIGINS"

#: the range that holds no port
NO_PORTS = (1, 0)


def client_ports(variable: str) -> tuple[int, int]:
    """The client ports ``variable`` names, ``(low, high)`` inclusive (:data:`NO_PORTS` if unset);
    ValueError names the variable and the bad value."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return NO_PORTS
    low, _, high = value.partition("-")
    try:
        ports = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"{variable}: {value!r} is not LOW-HIGH (client ports)") from None
    if not 0 < ports[0] <= ports[1] <= 0xFFFF:
        raise ValueError(f"{variable}: {value!r} is not a range of ports")
    return ports
