"""Sizes and costs of a model, computed from parameter shapes (nothing is allocated).

Shapes come from `nnx.eval_shape` of the real model, so the counts cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from shakti_jax.config import ModelConfig

# GGUF block formats: bytes per block of 32 weights (one f16 scale + packed values).
BLOCK_BYTES = {"q8_0": 34, "q5_0": 22, "q4_0": 18}
FLOAT_BYTES = {"f32": 4, "bf16": 2}
QK = 32


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def row_length(self) -> int:
        """Length of one row in the exported [out, in] layout (the contracted axes)."""
        if self.path == "embedding":
            return self.shape[-1]
        if self.axes[-1] == "embed":
            return math.prod(self.shape[:-1])
        return self.shape[0]


def tensors(cfg: ModelConfig) -> list[Tensor]:
    """Every parameter of every layer with its path, shape and logical axes."""
    from shakti_jax.model import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    out = []
    for path, var in jax.tree_util.tree_leaves_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        shape, axes = tuple(var.shape), tuple(var.get_metadata()["out_sharding"])
        if axes[0] == "layers":  # stacked layers: one tensor per layer, as the exporter writes
            out.extend(Tensor(f"{name}.{i}", shape[1:], axes[1:]) for i in range(shape[0]))
        else:
            out.append(Tensor(name, shape, axes))
    return out


def part_of(path: str) -> str:
    """Group a parameter path into embedding / attention / mlp / norms / lm_head / value_head."""
    if path in ("embedding", "lm_head", "value_head"):
        return path
    if ".attn." in path:
        return "attention"
    if ".mlp." in path:
        return "mlp"
    return "norms"


def summary(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameter breakdown, FLOPs per token, KV-cache and weight bytes, as one dict.

    Attention FLOPs are averaged over sequences of `seq_len` tokens (default: the context).
    """
    seq_len = seq_len or cfg.max_seq_len
    ts = tensors(cfg)
    parts: dict[str, int] = {}
    for t in ts:
        parts[part_of(t.path)] = parts.get(part_of(t.path), 0) + t.size
    total = sum(parts.values())
    embedding_like = parts["embedding"] + parts.get("lm_head", 0)
    per_layer = {p: parts[p] // cfg.num_layers for p in ("attention", "mlp")}

    # Matmul FLOPs: 2 per weight per token forward, including the output projection even when
    # it is tied to the embedding (the gather that embeds tokens costs no FLOPs).
    matmul_params = parts["attention"] + parts["mlp"] + cfg.vocab_size * cfg.d_model
    # Attention: QK^T and PV, 2 FLOPs per multiply-add, per query head, over the keys each
    # query actually sees at full context (so sliding windows and sparse layouts count less).
    visible = {kind: cfg.layer_mask(cfg.layer_kinds.index(kind)).visible_keys_per_query(seq_len)
               for kind in set(cfg.layer_kinds)}
    attn_fwd = sum(4 * cfg.num_heads * cfg.head_dim * visible[k] for k in cfg.layer_kinds)
    fwd = 2 * matmul_params + attn_fwd

    kv_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16
    cache_at_context = sum(kv_token * (min(cfg.window, cfg.max_seq_len) if k == "window"
                                       else cfg.max_seq_len) for k in cfg.layer_kinds)
    return {
        "model": cfg.name,
        "layers": cfg.num_layers,
        "layer_kinds": list(cfg.layer_kinds),
        "parts": parts,
        "per_layer": per_layer,
        "total_params": total,
        "non_embedding_params": total - embedding_like,
        "flops_per_token": 3 * fwd,
        "forward_flops_per_token": fwd,
        "attention_flops_per_token": 3 * attn_fwd,
        "visible_keys_per_query": {k: round(v, 2) for k, v in sorted(visible.items())},
        "kv_cache_bytes_per_token": kv_token * cfg.num_layers,
        "kv_cache_bytes_at_context": cache_at_context,
        "weight_bytes": weight_bytes(ts),
    }


def weight_bytes(ts: list[Tensor]) -> dict[str, int]:
    """File size of the weights per format. Norms stay f32; in block formats a matrix whose
    rows are not a multiple of 32 falls back to f16, as in llama.cpp."""
    out = {}
    for fmt in ("f32", "bf16", *BLOCK_BYTES):
        nbytes = 0
        for t in ts:
            if len(t.shape) == 1:
                nbytes += 4 * t.size
            elif fmt in FLOAT_BYTES:
                nbytes += FLOAT_BYTES[fmt] * t.size
            elif t.row_length % QK:
                nbytes += 2 * t.size
            else:
                nbytes += BLOCK_BYTES[fmt] * t.size // QK
        out[fmt] = nbytes
    return out
