"""How the lab reports a failure: one :class:`LabError` with one human-readable line, plus the
informative end of a server's log when a server is the one that failed."""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["LabError", "one_line", "log_tail", "exit_desc"]


class LabError(RuntimeError):
    """A lab operation failed; the message is one human-readable line (plus an optional log tail)."""


_ERROR_WORDS = ("error", "fail", "panic", "crit", "fatal", "denied", "unable", "cannot", "can't", "in use")


def one_line(text: str, lines: int = 3) -> str:
    """The last few non-empty lines of a tool's output, joined into one line."""
    keep = [l.strip() for l in text.splitlines() if l.strip()][-lines:]
    return " | ".join(keep) or "(no output)"


def log_tail(path: Path, lines: int = 12) -> str:
    """The informative end of a server log: its last error-looking lines, else its last lines."""
    try:
        data = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return f"(no log at {path})"
    if not data:
        return f"(log {path} is empty)"
    errs = [l for l in data if any(w in l.lower() for w in _ERROR_WORDS)]
    return "\n".join((errs or data)[-lines:])


def exit_desc(rc: int | None) -> str:
    """How a process ended, in words ("was killed by SIGABRT", "exited with status 1")."""
    if rc is None:
        return "is not running"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"
