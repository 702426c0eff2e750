"""The network lock of a live move: while a move's sockets are frozen, no TCP segment reaches them.

Why: a socket in repair mode still receives and acknowledges data (bench/TCPREPAIR.md, finding 1); a
byte acknowledged after the freeze would be lost. Removing the address would keep segments away too,
but then a move that is called off (the peer never confirmed, the sync link broke) could not simply
go on here: the address would have to come back and be announced again. With this lock the giver keeps
its address until the peer has confirmed; and between the silent close of the frozen sockets and the
removal of the address, a segment finds no socket and would be answered with a reset: the lock drops it
instead (the client resends it to the new holder). CRIU's network lock does the same with iptables.

One object owns the kernel change (an nftables table ``pairproxy_movelock_<address>``, family ip, one
input chain with one rule and a counter), as :mod:`proxy.rstguard` does for output::

    table ip pairproxy_movelock_10_0_0_1 {
        chain in { type filter hook input priority -300; policy accept;
            ip protocol tcp ip daddr 10.0.0.1 counter drop
        }
    }

A table left by a killed node is removed at the next start (:func:`remove_leftover`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.expressions import genex, verdict
from pyroute2.nftables.main import NFTables

from proxy.rstguard import (NF_ACCEPT, NF_DROP, NFPROTO_IPV4, NFT_CMP_EQ, NFT_PAYLOAD_NETWORK_HEADER, _cmp, _drops,
                            _delete_table, _load, _table_exists)

log = logging.getLogger("pairproxy.movelock")


class MoveLockError(Exception):
    """The lock could not be set (the move does not start: nothing was frozen yet)."""


def table_name(address: ipaddress.IPv4Address | str) -> str:
    return "pairproxy_movelock_" + str(address).replace(".", "_")


def remove_leftover(address: ipaddress.IPv4Address | str) -> bool:
    """Delete a lock a killed node left behind; True if there was one."""
    try:
        return _delete_table(table_name(address))
    except NetlinkError:
        return False


def _rule(address: ipaddress.IPv4Address) -> list[dict]:
    return [
        _load(NFT_PAYLOAD_NETWORK_HEADER, 9, 1), _cmp(NFT_CMP_EQ, bytes([socket.IPPROTO_TCP])),
        _load(NFT_PAYLOAD_NETWORK_HEADER, 16, 4), _cmp(NFT_CMP_EQ, address.packed),
        genex("counter", {"bytes": 0, "packets": 0}),
    ]


class MoveLock:
    """While open, TCP segments to ``address`` are dropped on arrival in this network namespace."""

    def __init__(self, address: ipaddress.IPv4Address | str):
        self.address = ipaddress.IPv4Address(str(address))
        self.table = table_name(self.address)
        self._nft: NFTables | None = None

    def open(self) -> "MoveLock":
        """:meth:`prepare` and :meth:`engage` at once."""
        return self.prepare().engage()

    def prepare(self) -> "MoveLock":
        """Make the table and its chain, without the rule (nothing is dropped yet). Slow under load (netlink
        and an nftables transaction: 1-12 ms measured), so a move does it in a thread while its pumps stop."""
        nft = NFTables(nfgen_family=NFPROTO_IPV4)
        try:
            if _table_exists(nft, self.table):
                nft.table("del", name=self.table)
            nft.table("add", name=self.table)
            nft.chain("add", table=self.table, name="in", hook="input", type="filter", priority=-300,
                      policy=NF_ACCEPT)
        except NetlinkError as exc:
            self._nft = nft
            self.close()
            raise MoveLockError(f"cannot lock {self.address} for a move: {exc.args[-1]}") from None
        except BaseException:
            nft.close()
            raise
        self._nft = nft
        return self

    def engage(self) -> "MoveLock":
        """Add the drop rule: from now on no TCP segment reaches a socket of the address."""
        try:
            self._nft.rule("add", table=self.table, chain="in", expressions=(_rule(self.address), verdict(code=NF_DROP)))
        except NetlinkError as exc:
            self.close()
            raise MoveLockError(f"cannot lock {self.address} for a move: {exc.args[-1]}") from None
        return self

    def dropped(self) -> int:
        """Segments dropped so far (the rule's counter)."""
        try:
            return (_drops(self._nft, self.table) or 0) if self._nft is not None else 0
        except NetlinkError:
            return 0

    def close(self) -> None:
        if self._nft is None:
            return
        try:
            self._nft.table("del", name=self.table)
        except NetlinkError as exc:
            log.error("cannot remove the move lock %s: %s", self.table, exc)
        finally:
            self._nft.close()
            self._nft = None
