"""Shared fixtures. `lab`: one namespace lab (prefix "ppt") for the whole test session."""

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

    root = tempfile.mkdtemp(prefix="pairproxy-lab-ppt-", dir="/var/tmp")
    the_lab = Lab(prefix="ppt", root=root)
    try:
        the_lab.up()
        yield the_lab
    finally:
        try:
            the_lab.down()
        finally:
            shutil.rmtree(root, ignore_errors=True)
