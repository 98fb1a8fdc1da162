"""KV-cache storage behind one interface: the model calls ``update`` once per layer per step."""

from workbench.kv.base import KVCache
from workbench.kv.contiguous import ContiguousKVCache

__all__ = ["KVCache", "ContiguousKVCache"]
