"""A planned stop in a pair: the peer serves new clients at once while the old connections drain here.

Why this is not simply "stop, then tell the peer": a stopping node that keeps its address for the
grace time refuses every new client for that long; one that tells the peer first loses its old
connections, because the peer's gratuitous ARP moves every client's (and the backend server's)
frames for the address to the peer, which has no socket for them and resets them.

So the two nodes share the address for the grace time, split by connection:

* the leaving node stops accepting, stops answering ARP on its service interface (``arp_ignore=8``;
  its own ARP requests use its primary address, ``arp_announce=2``), lists its established TCP
  connections on the address (client and backend legs alike, from ``/proc/net/tcp``), opens a VXLAN
  device towards the peer over the sync network, and only then sends ``leaving`` with that list;
* the peer takes over as usual, but first sends the frames of exactly those connections that arrive
  on its service interface into its VXLAN device (tc clsact ingress, u32 match on the 4-tuple, mirred
  redirect): they reach the leaving node's sockets, whose replies go straight to the clients;
* when the grace time is over both sides undo it (the leaving node also removes its address then).

VXLAN because this kernel has no ipip, flower or pedit; an L2 tunnel keeps the frames intact, and the
leaving node's VXLAN device carries the peer's MAC, so the frames (addressed to the peer's MAC) are
delivered to it. The tunnel adds 50 bytes: a full-sized segment from a client during the drain is
fragmented on the sync network (or, with DF, answered with "fragmentation needed").
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import subprocess
from dataclasses import dataclass

import trio

log = logging.getLogger("pairproxy.drain")

VXLAN_ID = 7477
VXLAN_PORT = 4789
TUNNEL = "pp-drain"
MAX_FLOWS = 20000
PRIORITY = 1700  # tc filter preference of the redirects

_TCP_STATES_LIVE = {"01", "02", "03", "04", "05", "08", "09", "0B"}  # all but TIME_WAIT, CLOSE, LISTEN


@dataclass(frozen=True)
class Flow:
    """One TCP connection of the leaving node on its service address, as the peer sees it arrive."""

    remote_ip: str
    remote_port: int
    local_port: int

    def as_list(self) -> list:
        return [self.remote_ip, self.remote_port, self.local_port]


def flows_from_message(raw: object) -> tuple[Flow, ...]:
    """The ``drain`` list of a ``leaving`` message; invalid entries are left out (logged)."""
    flows = []
    for entry in (raw if isinstance(raw, list) else [])[:MAX_FLOWS]:
        try:
            ip, port, local = entry
            flows.append(Flow(str(ipaddress.IPv4Address(ip)), int(port), int(local)))
        except (TypeError, ValueError):
            log.warning("drain: bad flow %r in leaving message ignored", entry)
    return tuple(f for f in flows if 0 < f.remote_port < 65536 and 0 < f.local_port < 65536)


def established_flows(address: str, proc_net_tcp: str = "/proc/net/tcp") -> list[Flow]:
    """Every live TCP connection with local address ``address`` (this network namespace)."""
    want = socket.inet_aton(address)
    flows = []
    with open(proc_net_tcp) as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state not in _TCP_STATES_LIVE:
                continue
            lip, lport = local.split(":")
            if struct.pack("<I", int(lip, 16)) != want:
                continue
            rip, rport = remote.split(":")
            flows.append(Flow(socket.inet_ntoa(struct.pack("<I", int(rip, 16))), int(rport, 16), int(lport, 16)))
    return flows[:MAX_FLOWS]


async def _run(argv: list[str], stdin: bytes | None = None) -> None:
    result = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise OSError(f"{' '.join(argv[:4])}: {result.stderr.decode(errors='replace').strip()}")


def _write_sysctl(path: str, value: str) -> str:
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write(value)
    return old


class DrainTunnel:
    """The VXLAN device between the two nodes over the sync network (owned: ``close`` removes it)."""

    def __init__(self, local: str, remote: str, mac: str | None = None):
        self.local, self.remote, self.mac = local, remote, mac
        self.opened = False

    async def open(self) -> "DrainTunnel":
        if await _exists(TUNNEL):  # left by a crashed run
            await _run(["ip", "link", "del", TUNNEL])
        argv = ["ip", "link", "add", TUNNEL]
        if self.mac:
            argv += ["address", self.mac]
        await _run(argv + ["type", "vxlan", "id", str(VXLAN_ID), "local", self.local, "remote", self.remote,
                           "dstport", str(VXLAN_PORT)])
        self.opened = True
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{TUNNEL}/rp_filter", "0")
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{TUNNEL}/disable_ipv6", "1")
        await _run(["ip", "link", "set", TUNNEL, "arp", "off", "up"])
        return self

    async def close(self) -> None:
        if self.opened:
            self.opened = False
            try:
                await _run(["ip", "link", "del", TUNNEL])
            except OSError as exc:
                log.error("drain: %s", exc)


async def _exists(ifname: str) -> bool:
    result = await trio.run_process(["ip", "link", "show", ifname], capture_stdout=True, capture_stderr=True,
                                    check=False)
    return result.returncode == 0


class DrainRedirect:
    """On the node taking over: the leaving node's connections, arriving on ``ifname``, into the tunnel,
    for ``seconds`` (the leaving node's grace time) at most."""

    def __init__(self, ifname: str, address: str, flows: tuple[Flow, ...], tunnel: DrainTunnel, seconds: float):
        self.ifname, self.address, self.flows, self.tunnel = ifname, address, flows, tunnel
        self.seconds = seconds
        self.installed = False

    async def open(self) -> "DrainRedirect":
        await self.tunnel.open()
        lines = [f"qdisc replace dev {self.ifname} clsact"]
        for f in self.flows:
            lines.append(f"filter add dev {self.ifname} ingress protocol ip pref {PRIORITY} u32 "
                         f"match ip protocol 6 0xff match ip src {f.remote_ip}/32 match ip dst {self.address}/32 "
                         f"match ip sport {f.remote_port} 0xffff match ip dport {f.local_port} 0xffff "
                         f"action mirred egress redirect dev {TUNNEL}")
        try:
            await _run(["tc", "-batch", "-"], stdin=("\n".join(lines) + "\n").encode())
        except BaseException:
            await self.close()
            raise
        self.installed = True
        log.info("drain: %d connection(s) of the leaving peer go on through the sync network", len(self.flows))
        return self

    async def close_after(self, seconds: float) -> None:
        """Close after ``seconds``, or when cancelled (the node stops) at the latest."""
        try:
            await trio.sleep(seconds)
            log.info("drain: over, the leaving peer's connections are no longer passed on")
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        if self.installed:
            self.installed = False
            try:
                await _run(["tc", "qdisc", "del", "dev", self.ifname, "clsact"])
            except OSError as exc:
                log.error("drain: %s", exc)
        await self.tunnel.close()


def remove_leftovers(ifname: str) -> list[str]:
    """Undo what a crashed run may have left of a drain (at start, like proxy.netplane.remove_leftovers):
    the tunnel, the redirects, and the ARP silence (arp_ignore=8 is set by nobody else)."""
    removed = []
    if subprocess.run(["ip", "link", "del", TUNNEL], capture_output=True).returncode == 0:
        removed.append(f"drain tunnel {TUNNEL}")
    filters = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True)
    if f"pref {PRIORITY} " in filters.stdout and \
            subprocess.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], capture_output=True).returncode == 0:
        removed.append(f"drain redirects on {ifname}")
    path = f"/proc/sys/net/ipv4/conf/{ifname}/arp_ignore"
    try:
        with open(path) as f:
            silent = f.read().strip() == "8"
        if silent:
            _write_sysctl(path, "0")
            removed.append(f"ARP silence on {ifname}")
    except OSError:
        pass
    return removed


class ArpSilence:
    """On the leaving node: answer no ARP on ``ifname`` and ask with the primary address only, so no
    client or server is steered back to this node while the peer serves the address."""

    def __init__(self, ifname: str):
        self.ifname = ifname
        self._old: dict[str, str] = {}

    def open(self) -> "ArpSilence":
        for name, value in (("arp_ignore", "8"), ("arp_announce", "2")):
            self._old[name] = _write_sysctl(f"/proc/sys/net/ipv4/conf/{self.ifname}/{name}", value)
        return self

    def close(self) -> None:
        for name, value in self._old.items():
            try:
                _write_sysctl(f"/proc/sys/net/ipv4/conf/{self.ifname}/{name}", value)
            except OSError as exc:
                log.error("drain: cannot restore %s on %s: %s", name, self.ifname, exc)
        self._old.clear()
