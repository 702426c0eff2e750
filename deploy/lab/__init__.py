"""Lab of network namespaces with real Samba and NFS-Ganesha servers (see deploy.lab.core)."""

from .core import Addresses, Lab, LabError, PairTimings

__all__ = ["Lab", "LabError", "Addresses", "PairTimings"]
