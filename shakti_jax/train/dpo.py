"""Direct preference optimisation: sequence log-probs and the loss variants.

With policy log-probs pi_c, pi_r and reference log-probs ref_c, ref_r of the chosen and
rejected replies, h = (pi_c - ref_c) - (pi_r - ref_r) and, per pair,
  sigmoid (DPO):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (label smoothing)
  ipo:            (h - 1 / (2 beta))^2
  hinge (SLiC):   max(0, 1 - beta h)
The implicit rewards are beta (pi - ref) for each reply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Sum over masked positions of log p(target): [B]. Padding and prompts carry mask 0."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(picked_BT * mask_BT, axis=-1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, *, beta: float, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [P] and per-pair metrics (rewards, accuracy, margin, log-probs)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        per_pair = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif loss == "ipo":
        per_pair = jnp.square(h - 1 / (2 * beta))
    elif loss == "hinge":
        per_pair = jax.nn.relu(1 - beta * h)
    else:
        raise ValueError(f"dpo loss {loss!r} is not one of {LOSSES}")
    reward_c = beta * (policy_chosen - ref_chosen)
    reward_r = beta * (policy_rejected - ref_rejected)
    metrics = {"rewards/chosen": reward_c, "rewards/rejected": reward_r,
               "rewards/accuracy": (reward_c > reward_r).astype(jnp.float32),
               "rewards/margin": reward_c - reward_r,
               "logps/policy_chosen": policy_chosen, "logps/policy_rejected": policy_rejected,
               "logps/ref_chosen": ref_chosen, "logps/ref_rejected": ref_rejected}
    return per_pair, metrics
