"""The Shakti transformer, its KV cache, and the `ModelDef` that binds params to it."""

from shakti_jax.model.kv_cache import LayerCache, init_cache
from shakti_jax.model.model_def import ModelDef
from shakti_jax.model.transformer import Transformer

__all__ = ["LayerCache", "ModelDef", "Transformer", "init_cache"]
