"""Lab topology: network namespaces, bridges, real Samba smbd and NFS-Ganesha.

Layout (all names derive from ``prefix``; addresses are identical in every lab
because each lab lives in its own set of namespaces)::

    {prefix}-sw      bridges br-svc (service net 10.77.0.0/24) and br-sync (10.77.1.0/24)
    {prefix}-client  eth0 10.77.0.100/24
    {prefix}-a       eth0 10.77.0.11/24 (admin; the node adds 10.77.0.1 itself), sync0 10.77.1.1/24
    {prefix}-b       eth0 10.77.0.12/24 (admin; the node adds 10.77.0.2 itself), sync0 10.77.1.2/24
    {prefix}-srv     eth0 10.77.0.10/24, runs smbd (445) and rpcbind (111) + ganesha.nfsd (2049, 20048)

State lives under ``root`` (default ``/var/lib/pairproxy-lab/{prefix}``)::

    root/samba/{smb.conf,client.conf,lock,state,cache,pid,private,ncalrpc,binddns,log}
    root/ganesha/{ganesha.conf,ganesha.log,recovery,run}   (run/ is bound over /run for rpcbind+ganesha)
    root/srv/share   SMB share        root/srv/export   NFS export (pseudo path /export)
    root/run/{smbd,rpcbind,ganesha}.pid   PIDs recorded by up(), used by down()
    root/a.toml, root/b.toml              node configs

Client URL forms that work with libnfs-utils 4.0 against this Ganesha (checked by tests/test_lab.py):

* NFSv3 uses the export's *real* path (Ganesha's default ``mount_path_pseudo = false``)::

      nfs-ls  "nfs://10.77.0.10/<root>/srv/export/?version=3"
      nfs-cp  local.bin "nfs://10.77.0.10/<root>/srv/export/local.bin?version=3"
      nfs-cp  "nfs://10.77.0.10/<root>/srv/export/data-1M.bin?version=3" out.bin

* NFSv4 uses the pseudo path::

      nfs-cat "nfs://10.77.0.10/export/hello.txt?version=4"
      nfs-ls  "nfs://10.77.0.10/export/?version=4"

  (v4 *writes* of >= 4000 bytes fail inside libnfs 4.0's encoder; use v3 or another client to write.)

Quirks handled here:

* Ganesha starts in a 90 s NFSv4 grace period (v4 OPEN fails with NFS4ERR_GRACE): ``Graceless = true``.
* rpcbind and ganesha share a private mount namespace with root/ganesha/run bound over /run; ganesha is
  started with ``nsenter -t <rpcbind pid> -m`` so both recorded PIDs are the real daemons.
* smbd panics (SIGABRT) when 445 is taken; readiness therefore also checks that the listening socket on
  each port belongs to the recorded daemon, not just that something answers.
* smbd forks smbd-notifyd/cleanupd; down() also stops whatever still runs in the lab's namespaces (found
  by network-namespace inode), because ``ip netns del`` would leave such processes running.
* Daemons outlive the CLI and are reparented to PID 1; on this VM PID 1 does not reap, so stopped daemons
  may remain as zombies (state Z). Liveness checks treat zombies as dead.

``Lab.nfs_url(host, relpath, version)`` builds these; ``Lab.smbclient(host, commands)`` runs
``smbclient //host/share -U pp%pairproxy -c commands`` in the client namespace.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["Lab", "LabError", "Addresses"]


class LabError(RuntimeError):
    """A lab operation failed; the message is one human-readable line (plus an optional log tail)."""


@dataclass(frozen=True)
class Addresses:
    client: str = "10.77.0.100"
    server: str = "10.77.0.10"
    service_a: str = "10.77.0.1"
    service_b: str = "10.77.0.2"
    admin_a: str = "10.77.0.11"
    admin_b: str = "10.77.0.12"
    sync_a: str = "10.77.1.1"
    sync_b: str = "10.77.1.2"
    prefixlen: int = 24


REQUIRED_COMMANDS = ("ip", "sysctl", "unshare", "nsenter", "mount",
                     "smbd", "smbpasswd", "smbclient", "ganesha.nfsd", "rpcbind")

SMB_PORTS = (445,)
NFS_PORTS = (2049, 111, 20048)

# Deterministic MACs of the eth0 interfaces (node a/b: ...:0a / ...:0b).
MACS = {
    "a": "02:77:00:00:00:0a",
    "b": "02:77:00:00:00:0b",
    "client": "02:77:00:00:00:64",
    "srv": "02:77:00:00:00:10",
}
SYNC_MACS = {"a": "02:77:00:01:00:0a", "b": "02:77:00:01:00:0b"}

UP_TIMEOUT = 30.0
KILL_TIMEOUT = 5.0


_ERROR_WORDS = ("error", "fail", "panic", "crit", "fatal", "denied", "unable", "cannot", "can't", "in use")


def _tail(path: Path, lines: int = 12) -> str:
    """The informative end of a server log: its last error-looking lines, else its last lines."""
    try:
        data = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return f"(no log at {path})"
    if not data:
        return f"(log {path} is empty)"
    errs = [l for l in data if any(w in l.lower() for w in _ERROR_WORDS)]
    return "\n".join((errs or data)[-lines:])


def _exit_desc(rc: int | None) -> str:
    if rc is None:
        return "is not running"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _one_line(text: str, lines: int = 3) -> str:
    """The last few non-empty lines of a tool's output, joined into one line."""
    keep = [l.strip() for l in text.splitlines() if l.strip()][-lines:]
    return " | ".join(keep) or "(no output)"


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field after the ")" that closes comm
    return stat[stat.rindex(")") + 2:].split()[0]


class Lab:
    """A lab of network namespaces with a bridge, Samba and NFS-Ganesha. See the module docstring."""

    smb_share = "share"
    smb_user = "pp"
    smb_password = "pairproxy"
    nfs_pseudo = "/export"

    def __init__(self, prefix: str = "pp", root: str | os.PathLike | None = None) -> None:
        if not prefix or len(prefix) > 8 or not prefix.replace("-", "").isalnum():
            raise LabError(f"invalid lab prefix {prefix!r} (1-8 letters/digits/dashes)")
        self.prefix = prefix
        self.root = Path(root) if root is not None else Path(f"/var/lib/pairproxy-lab/{prefix}")
        self.root = self.root.absolute()
        self.addresses = Addresses()
        self.ns_client = f"{prefix}-client"
        self.ns_a = f"{prefix}-a"
        self.ns_b = f"{prefix}-b"
        self.ns_server = f"{prefix}-srv"
        self.ns_switch = f"{prefix}-sw"
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ paths
    @property
    def namespaces(self) -> list[str]:
        return [self.ns_switch, self.ns_client, self.ns_a, self.ns_b, self.ns_server]

    @property
    def smb_share_path(self) -> Path:
        return self.root / "srv" / "share"

    @property
    def nfs_export_path(self) -> Path:
        return self.root / "srv" / "export"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def samba_dir(self) -> Path:
        return self.root / "samba"

    @property
    def ganesha_dir(self) -> Path:
        return self.root / "ganesha"

    @property
    def smb_conf(self) -> Path:
        return self.samba_dir / "smb.conf"

    @property
    def smb_client_conf(self) -> Path:
        return self.samba_dir / "client.conf"

    @property
    def ganesha_conf(self) -> Path:
        return self.ganesha_dir / "ganesha.conf"

    @property
    def smbd_log(self) -> Path:
        return self.samba_dir / "log" / "smbd.out"

    @property
    def ganesha_log(self) -> Path:
        return self.ganesha_dir / "ganesha.log"

    @property
    def rpcbind_log(self) -> Path:
        return self.ganesha_dir / "rpcbind.out"

    def node_config_path(self, node: str, pair: bool = False, mode: str = "stateless") -> Path:
        """a.toml / b.toml: one node alone; pair-a.toml / pair-b.toml: the two nodes as a stateless
        pair; stateful-a.toml / stateful-b.toml: a stateful pair (needs :meth:`flood`)."""
        if node not in ("a", "b"):
            raise ValueError(f"node must be 'a' or 'b', not {node!r}")
        if not pair:
            return self.root / f"{node}.toml"
        return self.root / (f"pair-{node}.toml" if mode == "stateless" else f"stateful-{node}.toml")

    def flood(self, on: bool) -> None:
        """Make the service bridge hub-like (``ageing_time 0``: every frame to every port), so a
        stateful standby sees its peer's traffic both ways, as a site would with a SPAN/mirror port;
        ``on=False`` restores the default learning bridge (300 s ageing)."""
        self._ip("link", "set", "br-svc", "type", "bridge", "ageing_time", "0" if on else "30000",
                 ns=self.ns_switch)

    @property
    def pair_key_path(self) -> Path:
        return self.root / "pair.key"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    # ------------------------------------------------------------- execution
    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside network namespace ``ns`` (``ip netns exec``); check=False by default."""
        kwargs.setdefault("check", False)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside network namespace ``ns``. ``ip netns exec`` execs, so .pid is the program's."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)

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

    # ------------------------------------------------------------ low level
    def _ip(self, *args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
        cp = subprocess.run(argv, capture_output=True, text=True)
        if check and cp.returncode != 0:
            raise LabError(f"'{' '.join(argv)}' failed: {_one_line(cp.stderr + cp.stdout)}")
        return cp

    def _ip_batch(self, ns: str, lines: Iterable[str]) -> None:
        script = "\n".join(lines) + "\n"
        cp = subprocess.run(["ip", "-n", ns, "-batch", "-"], input=script, capture_output=True, text=True)
        if cp.returncode != 0:
            raise LabError(f"ip -n {ns} -batch failed: {_one_line(cp.stderr)}")

    def _sysctl(self, ns: str, settings: dict[str, str]) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        cp = self.run(ns, ["sysctl", "-q", "-w", *args], capture_output=True, text=True)
        if cp.returncode != 0:
            raise LabError(f"sysctl in {ns} failed: {_one_line(cp.stderr)}")

    @staticmethod
    def existing_namespaces() -> set[str]:
        try:
            return set(os.listdir("/run/netns"))
        except FileNotFoundError:
            return set()

    def _links(self, ns: str) -> set[str]:
        cp = self._ip("-j", "link", "show", ns=ns, check=False)
        if cp.returncode != 0 or not cp.stdout.strip():
            return set()
        return {l["ifname"] for l in json.loads(cp.stdout)}

    # ------------------------------------------------------------ preflight
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

    # -------------------------------------------------------------- topology
    def _build_topology(self) -> None:
        have = self.existing_namespaces()
        quiet = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
        for ns in self.namespaces:
            if ns not in have:
                self._ip("netns", "add", ns)
            self._sysctl(ns, quiet)
            self._ip("link", "set", "lo", "up", ns=ns)

        sw = self.ns_switch
        sw_links = self._links(sw)
        batch = []
        for br in ("br-svc", "br-sync"):
            if br not in sw_links:
                batch.append(f"link add {br} type bridge stp_state 0 mcast_snooping 0")
            batch.append(f"link set {br} up")
        self._ip_batch(sw, batch)

        a = self.addresses
        pl = a.prefixlen
        # (namespace, ifname, port name in sw, bridge, mac, address)
        plan = [
            (self.ns_client, "eth0", "client", "br-svc", MACS["client"], a.client),
            (self.ns_server, "eth0", "srv", "br-svc", MACS["srv"], a.server),
            (self.ns_a, "eth0", "a-svc", "br-svc", MACS["a"], a.admin_a),
            (self.ns_b, "eth0", "b-svc", "br-svc", MACS["b"], a.admin_b),
            (self.ns_a, "sync0", "a-sync", "br-sync", SYNC_MACS["a"], a.sync_a),
            (self.ns_b, "sync0", "b-sync", "br-sync", SYNC_MACS["b"], a.sync_b),
        ]
        links = {ns: self._links(ns) for ns in set(p[0] for p in plan)}
        for ns, ifname, port, br, mac, addr in plan:
            inner, outer = ifname in links[ns], port in sw_links
            if not (inner and outer):
                # half a pair (after a crash) or nothing: recreate both ends
                if inner:
                    self._ip("link", "del", ifname, ns=ns)
                if outer:
                    self._ip("link", "del", port, ns=sw)
                # created directly inside the namespaces: nothing appears in the root namespace
                self._ip("link", "add", ifname, "address", mac, "type", "veth",
                         "peer", "name", port, "netns", sw, ns=ns)
            self._sysctl(ns, {f"net.ipv6.conf.{ifname}.disable_ipv6": "1"})
            self._sysctl(sw, {f"net.ipv6.conf.{port}.disable_ipv6": "1"})
            self._ip_batch(sw, [f"link set {port} master {br}", f"link set {port} up"])
            self._ip_batch(ns, [f"link set {ifname} address {mac}",
                                f"address replace {addr}/{pl} dev {ifname}",
                                f"link set {ifname} up"])

    # ----------------------------------------------------------------- files
    def _write_if_changed(self, path: Path, text: str) -> None:
        if not path.exists() or path.read_text() != text:
            path.write_text(text)

    def _ensure_user(self) -> None:
        try:
            pwd.getpwnam(self.smb_user)
            return
        except KeyError:
            pass
        if shutil.which("useradd") is None:
            raise LabError(f"unix user {self.smb_user!r} is missing and useradd is not available")
        cp = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                             "--shell", "/usr/sbin/nologin", self.smb_user], capture_output=True, text=True)
        if cp.returncode != 0 and cp.returncode != 9:  # 9: exists (race with another lab)
            raise LabError(f"useradd {self.smb_user} failed: {_one_line(cp.stderr)}")

    def _write_files(self) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        # smbd's per-user process must traverse to the share
        os.chmod(r, 0o755)
        s = self.samba_dir
        for d in ("lock", "state", "cache", "pid", "private", "ncalrpc", "binddns", "log",
                  "client/lock", "client/state", "client/cache", "client/private"):
            (s / d).mkdir(parents=True, exist_ok=True)
        os.chmod(s / "private", 0o700)
        g = self.ganesha_dir
        for d in ("recovery", "run"):
            (g / d).mkdir(parents=True, exist_ok=True)
        (r / "srv").mkdir(exist_ok=True)
        os.chmod(r / "srv", 0o755)
        self.smb_share_path.mkdir(exist_ok=True)
        self.nfs_export_path.mkdir(exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)

        self._ensure_user()
        pw = pwd.getpwnam(self.smb_user)
        os.chown(self.smb_share_path, pw.pw_uid, pw.pw_gid)
        os.chmod(self.smb_share_path, 0o775)
        os.chmod(self.nfs_export_path, 0o777)

        a = self.addresses
        common = "\n".join([
            f"   lock directory = {s / 'lock'}",
            f"   state directory = {s / 'state'}",
            f"   cache directory = {s / 'cache'}",
            f"   pid directory = {s / 'pid'}",
            f"   private dir = {s / 'private'}",
            f"   ncalrpc dir = {s / 'ncalrpc'}",
            f"   binddns dir = {s / 'binddns'}",
        ])
        smb_conf = f"""# written by pairproxy lab ({self.prefix}); do not edit
[global]
   workgroup = PAIRPROXY
   server role = standalone server
   netbios name = PPSRV
{common}
   log file = {s / 'log'}/log.%m
   max log size = 1000
   log level = 1
   interfaces = {a.server}/{a.prefixlen}
   bind interfaces only = yes
   disable netbios = yes
   smb ports = 445
   passdb backend = tdbsam:{s / 'private' / 'passdb.tdb'}
   server min protocol = SMB2
   map to guest = never
   usershare path =
   load printers = no
   printing = bsd
   printcap name = /dev/null
   disable spoolss = yes
   rpc start on demand helpers = no
   kernel oplocks = no

[{self.smb_share}]
   path = {self.smb_share_path}
   read only = no
   browseable = yes
   valid users = {self.smb_user}
   create mask = 0664
   directory mask = 0775
"""
        self._write_if_changed(self.smb_conf, smb_conf)
        c = s / "client"
        client_conf = f"""# smbclient config of pairproxy lab ({self.prefix}): private state dirs
[global]
   lock directory = {c / 'lock'}
   state directory = {c / 'state'}
   cache directory = {c / 'cache'}
   private dir = {c / 'private'}
   client min protocol = SMB2
   disable netbios = yes
   log level = 0
"""
        self._write_if_changed(self.smb_client_conf, client_conf)

        ganesha_conf = f"""# written by pairproxy lab ({self.prefix}); do not edit
NFS_CORE_PARAM {{
    Bind_addr = {a.server};
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = 3, 4;
    RPC_Max_Connections = 10000;
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
NFSV4 {{
    RecoveryBackend = fs;
    RecoveryRoot = {g / 'recovery'};
    Graceless = true;
}}
EXPORT {{
    Export_Id = 1;
    Path = {self.nfs_export_path};
    Pseudo = {self.nfs_pseudo};
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 3, 4;
    Transports = TCP;
    SecType = sys;
    FSAL {{
        Name = VFS;
    }}
}}
LOG {{
    Default_Log_Level = EVENT;
}}
"""
        self._write_if_changed(self.ganesha_conf, ganesha_conf)

        rpc = pwd.getpwnam("_rpc")
        rpcdir = g / "run" / "rpcbind"
        rpcdir.mkdir(exist_ok=True)
        os.chown(rpcdir, rpc.pw_uid, rpc.pw_gid)
        (g / "run" / "ganesha").mkdir(exist_ok=True)

        self._write_node_configs()
        self._write_test_data()

    def _write_node_configs(self, mode: str = "stateless") -> None:
        a = self.addresses
        if not self.pair_key_path.exists():
            self.pair_key_path.write_bytes(os.urandom(32).hex().encode() + b"\n")
        os.chmod(self.pair_key_path, 0o600)
        nodes = {"a": (a.service_a, a.sync_a), "b": (a.service_b, a.sync_b)}
        for node, (addr, sync) in nodes.items():
            peer = "b" if node == "a" else "a"
            peer_addr, peer_sync = nodes[peer]
            sd = self.root / f"node-{node}"
            sd.mkdir(exist_ok=True)
            text = f"""[node]
name = "{node}"
interface = "eth0"
address = "{addr}/{a.prefixlen}"
state_dir = "{sd}"
control = "{sd / 'control.sock'}"
grace = "5s"

[[service]]
name = "smb"
protocol = "smb"
port = 445
backend = "{a.server}:445"

[[service]]
name = "nfs"
protocol = "nfs"
port = 2049
backend = "{a.server}:2049"
extra_ports = [111, 20048]
"""
            self._write_if_changed(self.node_config_path(node), text)
            psd = self.root / f"pair-node-{node}"
            psd.mkdir(exist_ok=True)
            pair_text = text.replace(str(sd), str(psd)) + f"""
[peer]
name = "{peer}"
address = "{peer_addr}"
link = "{peer_sync}:7400"
listen = "{sync}:7400"
key_file = "{self.pair_key_path}"

[pair]
mode = "{mode}"
heartbeat = "20ms"
dead_after = "100ms"
"""
            self._write_if_changed(self.node_config_path(node, pair=True), pair_text)
            ssd = self.root / f"stateful-node-{node}"
            ssd.mkdir(exist_ok=True)
            self._write_if_changed(self.node_config_path(node, pair=True, mode="stateful"),
                                   pair_text.replace(str(psd), str(ssd)).replace('mode = "stateless"',
                                                                                 'mode = "stateful"'))

    def _write_test_data(self) -> None:
        pw = pwd.getpwnam(self.smb_user)
        blob = None
        for d, owner in ((self.smb_share_path, pw), (self.nfs_export_path, None)):
            hello = d / "hello.txt"
            if not hello.exists():
                hello.write_text("hello from the pairproxy lab\n")
            data = d / "data-1M.bin"
            if not data.exists() or data.stat().st_size != 1 << 20:
                if blob is None:
                    blob = os.urandom(1 << 20)
                data.write_bytes(blob)
            if owner is not None:
                for f in (hello, data):
                    os.chown(f, owner.pw_uid, owner.pw_gid)

    def _ensure_smb_user(self) -> None:
        cp = subprocess.run(["pdbedit", "-s", str(self.smb_conf), "-L"], capture_output=True, text=True) \
            if shutil.which("pdbedit") else None
        if cp is not None and cp.returncode == 0 and any(
                line.split(":", 1)[0] == self.smb_user for line in cp.stdout.splitlines()):
            return
        pw = f"{self.smb_password}\n{self.smb_password}\n"
        cp = subprocess.run(["smbpasswd", "-c", str(self.smb_conf), "-s", "-a", self.smb_user],
                            input=pw, capture_output=True, text=True)
        if cp.returncode != 0:
            raise LabError(f"smbpasswd -a {self.smb_user} failed: {_one_line(cp.stderr + cp.stdout)}")

    # ------------------------------------------------------------- processes
    def _read_pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _record_pid(self, name: str, pid: int) -> None:
        tmp = self.pid_file(name).with_suffix(".tmp")
        tmp.write_text(f"{pid}\n")
        tmp.replace(self.pid_file(name))

    def _pid_alive(self, pid: int | None, comm: str | None = None, ns: str | None = None) -> bool:
        """True if pid exists, is not a zombie, and (when given) has that comm and lives in netns ns."""
        if not pid:
            return False
        self._reap(pid)
        st = _proc_state(pid)
        if st is None or st in ("Z", "X"):
            return False
        if comm is not None:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != comm[:15]:
                    return False
            except OSError:
                return False
        if ns is not None:
            want = _ns_inode(f"/run/netns/{ns}")
            # if the namespace is already gone (crashed down), comm alone must do
            if want is not None and want != _ns_inode(f"/proc/{pid}/ns/net"):
                return False
        return True

    @staticmethod
    def _reap(pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        except OSError:
            pass

    SERVERS = {"smbd": "smbd", "rpcbind": "rpcbind", "ganesha": "ganesha.nfsd"}

    def _server_alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == self._read_pid(name):
            # our own child: right after spawning it may still be `ip`/`unshare`/`nsenter` before exec
            return proc.poll() is None
        return self._pid_alive(self._read_pid(name), self.SERVERS[name], self.ns_server)

    def _spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = self.popen(self.ns_server, argv, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        self._procs[name] = proc
        self._record_pid(name, proc.pid)
        return proc

    def _fail(self, what: str, log: Path) -> LabError:
        return LabError(f"{what}; last lines of {log}:\n{_tail(log)}")

    def _start_smbd(self) -> None:
        if self._server_alive("smbd"):
            return
        self._kill_recorded("smbd")
        self.smbd_log.write_bytes(b"")
        self._spawn("smbd", ["smbd", "-F", "--no-process-group", "--debug-stdout",
                             "-s", str(self.smb_conf)], self.smbd_log)

    def _start_nfs(self) -> None:
        rpc_ok = self._server_alive("rpcbind")
        gan_ok = self._server_alive("ganesha")
        if rpc_ok and gan_ok:
            return
        # both share one private mount namespace: restart the pair together
        self._kill_recorded("ganesha")
        self._kill_recorded("rpcbind")
        g = self.ganesha_dir
        run = g / "run"
        for stale in ("rpcbind.sock", "rpcbind.lock"):
            (run / stale).unlink(missing_ok=True)
        for f in (run / "rpcbind").iterdir():
            f.unlink(missing_ok=True)
        self.rpcbind_log.write_bytes(b"")
        self.ganesha_log.write_bytes(b"")
        # ip netns exec -> unshare -m (no fork) -> sh -> exec rpcbind: one PID all the way
        script = f'mount --bind "{run}" /run && exec rpcbind -f'
        rpc = self._spawn("rpcbind", ["unshare", "-m", "--propagation", "private",
                                      "sh", "-c", script], self.rpcbind_log)
        deadline = time.monotonic() + 10
        while not (run / "rpcbind.sock").exists():
            if rpc.poll() is not None:
                raise self._fail(f"rpcbind {_exit_desc(rpc.returncode)}", self.rpcbind_log)
            if time.monotonic() > deadline:
                raise self._fail("rpcbind did not create /run/rpcbind.sock within 10 s", self.rpcbind_log)
            time.sleep(0.02)
        # nsenter without -p does not fork: the recorded PID is ganesha.nfsd itself
        self._spawn("ganesha", ["nsenter", "-t", str(rpc.pid), "-m", "--",
                                "ganesha.nfsd", "-F", "-f", str(self.ganesha_conf),
                                "-L", str(self.ganesha_log), "-p", str(g / "ganesha.pid"),
                                "-N", "NIV_EVENT"], self.ganesha_log)

    def _probe(self, ports: Iterable[int]) -> set[int]:
        """TCP-connect from the client namespace to the server; returns the ports that answered."""
        code = ("import socket,sys\n"
                "ok=[]\n"
                "for p in map(int,sys.argv[2:]):\n"
                "  s=socket.socket();s.settimeout(0.5)\n"
                "  try:\n    s.connect((sys.argv[1],p));ok.append(p)\n"
                "  except OSError: pass\n"
                "  finally: s.close()\n"
                "print(' '.join(map(str,ok)))\n")
        cp = self.run(self.ns_client, [sys.executable, "-S", "-c", code, self.addresses.server,
                                       *map(str, ports)], capture_output=True, text=True)
        return {int(x) for x in cp.stdout.split()} if cp.returncode == 0 else set()

    def _listening_ports(self, name: str) -> set[int]:
        """TCP ports in LISTEN state whose socket belongs to the recorded server process."""
        pid = self._read_pid(name)
        if not pid:
            return set()
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            ports = set()
            for table in ("tcp", "tcp6"):
                try:
                    lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
                except OSError:
                    continue
                for line in lines:
                    f = line.split()
                    if len(f) > 9 and f[3] == "0A" and f[9] in inodes:
                        ports.add(int(f[1].rsplit(":", 1)[1], 16))
            return ports
        except OSError:
            return set()

    def _wait_ready(self, timeout: float = UP_TIMEOUT) -> None:
        want = set(SMB_PORTS) | set(NFS_PORTS)
        owners = {"smbd": {445}, "rpcbind": {111}, "ganesha": {2049, 20048}}
        deadline = time.monotonic() + timeout
        logs = {"smbd": self.smbd_log, "rpcbind": self.rpcbind_log, "ganesha": self.ganesha_log}
        while True:
            for name in ("smbd", "rpcbind", "ganesha"):
                if not self._server_alive(name):
                    proc = self._procs.get(name)
                    rc = proc.poll() if proc is not None else None
                    raise self._fail(f"{name} {_exit_desc(rc)}", logs[name])
            missing = want - self._probe(sorted(want))
            for name, ports in owners.items():
                missing |= ports - self._listening_ports(name)
            if not missing:
                return
            if time.monotonic() > deadline:
                who = next(n for n, p in owners.items() if p & missing)
                raise self._fail(f"{who}: port(s) {sorted(missing)} on {self.addresses.server} not "
                                 f"answering from its own socket after {timeout:.0f} s", logs[who])
            time.sleep(0.1)

    def _kill_pids(self, pids: list[int], timeout: float = KILL_TIMEOUT) -> None:
        live = [p for p in pids if self._pid_alive(p)]
        for p in live:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while live and time.monotonic() < deadline:
            live = [p for p in live if self._pid_alive(p)]
            if live:
                time.sleep(0.05)
        for p in live:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while live and time.monotonic() < deadline:
            live = [p for p in live if self._pid_alive(p)]
            if live:
                time.sleep(0.02)

    def _kill_recorded(self, name: str) -> None:
        pid = self._read_pid(name)
        # only kill if the pid is still the process we started (comm + our server netns)
        if pid and self._pid_alive(pid, self.SERVERS[name], self.ns_server):
            self._kill_pids([pid])
        self.pid_file(name).unlink(missing_ok=True)
        proc = self._procs.pop(name, None)
        if proc is not None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass

    def _pids_in_lab_namespaces(self) -> dict[int, str]:
        """Processes living in one of this lab's network namespaces (children of our daemons etc.)."""
        inodes = {}
        for ns in self.namespaces:
            ino = _ns_inode(f"/run/netns/{ns}")
            if ino is not None:
                inodes[ino] = ns
        if not inodes:
            return {}
        me = os.getpid()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            ino = _ns_inode(f"/proc/{entry}/ns/net")
            if ino in inodes and _proc_state(int(entry)) not in (None, "Z", "X"):
                found[int(entry)] = inodes[ino]
        return found

    # ------------------------------------------------------------------ API
    def up(self) -> None:
        """Build what is missing, (re)start servers that are not running, wait until they answer."""
        self._preflight()
        self._build_topology()
        self._write_files()
        self._ensure_smb_user()
        self._start_smbd()
        self._start_nfs()
        self._wait_ready()

    def down(self, purge: bool = False) -> None:
        """Stop recorded servers, anything left in the lab's namespaces, delete namespaces and run files."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root to tear down namespaces and processes: run as root")
        for name in ("ganesha", "rpcbind", "smbd"):
            self._kill_recorded(name)
        # leftovers (smbd children, processes other code started inside the lab) would keep running
        # after `ip netns del`: stop them by PID, found through their network namespace
        leftovers = self._pids_in_lab_namespaces()
        if leftovers:
            self._kill_pids(sorted(leftovers))
        have = self.existing_namespaces()
        errors = []
        for ns in self.namespaces:
            if ns in have:
                cp = self._ip("netns", "del", ns, check=False)
                if cp.returncode != 0:
                    errors.append(f"{ns}: {_one_line(cp.stderr)}")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        grun = self.ganesha_dir / "run"
        if grun.exists():
            shutil.rmtree(grun, ignore_errors=True)
        (self.ganesha_dir / "ganesha.pid").unlink(missing_ok=True)
        if purge and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise LabError("could not delete namespace(s): " + "; ".join(errors))

    def status(self) -> dict:
        """JSON-able description: namespaces present, server processes and liveness, addresses."""
        have = self.existing_namespaces()
        servers = {}
        for name in self.SERVERS:
            pid = self._read_pid(name)
            servers[name] = {"pid": pid, "alive": self._server_alive(name)}
        ns_status = {ns: ns in have for ns in self.namespaces}
        iface_addrs: dict[str, dict[str, list[str]]] = {}
        for ns in self.namespaces:
            if ns not in have or ns == self.ns_switch:
                continue
            cp = self._ip("-j", "-4", "addr", "show", ns=ns, check=False)
            if cp.returncode == 0 and cp.stdout.strip():
                iface_addrs[ns] = {
                    i["ifname"]: [f"{x['local']}/{x['prefixlen']}" for x in i.get("addr_info", [])]
                    for i in json.loads(cp.stdout) if i["ifname"] != "lo"}
        return {
            "prefix": self.prefix,
            "root": str(self.root),
            "namespaces": ns_status,
            "servers": servers,
            "up": all(ns_status.values()) and all(s["alive"] for s in servers.values()),
            "addresses": asdict(self.addresses),
            "interfaces": iface_addrs,
            "smb": {"share": self.smb_share, "user": self.smb_user, "path": str(self.smb_share_path)},
            "nfs": {"export_path": str(self.nfs_export_path), "pseudo": self.nfs_pseudo},
            "node_configs": {n: str(self.node_config_path(n)) for n in ("a", "b")},
        }
