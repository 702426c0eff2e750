"""The lab: network namespaces with real Samba smbd and NFS-Ganesha, and pairproxy node configs.

:class:`Lab` is the one object the CLI, the demo, the tests and the benchmarks use. It puts together
the modules that each do one job:

* :mod:`.topology`: namespaces, veth pairs, bridges, addresses (``{prefix}-sw``, ``-client``, ``-a``,
  ``-b``, ``-srv``; service net 10.77.0.0/24, sync net 10.77.1.0/24);
* :mod:`.servers`: smbd, rpcbind and ganesha.nfsd: config files, users, test data, start, readiness;
* :mod:`.nodeconfigs`: the nodes' TOML configs, built as data;
* :mod:`.processes`: supervision by PID (also of whatever still runs in the lab's namespaces at down);
* :mod:`.netns`: running commands in the namespaces.

State lives under ``root`` (default ``/var/lib/pairproxy-lab/{prefix}``): the servers' files (see
:mod:`.servers`), ``run/*.pid``, the node configs (see :mod:`.nodeconfigs`) and ``pair.key``.

Client URL forms that work with libnfs-utils 4.0 against this Ganesha (checked by tests/test_lab.py):

* NFSv3 uses the export's *real* path (Ganesha's default ``mount_path_pseudo = false``)::

      nfs-ls  "nfs://10.77.0.10/<root>/srv/export/?version=3"
      nfs-cp  local.bin "nfs://10.77.0.10/<root>/srv/export/local.bin?version=3"

* NFSv4 uses the pseudo path::

      nfs-cat "nfs://10.77.0.10/export/hello.txt?version=4"

  (v4 *writes* of >= 4000 bytes fail inside libnfs 4.0's encoder; use v3 or another client to write.)

``Lab.nfs_url(host, relpath, version)`` builds these; ``Lab.smbclient(host, commands)`` runs
``smbclient //host/share -U pp%pairproxy -c commands`` in the client namespace.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from . import netns, nodeconfigs
from .errors import LabError
from .nodeconfigs import LAB_TIMINGS, PairTimings
from .processes import kill_pids, pids_in_namespaces
from .servers import PROGRAMS, Servers
from .topology import MACS, SYNC_MACS, Addresses, Topology

__all__ = ["Lab", "LabError", "Addresses", "PairTimings", "MACS", "SYNC_MACS"]

REQUIRED_COMMANDS = ("ip", "sysctl", "unshare", "nsenter", "mount",
                     "smbd", "smbpasswd", "smbclient", "ganesha.nfsd", "rpcbind")


class Lab:
    """A lab of network namespaces with a bridge, Samba and NFS-Ganesha. See the module docstring."""

    smb_share = Servers.smb_share
    smb_user = Servers.smb_user
    smb_password = Servers.smb_password
    nfs_pseudo = Servers.nfs_pseudo
    SERVERS = PROGRAMS

    def __init__(self, prefix: str = "pp", root: str | os.PathLike | None = None) -> None:
        if not prefix or len(prefix) > 8 or not prefix.replace("-", "").isalnum():
            raise LabError(f"invalid lab prefix {prefix!r} (1-8 letters/digits/dashes)")
        self.prefix = prefix
        self.root = (Path(root) if root is not None else Path(f"/var/lib/pairproxy-lab/{prefix}")).absolute()
        self.addresses = Addresses()
        self.topology = Topology(prefix, self.addresses)
        self.ns_client = self.topology.ns_client
        self.ns_a = self.topology.ns_a
        self.ns_b = self.topology.ns_b
        self.ns_server = self.topology.ns_server
        self.ns_switch = self.topology.ns_switch
        self.servers = Servers(prefix, self.root, self.ns_server, self.ns_client, self.addresses)

    # ------------------------------------------------------------------ paths
    @property
    def namespaces(self) -> list[str]:
        return self.topology.namespaces

    @property
    def smb_share_path(self) -> Path:
        return self.servers.files.share

    @property
    def nfs_export_path(self) -> Path:
        return self.servers.files.export

    @property
    def run_dir(self) -> Path:
        return self.servers.supervisor.run_dir

    @property
    def samba_dir(self) -> Path:
        return self.servers.files.samba_dir

    @property
    def ganesha_dir(self) -> Path:
        return self.servers.files.ganesha_dir

    @property
    def smb_conf(self) -> Path:
        return self.servers.files.smb_conf

    @property
    def smb_client_conf(self) -> Path:
        return self.servers.files.smb_client_conf

    @property
    def ganesha_conf(self) -> Path:
        return self.servers.files.ganesha_conf

    @property
    def smbd_log(self) -> Path:
        return self.servers.files.smbd_log

    @property
    def ganesha_log(self) -> Path:
        return self.servers.files.ganesha_log

    @property
    def rpcbind_log(self) -> Path:
        return self.servers.files.rpcbind_log

    @property
    def pair_key_path(self) -> Path:
        return self.root / "pair.key"

    def pid_file(self, name: str) -> Path:
        return self.servers.supervisor.pid_file(name)

    # ----------------------------------------------------------- node configs
    def node_config_path(self, node: str, pair: bool = False, mode: str = "stateless") -> Path:
        """a.toml / b.toml: one node alone; pair-a.toml / pair-b.toml: the two nodes as a stateless
        pair; stateful-a.toml / stateful-b.toml: a stateful pair (needs :meth:`flood`)."""
        return self.root / nodeconfigs.config_name(node, pair, mode)

    def node_config(self, node: str, pair: bool = False, mode: str = "stateless",
                    timings: PairTimings = LAB_TIMINGS) -> dict[str, Any]:
        """The config of a lab node as data (what :meth:`node_config_path` holds, for these timings)."""
        state_dir = self.root / nodeconfigs.state_dir_name(node, pair, mode)
        return nodeconfigs.node_config(node, self.addresses, state_dir, pair=pair, mode=mode,
                                       key_file=self.pair_key_path, timings=timings)

    def write_node_config(self, path: Path, node: str, pair: bool = True, mode: str = "stateless",
                          timings: PairTimings = LAB_TIMINGS) -> Path:
        """A lab node's config with other pair timings, written to ``path`` (e.g. a benchmark's
        temp dir); it shares the state directory of the lab's own config of that node and mode."""
        self._write_node_state()
        return nodeconfigs.write_toml(path, self.node_config(node, pair, mode, timings))

    def _write_node_state(self) -> None:
        """The pair's key and the nodes' state directories (what the configs point to)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.pair_key_path.exists():
            self.pair_key_path.write_bytes(os.urandom(32).hex().encode() + b"\n")
        os.chmod(self.pair_key_path, 0o600)
        for node in nodeconfigs.NODES:
            for pair, mode in ((False, "stateless"), (True, "stateless"), (True, "stateful")):
                (self.root / nodeconfigs.state_dir_name(node, pair, mode)).mkdir(exist_ok=True)

    def _write_node_configs(self) -> None:
        self._write_node_state()
        for node in nodeconfigs.NODES:
            for pair, mode in ((False, "stateless"), (True, "stateless"), (True, "stateful")):
                nodeconfigs.write_toml(self.node_config_path(node, pair, mode), self.node_config(node, pair, mode))

    # -------------------------------------------------------------- network
    def flood(self, on: bool | str) -> None:
        """How the service bridge passes the nodes' frames: ``"nodes"`` (only frames destined to the
        nodes flood: what a stateful pair needs at least), ``"hub"``/``True`` (every frame to every port,
        as a mirror port), ``"learning"``/``False`` (the default learning bridge). See
        :meth:`deploy.lab.topology.Topology.flood`."""
        self.topology.flood(on)

    @staticmethod
    def existing_namespaces() -> set[str]:
        return netns.existing_namespaces()

    # ------------------------------------------------------------- execution
    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside network namespace ``ns`` (``ip netns exec``); check=False by default."""
        return netns.run(ns, argv, **kwargs)

    def set_links(self, ns: str, devs: Sequence[str], state: str) -> None:
        """Set links ``up`` or ``down`` in ``ns`` in one ``ip -batch``: a machine that dies loses all
        its links at once (two ``ip`` processes would be milliseconds apart)."""
        if state not in ("up", "down"):
            raise ValueError(f"link state must be 'up' or 'down', not {state!r}")
        batch = "".join(f"link set {dev} {state}\n" for dev in devs)
        self.run(ns, ["ip", "-batch", "-"], input=batch, text=True, check=True)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside network namespace ``ns``. ``ip netns exec`` execs, so .pid is the program's."""
        return netns.popen(ns, argv, **kwargs)

    def nfs_url(self, host: str, relpath: str = "", version: int = 3) -> str:
        """URL for libnfs-utils: v3 names the export's real path, v4 the pseudo path."""
        rel = relpath.lstrip("/")
        if version == 3:
            base = str(self.nfs_export_path)
        elif version == 4:
            base = self.nfs_pseudo
        else:
            raise ValueError(f"NFS version must be 3 or 4, not {version!r}")
        path = base.rstrip("/") + "/" + rel
        return f"nfs://{host}{path}?version={version}"

    def smbclient(self, host: str, commands: str, ns: str | None = None,
                  **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``smbclient //host/share -U pp%pairproxy -c commands`` in ``ns`` (default: client ns)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        argv = ["smbclient", f"//{host}/{self.smb_share}", "-s", str(self.smb_client_conf),
                "-U", f"{self.smb_user}%{self.smb_password}", "-m", "SMB3", "-c", commands]
        return self.run(ns or self.ns_client, argv, **kwargs)

    # ------------------------------------------------------------------ API
    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, bridges, smbd, ganesha): run as root")
        missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
        if missing:
            raise LabError(f"required command(s) not installed: {', '.join(missing)} "
                           "(apt-get install iproute2 samba smbclient nfs-ganesha nfs-ganesha-vfs rpcbind)")
        if str(self.root) == "/run" or str(self.root).startswith(("/run/", "/var/run/")):
            raise LabError(f"lab root {self.root} must not be under /run (ganesha gets a private /run)")
        try:
            pwd.getpwnam("_rpc")
        except KeyError:
            raise LabError("user _rpc (from the rpcbind package) is missing; reinstall rpcbind") from None

    def up(self) -> None:
        """Build what is missing, (re)start servers that are not running, wait until they answer."""
        self._preflight()
        self.topology.build()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # smbd's per-user process must traverse to the share
        self.servers.write_files()
        self._write_node_configs()
        self.servers.ensure_smb_user()
        self.servers.start()

    def down(self, purge: bool = False) -> None:
        """Stop recorded servers, anything left in the lab's namespaces, delete namespaces and run files."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root to tear down namespaces and processes: run as root")
        self.servers.stop()
        # leftovers (smbd children, processes other code started inside the lab) would keep running
        # after `ip netns del`: stop them by PID, found through their network namespace
        leftovers = pids_in_namespaces(self.namespaces)
        if leftovers:
            kill_pids(sorted(leftovers))
        errors = self.topology.delete()
        self.servers.remove_run_files()
        if purge and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise LabError("could not delete namespace(s): " + "; ".join(errors))

    def status(self) -> dict:
        """JSON-able description: namespaces present, server processes and liveness, addresses."""
        servers = self.servers.status()
        ns_status = self.topology.present()
        return {
            "prefix": self.prefix,
            "root": str(self.root),
            "namespaces": ns_status,
            "servers": servers,
            "up": all(ns_status.values()) and all(s["alive"] for s in servers.values()),
            "addresses": asdict(self.addresses),
            "interfaces": self.topology.interface_addresses(),
            "smb": {"share": self.smb_share, "user": self.smb_user, "path": str(self.smb_share_path)},
            "nfs": {"export_path": str(self.nfs_export_path), "pseudo": self.nfs_pseudo},
            "node_configs": {n: str(self.node_config_path(n)) for n in nodeconfigs.NODES},
        }
