"""The real file servers of the lab: Samba smbd, rpcbind and NFS-Ganesha in ``{prefix}-srv``.

Their config files are built from data (sections of keys and values) and written only when they
change; the daemons run in the foreground under PIDs the :class:`~.processes.Supervisor` records.

State under the lab's root::

    samba/{smb.conf,client.conf,lock,state,cache,pid,private,ncalrpc,binddns,log}
    ganesha/{ganesha.conf,ganesha.log,recovery,run}   (run/ is bound over /run for rpcbind+ganesha)
    srv/share   SMB share        srv/export   NFS export (pseudo path /export)
    run/{smbd,rpcbind,ganesha}.pid

Quirks handled here:

* Ganesha starts in a 90 s NFSv4 grace period (v4 OPEN fails with NFS4ERR_GRACE): ``Graceless = true``.
* rpcbind and ganesha share a private mount namespace with ganesha/run bound over /run; ganesha is
  started with ``nsenter -t <rpcbind pid> -m`` so both recorded PIDs are the real daemons.
* smbd panics (SIGABRT) when 445 is taken; readiness therefore also checks that the listening socket on
  each port belongs to the recorded daemon, not just that something answers.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Union

from . import netns
from .errors import LabError, exit_desc, log_tail, one_line
from .processes import Supervisor
from .topology import Addresses

__all__ = ["ServerFiles", "Servers", "render_smb_conf", "render_ganesha_conf", "SMB_PORTS", "NFS_PORTS"]

SMB_PORTS = (445,)
NFS_PORTS = (2049, 111, 20048)
UP_TIMEOUT = 30.0

#: name -> the command name the daemon runs as
PROGRAMS = {"smbd": "smbd", "rpcbind": "rpcbind", "ganesha": "ganesha.nfsd"}
#: which daemon owns which TCP port
PORT_OWNERS = {"smbd": {445}, "rpcbind": {111}, "ganesha": {2049, 20048}}

Value = Union[str, int, bool, Path, list]


@dataclass(frozen=True)
class ServerFiles:
    """Where the servers' configs, state, logs and data live under the lab's root."""

    root: Path

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

    @property
    def ganesha_run(self) -> Path:
        """Bound over /run in rpcbind's and ganesha's private mount namespace."""
        return self.ganesha_dir / "run"

    @property
    def share(self) -> Path:
        return self.root / "srv" / "share"

    @property
    def export(self) -> Path:
        return self.root / "srv" / "export"

    def log(self, name: str) -> Path:
        return {"smbd": self.smbd_log, "rpcbind": self.rpcbind_log, "ganesha": self.ganesha_log}[name]


# ------------------------------------------------------------------------------ config renderers
def _smb_value(v: Value) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def render_smb_conf(sections: Mapping[str, Mapping[str, Value]], title: str) -> str:
    """smb.conf text: ``[section]`` then ``   key = value`` lines (booleans as yes/no)."""
    out = [f"# {title}"]
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"   {k} = {_smb_value(v)}".rstrip() for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


def _ganesha_value(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def render_ganesha_conf(blocks: Mapping[str, Mapping], title: str, indent: str = "") -> str:
    """ganesha.conf text: ``BLOCK { key = value; SUBBLOCK { ... } }`` (nested dicts are blocks)."""
    out = [f"# {title}"] if not indent else []
    for name, body in blocks.items():
        out.append(f"{indent}{name} {{")
        for k, v in body.items():
            if isinstance(v, Mapping):
                out.append(render_ganesha_conf({k: v}, title, indent + "    ").rstrip("\n"))
            else:
                out.append(f"{indent}    {k} = {_ganesha_value(v)};")
        out.append(f"{indent}}}")
    return "\n".join(out) + "\n"


def write_if_changed(path: Path, text: str) -> None:
    """Write only when different, so ``up`` on a running lab changes nothing under its servers."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


class Servers:
    """smbd, rpcbind and ganesha.nfsd of one lab: files, users, test data, processes, readiness."""

    smb_share = "share"
    smb_user = "pp"
    smb_password = "pairproxy"
    nfs_pseudo = "/export"

    def __init__(self, prefix: str, root: Path, ns: str, client_ns: str, addresses: Addresses) -> None:
        self.prefix = prefix
        self.files = ServerFiles(root)
        self.ns = ns
        self.client_ns = client_ns
        self.addresses = addresses
        self.supervisor = Supervisor(root / "run", ns, PROGRAMS)

    # --------------------------------------------------------------------------- config data
    def smb_conf_data(self) -> dict[str, dict[str, Value]]:
        s, a = self.files.samba_dir, self.addresses
        return {
            "global": {
                "workgroup": "PAIRPROXY", "server role": "standalone server", "netbios name": "PPSRV",
                "lock directory": s / "lock", "state directory": s / "state", "cache directory": s / "cache",
                "pid directory": s / "pid", "private dir": s / "private", "ncalrpc dir": s / "ncalrpc",
                "binddns dir": s / "binddns",
                "log file": f"{s / 'log'}/log.%m", "max log size": 1000, "log level": 1,
                "interfaces": f"{a.server}/{a.prefixlen}", "bind interfaces only": True,
                "disable netbios": True, "smb ports": 445,
                "passdb backend": f"tdbsam:{s / 'private' / 'passdb.tdb'}",
                "server min protocol": "SMB2", "map to guest": "never", "usershare path": "",
                "load printers": False, "printing": "bsd", "printcap name": "/dev/null",
                "disable spoolss": True, "rpc start on demand helpers": False, "kernel oplocks": False,
            },
            self.smb_share: {
                "path": self.files.share, "read only": False, "browseable": True,
                "valid users": self.smb_user, "create mask": "0664", "directory mask": "0775",
            },
        }

    def smb_client_conf_data(self) -> dict[str, dict[str, Value]]:
        c = self.files.samba_dir / "client"
        return {"global": {"lock directory": c / "lock", "state directory": c / "state",
                           "cache directory": c / "cache", "private dir": c / "private",
                           "client min protocol": "SMB2", "disable netbios": True, "log level": 0}}

    def ganesha_conf_data(self) -> dict[str, dict]:
        return {
            "NFS_CORE_PARAM": {"Bind_addr": self.addresses.server, "NFS_Port": 2049, "MNT_Port": 20048,
                               "Enable_NLM": False, "Enable_RQUOTA": False, "Enable_UDP": False,
                               "Protocols": [3, 4],
                               # Ganesha's default of 1024 would cap the 2,000-connection test
                               "RPC_Max_Connections": 10000},
            "NFS_KRB5": {"Active_krb5": False},
            "NFSV4": {"RecoveryBackend": "fs", "RecoveryRoot": self.files.ganesha_dir / "recovery",
                      "Graceless": True},
            "EXPORT": {"Export_Id": 1, "Path": self.files.export, "Pseudo": self.nfs_pseudo,
                       "Access_Type": "RW", "Squash": "No_Root_Squash", "Protocols": [3, 4],
                       "Transports": "TCP", "SecType": "sys", "FSAL": {"Name": "VFS"}},
            "LOG": {"Default_Log_Level": "EVENT"},
        }

    # ------------------------------------------------------------------------------- files
    def write_files(self) -> None:
        """Directories, users, the three config files and the test data (idempotent)."""
        f, s, g = self.files, self.files.samba_dir, self.files.ganesha_dir
        for d in ("lock", "state", "cache", "pid", "private", "ncalrpc", "binddns", "log",
                  "client/lock", "client/state", "client/cache", "client/private"):
            (s / d).mkdir(parents=True, exist_ok=True)
        os.chmod(s / "private", 0o700)
        for d in ("recovery", "run"):
            (g / d).mkdir(parents=True, exist_ok=True)
        (f.root / "srv").mkdir(exist_ok=True)
        os.chmod(f.root / "srv", 0o755)
        f.share.mkdir(exist_ok=True)
        f.export.mkdir(exist_ok=True)
        self.supervisor.run_dir.mkdir(exist_ok=True)

        self._ensure_unix_user()
        pw = pwd.getpwnam(self.smb_user)
        os.chown(f.share, pw.pw_uid, pw.pw_gid)
        os.chmod(f.share, 0o775)
        os.chmod(f.export, 0o777)

        title = f"written by pairproxy lab ({self.prefix}); do not edit"
        write_if_changed(f.smb_conf, render_smb_conf(self.smb_conf_data(), title))
        write_if_changed(f.smb_client_conf, render_smb_conf(
            self.smb_client_conf_data(), f"smbclient config of pairproxy lab ({self.prefix}): private state dirs"))
        write_if_changed(f.ganesha_conf, render_ganesha_conf(self.ganesha_conf_data(), title))

        rpc = pwd.getpwnam("_rpc")
        rpcdir = f.ganesha_run / "rpcbind"
        rpcdir.mkdir(exist_ok=True)
        os.chown(rpcdir, rpc.pw_uid, rpc.pw_gid)
        (f.ganesha_run / "ganesha").mkdir(exist_ok=True)
        self._write_test_data()

    def _ensure_unix_user(self) -> None:
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
            raise LabError(f"useradd {self.smb_user} failed: {one_line(cp.stderr)}")

    def _write_test_data(self) -> None:
        pw = pwd.getpwnam(self.smb_user)
        blob = None
        for d, owner in ((self.files.share, pw), (self.files.export, None)):
            hello = d / "hello.txt"
            if not hello.exists():
                hello.write_text("hello from the pairproxy lab\n")
            data = d / "data-1M.bin"
            if not data.exists() or data.stat().st_size != 1 << 20:
                if blob is None:
                    blob = os.urandom(1 << 20)
                data.write_bytes(blob)
            if owner is not None:
                for p in (hello, data):
                    os.chown(p, owner.pw_uid, owner.pw_gid)

    def ensure_smb_user(self) -> None:
        """The Samba account ``pp`` with its password (added once)."""
        conf = str(self.files.smb_conf)
        cp = subprocess.run(["pdbedit", "-s", conf, "-L"], capture_output=True, text=True) \
            if shutil.which("pdbedit") else None
        if cp is not None and cp.returncode == 0 and any(
                line.split(":", 1)[0] == self.smb_user for line in cp.stdout.splitlines()):
            return
        pw = f"{self.smb_password}\n{self.smb_password}\n"
        cp = subprocess.run(["smbpasswd", "-c", conf, "-s", "-a", self.smb_user],
                            input=pw, capture_output=True, text=True)
        if cp.returncode != 0:
            raise LabError(f"smbpasswd -a {self.smb_user} failed: {one_line(cp.stderr + cp.stdout)}")

    # ---------------------------------------------------------------------------- processes
    def _fail(self, what: str, log: Path) -> LabError:
        return LabError(f"{what}; last lines of {log}:\n{log_tail(log)}")

    def alive(self, name: str) -> bool:
        return self.supervisor.alive(name)

    def start(self) -> None:
        """(Re)start the daemons that are not running and wait until each answers from its own socket."""
        self._start_smbd()
        self._start_nfs()
        self._wait_ready()

    def stop(self) -> None:
        for name in ("ganesha", "rpcbind", "smbd"):
            self.supervisor.stop(name)

    def _start_smbd(self) -> None:
        if self.alive("smbd"):
            return
        self.supervisor.stop("smbd")
        self.files.smbd_log.write_bytes(b"")
        self.supervisor.spawn("smbd", ["smbd", "-F", "--no-process-group", "--debug-stdout",
                                       "-s", str(self.files.smb_conf)], self.files.smbd_log)

    def _start_nfs(self) -> None:
        if self.alive("rpcbind") and self.alive("ganesha"):
            return
        # both share one private mount namespace: restart the pair together
        self.supervisor.stop("ganesha")
        self.supervisor.stop("rpcbind")
        f = self.files
        run = f.ganesha_run
        for stale in ("rpcbind.sock", "rpcbind.lock"):
            (run / stale).unlink(missing_ok=True)
        for p in (run / "rpcbind").iterdir():
            p.unlink(missing_ok=True)
        f.rpcbind_log.write_bytes(b"")
        f.ganesha_log.write_bytes(b"")
        # ip netns exec -> unshare -m (no fork) -> sh -> exec rpcbind: one PID all the way
        script = f'mount --bind "{run}" /run && exec rpcbind -f'
        rpc = self.supervisor.spawn("rpcbind", ["unshare", "-m", "--propagation", "private",
                                                "sh", "-c", script], f.rpcbind_log)
        deadline = time.monotonic() + 10
        while not (run / "rpcbind.sock").exists():
            if rpc.poll() is not None:
                raise self._fail(f"rpcbind {exit_desc(rpc.returncode)}", f.rpcbind_log)
            if time.monotonic() > deadline:
                raise self._fail("rpcbind did not create /run/rpcbind.sock within 10 s", f.rpcbind_log)
            time.sleep(0.02)
        # nsenter without -p does not fork: the recorded PID is ganesha.nfsd itself
        self.supervisor.spawn("ganesha", ["nsenter", "-t", str(rpc.pid), "-m", "--",
                                          "ganesha.nfsd", "-F", "-f", str(f.ganesha_conf),
                                          "-L", str(f.ganesha_log), "-p", str(f.ganesha_dir / "ganesha.pid"),
                                          "-N", "NIV_EVENT"], f.ganesha_log)

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
        cp = netns.run(self.client_ns, [sys.executable, "-S", "-c", code, self.addresses.server,
                                        *map(str, ports)], capture_output=True, text=True)
        return {int(x) for x in cp.stdout.split()} if cp.returncode == 0 else set()

    def _wait_ready(self, timeout: float = UP_TIMEOUT) -> None:
        want = set(SMB_PORTS) | set(NFS_PORTS)
        deadline = time.monotonic() + timeout
        while True:
            for name in PROGRAMS:
                if not self.alive(name):
                    raise self._fail(f"{name} {exit_desc(self.supervisor.returncode(name))}", self.files.log(name))
            missing = want - self._probe(sorted(want))
            for name, ports in PORT_OWNERS.items():
                missing |= ports - self.supervisor.listening_ports(name)
            if not missing:
                return
            if time.monotonic() > deadline:
                who = next(n for n, p in PORT_OWNERS.items() if p & missing)
                raise self._fail(f"{who}: port(s) {sorted(missing)} on {self.addresses.server} not "
                                 f"answering from its own socket after {timeout:.0f} s", self.files.log(who))
            time.sleep(0.1)

    def remove_run_files(self) -> None:
        """What only a running lab needs: PID files and ganesha's /run."""
        shutil.rmtree(self.supervisor.run_dir, ignore_errors=True)
        shutil.rmtree(self.files.ganesha_run, ignore_errors=True)
        (self.files.ganesha_dir / "ganesha.pid").unlink(missing_ok=True)

    def status(self) -> dict[str, dict]:
        return {name: {"pid": self.supervisor.read_pid(name), "alive": self.alive(name)} for name in PROGRAMS}
