"""Building blocks: stacked parameters with logical axis names, norms, RoPE, MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shakti_jax.config import ModelConfig


def param(rngs: nnx.Rngs, stack: int | None, shape: tuple[int, ...], axes: tuple[str, ...],
          std: float | None, dtype: str) -> nnx.Param:
    """A parameter carrying logical axis names (mapped to a mesh only by shakti_jax.sharding).

    `stack` prepends a "layers" axis of that many stacked layers (None: not stacked).
    std=None means ones (norm scales); std=0.0 means zeros (biases).
    """
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Norm(nnx.Module):
    """RMSNorm, or LayerNorm with a bias; computed in f32, returned in the input dtype."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.eps = cfg.norm_eps
        self.scale = param(rngs, stack, (cfg.d_model,), ("embed",), None, cfg.param_dtype)
        self.bias = (param(rngs, stack, (cfg.d_model,), ("embed",), 0.0, cfg.param_dtype)
                     if cfg.norm == "layernorm" else None)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        if self.bias is not None:
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(x_BTD.dtype)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-halves pairing: dim i pairs with dim i + H/2 (HF Llama style).

    llama.cpp rotates interleaved pairs (2i, 2i+1), so the GGUF exporter permutes the rows
    of the Q and K projections once; the HF export writes them unchanged.
    Computed in f32 and cast back so q, k and v keep one dtype.
    """
    H = x_BTNH.shape[-1]
    inv_freq_F = theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
    cos_BT1F, sin_BT1F = jnp.cos(angle_BTF)[:, :, None], jnp.sin(angle_BTF)[:, :, None]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    rotated = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], -1)
    return rotated.astype(x_BTNH.dtype)


class MLP(nnx.Module):
    """SwiGLU (silu(x W_gate) * x W_up) W_down, or non-gated silu(x W_up) W_down."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        D, F, std = cfg.d_model, cfg.ffn_dim, cfg.init_std
        self.dtype = cfg.dtype
        self.w_gate = (param(rngs, stack, (D, F), ("embed", "mlp"), std, cfg.param_dtype)
                       if cfg.mlp == "swiglu" else None)
        self.w_up = param(rngs, stack, (D, F), ("embed", "mlp"), std, cfg.param_dtype)
        self.w_down = param(rngs, stack, (F, D), ("mlp", "embed"),
                            std / (2 * cfg.num_layers) ** 0.5, cfg.param_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(self.dtype)
        h_BTF = x @ self.w_up[...].astype(self.dtype)
        if self.w_gate is not None:
            h_BTF = jax.nn.silu(x @ self.w_gate[...].astype(self.dtype)) * h_BTF
        else:
            h_BTF = jax.nn.silu(h_BTF)
        return h_BTF @ self.w_down[...].astype(self.dtype)
