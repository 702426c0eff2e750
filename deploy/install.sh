#!/usr/bin/env bash
# Install everything pairproxy, its lab, tests and benchmarks need on Debian 12, as root:
# the file servers and clients from Debian, and a venv (./.venv) with the package and its test extras.
# Idempotent: a second run only checks. For a real host (a venv in /opt, the systemd unit, a user)
# use deploy/install-host.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    samba smbclient                 # the SMB server and client of the lab
    nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils   # the NFS server (userspace) and client
    haproxy keepalived              # baselines for the benchmarks
    iproute2 procps tcpdump iputils-ping
    python3 python3-venv python3-dev gcc
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Debian's packages would start smbd/ganesha/rpcbind in the root namespace; the lab runs its own.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# The package is installed editable, so only a changed pyproject.toml (dependencies, packages)
# needs pip again: a second run takes a second instead of a quarter of a minute.
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.pairproxy-pyproject 2>/dev/null)" != "$stamp" ] || [ ! -x .venv/bin/pairproxy ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$stamp" > .venv/.pairproxy-pyproject
fi
echo "install.sh: ready ($(.venv/bin/python --version), pairproxy at .venv/bin/pairproxy)"
