"""The second witness of the failure detector: an authenticated UDP probe on the service network.

Why UDP to the peer's *service address* and not ARP: an ARP answer proves only that the peer's
kernel lives. When just the pairproxy process has died (its kernel still up and still holding the
address), ARP is answered but nobody serves the clients; the peer must take over then too. The UDP
probe is answered by the pairproxy process itself, over the service network (not the sync link), so

* sync link silent, probe answered   -> the peer serves; only the link is down; nobody takes over;
* sync link silent, probe unanswered -> the peer (process, kernel or network port) is gone;
* the peer answers, but its answer cannot be authenticated -> its process lives with another key
  (issue 9.1: a key rotation gone wrong): nobody takes over, the detector says ``misconfigured``.

What an answer proves (issue 8.2)
---------------------------------
Each datagram is ``MAGIC | kind (1 byte) | nonce (16) | tag (16)``, 41 bytes for every kind, so an
answer is never larger than what provoked it (no amplification).

* ``Q`` request from prober P to responder R: ``tag = HMAC(k(P->R), "Q" | nonce)``.
* ``A`` answer: the prober's fresh nonce echoed, ``tag = HMAC(k(R->P), "A" | nonce)``.
* ``U`` "I am R, but your request did not authenticate": the nonce echoed and
  ``tag = SHA-256("pairproxy probe name " | R)[:16]``: not a secret, it names the responder.

``k(X->Y) = HMAC(shared key, "pairproxy probe v2 " | len|X | len|Y)``: direction-bound and bound
to both names. So a's probe bounced off a's own responder (the relay of issue 8.2) does not
authenticate there (a expects ``k(b->a)``), and the ``U`` it provokes names a, not b: the prober
ignores it. A recorded answer is useless for a later probe (fresh nonce), and the prober takes
datagrams only from the peer's address and probe port.

What a ``U`` cannot prove: by definition the two nodes share no key then, so a ``U`` is exactly as
trustworthy as the network path: whoever sees the prober's nonce and can send from the peer's
address can make a dead peer look "alive but misconfigured" and so hold off a takeover. Such an
attacker can hold off the peer's clients anyway (ARP-spoof its address); an off-path attacker
cannot guess the nonce. Answering the prober's question "is the process alive?" correctly when
the keys differ (no split brain) is worth that.

Flood: the responder reads at most ``rate`` datagrams per second (a token bucket; beyond it the
kernel's small receive buffer drops them, which costs the event loop nothing), sends at most
``answer_rate`` ``A`` and ``unauthenticated_rate`` ``U`` answers per second, and checks the cheap
things (length, magic, kind) before computing an HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
from typing import Literal

import trio

from proxy.dataplane import IP_FREEBIND
from sync.heartbeat import TokenBucket  # one token bucket for both UDP responders

log = logging.getLogger("pairproxy.probe")

MAGIC = b"PPPROBE2"
NONCE = 16
TAG = 16
REQUEST, ANSWER, UNAUTHENTICATED = b"Q", b"A", b"U"
SIZE = len(MAGIC) + 1 + NONCE + TAG
KEY_LABEL = b"pairproxy probe v2 "
NAME_LABEL = b"pairproxy probe name "
RECEIVE_BUFFER = 32 * 1024

ProbeResult = Literal["answered", "unauthenticated", "silent"]


def _name(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("!I", len(raw)) + raw


def direction_key(key: bytes, sender: str, receiver: str) -> bytes:
    """The key of the probe direction ``sender -> receiver`` (requests use prober->responder)."""
    return hmac.new(key, KEY_LABEL + _name(sender) + _name(receiver), hashlib.sha256).digest()


def name_tag(name: str) -> bytes:
    """What a ``U`` answer carries: names the responder, proves nothing else."""
    return hashlib.sha256(NAME_LABEL + name.encode()).digest()[:TAG]


def _tag(key: bytes, kind: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, kind + nonce, hashlib.sha256).digest()[:TAG]


def probe_request(key: bytes, nonce: bytes, *, prober: str, responder: str) -> bytes:
    return MAGIC + REQUEST + nonce + _tag(direction_key(key, prober, responder), REQUEST, nonce)


def probe_answer(key: bytes, request: bytes, *, me: str, peer: str) -> bytes | None:
    """The ``A`` answer to ``peer``'s valid request to ``me``; None if it does not authenticate."""
    if len(request) != SIZE or not request.startswith(MAGIC + REQUEST):
        return None
    nonce = request[len(MAGIC) + 1:len(MAGIC) + 1 + NONCE]
    if not hmac.compare_digest(request[-TAG:], _tag(direction_key(key, peer, me), REQUEST, nonce)):
        return None
    return MAGIC + ANSWER + nonce + _tag(direction_key(key, me, peer), ANSWER, nonce)


def unauthenticated_answer(request: bytes, *, me: str) -> bytes | None:
    """The ``U`` answer to a well-formed request that did not authenticate; None if malformed."""
    if len(request) != SIZE or not request.startswith(MAGIC + REQUEST):
        return None
    return MAGIC + UNAUTHENTICATED + request[len(MAGIC) + 1:len(MAGIC) + 1 + NONCE] + name_tag(me)


def classify_answer(key: bytes, data: bytes, nonce: bytes, *, me: str, peer: str) -> ProbeResult | None:
    """What a datagram says about the probe with ``nonce`` that ``me`` sent to ``peer``.

    ``"answered"``: the peer's process, holding our key, answered this probe. ``"unauthenticated"``:
    a process calling itself ``peer`` answered this probe, but not with our key. None: not an answer
    to this probe from the peer (stale, forged, or a reflection of our own responder's ``U``).
    """
    if len(data) != SIZE or not data.startswith(MAGIC) or data[len(MAGIC) + 1:len(MAGIC) + 1 + NONCE] != nonce:
        return None
    kind, tag = data[len(MAGIC):len(MAGIC) + 1], data[-TAG:]
    if kind == ANSWER and hmac.compare_digest(tag, _tag(direction_key(key, peer, me), ANSWER, nonce)):
        return "answered"
    if kind == UNAUTHENTICATED and hmac.compare_digest(tag, name_tag(peer)):
        return "unauthenticated"
    return None


class ProbeResponder:
    """Answers probes from ``peer`` on ``address:port`` (this node ``me``'s service address).

    ``answered``: authenticated requests answered; ``unauthenticated``: well-formed requests that did
    not authenticate (answered with ``U`` within its rate); ``rejected``: everything not answered
    with ``A`` (malformed, unauthenticated, or over a rate); ``rate_limited``: answers not sent and
    pauses in reading because a rate was exceeded.
    """

    def __init__(self, key: bytes, address: str, port: int, *, me: str, peer: str,
                 rate: float = 2000.0, answer_rate: float = 1000.0, unauthenticated_rate: float = 20.0):
        self.key = key
        self.address = address
        self.port = port
        self.me, self.peer = me, peer
        self.answered = 0
        self.rejected = 0
        self.unauthenticated = 0
        self.unauthenticated_answered = 0
        self.rate_limited = 0
        self._reads = TokenBucket(rate, max(1.0, rate / 10))
        self._answers = TokenBucket(answer_rate, max(1.0, answer_rate / 10))
        self._unauthenticated_answers = TokenBucket(unauthenticated_rate, max(1.0, unauthenticated_rate / 4))
        self._sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)  # bind before the address is up
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)  # a flood drops in the kernel
        self._sock._sock.bind((address, port))

    def stats(self) -> dict[str, int]:
        """The responder's counters, for ``pairproxy status``."""
        return {"answered": self.answered, "rejected": self.rejected,
                "unauthenticated": self.unauthenticated, "unauthenticated_answered": self.unauthenticated_answered,
                "rate_limited": self.rate_limited}

    def answer(self, data: bytes, now: float) -> bytes | None:
        """What to send back for ``data`` received at ``now`` (None: nothing); counts it."""
        reply = probe_answer(self.key, data, me=self.me, peer=self.peer)
        if reply is not None:
            if self._answers.take(now):
                self.answered += 1
                return reply
            self.rate_limited += 1
            self.rejected += 1
            return None
        self.rejected += 1
        reply = unauthenticated_answer(data, me=self.me)
        if reply is None:
            return None
        self.unauthenticated += 1
        if self._unauthenticated_answers.take(now):
            self.unauthenticated_answered += 1
            return reply
        self.rate_limited += 1
        return None

    async def serve(self) -> None:
        with self._sock:
            while True:
                if not self._reads.take(trio.current_time()):
                    self.rate_limited += 1
                    await trio.sleep(self._reads.wait())  # meanwhile the kernel drops what does not fit
                    continue
                data, peer = await self._sock.recvfrom(SIZE + 1)
                reply = self.answer(data, trio.current_time())
                if reply is None:
                    log.debug("probe from %s:%d not answered", *peer)
                    continue
                try:
                    await self._sock.sendto(reply, peer)
                except OSError:
                    pass


async def probe(key: bytes, source: str, target: str, port: int, timeout: float, *,
                me: str, peer: str) -> ProbeResult:
    """Does the pairproxy process ``peer`` at ``target`` answer within ``timeout``?

    Sent from ``source`` (our service address), so it travels the service network. Tries twice
    within the timeout: one lost datagram must not declare a living peer dead. Only datagrams from
    ``target:port`` that echo this attempt's nonce count (see the module docstring).
    """
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock._sock.bind((source, 0))
        except OSError:
            pass  # the source address may be gone (being handed back): any source still tests the peer
        deadline = trio.current_time() + timeout
        for attempt in range(2):
            nonce = os.urandom(NONCE)
            try:
                await sock.sendto(probe_request(key, nonce, prober=me, responder=peer), (target, port))
            except OSError:
                return "silent"
            attempt_end = min(deadline, trio.current_time() + timeout / 2) if attempt == 0 else deadline
            with trio.move_on_at(attempt_end):
                while True:
                    try:
                        data, sender = await sock.recvfrom(SIZE + 1)
                    except ConnectionRefusedError:
                        # ICMP port unreachable: the peer's kernel lives, but no pairproxy answers there
                        return "silent"
                    if sender[:2] != (target, port):
                        continue
                    result = classify_answer(key, data, nonce, me=me, peer=peer)
                    if result is not None:
                        return result
    return "silent"
