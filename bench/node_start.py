"""Benchmark: how long a node takes from ``pairproxy run`` to serving, for one or more checkouts.

    sudo .venv/bin/python bench/node_start.py [--runs 5] [--checkout DIR ...] [--prefix pq5] [--json FILE]

Why: a restarted node is away until it serves again; in the soak (bench/SOAK.md) that start took 10-13 s
under load, most of it Python importing modules before the node's first line of log. Each run starts
node a of a lab (stateless, alone: it claims its address after ``claim_wait``) with ``python -m
proxy.cli run`` in the checkout's directory, and records when its control socket first answers and when
its status says ``serving``; then it stops the node (SIGTERM, by PID). Checkouts alternate run by run, so
the machine's load falls on all of them alike. Prints the median and the spread per checkout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.driver import Bench, run_info, say  # noqa: E402
from deploy.lab.clients import NodeProcess  # noqa: E402
from deploy.lab.errors import LabError  # noqa: E402


def one_start(bench: Bench, checkout: Path, timeout: float = 60) -> dict:
    """Start node a from ``checkout``; seconds to the first status answer and to serving."""
    lab = bench.lab
    node = NodeProcess(lab, "a", log=bench.work / f"start-{checkout.name}.log")
    lab.run(lab.ns_a, [sys.executable, "-m", "proxy.cli", "cleanup", "-c", str(node.config)], cwd=checkout,
            capture_output=True)
    with open(node.log, "ab") as log:
        t0 = time.monotonic()
        node.proc = lab.popen(lab.ns_a, [sys.executable, "-m", "proxy.cli", "run", "-c", str(node.config)],
                              cwd=checkout, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    answered = serving = None
    try:
        while time.monotonic() - t0 < timeout:
            if node.proc.poll() is not None:
                raise LabError(f"node exited with {node.proc.returncode}: {node.log.read_text()[-800:]}")
            try:
                state = node.status(tables=False).get("state")
            except LabError:
                state = None
            now = time.monotonic() - t0
            if state is not None and answered is None:
                answered = now
            if state == "serving":
                serving = now
                break
            time.sleep(0.01)
    finally:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(15)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
    return {"answered_s": answered, "serving_s": serving}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="starts per checkout (default 5)")
    ap.add_argument("--checkout", action="append", type=Path,
                    help="a checkout of pairproxy to start the node from (repeatable; default: this one)")
    ap.add_argument("--prefix", default="pq5", help="the lab's namespace prefix (default pq5)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    checkouts = [c.resolve() for c in (args.checkout or [ROOT])]
    for c in checkouts:
        if not (c / "proxy" / "cli.py").is_file():
            ap.error(f"--checkout {c}: not a pairproxy checkout (no proxy/cli.py)")
    results: dict[str, list] = {str(c): [] for c in checkouts}
    started = datetime.datetime.now(datetime.timezone.utc)
    with Bench("node-start", prefix=args.prefix, default_prefix="pq5") as bench:
        bench.up()
        for i in range(args.runs):
            for c in checkouts:
                r = one_start(bench, c)
                r["load"] = round(os.getloadavg()[0], 2)
                results[str(c)].append(r)
                say(f"run {i} {c}: {r}")
    summary = {}
    for c, rs in results.items():
        serving = [r["serving_s"] for r in rs if r["serving_s"] is not None]
        answered = [r["answered_s"] for r in rs if r["answered_s"] is not None]
        summary[c] = {"runs": len(rs), "answered_median_s": round(statistics.median(answered), 3) if answered else None,
                      "serving_median_s": round(statistics.median(serving), 3) if serving else None,
                      "serving_min_max_s": [round(min(serving), 3), round(max(serving), 3)] if serving else None}
        say(f"{c}: {summary[c]}")
    if args.json:
        args.json.write_text(json.dumps({"info": run_info("node_start.py", started), "summary": summary,
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
