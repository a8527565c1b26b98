"""Model params from canonical tensors: the inverse of `shakti_jax.export.canonical`.

Canonical tensors are llama.cpp-named [out, in] float32 matrices with rotate-halves RoPE rows
(readers undo llama.cpp's interleaved Q/K permutation before handing them over). Params are
filled into preallocated stacked arrays one tensor at a time, so an import holds one copy of
the weights in the target dtype plus one tensor in f32.
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np

from shakti_jax.config import ModelConfig
from shakti_jax.model.layout import layer_locations
from shakti_jax.model.model_def import ModelDef

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# (canonical layer tensor, param path); matrices [out, in] become the param's [in, ...] layout
_LAYER_TENSORS = (
    ("attn_norm.weight", ("attn_norm", "scale")),
    ("attn_q.weight", ("attn", "wq")),
    ("attn_k.weight", ("attn", "wk")),
    ("attn_v.weight", ("attn", "wv")),
    ("attn_q.bias", ("attn", "bq")),
    ("attn_k.bias", ("attn", "bk")),
    ("attn_v.bias", ("attn", "bv")),
    ("attn_output.weight", ("attn", "wo")),
    ("ffn_norm.weight", ("mlp_norm", "scale")),
    ("ffn_gate.weight", ("mlp", "w_gate")),
    ("ffn_up.weight", ("mlp", "w_up")),
    ("ffn_down.weight", ("mlp", "w_down")),
)


def interleaved_to_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation (rows [heads*H, ...] or a bias [heads*H])."""
    rows = w.shape[0] // heads
    return w.reshape(heads, rows // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_params(cfg: ModelConfig, read: Callable[[str], np.ndarray],
                 on_tensor: Callable[[str], None] | None = None) -> dict:
    """The ModelDef param tree of `cfg` with every tensor from `read(canonical_name)`."""
    dtype = NUMPY_DTYPES[cfg.param_dtype]
    abstract = ModelDef.from_config(cfg).abstract_params
    params = _empty(abstract, dtype)

    def put(name: str, target: np.ndarray) -> None:
        w = read(name)
        target[...] = (w.T if w.ndim == 2 and name != "token_embd.weight" else w).reshape(target.shape)
        if on_tensor:
            on_tensor(name)

    put("token_embd.weight", params["embedding"])
    for i, (g, r, s) in enumerate(layer_locations(cfg)):
        block = params["groups"][g]["blocks"][s]
        for name, (module, leaf) in _LAYER_TENSORS:
            if leaf in block[module]:
                put(f"blk.{i}.{name}", block[module][leaf][r])
    put("output_norm.weight", params["final_norm"]["scale"])
    if "lm_head" in params:
        put("output.weight", params["lm_head"])
    return params


def _empty(tree, dtype):
    if isinstance(tree, dict):
        return {k: _empty(v, dtype) for k, v in tree.items()}
    return np.empty(tree.shape, dtype)

