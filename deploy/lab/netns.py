"""Running commands in network namespaces: ``ip netns exec``, ``ip -n NS``, ``ip -batch``, sysctl.

The one place the lab shells out to iproute2, so every failure reads the same way
("'ip -n pp-a link add ...' failed: RTNETLINK answers: File exists").
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Iterable, Sequence

from .errors import LabError, one_line

__all__ = ["run", "popen", "ip", "ip_batch", "sysctl", "existing_namespaces", "links", "namespace_inode"]


def run(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``argv`` inside network namespace ``ns`` (``ip netns exec``); check=False by default."""
    kwargs.setdefault("check", False)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)


def popen(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start ``argv`` inside network namespace ``ns``. ``ip netns exec`` execs, so .pid is the program's."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``ip [-n NS] ARGS``; LabError naming the command if it fails (unless ``check=False``)."""
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    cp = subprocess.run(argv, capture_output=True, text=True)
    if check and cp.returncode != 0:
        raise LabError(f"'{' '.join(argv)}' failed: {one_line(cp.stderr + cp.stdout)}")
    return cp


def ip_batch(ns: str, lines: Iterable[str]) -> None:
    """Several ``ip`` commands in one process (``ip -n NS -batch -``): one fork instead of many."""
    script = "\n".join(lines) + "\n"
    cp = subprocess.run(["ip", "-n", ns, "-batch", "-"], input=script, capture_output=True, text=True)
    if cp.returncode != 0:
        raise LabError(f"ip -n {ns} -batch failed: {one_line(cp.stderr)}")


def sysctl(ns: str, settings: dict[str, str]) -> None:
    """Set sysctls inside ``ns`` (per-namespace ones such as net.ipv6.conf.*)."""
    args = [f"{k}={v}" for k, v in settings.items()]
    cp = run(ns, ["sysctl", "-q", "-w", *args], capture_output=True, text=True)
    if cp.returncode != 0:
        raise LabError(f"sysctl in {ns} failed: {one_line(cp.stderr)}")


def existing_namespaces() -> set[str]:
    """Names of the named network namespaces on this machine (``ip netns list``)."""
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def links(ns: str) -> set[str]:
    """Interface names in ``ns`` (empty if the namespace does not exist)."""
    cp = ip("-j", "link", "show", ns=ns, check=False)
    if cp.returncode != 0 or not cp.stdout.strip():
        return set()
    return {l["ifname"] for l in json.loads(cp.stdout)}


def namespace_inode(path: str) -> int | None:
    """The inode of a network namespace file (/run/netns/NAME or /proc/PID/ns/net): its identity."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
