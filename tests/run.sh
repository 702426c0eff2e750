#!/usr/bin/env bash
# The whole test suite: unit tests and lab tests (root: namespaces, real Samba and NFS-Ganesha).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
