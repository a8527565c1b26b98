"""Token-level losses. Each returns sums (not means) so micro-batches and hosts add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array):
    """(sum of masked next-token NLL, sum of masked log-partition^2, number of masked tokens).

    The second term is the z-loss (PaLM): `z_loss * logsumexp(logits)^2` keeps the softmax
    normaliser near 1 and bf16 logits in range. Logits are upcast to f32.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((lse_BT - target_logit_BT) * mask_BT)
    z_sum = jnp.sum(jnp.square(lse_BT) * mask_BT)
    return nll_sum, z_sum, jnp.sum(mask_BT)
