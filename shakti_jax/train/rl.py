"""Online RL math: per-token log-probs, GRPO advantages, GAE, and the clipped losses.

Arrays are token-aligned like the LM batch: position t of a row scores `targets[t]`, and
`mask` is 1 on the sampled (completion) tokens, EOS included. Losses return sums over masked
tokens, so the step divides by the global token count (a token-level mean, as DAPO / TRL's
"dapo" loss; every completion token weighs the same whatever its reply's length).

  ratio_t = exp(logp_t - old_t)
  policy  = -min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t)
  GRPO    A_t = (r - mean(group)) / (std(group) + 1e-4) for every token of the reply
          (population std; `scale=False` leaves r - mean), loss_t = policy + beta k3_t,
          k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (Schulman's unbiased KL estimate)
  PPO     per-token reward -beta (old_t - ref_t), plus the reply's score on its last token;
          GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1};
          returns R_t = A_t + V_t; advantages whitened over the batch's tokens;
          value loss 0.5 max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALGORITHMS = ("grpo", "ppo")


def token_logps(logits_BTV: jax.Array, targets_BT: jax.Array, temperature: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, T], entropy [B, T]) under softmax(logits / temperature), f32."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    return picked_BT, entropy_BT


def group_advantages(rewards_PG: jax.Array, scale: bool = True) -> jax.Array:
    """GRPO: each reply's reward minus its group's mean (over the G replies of one prompt),
    divided by the group's std + 1e-4 when `scale`. [P, G] -> [P, G]."""
    centred = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
    if not scale:
        return centred
    return centred / (jnp.std(rewards_PG, axis=1, keepdims=True) + 1e-4)


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's masked (contiguous) tokens:
    (advantages, returns) [B, T], zero off the mask. The value after the last token is 0."""
    mask_BT = mask_BT.astype(jnp.float32)
    values_BT = values_BT * mask_BT
    next_values_BT = jnp.concatenate([values_BT[:, 1:], jnp.zeros_like(values_BT[:, :1])], axis=1)
    delta_BT = (rewards_BT + gamma * next_values_BT - values_BT) * mask_BT

    def back(carry_B, xs):
        delta_B, m_B = xs
        adv_B = (delta_B + gamma * lam * carry_B) * m_B
        return adv_B, adv_B

    _, adv_TB = jax.lax.scan(back, jnp.zeros_like(delta_BT[:, 0]), (delta_BT.T, mask_BT.T), reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, (adv_BT + values_BT) * mask_BT


def whiten(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """(x - mean) / (std + 1e-8) over the masked entries (population std); 0 off the mask."""
    mask_BT = mask_BT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask_BT), 1.0)
    mean = jnp.sum(x_BT * mask_BT) / n
    var = jnp.sum(jnp.square(x_BT - mean) * mask_BT) / n
    return (x_BT - mean) / (jnp.sqrt(var) + 1e-8) * mask_BT


def kl_penalty_rewards(old_logps_BT: jax.Array, ref_logps_BT: jax.Array, scores_B: jax.Array,
                       mask_BT: jax.Array, beta: float) -> jax.Array:
    """PPO's per-token rewards: -beta (old - ref) on every sampled token, plus the reply's
    score on its last one. [B, T]."""
    mask_BT = mask_BT.astype(jnp.float32)
    last_BT = mask_BT * (1.0 - jnp.concatenate([mask_BT[:, 1:], jnp.zeros_like(mask_BT[:, :1])], axis=1))
    return (-beta * (old_logps_BT - ref_logps_BT) + scores_B[:, None] * last_BT) * mask_BT


def k3_kl(logps_BT: jax.Array, ref_logps_BT: jax.Array) -> jax.Array:
    """exp(ref - logp) - (ref - logp) - 1 per token: >= 0, unbiased for KL(policy || ref)."""
    diff_BT = ref_logps_BT - logps_BT
    return jnp.exp(diff_BT) - diff_BT - 1.0


def clipped_policy_loss(logps_BT: jax.Array, old_logps_BT: jax.Array, advantages_BT: jax.Array,
                        mask_BT: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """(sum of the clipped surrogate loss, number of tokens whose ratio was clipped) over the mask."""
    ratio_BT = jnp.exp(logps_BT - old_logps_BT)
    unclipped = ratio_BT * advantages_BT
    clipped = jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps) * advantages_BT
    loss_BT = -jnp.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).astype(jnp.float32)  # the min took the clipped branch
    return jnp.sum(loss_BT * mask_BT), jnp.sum(was_clipped * mask_BT)


def clipped_value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array,
                       mask_BT: jax.Array, clip_eps: float) -> jax.Array:
    """Sum over the mask of 0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps, clip_eps)
    loss_BT = 0.5 * jnp.maximum(jnp.square(values_BT - returns_BT), jnp.square(clipped_BT - returns_BT))
    return jnp.sum(loss_BT * mask_BT)
