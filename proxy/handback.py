"""The holder's side of the hand-back: let go of the peer's address (patent element 316).

The decisions (when to release, when to tell the peer, when the owner may claim) are in
:mod:`proxy.roles`; this is the sequence the node runs for :class:`~proxy.roles.ReleasePeerAddress`:
the takeover (:mod:`proxy.takeover`) undone in reverse order.

1. stop the peer's services at once (grace 0: the owner is waiting to claim), which closes the
   listeners, cuts the connections and removes the address (:class:`~proxy.serving.AddressService`);
2. the macvlan, if the takeover opened it and the node is stateless; a stateful standby keeps
   snooping on it (even if the takeover had to open it: the standby could not at start);
3. stateful: keep the resume report as it stood, stop watching (bounded in time);
4. note when it was released.

The owner claims only after the node then sends ``handback_done``, so the two never serve one address
at once.

And the other way round, a planned stop (SIGTERM) of a node serving its own address in a pair,
:func:`leave`: the peer serves the address for new clients at once while the old connections drain
here (see :mod:`proxy.drain` for how the two share it meanwhile):

1. stop accepting (the listeners close; open connections go on);
2. stop answering ARP on the service interface; the tunnel for the connections the peer passes on;
3. tell the peer ``leaving``, with those connections and the grace time: it takes over now;
4. drain for up to the grace time; the address is removed at the end (:class:`~proxy.serving.AddressService`);
5. undo 2 in reverse.

Without a connected sync link nobody can take over on our word: the node drains as a lone node does and
tells the peer afterwards (it will find out anyway).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from proxy.drain import ArpSilence, DrainTunnel, established_flows
from proxy.serving import AddressService
from proxy.takeover import HeldAddress, PeerMacvlanSlot

if TYPE_CHECKING:  # only for annotations: proxy.standby imports proxy.takeover
    from proxy.standby import StatefulStandby

log = logging.getLogger("pairproxy.handback")


async def release(held: HeldAddress, *, macvlan: PeerMacvlanSlot, standby: StatefulStandby | None) -> None:
    """Run the sequence in the module docstring."""
    # 1. services and address
    held.service.stop(0)
    await held.done.wait()
    if held.drain is not None:  # a leaving peer's connections (if its grace time is not over yet)
        await held.drain.close()
    # 2. the macvlan
    if held.opened_macvlan and standby is None:
        macvlan.close()  # stateless: receive the peer's MAC only while serving its address
    # 3. what the clients re-established
    if standby is not None:
        held.takeover.resume = await standby.end_takeover()
    # 4. done
    held.takeover.released_at = trio.current_time()
    log.info("released %s", held.takeover.address)


async def leave(*, service: AddressService, done: trio.Event, grace: float, ifname: str, peer_mac: str | None,
                tunnel_local: str, tunnel_remote: str, link_connected: bool,
                send: Callable[[dict], Awaitable[None]]) -> None:
    """Run the planned-stop sequence in the module docstring; returns when the own address is gone."""
    address = str(service.address.ip)
    # 1. stop accepting
    service.stop(grace)
    while service.state == "serving":
        await trio.sleep(0.002)
    if not link_connected:
        await done.wait()
        await send({"type": "leaving", "address": address, "drain": [], "grace": 0})
        return
    silence = tunnel = None
    try:
        # 2. silent on ARP; the tunnel (only if there is something to drain and the peer's MAC is known)
        silence = ArpSilence(ifname).open()
        flows = established_flows(address) if service.active_connections() and peer_mac else []
        if flows:
            try:
                tunnel = await DrainTunnel(tunnel_local, tunnel_remote, mac=peer_mac).open()
            except OSError as exc:
                log.error("drain: no tunnel to the peer, its takeover will reset these connections: %s", exc)
                flows = []
        # 3. the peer takes over now
        await send({"type": "leaving", "address": address, "drain": [f.as_list() for f in flows], "grace": grace})
        log.info("handed %s to the peer; draining %d connection(s) for up to %gs", address, len(flows), grace)
        # 4. drain
        await done.wait()
    finally:
        # 5. undo
        with trio.CancelScope(shield=True):
            if tunnel is not None:
                await tunnel.close()
            if silence is not None:
                silence.close()
