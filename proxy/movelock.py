"""The network lock of a live move: while a move's sockets are frozen, no TCP segment reaches them.

Why: a socket in repair mode still receives and acknowledges data (bench/TCPREPAIR.md, finding 1); a
byte acknowledged after the freeze would be lost. Removing the address would keep segments away too,
but then a move that is called off (the peer never confirmed, the sync link broke) could not simply
go on here: the address would have to come back and be announced again. With this lock the giver keeps
its address until the peer has confirmed; and between the silent close of the frozen sockets and the
removal of the address, a segment finds no socket and would be answered with a reset: the lock drops it
instead (the client resends it to the new holder). CRIU's network lock does the same with iptables.

What the lock drops is not lost for the client's clock: each dropped segment is also copied to this
process (NFLOG, :class:`DropLog`), and the move hands the copies to the sockets' new home, which delivers
them to its restored sockets (:func:`deliver`) as soon as they are live. Without that, a client whose
request arrived during the lock waits for its own retransmission: with one segment in flight Linux's tail
loss probe fires only after 2 RTT + 200 ms and its retransmission timeout is 200 ms at least (measured:
every move with a dropped segment stalled its client 223-229 ms, bench/MOVES.md). A duplicate that the
client resends anyway is discarded by TCP as usual.

One object owns the kernel change (an nftables table ``pairproxy_movelock_<address>``, family ip, one
input chain with two rules, each with a counter), as :mod:`proxy.rstguard` does for output::

    table ip pairproxy_movelock_10_0_0_1 {
        chain in { type filter hook input priority -300; policy accept;
            ip protocol tcp ip daddr 10.0.0.1 tcp flags & (syn | ack) == syn counter log group 31249 queue-threshold 1 drop
            ip protocol tcp ip daddr 10.0.0.1 counter log group 31249 queue-threshold 1 drop
        }

The first rule (new clients' SYNs) is there from :meth:`MoveLock.prepare`, before the listeners close;
the second from :meth:`MoveLock.engage`.
    }

From the ``move_go`` on, the giver also stops speaking ARP for the address (:meth:`MoveLock.silence_arp`:
a table ``pairproxy_movearp_<address>`` of family arp, prepared with the lock): it keeps the address
until the peer is live, and its kernel would otherwise answer who-has requests with its own MAC while the
peer announces the address with its MAC, two owners at once, what an ARP watcher reports as a conflict
and a client may cache the wrong way round::

    table arp pairproxy_movearp_10_0_0_1 {
        chain in  { type filter hook input priority 0; policy accept; arp daddr ip 10.0.0.1 counter drop }
        chain out { type filter hook output priority 0; policy accept; arp saddr ip 10.0.0.1 counter drop }
    }

Tables left by a killed node are removed at the next start (:func:`remove_leftover`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.expressions import genex, verdict
from pyroute2.nftables.main import NFTables

from protocols.frames import with_tcp_checksum
from proxy.rstguard import (NF_ACCEPT, NF_DROP, NFPROTO_IPV4, NFT_CMP_EQ, NFT_PAYLOAD_NETWORK_HEADER,
                            NFT_PAYLOAD_TRANSPORT_HEADER, _REG, _cmp, _data, _delete_table, _drops, _load,
                            _table_exists)

log = logging.getLogger("pairproxy.movelock")


class MoveLockError(Exception):
    """The lock could not be set (the move does not start: nothing was frozen yet)."""


def table_name(address: ipaddress.IPv4Address | str) -> str:
    return "pairproxy_movelock_" + str(address).replace(".", "_")


def arp_table_name(address: ipaddress.IPv4Address | str) -> str:
    return "pairproxy_movearp_" + str(address).replace(".", "_")


def remove_leftover(address: ipaddress.IPv4Address | str) -> bool:
    """Delete a lock (and its ARP silence) a killed node left behind; True if there was one."""
    found = False
    for name, family in ((table_name(address), NFPROTO_IPV4), (arp_table_name(address), NFPROTO_ARP)):
        try:
            found = _delete_table(name, family) or found
        except NetlinkError:
            pass
    return found


#: nftables' arp family has two hooks, NF_ARP_IN (0) and NF_ARP_OUT (1); pyroute2 0.9 takes hook names
#: only, numbered as for ip (prerouting 0, input 1): these names give the arp hooks' numbers
NFPROTO_ARP = 3
ARP_IN_HOOK, ARP_OUT_HOOK = "prerouting", "input"
#: offsets in an Ethernet/IPv4 ARP packet (network header): sender and target protocol address
ARP_SPA, ARP_TPA = 14, 24


def _arp_rule(offset: int, address: ipaddress.IPv4Address) -> list[dict]:
    return [_load(NFT_PAYLOAD_NETWORK_HEADER, offset, 4), _cmp(NFT_CMP_EQ, address.packed),
            genex("counter", {"bytes": 0, "packets": 0})]


TCP_SYN, TCP_ACK = 0x02, 0x10


def _rule(address: ipaddress.IPv4Address, log_group: int | None, *, syn_only: bool = False) -> list[dict]:
    """Every TCP segment to ``address`` (``syn_only``: a new client's SYN, no ACK), counted, and copied to
    the NFLOG ``log_group``."""
    rule = [
        _load(NFT_PAYLOAD_NETWORK_HEADER, 9, 1), _cmp(NFT_CMP_EQ, bytes([socket.IPPROTO_TCP])),
        _load(NFT_PAYLOAD_NETWORK_HEADER, 16, 4), _cmp(NFT_CMP_EQ, address.packed),
    ]
    if syn_only:
        rule += [_load(NFT_PAYLOAD_TRANSPORT_HEADER, 13, 1),
                 genex("bitwise", {"sreg": _REG, "dreg": _REG, "len": 1, "mask": _data(bytes([TCP_SYN | TCP_ACK])),
                                   "xor": _data(b"\0")}),
                 _cmp(NFT_CMP_EQ, bytes([TCP_SYN]))]
    rule.append(genex("counter", {"bytes": 0, "packets": 0}))
    if log_group is not None:  # a copy of each dropped segment to DropLog, at once (queue threshold 1)
        # the kernel reads NFTA_LOG_GROUP and NFTA_LOG_QTHRESHOLD as be16 from the attribute's first two
        # bytes; pyroute2 0.9 declares them be32: shifted, its four bytes start with the right two
        rule.append(genex("log", {"group": log_group << 16, "qthreshold": 1 << 16}))
    return rule


# ------------------------------------------------------------------ NFLOG (include/uapi/linux/netfilter/nfnetlink_log.h)
NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR, NLMSG_DONE = 2, 3
#: the NFLOG groups a lock tries (one listener per group and network namespace: two locks at once, or
#: another NFLOG user such as ulogd on a group, take the next)
LOG_GROUPS = range(31249, 31249 + 16)
#: bound on the dropped segments a lock keeps (a move's lock lasts milliseconds; a flood is not kept)
MAX_KEPT = 4096
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")      # family, version, res_id (big-endian group: packed by hand)
_NLA = struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes, at: int):
    while at + _NLA.size <= len(data):
        size, kind = _NLA.unpack_from(data, at)
        if size < _NLA.size:
            return
        yield kind & 0x3FFF, data[at + _NLA.size:at + size]
        at += (size + 3) & ~3


class DropLog:
    """Copies of the segments a lock drops, read from an NFLOG group of this network namespace.

    Why NFLOG and not a packet socket: it gives exactly what the rule dropped (a packet socket on the
    interface would also see what arrived just before the lock and hit no rule), with no filter of its own."""

    def __init__(self) -> None:
        self.group: int | None = None
        self.kept: list[bytes] = []
        self.lost = 0
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: past rmem_max
            self._sock.bind((0, 0))
            last: OSError | None = None
            for group in LOG_GROUPS:
                try:
                    self._config(group, _nla(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
                except OSError as exc:  # EBUSY: another listener has this group
                    last = exc
                    continue
                self.group = group
                break
            if self.group is None:
                raise last or OSError(errno.EBUSY, "no free NFLOG group")
            self._config(self.group, _nla(NFULA_CFG_MODE, struct.pack("!IBB", 0xFFFF, NFULNL_COPY_PACKET, 0)) +
                         _nla(NFULA_CFG_QTHRESH, struct.pack("!I", 1)))
        except BaseException:
            self._sock.close()
            raise

    def _config(self, group: int, attrs: bytes) -> None:
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", group) + attrs
        header = _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                             NLM_F_REQUEST | NLM_F_ACK, 1, 0)
        self._sock.send(header + body)
        self._sock.settimeout(1.0)
        try:
            while True:
                data = self._sock.recv(65536)
                at = 0
                while at + _NLMSG.size <= len(data):
                    length, kind, _, _, _ = _NLMSG.unpack_from(data, at)
                    if kind == NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, at + _NLMSG.size)[0]
                        if code:
                            raise OSError(-code, f"NFLOG group {group}: {os.strerror(-code)}")
                        return
                    at += max((length + 3) & ~3, _NLMSG.size)
        finally:
            self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[bytes]:
        """The dropped segments that arrived since the last call (IPv4 packets, as received)."""
        while True:
            try:
                data = self._sock.recv(1 << 17)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: the socket overflowed; those copies are lost (the client resends)
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                break
            at = 0
            while at + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, at)
                if length < _NLMSG.size:
                    break
                if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                    for attr, value in _attrs(data[:at + length], at + _NLMSG.size + _NFGEN.size):
                        if attr == NFULA_PAYLOAD:
                            if len(self.kept) < MAX_KEPT:
                                self.kept.append(bytes(value))
                            else:
                                self.lost += 1
                at += (length + 3) & ~3
        kept, self.kept = self.kept, []
        return kept

    def close(self) -> None:
        self._sock.close()


def deliver(packets: list[bytes]) -> int:
    """Hand segments a lock dropped to the sockets of this network namespace, as if they had just arrived
    (a raw IP socket: to a local address they loop back into TCP's input). Returns how many went."""
    if not packets:
        return 0
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for packet in packets:
            fixed = with_tcp_checksum(packet)
            if fixed is None:
                continue
            try:
                raw.sendto(fixed, (socket.inet_ntoa(fixed[16:20]), 0))
                sent += 1
            except OSError as exc:
                log.warning("a segment the move lock dropped could not be delivered: %s", exc)
    return sent


def count_syns(packets: list[bytes]) -> int:
    """How many of these IPv4 packets are a new client's SYN (SYN without ACK)."""
    n = 0
    for packet in packets:
        at = (packet[0] & 0x0F) * 4 + 13 if packet else 0
        if len(packet) > at and packet[9] == socket.IPPROTO_TCP and packet[at] & (TCP_SYN | TCP_ACK) == TCP_SYN:
            n += 1
    return n


class MoveLock:
    """While open, TCP segments to ``address`` are dropped on arrival in this network namespace (and a copy
    of each is kept: :meth:`take_dropped`)."""

    def __init__(self, address: ipaddress.IPv4Address | str):
        self.address = ipaddress.IPv4Address(str(address))
        self.table = table_name(self.address)
        self._nft: NFTables | None = None
        self._arp: NFTables | None = None
        self._log: DropLog | None = None

    def open(self) -> "MoveLock":
        """:meth:`prepare` and :meth:`engage` at once."""
        return self.prepare().engage()

    def prepare(self) -> "MoveLock":
        """Make the table and its chain with the rule that holds new clients (:meth:`engage` adds the one
        that drops everything), and the NFLOG listener.

        Why new clients are held from the start: the move closes the listeners before it freezes (and
        a move under load takes hundreds of milliseconds from there to the peer's go: 755 ms in
        bench/soak.py at load 12); a SYN that arrived meanwhile was answered with a reset by this
        node's kernel (no listener), and a client that connects per operation (libnfs ``nfs-cp``)
        failed at once. Held, each SYN is copied like any segment the lock drops and delivered to the
        listener of whoever holds the address after the move (:func:`deliver`): the client's
        handshake completes there without waiting for its 1 s retransmission.

        Slow under load (netlink and an nftables transaction: 1-12 ms measured), so a move does it in a
        thread while its pumps stop."""
        try:
            self._log = DropLog()
        except OSError as exc:  # the lock still works: a dropped segment then waits for the client's timer
            log.warning("move lock of %s: dropped segments will not be passed on (NFLOG: %s)", self.address, exc)
            self._log = None
        nft = NFTables(nfgen_family=NFPROTO_IPV4)
        try:
            if _table_exists(nft, self.table):
                nft.table("del", name=self.table)
            nft.table("add", name=self.table)
            nft.chain("add", table=self.table, name="in", hook="input", type="filter", priority=-300,
                      policy=NF_ACCEPT)
            group = self._log.group if self._log is not None else None
            nft.rule("add", table=self.table, chain="in",
                     expressions=(_rule(self.address, group, syn_only=True), verdict(code=NF_DROP)))
        except NetlinkError as exc:
            self._nft = nft
            self.close()
            raise MoveLockError(f"cannot lock {self.address} for a move: {exc.args[-1]}") from None
        except BaseException:
            nft.close()
            self._close_log()
            raise
        self._nft = nft
        self._prepare_arp()
        return self

    def _prepare_arp(self) -> None:
        """The ARP silence's table and chains, without rules (nothing is dropped yet). A failure costs
        only the silence (the move works; an ARP watcher may see two owners for a moment): logged."""
        arp = NFTables(nfgen_family=NFPROTO_ARP)
        name = arp_table_name(self.address)
        try:
            if _table_exists(arp, name):
                arp.table("del", name=name)
            arp.table("add", name=name)
            arp.chain("add", table=name, name="in", hook=ARP_IN_HOOK, type="filter", priority=0, policy=NF_ACCEPT)
            arp.chain("add", table=name, name="out", hook=ARP_OUT_HOOK, type="filter", priority=0, policy=NF_ACCEPT)
        except NetlinkError as exc:
            log.warning("move of %s: this node may still answer ARP for it after the go: %s", self.address,
                        exc.args[-1])
            try:
                if _table_exists(arp, name):
                    arp.table("del", name=name)
            except NetlinkError:
                pass
            arp.close()
            return
        self._arp = arp

    def silence_arp(self) -> bool:
        """From now on this node neither answers ARP requests for the address nor sends ARP from it
        (the peer is about to announce it). True if the silence is in place."""
        if self._arp is None:
            return False
        name = arp_table_name(self.address)
        try:
            self._arp.rule("add", table=name, chain="in",
                           expressions=(_arp_rule(ARP_TPA, self.address), verdict(code=NF_DROP)))
            self._arp.rule("add", table=name, chain="out",
                           expressions=(_arp_rule(ARP_SPA, self.address), verdict(code=NF_DROP)))
        except NetlinkError as exc:
            log.warning("move of %s: ARP not silenced: %s", self.address, exc.args[-1])
            return False
        return True

    def arp_dropped(self) -> int:
        """ARP packets the silence dropped so far (both directions)."""
        try:
            return (_drops(self._arp, arp_table_name(self.address)) or 0) if self._arp is not None else 0
        except NetlinkError:
            return 0

    def engage(self) -> "MoveLock":
        """Add the drop rule: from now on no TCP segment reaches a socket of the address."""
        group = self._log.group if self._log is not None else None
        try:
            self._nft.rule("add", table=self.table, chain="in",
                           expressions=(_rule(self.address, group), verdict(code=NF_DROP)))
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

    def take_dropped(self) -> list[bytes]:
        """Copies of the segments dropped since the last call (IPv4 packets), oldest first."""
        return self._log.read() if self._log is not None else []

    def release(self) -> list[bytes]:
        """Remove the lock; returns the copies of what it dropped that were not taken yet."""
        if self._nft is not None:
            try:
                self._nft.table("del", name=self.table)
            except NetlinkError as exc:
                log.error("cannot remove the move lock %s: %s", self.table, exc)
            finally:
                self._nft.close()
                self._nft = None
        if self._arp is not None:
            try:
                self._arp.table("del", name=arp_table_name(self.address))
            except NetlinkError as exc:
                log.error("cannot remove the move's ARP silence %s: %s", arp_table_name(self.address), exc)
            finally:
                self._arp.close()
                self._arp = None
        rest = self.take_dropped()
        self._close_log()
        return rest

    def close(self) -> None:
        self.release()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
