"""A/B of the splice pump alone: 64-byte round trips through two pumps (one per direction) of this
checkout's ``proxy/pump.py`` and of the one at git revision REF, interleaved, in one process.

Why: ``bench/throughput.py`` measures the whole node against haproxy and direct, but on a shared
machine its small-message ratios move by +-20 % between runs; this isolates the per-message cost of
the pump so a change to it (e.g. the pipe pool) can be judged on its own.

    .venv/bin/python bench/pump_ab.py [--ref 832eebd] [--rounds 5] [--messages 4000]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import pump as this_pump  # noqa: E402


def load_pump_at(ref: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:proxy/pump.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="pump-ab-")) / "pump_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pump_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def round_trips(pump, messages: int) -> float:
    """Median microseconds of a 64-byte round trip: client -> pump -> echo -> pump -> client."""
    client, near = trio.socket.socketpair()
    far, echo_end = trio.socket.socketpair()

    async def echo():
        while data := await echo_end.recv(65536):
            await echo_end.send(data)

    times = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.splice_pump, near, far, lambda n: None)
        nursery.start_soon(pump.splice_pump, far, near, lambda n: None)
        nursery.start_soon(echo)
        message = b"x" * 64
        for _ in range(messages):
            t = time.perf_counter()
            await client.send(message)
            got = 0
            while got < len(message):
                got += len(await client.recv(65536))
            times.append(time.perf_counter() - t)
        nursery.cancel_scope.cancel()
    for s in (client, near, far, echo_end):
        s.close()
    return statistics.median(times) * 1e6


async def main(args) -> None:
    pumps = {args.ref: load_pump_at(args.ref), "this checkout": this_pump}
    results = {name: [] for name in pumps}
    for _ in range(args.rounds):
        for name, pump in pumps.items():
            results[name].append(await round_trips(pump, args.messages))
    for name, values in results.items():
        print(f"{name:14} " + " ".join(f"{v:6.1f}" for v in values) + f"   median {statistics.median(values):.1f} us")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="832eebd")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=4000)
    trio.run(main, p.parse_args())
