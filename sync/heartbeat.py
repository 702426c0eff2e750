"""Heartbeat datagrams on two paths, and what they say about the peer: pure code (bytes and times in).

Why datagrams, off the event loop (issue 12): the sync link's heartbeats were sent and checked by the
node's trio loop, which also runs the pumps, status and garbage collection; a loop busy for 40 ms
looked like a dead peer. The heartbeat process (:mod:`proxy.heartbeat`) runs this code alone, at
real-time priority where allowed, and reports *facts* to the node; the decisions stay in
:mod:`sync.detector` and :mod:`proxy.roles`. This module has no sockets and no clock: every input
carries ``now`` (seconds, any monotonic clock), so tests drive it with plain numbers.

Two paths, always both: ``sync`` (the sync network, sync addresses) and ``service`` (the service
network, service addresses), the same port on each. The peer is silent when neither path brought a
*fresh* heartbeat for ``dead_after``; silent on the sync path alone it lives (``link_down``).

What a heartbeat proves (the issue 8 guarantees, kept)
------------------------------------------------------
A datagram is ``MAGIC | path (1) | sender tag (8) | nonce (8) | echo (8) | echo_any (8) | seq (8) |
tag (16)``, 62 bytes. ``tag = HMAC(k, everything before)[:16]`` with

    k(path, X->Y) = HMAC(shared key, "pairproxy heartbeat v1 " | path | len|X | len|Y | len|mode)

so it is bound to the direction, the path, both names and the pair's mode. ``nonce`` is fresh random
per datagram; ``echo`` is the nonce of the last heartbeat the sender received *and authenticated*
from us on this path, ``echo_any`` that of the last well-formed one naming us, authenticated or not. A heartbeat counts
as the peer's life only if it authenticates *and* echoes one of our nonces sent within ``fresh_for``
(default ``dead_after``) before it arrived. So:

* a recorded heartbeat replayed later echoes an old nonce: no life (replay-safe);
* our own heartbeat reflected back carries our sender tag and our direction's key: rejected;
* a heartbeat relayed from one path to the other fails the path-bound key;
* a relay that *delays* the peer's last datagrams can postpone the verdict by at most ``fresh_for``,
  never keep a dead peer alive: after the peer's death no datagram echoes a newer nonce.

A well-formed datagram naming the peer, from the peer's address, whose ``echo_any`` is a fresh nonce
of ours, that does *not* authenticate is ``unauthenticated``: the peer's process lives but holds
another key or mode (issue 9.1: misconfigured, not dead). Requiring the fresh echo means an off-path
host that merely spoofs the peer's address cannot fake it (it never saw our nonce). Two echo fields,
because a forged datagram must never change ``echo``: we would then echo garbage, and the living peer
would find our heartbeats stale.

``seq`` (per sender, from 1) orders the peer's datagrams: while the path is up, an authenticated
datagram with an old ``seq`` (a duplicate, or a recorded one replayed) is counted and ignored, so a
replay cannot change the nonce we echo. A lower ``seq`` is a
restarted peer while the path is down, or when it echoes a nonce of ours newer than the one the peer's
latest datagram echoed (no earlier datagram of one process can: see ``received``), so a peer that
restarts within ``dead_after`` is heard at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Path = Literal["sync", "service"]
PATHS: tuple[Path, ...] = ("sync", "service")
PATH_BYTE: dict[str, bytes] = {"sync": b"S", "service": b"V"}

MAGIC = b"PPHB1"
_BODY = struct.Struct("!5sc8s8s8s8sQ")
TAG = 16
SIZE = _BODY.size + TAG
KEY_LABEL = b"pairproxy heartbeat v1 "
NAME_LABEL = b"pairproxy heartbeat name "
STALLS_KEPT = 256  # our own recent stalls (see HeartbeatMonitor.own_stall)
NONCES_KEPT = 256  # our recent nonces per path (at 10 ms, 2.5 s: far more than any fresh_for)
GAPS_KEPT = 6000   # gaps kept per path for the percentiles (one minute at 10 ms)


def _len(raw: bytes) -> bytes:
    return struct.pack("!I", len(raw)) + raw


def path_key(key: bytes, path: str, sender: str, receiver: str, mode: str) -> bytes:
    """The key of heartbeats on ``path`` from ``sender`` to ``receiver`` in a pair of ``mode``."""
    return hmac.new(key, KEY_LABEL + PATH_BYTE[path] + _len(sender.encode()) + _len(receiver.encode())
                    + _len(mode.encode()), hashlib.sha256).digest()


def sender_tag(name: str) -> bytes:
    """Names the sender in clear (not a secret): lets a receiver tell the peer from a reflection of itself."""
    return hashlib.sha256(NAME_LABEL + name.encode()).digest()[:8]


def seal(key: bytes, path: str, sender: str, nonce: bytes, echo: bytes, seq: int,
         echo_any: bytes = bytes(8)) -> bytes:
    """One heartbeat datagram (``key`` is :func:`path_key` of this path and direction)."""
    body = _BODY.pack(MAGIC, PATH_BYTE[path], sender_tag(sender), nonce, echo, echo_any, seq)
    return body + hmac.new(key, body, hashlib.sha256).digest()[:TAG]


def percentiles(values: "list[float] | deque[float]") -> dict[str, float] | None:
    """p50/p99/max and count of ``values`` (None if empty)."""
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return {"p50": s[(n - 1) // 2], "p99": s[min(n - 1, int(n * 0.99))], "max": s[-1], "count": n}


@dataclass
class TokenBucket:
    """At most ``rate`` per second on average, ``burst`` at once. Pure: the caller passes ``now``."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    _last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        if self._last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token (0 if one is there)."""
        return max(0.0, (1 - self.tokens) / self.rate)


@dataclass
class PathState:
    """One path's view of the peer: when it was last heard, and the gaps between heartbeats."""

    heard_at: float | None = None
    up: bool = False                 # a fresh heartbeat within dead_after
    received: int = 0                # fresh, authenticated heartbeats
    stale: int = 0                   # authenticated, but echoing no fresh nonce of ours (start-up, replay)
    old_seq: int = 0                 # authenticated, but a sequence number already seen
    rejected: int = 0                # malformed, from elsewhere, reflected, or not authenticated
    unauthenticated: int = 0         # the peer's process with another key/mode (see the module docstring)
    sent: int = 0
    send_errors: int = 0
    last_send_error: str | None = None
    gaps: deque = field(default_factory=lambda: deque(maxlen=GAPS_KEPT))
    max_gap: float = 0.0             # since start (the deque keeps the last minute)
    peer_nonce: bytes = bytes(8)     # echoed in our next heartbeat on this path
    any_nonce: bytes = bytes(8)      # echoed as echo_any (authenticated or not)
    peer_seq: int = -1
    #: the seq of the peer's latest *fresh* heartbeat: a fresh one with a lower seq is a new process (a
    #: replayed old datagram is never fresh, so it cannot fake a restart)
    fresh_seq: int = -1
    echo_sent: float = -1e18         # when we sent the nonce the peer's latest fresh heartbeat echoed
    mine: dict = field(default_factory=dict)  # our recent nonces -> when sent
    order: deque = field(default_factory=lambda: deque(maxlen=NONCES_KEPT))


@dataclass(frozen=True)
class Fact:
    """What the monitor tells the node. ``kind``:

    ``path_up`` / ``path_silent``: one path got its first fresh heartbeat / was silent ``dead_after``;
    ``quiet``: both paths silent ``dead_after / 2`` (time to prepare a takeover);
    ``silent``: both paths silent ``dead_after`` (the fact a death verdict rests on);
    ``heard``: a fresh heartbeat after ``quiet`` or ``silent``;
    ``unauthenticated``: the peer's process answers with another key or mode (rate-limited);
    ``restarted``: a fresh heartbeat from a new process of the peer (its sequence started again),
    told before the ``path_up`` or ``heard`` it comes with: what the peer's old process said (the
    addresses it served) no longer holds.
    ``at``: when it became true; ``last_heard``: the last fresh heartbeat on any path (None: never).
    """

    kind: Literal["path_up", "path_silent", "quiet", "silent", "heard", "unauthenticated", "restarted"]
    at: float
    path: str | None = None
    last_heard: float | None = None


class HeartbeatMonitor:
    """Builds our heartbeats and judges the peer's, per path; see the module docstring.

    ``peers`` maps each path to the peer's address on it: datagrams from anywhere else are rejected
    (the heartbeat process also filters them in the kernel).
    """

    def __init__(self, key: bytes, *, me: str, peer: str, mode: str, heartbeat: float, dead_after: float,
                 now: float, fresh_for: float | None = None, unauthenticated_every: float = 0.5):
        if not 0 < heartbeat < dead_after:
            raise ValueError("need 0 < heartbeat < dead_after")
        self.me, self.peer = me, peer
        self.heartbeat, self.dead_after = heartbeat, dead_after
        self.fresh_for = dead_after if fresh_for is None else fresh_for
        self.unauthenticated_every = unauthenticated_every
        self._out = {p: path_key(key, p, me, peer, mode) for p in PATHS}
        self._in = {p: path_key(key, p, peer, me, mode) for p in PATHS}
        self._peer_tag = sender_tag(peer)
        self.paths: dict[str, PathState] = {p: PathState() for p in PATHS}
        self.started = now
        self._stalls: deque = deque(maxlen=STALLS_KEPT)  # (start, end) of our own stalls (see own_stall)
        self._seq = 0
        self._quiet = False     # "quiet" reported for this silence
        self._silent = False    # "silent" reported for this silence
        self._unauth_at = -1e18
        self.facts: list[Fact] = []  # filled by the inputs, taken with take_facts()

    # -- inputs ----------------------------------------------------------------------------------
    def outgoing(self, path: str, now: float, nonce: bytes | None = None) -> bytes:
        """Our next heartbeat on ``path`` (remembers its nonce as sent at ``now``)."""
        st = self.paths[path]
        nonce = os.urandom(8) if nonce is None else nonce
        if len(st.order) == st.order.maxlen:
            st.mine.pop(st.order[0], None)
        st.order.append(nonce)
        st.mine[nonce] = now
        self._seq += 1
        st.sent += 1
        return seal(self._out[path], path, self.me, nonce, st.peer_nonce, self._seq, st.any_nonce)

    def received(self, path: str, data: bytes, now: float) -> bool:
        """A datagram arrived on ``path`` from the peer's address at ``now``; True if it proves life."""
        st = self.paths[path]
        if len(data) != SIZE or not data.startswith(MAGIC):
            st.rejected += 1
            return False
        _, path_byte, tag, nonce, echo, echo_any, seq = _BODY.unpack_from(data)
        if path_byte != PATH_BYTE[path] or tag != self._peer_tag:  # another path, or ourselves reflected
            st.rejected += 1
            return False
        st.any_nonce = nonce
        if not hmac.compare_digest(data[-TAG:], hmac.new(self._in[path], data[:-TAG], hashlib.sha256).digest()[:TAG]):
            st.rejected += 1
            if self._fresh(st, echo_any, now):
                st.unauthenticated += 1
                if now - self._unauth_at >= self.unauthenticated_every:
                    self._unauth_at = now
                    self.facts.append(Fact("unauthenticated", now, path, self.last_heard()))
            return False
        echo_sent = st.mine.get(echo)
        restarted = echo_sent is not None and echo_sent > st.echo_sent and self._fresh(st, echo, now)
        if seq <= st.peer_seq and st.up and not restarted:
            # a duplicate or a replay while the peer talks: ignored (a replay must not change our echo,
            # or replayed datagrams would make our heartbeats look stale to the living peer)
            st.old_seq += 1
            return False
        # A lower seq is a restarted peer (its seq starts again at 1) when the path is down, or when it
        # echoes a nonce of ours sent after the one the peer's latest datagram echoed: the peer echoes
        # the latest of ours it took, so no earlier datagram of the same process can (a replay cannot).
        # Without this, a peer restarted within dead_after would be ignored until the path fell silent,
        # and it would see this node's heartbeats as stale (echoing its old process's nonce) meanwhile.
        fresh = self._fresh(st, echo, now)
        # A stale one too (not proof of life): echoing the peer's newest nonce is what lets its next
        # heartbeat be fresh. Ignoring stale ones while the path is up made both sides echo old nonces
        # to each other after one delay, each finding the other stale until the path fell silent.
        st.peer_seq, st.peer_nonce = seq, nonce
        if not fresh:
            st.stale += 1
            return False
        st.echo_sent = echo_sent
        st.received += 1
        new_process, st.fresh_seq = seq < st.fresh_seq, seq
        if new_process:
            self.facts.append(Fact("restarted", now, path, now))
        if st.heard_at is not None and now >= st.heard_at:
            gap = now - st.heard_at
            st.gaps.append(gap)
            st.max_gap = max(st.max_gap, gap)
        was_silent = self._quiet or self._silent
        st.heard_at = now
        if not st.up:
            st.up = True
            self.facts.append(Fact("path_up", now, path, now))
        if was_silent:
            self._quiet = self._silent = False
            self.facts.append(Fact("heard", now, path, now))
        return True

    def _fresh(self, st: PathState, echo: bytes, now: float) -> bool:
        """Does ``echo`` prove the datagram was made after we sent that nonce, recently?

        Our *latest* nonce always counts, however old: if we ourselves stalled (sent nothing for a
        while), the peer's answer to our last heartbeat is as fresh as an answer can be, and only the
        peer's process can make it (a replay of an earlier datagram echoes an earlier nonce, or has a
        sequence number already seen)."""
        sent = st.mine.get(echo)
        if sent is None:
            return False
        return (0 <= now - sent - self.excused(sent, now) <= self.fresh_for) or (bool(st.order) and echo == st.order[-1])

    def own_stall(self, start: float, end: float) -> None:
        """The process did not run from ``start`` to ``end`` (it woke that late). That time is not the
        peer's silence: we could not hear it. Where the peer shares the CPU (the lab's two nodes on one
        VM, a host that stops both), it did not run either, and after the stall both send at once: the
        silence must be counted over time we ran, or every stall of the machine longer than dead_after is
        a takeover (bench/FAILOVER.md, 2026-11-28: the heartbeat process itself 300-400 ms late on both
        nodes at once, SCHED_FIFO notwithstanding). Costs a real death at most the stall's length."""
        if end > start:
            self._stalls.append((start, end))

    def excused(self, since: float, now: float) -> float:
        """Seconds of our own stalls between ``since`` and ``now``."""
        total = 0.0
        for start, end in reversed(self._stalls):
            if end <= since:
                break
            total += max(0.0, min(end, now) - max(start, since))
        return total

    def send_failed(self, path: str, error: str) -> None:
        st = self.paths[path]
        st.send_errors += 1
        st.last_send_error = error

    def tick(self, now: float) -> None:
        """Let time pass: report paths and the peer falling silent."""
        for path, st in self.paths.items():
            excused = self.excused(st.heard_at, now) if st.up else 0.0
            if st.up and now - st.heard_at - excused >= self.dead_after:
                st.up = False
                self.facts.append(Fact("path_silent", min(now, st.heard_at + excused + self.dead_after), path,
                                       self.last_heard()))
        silent = self.silent_for(now)
        if not self._quiet and silent >= self.dead_after / 2:
            self._quiet = True
            self.facts.append(Fact("quiet", now, None, self.last_heard()))
        if not self._silent and silent >= self.dead_after:
            self._silent = True
            self.facts.append(Fact("silent", now, None, self.last_heard()))

    # -- queries ---------------------------------------------------------------------------------
    def take_facts(self) -> list[Fact]:
        facts, self.facts = self.facts, []
        return facts

    def last_heard(self) -> float | None:
        heard = [st.heard_at for st in self.paths.values() if st.heard_at is not None]
        return max(heard) if heard else None

    def silent_for(self, now: float) -> float:
        """Seconds since a fresh heartbeat on any path (since start, before the first), less our own
        stalls (:meth:`own_stall`): the silence we were there to hear."""
        last = self.last_heard()
        base = self.started if last is None else last
        return max(0.0, now - base - self.excused(base, now))

    def next_deadline(self, now: float) -> float:
        """The next time :meth:`tick` may have something to report (for the process's poll timeout)."""
        times = [st.heard_at + self.excused(st.heard_at, now) + self.dead_after for st in self.paths.values() if st.up]
        base = self.started if self.last_heard() is None else self.last_heard()
        base += self.excused(base, now)
        if not self._quiet:
            times.append(base + self.dead_after / 2)
        if not self._silent:
            times.append(base + self.dead_after)
        return min(times) if times else now + 3600.0

    def stats(self, now: float) -> dict:
        """Per path: state, counters, gaps and jitter (|gap - heartbeat|) in milliseconds; JSON-able."""
        out = {}
        for path, st in self.paths.items():
            gaps = [g * 1000 for g in st.gaps]
            out[path] = {
                "up": st.up, "silent_for_ms": None if st.heard_at is None else round((now - st.heard_at) * 1000, 3),
                "received": st.received, "sent": st.sent, "send_errors": st.send_errors,
                "last_send_error": st.last_send_error, "rejected": st.rejected, "stale": st.stale,
                "old_seq": st.old_seq, "unauthenticated": st.unauthenticated,
                "gap_ms": _rounded(percentiles(gaps)), "max_gap_ever_ms": round(st.max_gap * 1000, 3),
                "jitter_ms": _rounded(percentiles([abs(g - self.heartbeat * 1000) for g in gaps])),
            }
        return out


def _rounded(p: dict | None) -> dict | None:
    return None if p is None else {k: (round(v, 3) if k != "count" else v) for k, v in p.items()}


#: ``pairproxy check`` warns when a path's largest gap was this share of dead_after or more
TIGHT_SHARE = 0.75


def jitter_warning(dead_after: float, measured: dict) -> str | None:
    """Is ``dead_after`` too tight for the gaps the heartbeat process measured (``measured``: what the
    node saves as ``heartbeat-jitter.json``)? A warning naming the key and what to set, or None.

    Both paths must be silent at once for a takeover, so the path with the *smaller* worst gap is what
    a false verdict needs; the warning still names the worst path, as the cause to look at."""
    paths = {p: v for p, v in (measured.get("paths") or {}).items() if isinstance(v, dict)}
    worst = {p: float(v.get("max_gap_ever_ms") or 0.0) for p, v in paths.items()}
    if not worst:
        return None
    both = min(worst.values())
    path, gap = max(worst.items(), key=lambda kv: kv[1])
    limit = dead_after * 1000 * TIGHT_SHARE
    if gap < limit:
        return None
    p99 = ((paths[path].get("gap_ms") or {}).get("p99"))
    suggest = max(gap, both) / TIGHT_SHARE
    return (f"pair.dead_after: {dead_after * 1000:g}ms is tight for the heartbeat gaps measured "
            f"{measured.get('at', 'in the last run')}: up to {gap:.1f} ms on the {path} path"
            + (f" (p99 {p99:.1f} ms)" if p99 is not None else "")
            + f", {both:.1f} ms on both; a gap of dead_after on both paths is a false takeover: set dead_after "
              f"to at least {suggest:.0f}ms, or find what delays the heartbeats (status: heartbeat)")
