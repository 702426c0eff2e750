"""Shared fixtures. `lab`: one namespace lab (prefix "ppt") for the whole test session.

``PAIRPROXY_TEST_LAB=<prefix>`` picks another prefix, so that two test runs on one machine (two
checkouts) build separate labs instead of tearing down each other's."""

import os
import shutil
import tempfile

import pytest


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
