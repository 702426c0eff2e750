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
