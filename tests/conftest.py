"""Shared fixtures. `lab`: one namespace lab (prefix "ppt") for the whole test session.

``PAIRPROXY_TEST_LAB=<prefix>`` picks another prefix, so that two test runs on one machine (two
checkouts) build separate labs instead of tearing down each other's. Two runs with the same prefix
would share namespaces (a node of one answering in the other's lab): the second waits for the first
(:func:`pytest_sessionstart`), and a lab a killed run left behind is torn down before it is reused."""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest


#: how long a second run with the same lab prefix waits for the first before it gives up
LAB_LOCK_WAIT = 20 * 60


def pytest_sessionstart(session) -> None:
    """Take this run's lab prefix: an exclusive lock on ``/run/lock/pairproxy-test-<prefix>.lock``,
    held until the process ends. Another run holding it is waited for (saying so); once it is ours,
    namespaces of the prefix are a killed run's leftovers and are torn down, so no stale node or
    address of theirs is mistaken for this run's."""
    if os.geteuid() != 0:
        return
    prefix = os.environ.get("PAIRPROXY_TEST_LAB", "ppt")
    os.makedirs("/run/lock", exist_ok=True)
    path = f"/run/lock/pairproxy-test-{prefix}.lock"
    lock = open(path, "a+")  # noqa: SIM115 - held for the whole session, closed by the exit
    deadline = time.monotonic() + LAB_LOCK_WAIT
    said = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            if time.monotonic() > deadline:
                pytest.exit(f"another test run (PID {holder}) holds lab prefix {prefix!r} ({path}) since "
                            f"{LAB_LOCK_WAIT // 60} min: stop it, or set PAIRPROXY_TEST_LAB to another prefix",
                            returncode=3)
            if not said:
                print(f"\nwaiting for another test run (PID {holder}) that uses lab prefix {prefix!r}; "
                      "PAIRPROXY_TEST_LAB=<prefix> runs apart", file=sys.stderr, flush=True)
                said = True
            time.sleep(2)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    session.config._pairproxy_lab_lock = lock  # keeps the lock (and its fd) alive
    from deploy.lab import netns
    from deploy.lab.processes import kill_pids, pids_in_namespaces

    stale = sorted(name for name in netns.existing_namespaces() if name.startswith(prefix) and "-" in name)
    if stale:
        print(f"\ntearing down namespaces a killed test run left behind: {', '.join(stale)}",
              file=sys.stderr, flush=True)
        kill_pids(sorted(pids_in_namespaces(stale)))
        for name in stale:
            netns.ip("netns", "del", name, check=False)


@pytest.fixture(scope="session")
def lab():
    """A running deploy.lab.Lab (prefix "ppt", state in a temp dir under /var/tmp); torn down at the end."""
    if os.geteuid() != 0:
        pytest.fail("the lab fixture needs root (network namespaces, smbd, ganesha): run pytest as root",
                    pytrace=False)
    from deploy.lab import Lab

    prefix = os.environ.get("PAIRPROXY_TEST_LAB", "ppt")
    root = tempfile.mkdtemp(prefix=f"pairproxy-lab-{prefix}-", dir="/var/tmp")
    the_lab = Lab(prefix=prefix, root=root)
    try:
        the_lab.up()
        yield the_lab
    finally:
        try:
            the_lab.down()
        finally:
            if os.environ.get("PAIRPROXY_TEST_KEEP_LOGS"):  # the nodes' logs, to read after a failure
                print(f"lab logs kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def host_install():
    """deploy/install-host.sh run below a temporary root (PAIRPROXY_ROOT): the documented host
    install without touching the machine; the root is readable by all (an unprivileged node runs
    from it). Removed at the end."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).parent.parent
    root = Path(tempfile.mkdtemp(prefix="pairproxy-host-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        cp = subprocess.run(["bash", str(repo / "deploy" / "install-host.sh")], capture_output=True, text=True,
                            env={**os.environ, "PAIRPROXY_ROOT": str(root)}, timeout=600)
        assert cp.returncode == 0, cp.stderr[-3000:]
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def capturing(lab, ns: str, path, bpf_filter: str, *extra: str):
    """tcpdump on ``eth0`` of namespace ``ns`` into ``path`` while the block runs (it is capturing
    when the block starts; stopped with SIGINT, so the file is complete, also when the block fails)."""
    tcpdump = lab.popen(ns, ["tcpdump", "-i", "eth0", "-s", "0", *extra, "--immediate-mode", "-U",
                             "-w", str(path), bpf_filter], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # tcpdump is capturing
        yield
    finally:
        tcpdump.send_signal(2)
        tcpdump.wait(10)


def replay_json(path):
    """``pairproxy replay CAPTURE --json``, read strictly as the one schema's ReplayReport."""
    from schema import ReplayReport, from_json

    cp = subprocess.run([sys.executable, "-m", "proxy.cli", "replay", str(path), "--json"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return from_json(ReplayReport, json.loads(cp.stdout))
