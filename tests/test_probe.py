"""proxy.probe: what a probe answer proves (issue 8.2, 9.1), on loopback with real sockets."""

import os
import socket
import subprocess
import sys
import time

import pytest
import trio

from proxy.probe import (SIZE, ProbeResponder, TokenBucket, classify_answer, probe, probe_answer, probe_request,
                         unauthenticated_answer)

KEY = b"the pair's shared key, 32 bytes"
OTHER = b"another key of at least 16 bytes"


def free_udp_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def responder(name, peer, key=KEY, host="127.0.0.1", **kw):
    return ProbeResponder(key, host, free_udp_port(host), me=name, peer=peer, **kw)


# -- pure functions -------------------------------------------------------------------------------

def test_answers_are_bound_to_direction_names_and_nonce():
    nonce = os.urandom(16)
    request = probe_request(KEY, nonce, prober="a", responder="b")
    answer = probe_answer(KEY, request, me="b", peer="a")
    assert len(request) == len(answer) == SIZE  # never larger than the request: no amplification
    assert classify_answer(KEY, answer, nonce, me="a", peer="b") == "answered"
    # a's own responder does not authenticate a's request to b (the relay of issue 8.2) ...
    assert probe_answer(KEY, request, me="a", peer="b") is None
    # ... and the U it sends names a, which a's prober does not take for b
    assert classify_answer(KEY, unauthenticated_answer(request, me="a"), nonce, me="a", peer="b") is None
    # b's answer is not an answer to another probe, nor an answer to b's own probe of a
    assert classify_answer(KEY, answer, os.urandom(16), me="a", peer="b") is None
    assert classify_answer(KEY, answer, nonce, me="b", peer="a") is None
    # a request bounced back to the prober is not an answer
    assert classify_answer(KEY, request, nonce, me="a", peer="b") is None
    # a third node with the key cannot answer for b
    assert classify_answer(KEY, probe_answer(KEY, probe_request(KEY, nonce, prober="a", responder="c"),
                                             me="c", peer="a"), nonce, me="a", peer="b") is None


def test_a_peer_with_another_key_is_recognised_as_unauthenticated():
    nonce = os.urandom(16)
    request = probe_request(KEY, nonce, prober="a", responder="b")
    assert probe_answer(OTHER, request, me="b", peer="a") is None
    u = unauthenticated_answer(request, me="b")
    assert classify_answer(KEY, u, nonce, me="a", peer="b") == "unauthenticated"
    assert unauthenticated_answer(b"garbage", me="b") is None


def test_token_bucket():
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False and bucket.take(0.1) is True
    assert sum(bucket.take(1.0 + i / 1000) for i in range(1000)) <= 3 + 10 + 1


# -- on sockets -----------------------------------------------------------------------------------

async def test_probe_answered_by_the_peer(nursery):
    b = responder("b", "a")
    nursery.start_soon(b.serve)
    assert await probe(KEY, "127.0.0.1", "127.0.0.1", b.port, 0.5, me="a", peer="b") == "answered"
    assert b.answered >= 1


async def test_relay_of_a_probe_off_the_probers_own_responder_fails(nursery):
    """Issue 8.2: b is dead; an attacker at b's address bounces a's probe off a's own responder and
    hands the answer back (from b's address). a must not see b alive (nor alive-misconfigured)."""
    a = responder("a", "b")
    nursery.start_soon(a.serve)
    relay = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await relay.bind(("127.0.0.2", 0))  # "b's address"
    relayed = []

    async def bounce():
        prober = None
        while True:
            data, sender = await relay.recvfrom(256)
            if sender[:2] == ("127.0.0.1", a.port):
                relayed.append(data)
                await relay.sendto(data, prober)  # a's responder's answer, back to a's prober
            else:
                prober = sender
                await relay.sendto(data, ("127.0.0.1", a.port))

    async with trio.open_nursery() as inner:
        inner.start_soon(bounce)
        result = await probe(KEY, "127.0.0.1", "127.0.0.2", relay.getsockname()[1], 0.4, me="a", peer="b")
        inner.cancel_scope.cancel()
    assert result == "silent"
    assert relayed, "the relay got answers from a's responder (U naming a), which a's prober refused"
    assert a.answered == 0 and a.unauthenticated >= 1
    relay.close()


async def test_answer_from_another_address_is_ignored(nursery):
    """A correct answer that does not come from the peer's address and probe port is not an answer."""
    target = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await target.bind(("127.0.0.1", 0))
    elsewhere = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await elsewhere.bind(("127.0.0.1", 0))

    async def answer_from_elsewhere():
        data, sender = await target.recvfrom(256)
        await elsewhere.sendto(probe_answer(KEY, data, me="b", peer="a"), sender)

    nursery.start_soon(answer_from_elsewhere)
    assert await probe(KEY, "127.0.0.1", "127.0.0.1", target.getsockname()[1], 0.3, me="a", peer="b") == "silent"
    target.close()
    elsewhere.close()


async def test_peer_with_a_different_key_answers_unauthenticated(nursery):
    b = responder("b", "a", key=OTHER)
    nursery.start_soon(b.serve)
    assert await probe(KEY, "127.0.0.1", "127.0.0.1", b.port, 0.5, me="a", peer="b") == "unauthenticated"
    assert b.answered == 0 and b.unauthenticated >= 1 and b.stats()["unauthenticated_answered"] >= 1


async def test_nobody_there_is_silent():
    assert await probe(KEY, "127.0.0.1", "127.0.0.1", free_udp_port(), 0.2, me="a", peer="b") == "silent"


FLOOD = """
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
port, seconds = int(sys.argv[1]), float(sys.argv[2])
req = b"PPPROBE2Q" + os.urandom(32)  # well-formed, never authenticates: the most work for the responder
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for _ in range(100):
        try:
            s.sendto(req if n % 2 else os.urandom(41), ("127.0.0.1", port)); n += 1
        except BlockingIOError:
            pass
print(n)
"""


async def test_a_flood_costs_the_event_loop_little_and_the_peer_is_still_answered(nursery):
    b = responder("b", "a", rate=2000)
    nursery.start_soon(b.serve)
    lateness = []

    async def ticker():
        while True:
            t = trio.current_time()
            await trio.sleep(0.002)
            lateness.append(trio.current_time() - t - 0.002)

    nursery.start_soon(ticker)
    seconds = 1.5
    start, cpu_start = trio.current_time(), time.process_time()
    flood = await trio.run_process([sys.executable, "-c", FLOOD, str(b.port), str(seconds)],
                                   capture_stdout=True)
    elapsed, cpu = trio.current_time() - start, time.process_time() - cpu_start
    sent = int(flood.stdout)
    handled = b.answered + b.rejected
    print(f"flood: sent {sent} in {elapsed:.2f} s, handled {handled}, U answers {b.unauthenticated_answered}, "
          f"this process used {cpu / elapsed:.0%} of a core, max loop lateness {max(lateness) * 1000:.1f} ms")
    assert handled <= 2000 * elapsed + 200 + 10 and handled < sent, (sent, handled)
    assert b.unauthenticated_answered <= 20 * elapsed + 5 + 1  # U answers are rate-limited too
    # what the flood costs this process (responder, ticker, test) is bounded by the rate, not by the
    # flood: CPU time, not wall-clock lateness, so that a loaded test machine does not decide it
    assert cpu / elapsed < 0.5, (cpu, elapsed)
    if sent > 3 * (2000 * elapsed + 200):
        assert b.rate_limited > 0
    # after the flood the peer's probe is answered at once
    assert await probe(KEY, "127.0.0.1", "127.0.0.1", b.port, 0.5, me="a", peer="b") == "answered"
