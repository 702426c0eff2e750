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

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pairproxy.net")


class NetworkError(Exception):
    """A kernel change the node needs could not be made."""


def interface_index(ipr: IPRoute, ifname: str) -> int:
    """The index of ``ifname`` in this network namespace; NetworkError if there is none."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetworkError(f"no interface {ifname!r} in this network namespace")
    return found[0]


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


class ServiceAddress:
    """An IPv4 address this node serves, present on ``ifname`` exactly while this object is open."""

    def __init__(self, ifname: str, address: ipaddress.IPv4Interface):
        self.ifname = ifname
        self.address = address
        self._ipr: IPRoute | None = None
        self._index: int | None = None

    def open(self) -> "ServiceAddress":
        ipr = IPRoute()
        try:
            self._index = interface_index(ipr, self.ifname)
            try:
                ipr.addr("add", index=self._index, address=str(self.address.ip),
                         prefixlen=self.address.network.prefixlen)
                log.info("address %s added to %s", self.address, self.ifname)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise NetworkError(f"cannot add {self.address} to {self.ifname}: {exc.args[-1]}") from None
                log.warning("address %s was already on %s (left by an earlier run?); taking it over",
                            self.address, self.ifname)
        except BaseException:
            ipr.close()
            raise
        self._ipr = ipr
        return self

    def close(self) -> None:
        if self._ipr is None:
            return
        try:
            self._ipr.addr("del", index=self._index, address=str(self.address.ip),
                           prefixlen=self.address.network.prefixlen)
            log.info("address %s removed from %s", self.address, self.ifname)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                log.error("cannot remove %s from %s: %s", self.address, self.ifname, exc)
        finally:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> "ServiceAddress":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()
