"""Typed records shared by the node, the CLI and the offline tools (see :mod:`schema.records`)."""

from schema.records import *  # noqa: F401,F403
from schema.records import __all__  # noqa: F401
