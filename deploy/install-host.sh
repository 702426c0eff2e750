#!/usr/bin/env bash
# Install pairproxy on a real host (Debian 12, as root, from a checkout): the one documented way,
# ending with `systemctl enable --now pairproxy@a` working. It makes
#   /opt/pairproxy                      a venv with the package (Debian's own Python refuses
#                                       `pip install`: externally-managed-environment)
#   /usr/local/bin/pairproxy            -> /opt/pairproxy/bin/pairproxy (what the unit runs)
#   user and group pairproxy            the unit's User= (no login, no home)
#   /etc/pairproxy                      mode 700, owned by pairproxy: configs and the key file
#   /etc/systemd/system/pairproxy@.service
#   /usr/share/doc/pairproxy/           README.md (the unit's Documentation=), example-a/b.toml
# /var/lib/pairproxy/<node> and /run/pairproxy are made by systemd (StateDirectory=, RuntimeDirectory=).
#
# Idempotent and quick when nothing changed: the venv is only reinstalled when the source changed.
# PAIRPROXY_ROOT=/some/dir installs below that directory instead of / (for tests); it then makes no
# user, changes no owner and does not talk to systemd.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${PAIRPROXY_ROOT:-}
ROOT=${ROOT%/}
VENV=$ROOT/opt/pairproxy
say() { echo "install-host.sh: $*"; }

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install-host.sh: run as root (or set PAIRPROXY_ROOT to install below a directory)" >&2
    exit 1
fi

missing=()
for p in python3 python3-venv; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The package's top-level folders, as pyproject.toml lists them (one list, not a copy here).
PYTHON=${PYTHON:-/usr/bin/python3}
read -r -a PACKAGE_DIRS <<< "$("$PYTHON" -c 'import sys, tomllib
pkgs = tomllib.load(open(sys.argv[1], "rb"))["tool"]["setuptools"]["packages"]
print(" ".join(sorted({p.split(".")[0] for p in pkgs})))' "$SRC/pyproject.toml")"

# The venv: reinstalled only when the package's source differs from what it holds.
source_hash=$(cd "$SRC" && find pyproject.toml "${PACKAGE_DIRS[@]}" -type f \
                  \( -name '*.py' -o -name '*.toml' \) -not -path '*/__pycache__/*' -print0 \
              | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
# Debian's own interpreter (python3-venv is for it, PYTHON above), not whatever `python3` is first on
# root's PATH: the unit's user must be able to run it, and a pyenv under /root is not readable by it.
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.pairproxy-source" 2>/dev/null)" != "$source_hash" ] || [ ! -x "$VENV/bin/pairproxy" ]; then
    say "installing pairproxy from $SRC into $VENV"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    for d in pyproject.toml README.md "${PACKAGE_DIRS[@]}"; do cp -a "$SRC/$d" "$build/"; done
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$build"
    echo "$source_hash" > "$VENV/.pairproxy-source"
fi
mkdir -p "$ROOT/usr/local/bin"
ln -sfn "$VENV/bin/pairproxy" "$ROOT/usr/local/bin/pairproxy"

if [ -z "$ROOT" ] && ! getent passwd pairproxy >/dev/null; then
    say "adding system user pairproxy"
    useradd --system --user-group --home-dir /var/lib/pairproxy --no-create-home \
            --shell /usr/sbin/nologin --comment "pairproxy node" pairproxy
fi
install -d -m 700 "$ROOT/etc/pairproxy"
if [ -z "$ROOT" ]; then
    chown pairproxy:pairproxy /etc/pairproxy
fi

install -d -m 755 "$ROOT/etc/systemd/system" "$ROOT/usr/share/doc/pairproxy"
install -m 644 "$SRC/deploy/systemd/pairproxy@.service" "$ROOT/etc/systemd/system/pairproxy@.service"
install -m 644 "$SRC/README.md" "$SRC/deploy/example-a.toml" "$SRC/deploy/example-b.toml" \
        "$ROOT/usr/share/doc/pairproxy/"
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "ready: $("$ROOT/usr/local/bin/pairproxy" --help >/dev/null && echo "$ROOT/usr/local/bin/pairproxy works")"
say "next: /etc/pairproxy/<node>.toml (see /usr/share/doc/pairproxy/example-a.toml), the key file, then"
say "      pairproxy check -c /etc/pairproxy/a.toml && systemctl enable --now pairproxy@a"
