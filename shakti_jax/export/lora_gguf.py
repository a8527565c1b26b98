"""LoRA adapters as a llama.cpp adapter GGUF (`llama-cli --lora`, `Llama(lora_path=...)`).

The file holds `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`,
the base export's `general.architecture` (llama.cpp refuses an adapter whose architecture
differs from the model's: `llama` when no layer has a sliding window, else `granite_swa`, as
`gguf_export` decides), and per adapted kernel of layer i two F32 tensors named after the base
tensor, `blk.{i}.attn_q.weight.lora_a` / `.lora_b`.

Shapes follow llama.cpp's `llama_adapter_lora_init_impl` (src/llama-adapter.cpp): for a base
tensor of ggml shape ne = [n_in, n_out] (numpy [out, in], the canonical form), it requires
`a->ne[0] == n_in`, `b->ne[1] == n_out` and `a->ne[1] == b->ne[0]` (the rank), i.e. numpy
lora_a [R, n_in] and lora_b [n_out, R] (PEFT's lora_A / lora_B weights, as
convert_lora_to_gguf.py writes them), and applies `W x + (alpha / R) * B (A x)` with R read
from `b->ne[0]`. The inputs and outputs are flattened head-major as in `export.canonical`, and
the output rows of q and k (B's rows) get the same per-head interleaved-RoPE permutation as
the base export's Q/K rows.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from data_pipelines.atomic import atomic_file
from shakti_jax.config import ModelConfig
from shakti_jax.export.canonical import ExportError, check_exportable
from shakti_jax.lora import TARGETS, LoraConfig, target_paths
from shakti_jax.model.layout import layer_locations
from shakti_jax.model.model_def import ModelDef


def gguf_arch(cfg: ModelConfig) -> str:
    """The architecture the base GGUF export writes for `cfg` (see `gguf_export`)."""
    return "granite_swa" if any(kind == "window" for kind in cfg.layer_kinds) else "llama"


def _interleave_rows(m: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Rows of [heads * head_dim, ...] from rotate-halves to llama.cpp's interleaved pairs."""
    return m.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(m.shape)


def lora_tensors(cfg: ModelConfig, adapters: dict, lora: LoraConfig) -> list[tuple[str, np.ndarray]]:
    """(name, float32 numpy array) of every adapter tensor in llama.cpp's layout, layer order."""
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads}
    by_slot = {}
    for path, name in target_paths(cfg, lora):
        g, s = path[1], path[3]
        node = adapters
        for key in path:
            node = node[key]
        by_slot[g, s, name] = node
    out = []
    for i, (g, r, s) in enumerate(layer_locations(cfg)):
        for name in lora.targets:
            ad = by_slot[g, s, name]
            a_IR = np.asarray(ad["lora_a"][r], np.float32)
            b_RO = np.asarray(ad["lora_b"][r], np.float32)
            R = a_IR.shape[-1]
            a_RI = a_IR.reshape(-1, R).T  # numpy [R, n_in] = ggml ne [n_in, R]
            b_OR = b_RO.reshape(R, -1).T  # numpy [n_out, R] = ggml ne [R, n_out]
            if name in heads:
                b_OR = _interleave_rows(b_OR, heads[name], cfg.head_dim)
            base = f"blk.{i}.{TARGETS[name].gguf_name}.weight"
            for suffix, t in (("lora_a", a_RI), ("lora_b", b_OR)):
                if not np.isfinite(t).all():
                    raise ExportError(f"{base}.{suffix} has NaN/Inf values; a diverged adapter "
                                      f"cannot be exported")
                out.append((f"{base}.{suffix}", np.ascontiguousarray(t)))
    return out


def write_lora_gguf(model: ModelDef | ModelConfig, adapters: dict, lora: LoraConfig,
                    path: str | Path) -> Path:
    """Write `adapters` as a llama.cpp LoRA adapter GGUF (F32 tensors), atomically.

    Load it over the base model's GGUF export (any quant type) with llama.cpp's `--lora`.
    Raises ExportError for models the GGUF export refuses (non-gated MLPs, LayerNorm) and for
    NaN/Inf adapter values."""
    cfg = model.config if isinstance(model, ModelDef) else model
    check_exportable(cfg, allow_attention_change=True)  # block-sparse: the base export decides
    tensors = lora_tensors(cfg, adapters, lora)
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf_arch(cfg))
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(f"{cfg.name}-lora")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.alpha))
        for name, t in tensors:
            writer.add_tensor(name, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
