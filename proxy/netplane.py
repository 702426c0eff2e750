"""Kernel changes the node makes, each owned by one object that undoes it.

Why objects with ``close()``: a node may be stopped by a signal, by a failure in a sibling task or by
a crash. Every change goes through one of these owners, used as a context manager, so the change is
undone on every path out. Setup is idempotent: an address left behind by a crashed run is adopted
(and removed on exit) instead of failing with "exists".
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pairproxy.net")


class NetworkError(Exception):
    """A kernel change the node needs could not be made."""


def interface_index(ipr: IPRoute | None, ifname: str) -> int:
    """The index of ``ifname`` in this network namespace; NetworkError if there is none.
    (``if_nametoindex``: one ioctl; pyroute2's ``link_lookup`` dumps every link, 3-13 ms under load on
    a live move's critical path.)"""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise NetworkError(f"no interface {ifname!r} in this network namespace") from None


def interface_mac(ifname: str) -> str:
    """The MAC address of ``ifname``."""
    with IPRoute() as ipr:
        link = ipr.get_links(interface_index(ipr, ifname))[0]
        return link.get_attr("IFLA_ADDRESS")


def addresses_on(ifname: str) -> list[ipaddress.IPv4Interface]:
    """IPv4 addresses currently on ``ifname`` (for status and tests)."""
    with IPRoute() as ipr:
        index = interface_index(ipr, ifname)
        return [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in ipr.get_addr(index=index, family=2)]


def not_our_macvlan(ipr: IPRoute, index: int, parent: int) -> str | None:
    """Why the interface ``index`` cannot be a peer macvlan this node made on ``parent``, or None.

    A leftover is only removed when it is what the node makes (a macvlan on the service interface):
    an interface of the host that happens to carry the configured name is not ours to delete."""
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind != "macvlan":
        return f"is a {kind or 'physical or unknown'} interface, not a macvlan"
    if link.get_attr("IFLA_LINK") != parent:
        return "is a macvlan on another interface"
    return None


def remove_leftovers(ifname: str, address: ipaddress.IPv4Interface, macvlan: str | None = None) -> list[str]:
    """Undo what a crashed run of this node may have left: its address and the peer macvlan.

    A node in a pair must not serve (or even hold) its address before it knows the peer does not:
    a kernel that still holds it would answer ARP and reset clients the peer is serving.
    Returns what was removed, for the log.
    """
    removed = []
    with IPRoute() as ipr:
        index = interface_index(ipr, ifname)
        if macvlan:
            stale = ipr.link_lookup(ifname=macvlan)
            if stale:
                why = not_our_macvlan(ipr, stale[0], index)
                if why:
                    raise NetworkError(f"{macvlan} {why}; not removing it (peer.macvlan names another interface?)")
                ipr.link("del", index=stale[0])
                removed.append(f"macvlan {macvlan}")
        for a in ipr.get_addr(index=index, family=2):
            if a.get_attr("IFA_ADDRESS") == str(address.ip):
                ipr.addr("del", index=index, address=str(address.ip), prefixlen=a["prefixlen"])
                removed.append(f"address {address.ip} on {ifname}")
    return removed


# rtnetlink (include/uapi/linux/rtnetlink.h, if_addr.h, netlink.h): one IPv4 address added or deleted
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
IFA_ADDRESS, IFA_LOCAL = 1, 2


def _address_message(kind: int, index: int, address: ipaddress.IPv4Interface, seq: int) -> bytes:
    """An RTM_NEWADDR/RTM_DELADDR request for ``address`` on interface ``index`` (as ``ip addr`` sends:
    IFA_LOCAL and IFA_ADDRESS both the address)."""
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if kind == RTM_NEWADDR else 0)
    packed = address.ip.packed
    body = struct.pack("=BBBBI", socket.AF_INET, address.network.prefixlen, 0, 0, index)
    body += struct.pack("=HH", 8, IFA_LOCAL) + packed + struct.pack("=HH", 8, IFA_ADDRESS) + packed
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def change_address(kind: int, index: int, address: ipaddress.IPv4Interface) -> int:
    """Send one address request over a fresh rtnetlink socket; 0 or the kernel's errno.

    Why not pyroute2 here: making an ``IPRoute`` and its ``addr`` call cost 1-2 ms of CPU on a quiet
    machine and most of the 3-5 ms of CPU of a takeover's address step under load (bench/FAILOVER.md,
    2026-11-29), on the path between the death verdict and the first client; this is one sendto and one
    recv."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        seq = 1
        sock.sendto(_address_message(kind, index, address, seq), (0, 0))
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _, mseq, _ = struct.unpack_from("=IHHII", data, offset)
                if mtype == NLMSG_ERROR and mseq == seq:
                    return -struct.unpack_from("=i", data, offset + 16)[0]
                offset += max((length + 3) & ~3, 16)


class ServiceAddress:
    """An IPv4 address this node serves, present on ``ifname`` exactly while this object is open."""

    def __init__(self, ifname: str, address: ipaddress.IPv4Interface):
        self.ifname = ifname
        self.address = address
        self._index: int | None = None

    def open(self) -> "ServiceAddress":
        index = interface_index(None, self.ifname)
        try:
            code = change_address(RTM_NEWADDR, index, self.address)
        except OSError as exc:
            raise NetworkError(f"cannot add {self.address} to {self.ifname}: {exc}") from None
        if code == errno.EEXIST:
            log.warning("address %s was already on %s (left by an earlier run?); taking it over",
                        self.address, self.ifname)
        elif code:
            raise NetworkError(f"cannot add {self.address} to {self.ifname}: {os.strerror(code)}")
        else:
            log.info("address %s added to %s", self.address, self.ifname)
        self._index = index
        return self

    def close(self) -> None:
        if self._index is None:
            return
        try:
            code = change_address(RTM_DELADDR, self._index, self.address)
        except OSError as exc:
            code = exc.errno or errno.EIO
        self._index = None
        if not code:
            log.info("address %s removed from %s", self.address, self.ifname)
        elif code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
            log.error("cannot remove %s from %s: %s", self.address, self.ifname, os.strerror(code))

    def __enter__(self) -> "ServiceAddress":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()


IFF_NOARP = 0x80


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class PeerMacvlan:
    """A macvlan on the service interface carrying the *peer's* MAC (patent element 304).

    It receives the frames clients address to the peer. It never speaks with that MAC: IPv6 is off
    before it comes up (no neighbour discovery that would move the bridge's entry for the peer's
    MAC), ARP is off (only one host answers ARP for an address: the node's own interface), and
    rp_filter is 0 (segments from clients arrive on it while the route back is the own interface).
    With the peer's address as a /32 on it, replies leave through the own interface with the own MAC.
    """

    def __init__(self, ifname: str, name: str, mac: str):
        self.ifname = ifname
        self.name = name
        self.mac = mac
        self._index: int | None = None

    def open(self) -> "PeerMacvlan":
        with IPRoute() as ipr:
            parent = interface_index(ipr, self.ifname)
            stale = ipr.link_lookup(ifname=self.name)
            if stale:
                log.warning("macvlan %s was left by an earlier run; recreating it", self.name)
                ipr.link("del", index=stale[0])
            try:
                ipr.link("add", ifname=self.name, kind="macvlan", link=parent, macvlan_mode="bridge",
                         address=self.mac)
            except NetlinkError as exc:
                raise NetworkError(f"cannot create macvlan {self.name} with MAC {self.mac} on "
                                   f"{self.ifname}: {exc.args[-1]}") from None
            index = interface_index(ipr, self.name)
            self._index = index
            try:
                _write_sysctl(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "1")
                _write_sysctl(f"/proc/sys/net/ipv4/conf/{self.name}/rp_filter", "0")
                ipr.link("set", index=index, flags=IFF_NOARP, change=IFF_NOARP)
                ipr.link("set", index=index, state="up")
            except BaseException:
                self.close()
                raise
        log.info("macvlan %s with the peer's MAC %s is up on %s", self.name, self.mac, self.ifname)
        return self

    def close(self) -> None:
        if self._index is None:
            return
        with IPRoute() as ipr:
            try:
                ipr.link("del", index=self._index)
                log.info("macvlan %s removed", self.name)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    log.error("cannot remove macvlan %s: %s", self.name, exc)
        self._index = None

    def __enter__(self) -> "PeerMacvlan":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()
