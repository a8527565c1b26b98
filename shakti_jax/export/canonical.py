"""The one canonical form every exporter reads: named [out, in] numpy tensors plus config.

Tensor names are llama.cpp's (`token_embd.weight`, `blk.N.attn_q.weight`, ...); the HF
writer renames them. Layout work happens here and nowhere else:
- Flax kernels [in, ...] become [out, in] matrices (heads flattened, head-major);
- RoPE pairing: the model rotates halves (dim i with i + H/2, as HF Llama does); llama.cpp
  rotates interleaved pairs (2i, 2i+1), so `rope_pairing="interleaved"` permutes the rows of
  Q and K once, per head;
- vocabulary: the tokenizer's pieces (sentencepiece, or byte-level BPE with its merges) are
  padded with unused pieces up to the embedding rows;
- a value head (`model.value_head`, a reward model's score) is one more [1, D] tensor,
  `VALUE_HEAD`; GGUF writes `lm_tensors` (llama.cpp's llama arch has no such head).
Tensors are produced one at a time (`CanonicalTensor.load`), so a writer holds at most one
converted tensor next to the model's own weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx
from gguf import TokenType  # llama.cpp's llama_token_type

from data_pipelines.errors import TokenizerError, UserError
from data_pipelines.tokenizer import CHAT_TOKENS, Tokenizer
from shakti_jax.config import ModelConfig
from shakti_jax.model.layout import layer_tensor

RopePairing = Literal["halves", "interleaved"]
# `data_pipelines.chat`'s own rendering (sentencepiece models) as a jinja template for runtimes.
OWN_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                     "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
VALUE_HEAD = "cls.output.weight"  # llama.cpp's name for a classifier's output (its BERT rerankers)


class ExportError(UserError):
    """The model or request cannot be exported as asked; the message is one line."""


@dataclasses.dataclass(frozen=True)
class CanonicalTensor:
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  # float32, C-contiguous, `shape`

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as the exporters write it: GGUF token list, types and scores or merges."""
    path: Path  # the tokenizer file
    tokenizer: Tokenizer  # ids of BOS/EOS/end of turn, add_bos, chat template, files
    model: str  # GGUF tokenizer.ggml.model: "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    pieces: list[str]
    types: list[TokenType]
    scores: list[float] | None = None  # sentencepiece
    merges: list[str] | None = None  # byte-level BPE
    pre: str | None = None  # llama.cpp's pre-tokenizer name (BPE); None if llama.cpp has none

    @property
    def chat_template(self) -> str:
        """The model's own template, or this project's (how `data_pipelines.chat` renders)."""
        return self.tokenizer.chat_template or OWN_CHAT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class CanonicalModel:
    config: ModelConfig  # layers changed by `allow_attention_change` are already global here
    tensors: list[CanonicalTensor]
    vocab: Vocabulary
    rope_pairing: RopePairing

    @property
    def window_layers(self) -> list[bool]:
        return [kind == "window" for kind in self.config.layer_kinds]

    @property
    def lm_tensors(self) -> list[CanonicalTensor]:
        """The causal LM's tensors: all but the value head."""
        return [t for t in self.tensors if t.name != VALUE_HEAD]


def check_exportable(cfg: ModelConfig, allow_attention_change: bool = False) -> tuple[ModelConfig, list[str]]:
    """The config as the edge runtimes will run it, and warnings of what changes.

    Raises ExportError for what no runtime can run: plain (non-gated) SiLU MLPs, LayerNorm,
    and block-sparse layers unless `allow_attention_change` (then they run as full causal
    attention, a superset of the keys the layout allowed, and the logits differ).
    """
    if cfg.mlp != "swiglu":
        raise ExportError(f"model.mlp={cfg.mlp!r}: llama.cpp and HF Llama/Mistral/Qwen2 only run gated "
                          f"(swiglu) MLPs; this model cannot be exported")
    if cfg.norm != "rmsnorm":
        raise ExportError(f"model.norm={cfg.norm!r}: the edge runtimes only run RMSNorm")
    sparse = [i for i, kind in enumerate(cfg.layer_kinds) if kind == "block_sparse"]
    if not sparse:
        return cfg, []
    s = cfg.sparse
    layout = (f"block-sparse layers {sparse} (blocks of {s.block_size}: {s.local_blocks} local, "
              f"{s.global_blocks} global, {s.random_blocks} random)")
    if not allow_attention_change:
        raise ExportError(f"{layout}: no edge runtime runs this layout; pass "
                          f"--allow_attention_change to export them as full causal attention")
    pattern = tuple("global" if k == "block_sparse" else k for k in cfg.layer_kinds)
    warning = (f"warning: {layout} are exported as full causal attention; they attend to more "
               f"keys than in training, so outputs will differ from the JAX model")
    return cfg.replace(attention_pattern=pattern), [warning]


def read_vocabulary(tokenizer_path: str | Path, vocab_size: int) -> Vocabulary:
    """The tokenizer at `tokenizer_path` as GGUF vocabulary, padded with unused tokens to
    `vocab_size` (the embedding rows)."""
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except TokenizerError as err:
        raise ExportError(str(err)) from None
    if tokenizer.kind == "bpe":
        v = tokenizer.gguf_vocab()
        vocab = Vocabulary(Path(tokenizer_path), tokenizer, "gpt2", list(v["tokens"]), [TokenType(t) for t in v["token_types"]],
                           merges=list(v["merges"]), pre=v["pre"])
    else:
        vocab = _sentencepiece_vocabulary(Path(tokenizer_path), tokenizer)
    n = len(vocab.pieces)
    if n > vocab_size:
        raise ExportError(f"tokenizer {tokenizer_path} has {n} tokens but model.vocab_size={vocab_size}")
    vocab.pieces.extend(f"<unused{i}>" for i in range(vocab_size - n))
    vocab.types.extend([TokenType.UNUSED] * (vocab_size - n))
    if vocab.scores is not None:
        vocab.scores.extend([0.0] * (vocab_size - n))
    return vocab


def _sentencepiece_vocabulary(path: Path, tokenizer: Tokenizer) -> Vocabulary:
    sp = spm.SentencePieceProcessor()
    sp.Load(str(tokenizer.model_path))
    pieces, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        pieces.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.IsControl(i) or pieces[-1] in CHAT_TOKENS:  # older models: user-defined chat pieces
            types.append(TokenType.CONTROL)
        elif sp.IsByte(i):
            types.append(TokenType.BYTE)
        elif sp.IsUnused(i):
            types.append(TokenType.UNUSED)
        else:
            types.append(TokenType.NORMAL)
    return Vocabulary(path, tokenizer, "llama", pieces, types, scores=scores)


def canonicalize(cfg: ModelConfig, params: dict | None, tokenizer_path: str | Path, *,
                 rope_pairing: RopePairing, allow_attention_change: bool = False
                 ) -> tuple[CanonicalModel, list[str]]:
    """The canonical form of a model's parameters (the `nnx.to_pure_dict` of its nnx.Param state).

    With `params=None` the result only describes shapes, names and vocabulary (for checking a
    request before any weight is loaded); its tensors cannot be loaded. Raises ExportError for
    NaN or Inf weights.
    """
    export_cfg, warnings = check_exportable(cfg, allow_attention_change)
    tensors = canonical_tensors(cfg, params, rope_pairing)
    if params is not None:
        check_finite(tensors, params)
    vocab = read_vocabulary(tokenizer_path, cfg.vocab_size)
    return CanonicalModel(export_cfg, tensors, vocab, rope_pairing), warnings


def canonical_tensors(cfg: ModelConfig, params: dict | None, rope_pairing: RopePairing
                      ) -> list[CanonicalTensor]:
    """The canonical tensors of `params` in file order (names and shapes only when None)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def matrix(get, out_shape, permute_heads=0):
        def load():
            w = np.asarray(get(), np.float32).reshape(-1, out_shape[0]).T  # [in, out] -> [out, in]
            if permute_heads and rope_pairing == "interleaved":
                w = w.reshape(permute_heads, 2, H // 2, -1).swapaxes(1, 2).reshape(out_shape)
            return np.ascontiguousarray(w)
        return load

    def vector(get, permute_heads=0):
        def load():
            v = np.asarray(get(), np.float32).reshape(-1)
            if permute_heads and rope_pairing == "interleaved":
                v = v.reshape(permute_heads, 2, H // 2).swapaxes(1, 2).reshape(-1)
            return np.ascontiguousarray(v)
        return load

    tensors = [CanonicalTensor("token_embd.weight", (cfg.vocab_size, D),
                               lambda: np.ascontiguousarray(np.asarray(params["embedding"], np.float32)))]
    for i in range(cfg.num_layers):
        b = lambda *path, i=i: layer_tensor(params, cfg, i, path)  # noqa: E731 - read when written
        tensors += [
            CanonicalTensor(f"blk.{i}.attn_norm.weight", (D,), vector(lambda b=b: b("attn_norm", "scale"))),
            CanonicalTensor(f"blk.{i}.attn_q.weight", (N * H, D),
                            matrix(lambda b=b: b("attn", "wq"), (N * H, D), permute_heads=N)),
            CanonicalTensor(f"blk.{i}.attn_k.weight", (K * H, D),
                            matrix(lambda b=b: b("attn", "wk"), (K * H, D), permute_heads=K)),
            CanonicalTensor(f"blk.{i}.attn_v.weight", (K * H, D),
                            matrix(lambda b=b: b("attn", "wv"), (K * H, D))),
        ]
        if cfg.attention_bias:
            tensors += [
                CanonicalTensor(f"blk.{i}.attn_q.bias", (N * H,), vector(lambda b=b: b("attn", "bq"), N)),
                CanonicalTensor(f"blk.{i}.attn_k.bias", (K * H,), vector(lambda b=b: b("attn", "bk"), K)),
                CanonicalTensor(f"blk.{i}.attn_v.bias", (K * H,), vector(lambda b=b: b("attn", "bv"))),
            ]
        tensors += [
            CanonicalTensor(f"blk.{i}.attn_output.weight", (D, N * H),
                            matrix(lambda b=b: b("attn", "wo"), (D, N * H))),
            CanonicalTensor(f"blk.{i}.ffn_norm.weight", (D,), vector(lambda b=b: b("mlp_norm", "scale"))),
            CanonicalTensor(f"blk.{i}.ffn_gate.weight", (cfg.ffn_dim, D),
                            matrix(lambda b=b: b("mlp", "w_gate"), (cfg.ffn_dim, D))),
            CanonicalTensor(f"blk.{i}.ffn_up.weight", (cfg.ffn_dim, D),
                            matrix(lambda b=b: b("mlp", "w_up"), (cfg.ffn_dim, D))),
            CanonicalTensor(f"blk.{i}.ffn_down.weight", (D, cfg.ffn_dim),
                            matrix(lambda b=b: b("mlp", "w_down"), (D, cfg.ffn_dim))),
        ]
    tensors.append(CanonicalTensor("output_norm.weight", (D,), vector(lambda: params["final_norm"]["scale"])))
    if not cfg.tie_embeddings:
        tensors.append(CanonicalTensor("output.weight", (cfg.vocab_size, D),
                                       matrix(lambda: params["lm_head"], (cfg.vocab_size, D))))
    if cfg.value_head:
        tensors.append(CanonicalTensor(VALUE_HEAD, (1, D), matrix(lambda: params["value_head"], (1, D))))
    return tensors


def check_finite(tensors: list[CanonicalTensor], params: dict) -> None:
    """Raise ExportError naming the first tensor with NaN or Inf values. One pass over the
    params on their device; tensors are only converted to name the culprit."""
    if all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(params)):
        return
    for t in tensors:
        values = t.load()
        bad = values.size - int(np.isfinite(values).sum())
        if bad:
            raise ExportError(f"{t.name} has {bad} NaN/Inf values (of {values.size}); "
                              f"a diverged checkpoint cannot be exported")


def model_params(model: nnx.Module) -> dict:
    """The plain nested dict of a model's parameters (what `canonicalize` reads)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
