"""DualForce model components."""
from .dualforce import DualForceModel, DualForceOutput
from .kv_cache import KVCache

__all__ = ["DualForceModel", "DualForceOutput", "KVCache"]
