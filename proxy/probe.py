"""The second witness of the failure detector: an authenticated UDP probe on the service network.

Why UDP to the peer's *service address* and not ARP: an ARP answer proves only that the peer's
kernel lives. When just the pairproxy process has died (its kernel still up and still holding the
address), ARP is answered but nobody serves the clients; the peer must take over then too. The UDP
probe is answered by the pairproxy process itself, over the service network (not the sync link), so

* sync link silent, probe answered   -> the peer serves; only the link is down; nobody takes over;
* sync link silent, probe unanswered -> the peer (process, kernel or network port) is gone.

Both sides prove they hold the pair's key (HMAC over a fresh nonce), so a stray host cannot keep a
dead node "alive" by echoing probes, and a probe cannot be used to learn anything.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket

import trio

from proxy.dataplane import IP_FREEBIND

log = logging.getLogger("pairproxy.probe")

MAGIC = b"PPPROBE1"
NONCE = 16
TAG = 16


def _tag(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()[:TAG]


def probe_request(key: bytes, nonce: bytes) -> bytes:
    return MAGIC + nonce + _tag(key, b"probe", nonce)


def probe_answer(key: bytes, request: bytes) -> bytes | None:
    """The answer to a valid request, None for anything else (unauthenticated or malformed)."""
    if len(request) != len(MAGIC) + NONCE + TAG or not request.startswith(MAGIC):
        return None
    nonce = request[len(MAGIC):len(MAGIC) + NONCE]
    if not hmac.compare_digest(request[len(MAGIC) + NONCE:], _tag(key, b"probe", nonce)):
        return None
    return MAGIC + nonce + _tag(key, b"answer", nonce)


class ProbeResponder:
    """Answers authenticated probes on ``address:port`` (the node's service address)."""

    def __init__(self, key: bytes, address: str, port: int):
        self.key = key
        self.address = address
        self.port = port
        self.answered = 0
        self.rejected = 0
        self._sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)  # bind before the address is up
        self._sock._sock.bind((address, port))

    async def serve(self) -> None:
        with self._sock:
            while True:
                data, peer = await self._sock.recvfrom(256)
                answer = probe_answer(self.key, data)
                if answer is None:
                    self.rejected += 1
                    log.debug("unauthenticated probe from %s:%d dropped", *peer)
                    continue
                self.answered += 1
                try:
                    await self._sock.sendto(answer, peer)
                except OSError:
                    pass


async def probe(key: bytes, source: str, target: str, port: int, timeout: float) -> bool:
    """True if the pairproxy process at ``target`` answers within ``timeout``.

    Sent from ``source`` (our service address), so it travels the service network. Tries twice
    within the timeout: one lost datagram must not declare a living peer dead.
    """
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock._sock.bind((source, 0))
        except OSError:
            pass  # the source address may be gone (being handed back): any source still tests the peer
        deadline = trio.current_time() + timeout
        for attempt in range(2):
            nonce = os.urandom(NONCE)
            want = MAGIC + nonce + _tag(key, b"answer", nonce)
            try:
                await sock.sendto(probe_request(key, nonce), (target, port))
            except OSError:
                return False
            attempt_end = min(deadline, trio.current_time() + timeout / 2) if attempt == 0 else deadline
            with trio.move_on_at(attempt_end):
                while True:
                    try:
                        data = await sock.recv(256)
                    except ConnectionRefusedError:
                        # ICMP port unreachable: the peer's kernel lives, but no pairproxy answers there
                        return False
                    if hmac.compare_digest(data, want):
                        return True
    return False
