"""Keep a dead node process's kernel from ending its clients' connections: drop its FIN and RST.

Why: if only the node process dies (SIGKILL, a crash) while its kernel and link live, the kernel closes
every socket of the process and tells each client so: a FIN, or a RST when unread data was left. The
client's connection is then over before the peer can continue it (issue 10: continue the connections with
TCP_REPAIR from sniffed state). With this guard in place, the kernel's FIN and RST segments from the
service address are dropped in the output hook, so the clients keep waiting (and retransmitting) until
the peer takes the address and the connections over. The same holds for the resets the kernel sends
afterwards for segments that find no socket any more.

The node's own, deliberate closes must still reach the clients: before closing or shutting down a socket
on purpose the node calls :func:`mark_own_close`, which sets ``SO_MARK`` to ``own_mark`` on that socket; the
guard lets marked FIN/RST pass. A socket is marked only at its deliberate end, never at creation: the
kernel's closes after a crash must go out unmarked.

One object owns the kernel change (an nftables table ``pairproxy_rstguard_<address>``, family ip, one
output chain with one rule and a counter), as in :mod:`proxy.netplane`: :meth:`RstGuard.open` creates it
(replacing one left by an earlier run), :meth:`RstGuard.close` deletes it. Unlike the other owners this
one is *meant* to outlive a killed process: that is its whole point. So a node that starts calls
:func:`remove_leftover` first (next to ``netplane.remove_leftovers``), and the peer, once it holds the
address, has no need for the dead node's table (the address is gone from that kernel with the node's
cleanup or with the whole node).

The rule, in nft syntax::

    table ip pairproxy_rstguard_10_0_0_1 {
        chain out { type filter hook output priority 0; policy accept;
            ip protocol tcp ip saddr 10.0.0.1 tcp flags & (fin|rst) != 0 meta mark != 0x70707270 counter drop
        }
    }

Built through pyroute2's nftables netlink layer (no ``nft`` binary is installed on these machines).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.expressions import genex, verdict
from pyroute2.nftables.main import NFTables

log = logging.getLogger("pairproxy.rstguard")

OWN_CLOSE_MARK = 0x70707270  # "pprp": the mark of a close the node means
TCP_FIN = 0x01
TCP_RST = 0x04

# nf_tables uapi values (include/uapi/linux/netfilter/nf_tables.h, netfilter.h)
NFPROTO_IPV4 = 2
NFT_PAYLOAD_NETWORK_HEADER = 1
NFT_PAYLOAD_TRANSPORT_HEADER = 2
NFT_CMP_EQ = 0
NFT_CMP_NEQ = 1
NFT_META_MARK = 3
NF_DROP = 0
NF_ACCEPT = 1
_REG = 1


class RstGuardError(Exception):
    """The guard could not be installed or removed."""


def table_name(address: ipaddress.IPv4Address | str) -> str:
    """The table that guards ``address``: one per address, so two guarded addresses never collide."""
    return "pairproxy_rstguard_" + str(ipaddress.IPv4Address(str(address))).replace(".", "_")


def mark_own_close(sock, mark: int = OWN_CLOSE_MARK) -> None:
    """Mark ``sock`` (a socket or trio socket) so that the FIN or RST of the close that follows passes
    the guard (needs CAP_NET_ADMIN; without it, or on a closed socket, nothing happens: a node without
    a guard needs no mark)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError:
        pass


def _delete_table(name: str, family: int = NFPROTO_IPV4) -> bool:
    """Delete the nft table ``name`` of ``family`` if it exists; True if there was one (shared with
    proxy.movelock)."""
    nft = NFTables(nfgen_family=family)
    try:
        if not _table_exists(nft, name):
            return False
        nft.table("del", name=name)
        return True
    finally:
        nft.close()


def remove_leftover(address: ipaddress.IPv4Address | str) -> bool:
    """Delete the guard table of ``address`` if an earlier (killed) run left one; True if there was one."""
    name = table_name(address)
    if not _delete_table(name):
        return False
    log.info("removed the FIN/RST guard %s left by an earlier run", name)
    return True


def destroy_leftover_sockets(address: ipaddress.IPv4Address | str) -> int:
    """Abort every TCP socket of ``address`` in this network namespace (sock_diag ``SOCK_DESTROY``, as
    ``ss -K``); how many there were. For a node starting where a killed run left its kernel's sockets:
    with the guard in place their FINs never left, so they linger (FIN_WAIT1, retrying) and hold the
    4-tuples a connection moving back here with TCP_REPAIR needs (connect fails: EADDRNOTAVAIL). Call it
    with the guard open: the aborts' RSTs are unmarked and stay in this kernel."""
    import subprocess

    try:
        cp = subprocess.run(["ss", "-tnHK", "src", str(ipaddress.IPv4Address(str(address)))], capture_output=True,
                            text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot abort the sockets a killed run left on %s: %s", address, exc)
        return 0
    if cp.returncode != 0:
        log.warning("cannot abort the sockets a killed run left on %s: %s", address, cp.stderr.strip())
        return 0
    found = len([line for line in cp.stdout.splitlines() if line.strip()])
    if found:
        log.info("aborted %d TCP socket(s) a killed run left on %s (quietly: the guard keeps their RSTs)",
                 found, address)
    return found


def drops(address: ipaddress.IPv4Address | str) -> int | None:
    """How many FIN/RST segments the guard of ``address`` has dropped; None if there is no guard (e.g. to
    report what a killed run's guard did before :func:`remove_leftover`)."""
    nft = NFTables(nfgen_family=NFPROTO_IPV4)
    try:
        return _drops(nft, table_name(address))
    finally:
        nft.close()


def _drops(nft: NFTables, table: str) -> int | None:
    """The packets counted by the counters of ``table``'s rules, summed; None if it has no counter."""
    total = None
    for rule in nft.get_rules():
        if rule.get_attr("NFTA_RULE_TABLE") != table:
            continue
        for expr in rule.get_attr("NFTA_RULE_EXPRESSIONS") or ():
            if expr.get_attr("NFTA_EXPR_NAME") == "counter":
                total = (total or 0) + expr.get_attr("NFTA_EXPR_DATA").get_attr("NFTA_COUNTER_PACKETS")
    return total


def _table_exists(nft: NFTables, name: str) -> bool:
    return any(t.get_attr("NFTA_TABLE_NAME") == name for t in nft.get_tables())


def _data(value: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", value)]}


def _load(base: int, offset: int, length: int) -> dict:
    return genex("payload", {"dreg": _REG, "base": base, "offset": offset, "len": length})


def _cmp(op: int, value: bytes) -> dict:
    return genex("cmp", {"sreg": _REG, "op": op, "data": _data(value)})


def _rule(address: ipaddress.IPv4Address, own_mark: int) -> list[dict]:
    return [
        _load(NFT_PAYLOAD_NETWORK_HEADER, 9, 1), _cmp(NFT_CMP_EQ, bytes([socket.IPPROTO_TCP])),
        _load(NFT_PAYLOAD_NETWORK_HEADER, 12, 4), _cmp(NFT_CMP_EQ, address.packed),
        _load(NFT_PAYLOAD_TRANSPORT_HEADER, 13, 1),
        genex("bitwise", {"sreg": _REG, "dreg": _REG, "len": 1, "mask": _data(bytes([TCP_FIN | TCP_RST])),
                          "xor": _data(b"\0")}),
        _cmp(NFT_CMP_NEQ, b"\0"),
        genex("meta", {"key": NFT_META_MARK, "dreg": _REG}), _cmp(NFT_CMP_NEQ, struct.pack("=I", own_mark)),
        genex("counter", {"bytes": 0, "packets": 0}),
    ]


class RstGuard:
    """While open, this network namespace's kernel sends no unmarked TCP FIN or RST from ``address``.

    Made in the network namespace of the calling thread (the netlink socket is opened in :meth:`open`).
    """

    def __init__(self, address: ipaddress.IPv4Address | str, *, own_mark: int = OWN_CLOSE_MARK):
        self.address = ipaddress.IPv4Address(str(address))
        if not 0 < own_mark <= 0xFFFF_FFFF:
            raise ValueError(f"own_mark: {own_mark} is outside 1..0xffffffff")
        self.own_mark = own_mark
        self.table = table_name(self.address)
        self._nft: NFTables | None = None

    def open(self) -> "RstGuard":
        nft = NFTables(nfgen_family=NFPROTO_IPV4)
        try:
            if _table_exists(nft, self.table):
                log.warning("FIN/RST guard %s was already there (left by an earlier run?); replacing it", self.table)
                nft.table("del", name=self.table)
            nft.table("add", name=self.table)
            nft.chain("add", table=self.table, name="out", hook="output", type="filter", priority=0,
                      policy=NF_ACCEPT)
            nft.rule("add", table=self.table, chain="out",
                     expressions=(_rule(self.address, self.own_mark), verdict(code=NF_DROP)))
        except NetlinkError as exc:
            try:
                if _table_exists(nft, self.table):
                    nft.table("del", name=self.table)
            finally:
                nft.close()
            raise RstGuardError(f"cannot guard {self.address} against FIN/RST: {exc.args[-1]}") from None
        except BaseException:
            nft.close()
            raise
        self._nft = nft
        log.info("FIN/RST from %s dropped unless marked 0x%x (table %s)", self.address, self.own_mark, self.table)
        return self

    @property
    def is_open(self) -> bool:
        return self._nft is not None

    def dropped(self) -> int:
        """How many FIN/RST segments the guard has dropped so far (the rule's counter)."""
        return (_drops(self._nft, self.table) or 0) if self._nft is not None else 0

    def close(self) -> None:
        if self._nft is None:
            return
        try:
            self._nft.table("del", name=self.table)
            log.info("FIN/RST guard for %s removed", self.address)
        except NetlinkError as exc:
            log.error("cannot remove the FIN/RST guard %s: %s", self.table, exc)
        finally:
            self._nft.close()
            self._nft = None

    def __enter__(self) -> "RstGuard":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()
