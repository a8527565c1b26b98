"""Attention operators: mask specs, the dispatching entry point, and implementations."""

from shakti_jax.ops.attention import attention
from shakti_jax.ops.masks import BlockSparse, MaskSpec

__all__ = ["attention", "BlockSparse", "MaskSpec"]
