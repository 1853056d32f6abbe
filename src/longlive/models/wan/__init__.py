"""The Wan2.2 DiT: config, model (all execution modes), RoPE, attention backends, KV cache, checkpoints."""
from .config import PRESETS, WanConfig
from .kv_cache import KVCache
from .model import WanModel

__all__ = ["PRESETS", "WanConfig", "KVCache", "WanModel"]
