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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from proxy.takeover import HeldAddress, PeerMacvlanSlot

if TYPE_CHECKING:  # only for annotations: proxy.standby imports proxy.takeover
    from proxy.standby import StatefulStandby

log = logging.getLogger("pairproxy.handback")


async def release(held: HeldAddress, *, macvlan: PeerMacvlanSlot, standby: StatefulStandby | None) -> None:
    """Run the sequence in the module docstring."""
    # 1. services and address
    held.service.stop(0)
    await held.done.wait()
    # 2. the macvlan
    if held.opened_macvlan and standby is None:
        macvlan.close()  # stateless: receive the peer's MAC only while serving its address
    # 3. what the clients re-established
    if standby is not None:
        held.takeover.resume = await standby.end_takeover()
    # 4. done
    held.takeover.released_at = trio.current_time()
    log.info("released %s", held.takeover.address)
