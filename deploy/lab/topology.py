"""The lab's network: namespaces, veth pairs, the two bridges, addresses and MACs.

All names derive from the prefix; the addresses are the same in every lab because each lab lives in
its own set of namespaces::

    {prefix}-sw      bridges br-svc (service net 10.77.0.0/24) and br-sync (10.77.1.0/24)
    {prefix}-client  eth0 10.77.0.100/24
    {prefix}-a       eth0 10.77.0.11/24 (admin; the node adds 10.77.0.1 itself), sync0 10.77.1.1/24
    {prefix}-b       eth0 10.77.0.12/24 (admin; the node adds 10.77.0.2 itself), sync0 10.77.1.2/24
    {prefix}-srv     eth0 10.77.0.10/24 (the file servers)

Building is idempotent: what exists stays, half a veth pair (after a crash) is recreated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import netns
from .errors import one_line

__all__ = ["Addresses", "MACS", "SYNC_MACS", "SWITCH_MODES", "Topology"]

#: how the service bridge passes the nodes' frames (see :meth:`Topology.flood`)
SWITCH_MODES = ("learning", "nodes", "hub")


@dataclass(frozen=True)
class Addresses:
    client: str = "10.77.0.100"
    server: str = "10.77.0.10"
    service_a: str = "10.77.0.1"
    service_b: str = "10.77.0.2"
    admin_a: str = "10.77.0.11"
    admin_b: str = "10.77.0.12"
    sync_a: str = "10.77.1.1"
    sync_b: str = "10.77.1.2"
    prefixlen: int = 24


# Deterministic MACs of the eth0 interfaces (node a/b: ...:0a / ...:0b).
MACS = {
    "a": "02:77:00:00:00:0a",
    "b": "02:77:00:00:00:0b",
    "client": "02:77:00:00:00:64",
    "srv": "02:77:00:00:00:10",
}
SYNC_MACS = {"a": "02:77:00:01:00:0a", "b": "02:77:00:01:00:0b"}

_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


@dataclass(frozen=True)
class Veth:
    """One veth pair: ``ifname`` with ``address`` in namespace ``ns``, ``port`` on ``bridge`` in the switch."""

    ns: str
    ifname: str
    port: str
    bridge: str
    mac: str
    address: str


class Topology:
    """The namespaces and links of one lab (by prefix)."""

    bridges = ("br-svc", "br-sync")

    def __init__(self, prefix: str, addresses: Addresses) -> None:
        self.addresses = addresses
        self.ns_client = f"{prefix}-client"
        self.ns_a = f"{prefix}-a"
        self.ns_b = f"{prefix}-b"
        self.ns_server = f"{prefix}-srv"
        self.ns_switch = f"{prefix}-sw"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns_switch, self.ns_client, self.ns_a, self.ns_b, self.ns_server]

    @property
    def veths(self) -> list[Veth]:
        a = self.addresses
        return [
            Veth(self.ns_client, "eth0", "client", "br-svc", MACS["client"], a.client),
            Veth(self.ns_server, "eth0", "srv", "br-svc", MACS["srv"], a.server),
            Veth(self.ns_a, "eth0", "a-svc", "br-svc", MACS["a"], a.admin_a),
            Veth(self.ns_b, "eth0", "b-svc", "br-svc", MACS["b"], a.admin_b),
            Veth(self.ns_a, "sync0", "a-sync", "br-sync", SYNC_MACS["a"], a.sync_a),
            Veth(self.ns_b, "sync0", "b-sync", "br-sync", SYNC_MACS["b"], a.sync_b),
        ]

    def build(self) -> None:
        """Create whatever is missing; set MACs, addresses and links up (idempotent)."""
        have = netns.existing_namespaces()
        for ns in self.namespaces:
            if ns not in have:
                netns.ip("netns", "add", ns)
            netns.sysctl(ns, _NO_IPV6)
            netns.ip("link", "set", "lo", "up", ns=ns)

        sw = self.ns_switch
        sw_links = netns.links(sw)
        batch = []
        for br in self.bridges:
            if br not in sw_links:
                batch.append(f"link add {br} type bridge stp_state 0 mcast_snooping 0")
            batch.append(f"link set {br} up")
        netns.ip_batch(sw, batch)

        pl = self.addresses.prefixlen
        links = {ns: netns.links(ns) for ns in {v.ns for v in self.veths}}
        for v in self.veths:
            inner, outer = v.ifname in links[v.ns], v.port in sw_links
            if not (inner and outer):
                # half a pair (after a crash) or nothing: recreate both ends
                if inner:
                    netns.ip("link", "del", v.ifname, ns=v.ns)
                if outer:
                    netns.ip("link", "del", v.port, ns=sw)
                # created directly inside the namespaces: nothing appears in the root namespace
                netns.ip("link", "add", v.ifname, "address", v.mac, "type", "veth",
                         "peer", "name", v.port, "netns", sw, ns=v.ns)
            netns.sysctl(v.ns, {f"net.ipv6.conf.{v.ifname}.disable_ipv6": "1"})
            netns.sysctl(sw, {f"net.ipv6.conf.{v.port}.disable_ipv6": "1"})
            netns.ip_batch(sw, [f"link set {v.port} master {v.bridge}", f"link set {v.port} up"])
            netns.ip_batch(v.ns, [f"link set {v.ifname} address {v.mac}",
                                  f"address replace {v.address}/{pl} dev {v.ifname}",
                                  f"link set {v.ifname} up"])

    def flood(self, on: bool | str) -> None:
        """How the service bridge passes the nodes' frames (:data:`SWITCH_MODES`):

        * ``"nodes"``: learning off on the two nodes' ports only, so frames *destined to* a node's MAC
          are unknown unicast and flood to every port (what a switch with unknown-unicast flooding or
          NLB-style unicast mode gives), while frames *from* a node go only to their destination (the
          client and server ports learn). A standby sees exactly what the patent's element 310 receives:
          client -> peer and server -> peer. The setup a stateful pair needs at least.
        * ``"hub"`` (or ``True``): ``ageing_time 0``, every frame to every port, as a SPAN/mirror port:
          the standby sees both directions.
        * ``"learning"`` (or ``False``): the default learning bridge (300 s ageing), learning on every port.
        """
        mode = {True: "hub", False: "learning"}.get(on, on) if isinstance(on, bool) else on
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch mode {on!r}: must be one of {', '.join(SWITCH_MODES)}")
        netns.ip("link", "set", "br-svc", "type", "bridge", "ageing_time", "0" if mode == "hub" else "30000",
                 ns=self.ns_switch)
        learning = "off" if mode == "nodes" else "on"
        for port in ("a-svc", "b-svc"):
            # fdb_flush: what the bridge learned of the node's MAC before would still steer its frames
            netns.ip("link", "set", "dev", port, "type", "bridge_slave", "learning", learning, "fdb_flush",
                     ns=self.ns_switch)

    def delete(self) -> list[str]:
        """Delete the lab's namespaces; the ones that could not be deleted, with the reason."""
        have = netns.existing_namespaces()
        errors = []
        for ns in self.namespaces:
            if ns in have:
                cp = netns.ip("netns", "del", ns, check=False)
                if cp.returncode != 0:
                    errors.append(f"{ns}: {one_line(cp.stderr)}")
        return errors

    def present(self) -> dict[str, bool]:
        have = netns.existing_namespaces()
        return {ns: ns in have for ns in self.namespaces}

    def interface_addresses(self) -> dict[str, dict[str, list[str]]]:
        """IPv4 addresses per interface per namespace (the switch and loopback left out)."""
        have = netns.existing_namespaces()
        out: dict[str, dict[str, list[str]]] = {}
        for ns in self.namespaces:
            if ns not in have or ns == self.ns_switch:
                continue
            cp = netns.ip("-j", "-4", "addr", "show", ns=ns, check=False)
            if cp.returncode == 0 and cp.stdout.strip():
                out[ns] = {
                    i["ifname"]: [f"{x['local']}/{x['prefixlen']}" for x in i.get("addr_info", [])]
                    for i in json.loads(cp.stdout) if i["ifname"] != "lo"}
        return out
