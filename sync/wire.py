"""The sync link's wire format: authenticated, msgpack-framed messages, with no I/O.

Like h11, this module owns the bytes and nothing else: the caller owns the socket, the clock and
the decision what to do about a bad peer. One :class:`SyncSession` serves one TCP connection, so the
same code runs in :mod:`sync.link`, in a unit test, and on a captured byte stream.

Theory of operation
-------------------
1. Each side first sends a preamble: ``MAGIC`` (4 bytes, names the protocol and its version) and a
   fresh random 16-byte nonce. Nothing is sent before the peer's nonce is known, because the keys
   depend on it.
2. From the shared key, both node names and both nonces each direction gets its own key::

       key(sender -> receiver) = HMAC-SHA256(shared_key, LABEL + len|sender name + len|receiver name
                                             + sender's nonce + receiver's nonce)

   Fresh nonces make every connection's keys new, so a message recorded on an earlier connection
   fails authentication on this one. The direction is named by the nodes, not by which nonce sorts
   lower (as in wire version 1), so a frame sealed by ``a`` verifies only at ``b``, on the connection
   whose nonces it was sealed with: not reflected back to ``a``, and not on a second connection
   between the two even if an attacker arranges the nonces swapped (issue 8.3; the hello's name
   check used to be the only thing that stopped it). Equal nonces (a peer echoing ours) are refused.
3. A frame is ``u32 length | u64 seq | 32-byte MAC | msgpack(message)``, where
   ``MAC = HMAC-SHA256(direction key, u64 seq | msgpack bytes)``. ``seq`` starts at 0 and goes up
   by exactly 1 per message, so a replayed, dropped or reordered message within the connection is
   caught after its MAC verified (kind ``"out_of_sequence"``; "replay" names the offline tool only).
4. The MAC is checked before msgpack touches the bytes: unauthenticated input is never parsed.

Why the length prefix and not a streaming ``msgpack.Unpacker``: the frame size is known before the
bytes arrive, so an oversize frame is refused without buffering it, and the MAC covers exact bytes.

Errors: bad input from the peer is an event (:class:`Rejected`), never an exception, and is counted
in :attr:`SyncSession.counters`. Only when the framing itself is lost (bad preamble, an impossible
length) is the session marked ``broken``: the stream can no longer be cut into frames, so the caller
must drop the connection and reconnect. A call of :meth:`SyncSession.receive_data` that breaks the
session returns *only* its :class:`Rejected` events: a :class:`Ready` or a :class:`Message` cut from
the same bytes (``MAGIC`` + nonce + an impossible length in one TCP segment) would invite the caller
to answer (seal a hello) on a session that is already broken, so the events of a broken call are
never handed out; the connection is dropped anyway, and delivery is at most once. A bad MAC or a bad message inside an intact frame is skipped
and the stream goes on. Misuse by the caller (sealing before the handshake, a message without
``"type"``) raises :class:`LocalProtocolError`: that is a bug on our side, not the peer's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgpack

MAGIC = b"PPS\x02"  # "pairproxy sync", wire version 2 (direction keys bound to the node names)
NONCE_SIZE = 16
MIN_KEY_SIZE = 16
MAX_FRAME = 1024 * 1024  # bytes after the length prefix
KEY_LABEL = b"pairproxy sync v2 "
KEY_MISMATCH_HINT = ("authentication failed (different key_file on the two nodes? or this node's [peer] name "
                     "is not the other node's [node] name: both are part of the keys)")

_LENGTH = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
_MAC_SIZE = hashlib.sha256().digest_size
_HEADER_SIZE = _SEQ.size + _MAC_SIZE

RejectKind = Literal["auth", "parse", "out_of_sequence", "too_large"]


class LocalProtocolError(Exception):
    """Our own code used the session wrongly (a bug here, not bad input from the peer)."""


@dataclass(frozen=True)
class Ready:
    """The peer's preamble arrived; :meth:`SyncSession.seal` works from now on."""


@dataclass(frozen=True)
class Message:
    """An authenticated message in sequence. ``body`` is the whole message dict, ``"type"`` included."""

    type: str
    body: dict


@dataclass(frozen=True)
class Rejected:
    """Input from the peer that was refused. If ``broken``, drop the connection: framing is lost."""

    reason: str
    kind: RejectKind
    broken: bool = False


Event = Ready | Message | Rejected


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    return _LENGTH.pack(len(raw)) + raw  # length-prefixed: ("ab", "c") and ("a", "bc") differ


def _direction_key(shared_key: bytes, sender: str, receiver: str, sender_nonce: bytes,
                   receiver_nonce: bytes) -> bytes:
    """The key of the direction ``sender -> receiver`` on the connection with these nonces."""
    info = KEY_LABEL + _name_bytes(sender) + _name_bytes(receiver) + sender_nonce + receiver_nonce
    return hmac.new(shared_key, info, hashlib.sha256).digest()


def _mac(key: bytes, seq: int, payload: bytes) -> bytes:
    return hmac.new(key, _SEQ.pack(seq) + payload, hashlib.sha256).digest()


class SyncSession:
    """The protocol state of one sync-link connection (either side: the protocol is symmetric).

    ``me`` and ``peer`` are the two nodes' names (``[node] name`` and ``[peer] name``); they are part
    of the direction keys, so both ends must agree on them.

    Use: send :meth:`initial_bytes` first; feed everything received to :meth:`receive_data` and act
    on the events; once :class:`Ready` was seen, :meth:`seal` messages and send the bytes in the
    order they were sealed.
    """

    def __init__(self, key: bytes, *, me: str, peer: str, nonce: bytes | None = None, max_frame: int = MAX_FRAME):
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(f"sync key must have at least {MIN_KEY_SIZE} bytes, got {len(key)}")
        if me == peer:
            raise ValueError(f"the two ends need different names, both are {me!r}")
        self._key = key
        self.me, self.peer = me, peer
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must have {NONCE_SIZE} bytes")
        self.max_frame = max_frame
        self.peer_nonce: bytes | None = None
        self.broken = False
        self.counters: dict[str, int] = {
            "messages_in": 0, "messages_out": 0,
            "rejected_auth": 0, "rejected_parse": 0, "rejected_out_of_sequence": 0, "rejected_too_large": 0,
        }
        self._buffer = bytearray()
        self._send_key: bytes | None = None
        self._receive_key: bytes | None = None
        self._send_seq = 0
        self._receive_seq = 0
        self._any_authenticated = False

    @property
    def ready(self) -> bool:
        """True once both nonces are known (the keys exist)."""
        return self._send_key is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet cut into frames (bounded by ``max_frame`` plus one chunk)."""
        return len(self._buffer)

    def initial_bytes(self) -> bytes:
        """The preamble: send it before anything else."""
        return MAGIC + self.nonce

    def seal(self, message: dict[str, Any]) -> bytes:
        """Frame and authenticate one message; the next sequence number is used up."""
        if self._send_key is None:
            raise LocalProtocolError("cannot seal before the peer's preamble arrived (wait for Ready)")
        if self.broken:
            raise LocalProtocolError("session is broken; open a new connection")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise LocalProtocolError(f'a message must be a dict with a "type" string: {message!r}')
        try:
            payload = msgpack.packb(message, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"message cannot be encoded: {exc}") from None
        if _HEADER_SIZE + len(payload) > self.max_frame:
            raise LocalProtocolError(f"message of {len(payload)} bytes exceeds the frame limit {self.max_frame}")
        seq = self._send_seq
        self._send_seq += 1
        self.counters["messages_out"] += 1
        frame = _SEQ.pack(seq) + _mac(self._send_key, seq, payload) + payload
        return _LENGTH.pack(len(frame)) + frame

    def receive_data(self, data: bytes) -> list[Event]:
        """Consume bytes from the peer; return what they meant. After ``broken``, input is ignored."""
        if self.broken:
            return []
        self._buffer += data
        events: list[Event] = []
        if self.peer_nonce is None:
            preamble = self._take_preamble()
            if preamble is None or self.broken:
                return preamble or []
            events += preamble
        while not self.broken:
            event = self._take_frame()
            if event is None:
                break
            events.append(event)
        if self.broken:  # never invite an answer on a broken session (see the module docstring)
            return [e for e in events if isinstance(e, Rejected)]
        return events

    # -- internals ---------------------------------------------------------------------------

    def _reject(self, reason: str, kind: RejectKind, *, broken: bool = False) -> Rejected:
        self.counters[f"rejected_{kind}"] += 1
        if broken:
            self.broken = True
            self._buffer.clear()
            reason += "; stream lost, reconnect"
        return Rejected(reason, kind, broken)

    def _take_preamble(self) -> list[Event] | None:
        size = len(MAGIC) + NONCE_SIZE
        if self._buffer[:len(MAGIC)] != MAGIC[:len(self._buffer)]:
            return [self._reject(f"bad preamble {bytes(self._buffer[:len(MAGIC)])!r}: not a pairproxy sync peer "
                                 "(or another wire version)", "parse", broken=True)]
        if len(self._buffer) < size:
            return None
        peer_nonce = bytes(self._buffer[len(MAGIC):size])
        del self._buffer[:size]
        if peer_nonce == self.nonce:
            return [self._reject("peer echoed our nonce (reflection?)", "auth", broken=True)]
        self.peer_nonce = peer_nonce
        self._send_key = _direction_key(self._key, self.me, self.peer, self.nonce, peer_nonce)
        self._receive_key = _direction_key(self._key, self.peer, self.me, peer_nonce, self.nonce)
        return [Ready()]

    def _take_frame(self) -> Event | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > self.max_frame:
            return self._reject(f"frame of {length} bytes exceeds the limit {self.max_frame}", "too_large",
                                broken=True)
        if length < _HEADER_SIZE:
            return self._reject(f"frame of {length} bytes is shorter than its header", "parse", broken=True)
        if len(self._buffer) < _LENGTH.size + length:
            return None
        frame = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
        del self._buffer[:_LENGTH.size + length]
        return self._open(frame)

    def _open(self, frame: bytes) -> Event:
        (seq,) = _SEQ.unpack_from(frame)
        mac, payload = frame[_SEQ.size:_HEADER_SIZE], frame[_HEADER_SIZE:]
        assert self._receive_key is not None
        if not hmac.compare_digest(mac, _mac(self._receive_key, seq, payload)):
            if not self._any_authenticated:
                return self._reject(KEY_MISMATCH_HINT, "auth")
            return self._reject("authentication failed (forged or corrupted message)", "auth")
        self._any_authenticated = True
        if seq != self._receive_seq:
            what = "replayed" if seq < self._receive_seq else "out of order (messages lost?)"
            return self._reject(f"message seq {seq} {what}, expected {self._receive_seq}", "out_of_sequence")
        self._receive_seq += 1
        try:
            message = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types for bad input; none may escape
            return self._reject(f"message does not decode: {type(exc).__name__}: {exc}", "parse")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return self._reject(f'message is not a dict with a "type" string: {message!r:.80}', "parse")
        self.counters["messages_in"] += 1
        return Message(message["type"], message)


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read the shared secret from ``key_file``: the file's bytes without surrounding whitespace.

    Raises ValueError with the path when the file is missing, unreadable, or holds less than
    ``MIN_KEY_SIZE`` bytes, because a short key would make the authentication worthless. Check
    :func:`key_permission_problem` separately (`check` and `run` refuse a key open to group or others).
    """
    path = Path(path)
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise ValueError(f"key_file {path}: does not exist (create it with e.g. "
                         f"`head -c 32 /dev/urandom | base64 > {path}`, the same file on both nodes)") from None
    except OSError as exc:
        raise ValueError(f"key_file {path}: cannot read: {exc.strerror}") from None
    if len(secret) < MIN_KEY_SIZE:
        raise ValueError(f"key_file {path}: holds {len(secret)} bytes of secret, needs at least {MIN_KEY_SIZE}")
    return secret


def key_permission_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the key file is open to others than its owner (mode 600 or 400 is right), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # load_key reports missing files
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"key_file {path}: open to group or others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
    return None
