"""``pairproxy lab demo`` for the pair: a node dies under client load, its peer takes over, it returns.

The timeline it prints is measured, not narrated: node times come from the nodes' own status
(takeover timing), client outages from the clients' operations (the gap between the last successful
operation before an event and the first one after it, less one normal operation's duration).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .clients import IoLoop, NodeProcess, SmbHolder, established, serving, takeover_settled
from .core import Lab


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        print(f"  {at - self.t0:8.3f} s  {text}", flush=True)


def run_pair_demo(lab: Lab, seconds: float = 3.0) -> bool:
    addr = lab.addresses
    print(f"lab {lab.prefix}: bringing it up (namespaces, smbd, rpcbind, ganesha) ...", flush=True)
    lab.up()
    work = Path(tempfile.mkdtemp(prefix="pairproxy-pairdemo-", dir="/var/tmp"))
    a = NodeProcess(lab, "a", pair=True, log=lab.root / "demo-pair-a.log")
    b = NodeProcess(lab, "b", pair=True, log=lab.root / "demo-pair-b.log")
    loops: list[IoLoop] = []
    ok = True
    tl = Timeline()
    try:
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        print("\ntimeline (seconds since start):", flush=True)
        b.start()
        a.start()
        a.wait_for(serving(addr.service_a, "a"), 15, "a serving")
        st = b.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and
                        (s["pair"]["link"].get("rtt_ms") or {}).get("count", 0) > 3, 10, "link up")
        rtt = st["pair"]["link"]["rtt_ms"]
        tl.say(f"pair up: a serves {addr.service_a}, b serves {addr.service_b}; sync link heartbeat every 20 ms, "
               f"round trip median {rtt['median']:.2f} ms")
        loops = [IoLoop(lab, addr.service_a, kind, work).start() for kind in ("smb", "nfs")]
        for loop in loops:
            loop.wait_ops(3)
        tl.say(f"clients running through {addr.service_a}: smbclient put+get and NFSv3 nfs-cp put+get of 64 KiB "
               "files in a loop, each read back and compared")
        time.sleep(seconds)

        died = a.kill_hard(link_down=True)
        tl.say("node a killed (SIGKILL, and its service link down: a dead machine)", died)
        st = b.wait_for(serving(addr.service_a, "b"), 10, "b taking over")
        t = st["pair"]["takeovers"][-1]
        tl.say(f"node b: a silent {t['silence_ms']:.0f} ms and no answer to the probe: a is dead")
        tl.say(f"node b: {addr.service_a} up on the macvlan with a's MAC, gratuitous ARP with b's own MAC "
               f"{t['address_moved_ms']:.1f} ms after detection")
        for loop in loops:
            loop.wait_ops(2, 30)
        st = b.status()
        t = st["pair"]["takeovers"][-1]
        if t["first_client_ms"] is not None:
            tl.say(f"node b: first client served on {addr.service_a} {t['first_client_ms']:.1f} ms after detection")
        outages = {loop.kind: loop.outage_around(died) for loop in loops}
        tl.say("clients going on through node b; client-visible outage: " +
               ", ".join(f"{k} {v * 1000:.0f} ms" if v is not None else f"{k} ?" for k, v in outages.items()))
        slow = [loop.kind for loop in loops if (outages[loop.kind] or 0) >= loop.op_timeout * 0.9]
        if slow:
            tl.say(f"({', '.join(slow)}: a request a had acknowledged but never answered; in stateless mode "
                   f"the client notices only by its own timeout, here {loops[0].op_timeout:g} s; part 3 shows "
                   "stateful mode resetting such clients at once)")
        time.sleep(seconds / 2)

        back = time.monotonic()
        a.link_up()
        a.start()
        tl.say("node a restarted (link up, pairproxy run)", back)
        a.wait_for(serving(addr.service_a, "a"), 20, "a serving again")
        tl.say("hand-back: b stopped serving and removed the address and macvlan, then a claimed it")
        b.wait_for(lambda s: s["pair"]["addresses"][addr.service_a]["role"] == "standby", 5, "b standby")
        for loop in loops:
            loop.wait_ops(2, 30)
        outages = {loop.kind: loop.outage_around(back) for loop in loops}
        tl.say("clients going on through node a; outage around the hand-back: " +
               ", ".join(f"{k} {v * 1000:.0f} ms" if v is not None else f"{k} ?" for k, v in outages.items()))
    finally:
        for loop in loops:
            loop.finish()
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        shutil.rmtree(work, ignore_errors=True)
    print()
    for loop in loops:
        bad = loop.verify_stored()
        failed = sum(1 for *_, ok_ in loop.ops if not ok_)
        print(f"  {loop.kind}: {len(loop.done)} files written and read back, {failed} failed attempts retried, "
              f"{'all intact on the server' if not bad and not loop.corrupt else f'DAMAGED: {bad + loop.corrupt}'}")
        if failed and loop.last_error:
            print(f"      last failure: {loop.last_error.strip().splitlines()[-1][:160]}")
        ok = ok and not bad and not loop.corrupt
        loop.remove_stored()
    print("demo " + ("passed" if ok else "FAILED"))
    return ok


def run_stateful_demo(lab: Lab) -> bool:
    """The stateful pair: b keeps a's sessions and, when a dies, continues its client's connection (issue
    10): the client writes on through b with the same connection and session."""
    addr = lab.addresses
    lab.up()
    lab.flood("nodes")  # only the frames destined to the nodes flood: what the standby needs (issue 10)
    a = NodeProcess(lab, "a", pair=True, mode="stateful", log=lab.root / "demo-stateful-a.log")
    b = NodeProcess(lab, "b", pair=True, mode="stateful", log=lab.root / "demo-stateful-b.log")
    holder = None
    tl = Timeline()
    ok = True
    try:
        print("\ntimeline (seconds since start):", flush=True)
        b.start()
        a.start()
        a.wait_for(serving(addr.service_a, "a"), 15, "a serving")
        b.wait_for(lambda s: s["pair"]["link"]["state"] == "connected", 10, "link up")
        for node in (a, b):
            node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 10, "observer running")
        tl.say("stateful pair up: the bridge floods the frames destined to the nodes, so b sees those to a "
               "(client -> a, server -> a); b decodes them, never replies")
        holder = SmbHolder(lab, addr.service_a, "demo-stateful.bin")
        tl.say(f"an SMB client (smbprotocol) opens demo-stateful.bin on {addr.service_a} and goes idle")

        def b_sees(s):
            return [c for c in s.get("connections", []) if c["server"].startswith(addr.service_a + ":") and c["opens"]]

        st = b.wait_for(b_sees, 5, "b seeing the open")
        conn = b_sees(st)[0]
        session = conn["sessions"][0]
        tl.say(f"node b's tables: {conn['client']} session 0x{session['session_id']:x} user {session['user']}, "
               f"tree {session['trees'][0]['share']}, open {conn['opens'][0]['path']}")
        st = b.wait_for(lambda s: s["pair"]["state_sync"]["in_sync"], 5, "views in sync")
        tl.say(f"b's view of {addr.service_a} agrees with a's own (digest {st['digests'][addr.service_a][:12]}..., "
               f"{st['pair']['state_sync']['matches']} matching comparisons)")
        old = established(lab, addr.service_a, 445)
        died = a.kill_hard(link_down=True)
        tl.say("node a killed (SIGKILL, link down); the client is idle and sends nothing", died)
        # settled: a's connections are continued right after the address comes up
        st = b.wait_for(takeover_settled(addr.service_a, "b"), 10, "b taking over")
        t = st["pair"]["takeovers"][-1]
        tl.say(f"node b: took over {addr.service_a} after {t['silence_ms']:.0f} ms of silence; continued "
               f"{t['connections_continued']} of a's connection(s) with TCP_REPAIR (both legs), reset "
               f"{t['clients_reset']} client and {t['backend_connections_reset']} backend connection(s)")
        for c in t["connections"]:
            tl.say(f"  {c['client']}: " + ("continued" if c["continued"] else f"reset: {c['reason']}"))
        answer = holder.do("write")
        same = established(lab, addr.service_a, 445) == old
        tl.say(f"the client writes to its open file through b: {'ok' if answer['ok'] else answer['error']}, "
               + ("on the same connection, same session (no reconnect)" if same else "ON A NEW CONNECTION"))
        ok = ok and answer["ok"] and same
        st = b.wait_for(lambda s: s["pair"]["resume"], 5, "resume report")
        for r in st["pair"]["resume"]:
            tl.say(f"resume report for {r['client']}: {r['verdict']}")
    finally:
        if holder is not None:
            holder.close()
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        lab.flood(False)
    print("stateful demo " + ("passed" if ok else "FAILED"))
    return ok
