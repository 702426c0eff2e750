"""The product does not import its lab: `pairproxy lab` is a plugin (entry point group
``pairproxy.commands``), and no module of ``proxy`` imports ``deploy``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_proxy_module_imports_deploy_in_source():
    """Every import statement in proxy/, also those inside functions (lazy imports)."""
    offenders = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
                          for n in names if n == "deploy" or n.startswith("deploy.")]
    assert not offenders, offenders


def test_importing_every_proxy_module_loads_no_deploy_module():
    """In a fresh interpreter: import every module of proxy/ (the CLI included); nothing of deploy/
    may be in sys.modules afterwards."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import proxy\n"
        "mods = sorted(m.name for m in pkgutil.walk_packages(proxy.__path__, 'proxy.'))\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps({'imported': mods,\n"
        "                  'deploy': sorted(m for m in sys.modules if m == 'deploy' or m.startswith('deploy.'))}))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert "proxy.cli" in out["imported"] and "proxy.node" in out["imported"]
    assert out["deploy"] == []


def test_lab_command_comes_from_the_entry_point():
    """The installed package declares the plugin, and the CLI built from it has `lab` with its commands."""
    from importlib.metadata import entry_points

    from proxy.cli import build_parser

    plugins = {ep.name: ep.value for ep in entry_points(group="pairproxy.commands")}
    assert plugins.get("lab") == "deploy.lab.cli:register"
    cp = subprocess.run([sys.executable, "-m", "proxy.cli", "lab", "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    for command in ("up", "down", "status"):
        assert command in cp.stdout
    args = build_parser().parse_args(["lab", "demo", "--prefix", "zz", "--down"])
    assert args.prefix == "zz" and args.down and callable(args.func)
