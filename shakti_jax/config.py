"""Model configs: the three Shakti sizes and tiny sizes for tests.

Published numbers (../shared/docs/shakti-facts.md) are kept as published: 100M = 10 layers x
640 wide with FFN 2560; 250M = 16 x 1024; 500M = 24 x 2048 with 16 attention heads and a
4096 context; RoPE everywhere, pre-norm, SiLU. Everything else is a choice, made so the total
lands within 10% of the nominal size with the project's 32k vocabulary, and written beside
each config. `python -m shakti_jax.info --model NAME` prints the derivation.

Choices shared by all sizes:
- Vocabulary 32,000: one sentencepiece tokenizer (byte fallback) for the whole family.
- RMSNorm (eps 1e-5) rather than LayerNorm: the "LayerNorm" of the paper without the mean
  and bias, which is what llama.cpp's `llama` architecture and HF Llama/Qwen2 run. LayerNorm
  stays available (`norm="layernorm"`) for ablations, but it is not exportable.
- RoPE theta 500,000 (SandLogic's value for its text SLMs), rotate-halves pairing.
- Head dim 64 for 100M/250M (MXU/tensor-core friendly), 128 for 500M (2048 / 16 heads).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from data_pipelines.errors import UserError
from shakti_jax.ops.masks import BlockSparse, MaskSpec

LAYER_KINDS = ("global", "window", "block_sparse")
MLP_KINDS = ("swiglu", "silu")
NORM_KINDS = ("rmsnorm", "layernorm")
DTYPES = ("float32", "bfloat16")
# Attention implementations (shakti_jax.ops.attention dispatches on them; "auto" picks by backend).
ATTENTION_IMPLS = ("auto", "xla", "pallas", "splash")
# Rematerialisation of each scanned period of layers: none, full (save only its inputs), or a
# `jax.checkpoint_policies` policy by name.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable")


class ConfigError(UserError):
    """A config value is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of one decoder-only transformer."""

    name: str
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_theta: float = 500_000.0
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    # A scalar head [d_model, 1] on the final-normed residual stream beside the LM head: a
    # reward model's score, PPO's value. GGUF export ignores it; HF export of a reward model
    # writes it as the sequence-classification `score`.
    value_head: bool = False
    # Per-layer attention: this pattern repeats over the layers ("global" = full causal,
    # "window" = sliding window of `window` tokens, "block_sparse" = the `sparse` layout).
    attention_pattern: tuple[str, ...] = ("global",)
    window: int = 512
    sparse: BlockSparse = BlockSparse()
    dropout_rate: float = 0.0
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"  # master weights
    init_std: float = 0.02
    attention_impl: str = "auto"
    # Layers are stacked by period of `attention_pattern` and run under `lax.scan` (compile
    # time independent of depth); False runs the same stacked params in a Python loop.
    scan_layers: bool = True
    remat: str = "none"

    def __post_init__(self):
        validate(self)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        pattern = self.attention_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    @property
    def layer_groups(self) -> tuple[tuple[tuple[str, ...], int], ...]:
        """The layers as (kinds of one period, repeats): every whole period of the pattern,
        then the remaining layers (if any) as one more group of one repeat. Each group's
        params are stacked on a leading "layers" axis (`shakti_jax.model.layout` maps layer
        indices to (group, repeat, slot))."""
        period = len(self.attention_pattern)
        full, rest = divmod(self.num_layers, period)
        groups = ((self.attention_pattern, full),) if full else ()
        return groups + (((self.attention_pattern[:rest], 1),) if rest else ())

    def layer_mask(self, layer: int) -> MaskSpec:
        return kind_mask(self, self.layer_kinds[layer])

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists); `from_dict` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Rebuild a config written by `to_dict`; unknown keys fail in one line."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(sorted(unknown))}")
        values = dict(values)
        if "attention_pattern" in values:
            values["attention_pattern"] = tuple(values["attention_pattern"])
        if isinstance(values.get("sparse"), Mapping):
            values["sparse"] = BlockSparse(**values["sparse"])
        return cls(**values)


def kind_mask(cfg: ModelConfig, kind: str) -> MaskSpec:
    """The attention mask of a layer kind ("global", "window", "block_sparse")."""
    if kind == "window":
        return MaskSpec(causal=True, window=cfg.window)
    if kind == "block_sparse":
        return MaskSpec(causal=True, sparse=cfg.sparse)
    return MaskSpec(causal=True)


def validate(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first bad key; runs before anything is built or compiled."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"model.{key}={getattr(cfg, key)!r}: {why}")

    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "ffn_dim", "max_seq_len", "window"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(key, "must be a positive integer")
    if cfg.num_heads % cfg.num_kv_heads:
        fail("num_heads", f"must be divisible by num_kv_heads={cfg.num_kv_heads}")
    if cfg.head_dim % 2:
        fail("head_dim", "must be even (RoPE rotates pairs)")
    if cfg.mlp not in MLP_KINDS:
        fail("mlp", f"must be one of {MLP_KINDS}")
    if cfg.norm not in NORM_KINDS:
        fail("norm", f"must be one of {NORM_KINDS}")
    if not cfg.attention_pattern or any(k not in LAYER_KINDS for k in cfg.attention_pattern):
        fail("attention_pattern", f"must be a non-empty tuple of {LAYER_KINDS}")
    if "window" in cfg.attention_pattern and cfg.window > cfg.max_seq_len:
        fail("window", f"must be <= max_seq_len={cfg.max_seq_len}")
    if "block_sparse" in cfg.attention_pattern and cfg.sparse.block_size > cfg.max_seq_len:
        fail("sparse", f"block_size must be <= max_seq_len={cfg.max_seq_len}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
    if cfg.remat not in REMAT_POLICIES:
        fail("remat", f"must be one of {REMAT_POLICIES}")
    for key in ("scan_layers", "tie_embeddings", "attention_bias", "value_head"):
        if not isinstance(getattr(cfg, key), bool):
            fail(key, "must be true or false")
    if not 0.0 <= cfg.dropout_rate < 1.0:
        fail("dropout_rate", "must be in [0, 1)")
    if cfg.dtype not in DTYPES:
        fail("dtype", f"must be one of {DTYPES}")
    if cfg.param_dtype not in DTYPES:
        fail("param_dtype", f"must be one of {DTYPES}")
    if not cfg.rope_theta > 0:
        fail("rope_theta", "must be > 0")
    if not cfg.norm_eps > 0:
        fail("norm_eps", "must be > 0")


_VOCAB = 32_000

# 100M: 10 x 640, FFN 2560 (published). 10 heads x 64, 2 KV heads ("variable GQA": 5 query
# heads share a KV head). SwiGLU at 2560 and untied embeddings: with a non-gated 4x MLP the
# model would be 63M tied / 84M untied, outside the 10% band; SwiGLU + untied lands at ~100M.
# Block-sparse + sliding-window cache: four 512-token window layers per global layer, so the
# cache of 8 of 10 layers is O(512). Dropout 0.1 ("LayerNorm and dropout throughout").
SHAKTI_100M = ModelConfig(
    name="shakti_100m", vocab_size=_VOCAB, num_layers=10, d_model=640, num_heads=10,
    num_kv_heads=2, head_dim=64, ffn_dim=2560, max_seq_len=2048, mlp="swiglu",
    tie_embeddings=False, attention_pattern=("window",) * 4 + ("global",), window=512,
    dropout_rate=0.1,
)

# 250M: 16 x 1024 (secondary source). The paper lists plain GQA, so every layer is global.
# 16 heads x 64 with 4 KV heads; SwiGLU FFN 3584 (3.5 x width, a multiple of 256) and tied
# embeddings put it at ~251M.
SHAKTI_250M = ModelConfig(
    name="shakti_250m", vocab_size=_VOCAB, num_layers=16, d_model=1024, num_heads=16,
    num_kv_heads=4, head_dim=64, ffn_dim=3584, max_seq_len=2048, mlp="swiglu",
    tie_embeddings=True, attention_pattern=("global",),
)

# 500M: 24 x 2048, 16 heads (published), context 4096 (published). A dense 4x FFN would be
# ~1.4B, so: 4 KV heads of 128 and a narrow SwiGLU FFN of 1280 (5 x 256, so every row splits
# into K-quant blocks), tied embeddings -> ~506M. Gated rather than plain SiLU because the edge
# runtimes (llama.cpp's llama/granite_swa, HF Llama/Mistral/Qwen2) only run gated MLPs; plain
# SiLU at 2048 (~519M) stays available as `mlp="silu"` for ablations, but it is not exportable.
# Block-sparse + sliding-window cache: three 1024-token window layers per global layer.
SHAKTI_500M = ModelConfig(
    name="shakti_500m", vocab_size=_VOCAB, num_layers=24, d_model=2048, num_heads=16,
    num_kv_heads=4, head_dim=128, ffn_dim=1280, max_seq_len=4096, mlp="swiglu",
    tie_embeddings=True, attention_pattern=("window",) * 3 + ("global",), window=1024,
)

# Tiny sizes for tests and the CPU demo (width <= 64, 2-4 layers: seconds to compile).
TINY = ModelConfig(
    name="tiny", vocab_size=512, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
    head_dim=16, ffn_dim=128, max_seq_len=256, attention_pattern=("window", "global"), window=32,
)
TINY_SPARSE = TINY.replace(
    name="tiny_sparse", num_layers=3, attention_pattern=("window", "block_sparse", "global"),
    window=16, sparse=BlockSparse(block_size=16, local_blocks=1, global_blocks=1, random_blocks=1),
)

CONFIGS: dict[str, ModelConfig] = {
    c.name: c for c in (SHAKTI_100M, SHAKTI_250M, SHAKTI_500M, TINY, TINY_SPARSE)
}
NOMINAL_PARAMS = {"shakti_100m": 100e6, "shakti_250m": 250e6, "shakti_500m": 500e6}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named config with optional field overrides; unknown names or keys fail in one line."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown model {name!r}; choose from {sorted(CONFIGS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model config key(s): {', '.join(sorted(unknown))}")
    return CONFIGS[name].replace(**overrides)
