"""The decoder-only transformer: embed -> pre-norm blocks (stacked, scanned) -> norm -> logits.

Layers are stored stacked by period of the attention pattern (`ModelConfig.layer_groups`): a
group holds one `Block` per slot of the period, each with a leading "layers" axis of the
group's repeats. Running a group scans over its repeats (`lax.scan`, or a Python loop over
the same params with `scan_layers=False`), each step running one period, optionally under
`jax.checkpoint` (`remat`). Activations are constrained to logical axes at period boundaries.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from shakti_jax.config import ModelConfig
from shakti_jax.model.attention import Attention
from shakti_jax.model.kv_cache import Caches, LayerCache
from shakti_jax.model.layers import MLP, Norm, param
from shakti_jax.sharding import constrain

ACTIVATION_AXES = ("batch", "seq", "embed")


class Block(nnx.Module):
    """x + drop(attn(norm(x))), then x + drop(mlp(norm(x))); params stacked `stack` deep."""

    def __init__(self, cfg: ModelConfig, kind: str, stack: int, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs, stack)
        self.attn = Attention(cfg, kind, rngs, stack)
        self.mlp_norm = Norm(cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        self.dropout_rate = cfg.dropout_rate

    def _residual(self, x_BTD, update_BTD, key):
        if key is not None and self.dropout_rate:
            keep = 1.0 - self.dropout_rate
            kept_BTD = jax.random.bernoulli(key, keep, update_BTD.shape)
            update_BTD = jnp.where(kept_BTD, update_BTD / keep, 0).astype(update_BTD.dtype)
        return x_BTD + update_BTD.astype(x_BTD.dtype)

    def _finish(self, x_BTD, attn_out_BTD, key):
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x_BTD = self._residual(x_BTD, attn_out_BTD, keys[0])
        return self._residual(x_BTD, self.mlp(self.mlp_norm(x_BTD)), keys[1])

    def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, key=None):
        out_BTD = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
        return self._finish(x_BTD, out_BTD, key)

    def prefill(self, x_BTD, lengths_B, cache: LayerCache):
        out_BTD, cache = self.attn.prefill(self.attn_norm(x_BTD), lengths_B, cache)
        return self._finish(x_BTD, out_BTD, None), cache

    def decode(self, x_BTD, positions_BT, cache: LayerCache):
        out_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), positions_BT, cache)
        return self._finish(x_BTD, out_BTD, None), cache


class LayerGroup(nnx.Module):
    """`repeats` repetitions of one period of layer kinds, params stacked on axis 0."""

    def __init__(self, cfg: ModelConfig, kinds: tuple[str, ...], repeats: int, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, kind, repeats, rngs) for kind in kinds])
        self.repeats = repeats


def _remat(fn: Callable, policy: str) -> Callable:
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


def run_group(group: LayerGroup, period_fn: Callable, x: Any, xs: Any, *, scan: bool,
              remat: str = "none") -> tuple[Any, Any]:
    """Fold `period_fn(blocks, x, xs_i) -> (x, ys_i)` over the group's repeats, each call
    seeing one repeat's (unstacked) blocks and the i-th slice of `xs`; ys are stacked."""
    graphdef, state = nnx.split(group.blocks)

    def body(carry, sliced):
        state_i, xs_i = sliced
        return period_fn(nnx.merge(graphdef, state_i), carry, xs_i)

    body = _remat(body, remat)
    if scan:
        return jax.lax.scan(body, x, (state, xs))
    ys = []
    for i in range(group.repeats):
        x, y = body(x, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


class Transformer(nnx.Module):
    """Shakti decoder. The residual stream is f32; matmuls run in `cfg.dtype`; logits are f32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = param(rngs, None, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                               cfg.init_std, cfg.param_dtype)
        self.groups = nnx.List([LayerGroup(cfg, kinds, repeats, rngs)
                                for kinds, repeats in cfg.layer_groups])
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        param(rngs, None, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              cfg.init_std, cfg.param_dtype))
        self.value_head = (param(rngs, None, (cfg.d_model, 1), ("embed", None), cfg.init_std,
                                 cfg.param_dtype) if cfg.value_head else None)

    def _embed(self, tokens_BT):
        return constrain(self.embedding[...][tokens_BT].astype(jnp.float32), ACTIVATION_AXES)

    def _logits(self, x_BTD):
        x = self.final_norm(x_BTD).astype(self.cfg.dtype)
        if self.lm_head is None:
            w_DV = self.embedding[...].astype(self.cfg.dtype).T
        else:
            w_DV = self.lm_head[...].astype(self.cfg.dtype)
        return jnp.einsum("btd,dv->btv", x, w_DV, preferred_element_type=jnp.float32)

    def _values(self, x_BTD):
        if self.value_head is None:
            raise ValueError("this model has no value head (model.value_head=False)")
        x = self.final_norm(x_BTD).astype(self.cfg.dtype)
        w_D1 = self.value_head[...].astype(self.cfg.dtype)
        return jnp.einsum("btd,do->bto", x, w_D1, preferred_element_type=jnp.float32)[..., 0]

    def _run(self, period_fn, x, per_group_xs, remat="none"):
        ys = []
        for group, xs in zip(self.groups, per_group_xs):
            x, y = run_group(group, period_fn, x, xs, scan=self.cfg.scan_layers, remat=remat)
            ys.append(y)
        return x, ys

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, *,
                 dropout_key: jax.Array | None = None, logits_at_BK: jax.Array | None = None
                 ) -> jax.Array:
        """Logits [B, T, V] for whole sequences (training, scoring, the no-cache reference),
        or [B, K, V] at the sequence indices `logits_at_BK` only (the head skips the rest).
        Dropout is on only when `dropout_key` is given (each layer folds in its index)."""
        x_BTD = self.hidden(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key)
        if logits_at_BK is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_BK[..., None], axis=1)
        return self._logits(x_BTD)

    def values(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, dropout_key: jax.Array | None = None
               ) -> jax.Array:
        """The value head at every position [B, T] (f32); the LM head is not computed."""
        return self._values(self.hidden(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key))

    def logits_and_values(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                          segment_ids_BT: jax.Array | None = None, *,
                          dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Logits [B, T, V] and values [B, T] from one pass (PPO's policy and critic)."""
        x_BTD = self.hidden(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key)
        return self._logits(x_BTD), self._values(x_BTD)

    def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, dropout_key: jax.Array | None = None
               ) -> jax.Array:
        """The residual stream after the last layer [B, T, D] (before the final norm)."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)

        def period(blocks, x_BTD, key):
            for slot, block in enumerate(blocks):
                k = None if key is None else jax.random.fold_in(key, slot)
                x_BTD = block(x_BTD, positions_BT, segment_ids_BT, k)
            return constrain(x_BTD, ACTIVATION_AXES), None

        keys = [None] * len(self.groups)
        if dropout_key is not None:
            keys = [jax.random.split(jax.random.fold_in(dropout_key, g), group.repeats)
                    for g, group in enumerate(self.groups)]
        x_BTD, _ = self._run(period, self._embed(tokens_BT), keys, remat=self.cfg.remat)
        return x_BTD

    def prefill(self, tokens_BT: jax.Array, lengths_B: jax.Array, caches: Caches):
        """Right-padded prompts -> (logits at each prompt's last token [B, V], filled caches)."""
        period = _with_caches(lambda block, x, cache: block.prefill(x, lengths_B, cache))
        x_BTD, caches = self._run(period, self._embed(tokens_BT), caches)
        last_BD = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
        return self._logits(last_BD)[:, 0], caches

    def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, caches: Caches):
        """New tokens at `positions_BT` -> (logits [B, T, V], updated caches)."""
        period = _with_caches(lambda block, x, cache: block.decode(x, positions_BT, cache))
        x_BTD, caches = self._run(period, self._embed(tokens_BT), caches)
        return self._logits(x_BTD), caches


def _with_caches(step: Callable) -> Callable:
    """A period function running `step(block, x, cache) -> (x, cache)` over its slots."""

    def period(blocks, x_BTD, group_caches):
        new = []
        for block, cache in zip(blocks, group_caches):
            x_BTD, cache = step(block, x_BTD, cache)
            new.append(cache)
        return x_BTD, tuple(new)

    return period
