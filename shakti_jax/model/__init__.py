"""The Shakti transformer and its KV cache."""

from shakti_jax.model.kv_cache import LayerCache, init_cache
from shakti_jax.model.transformer import Transformer

__all__ = ["LayerCache", "Transformer", "init_cache"]
