"""A frozen base model held in GGUF block formats in memory, dequantized in JAX (QLoRA bases).

Every quantizable matmul weight (the tensors the GGUF exporter quantizes: every 2-D canonical
tensor, i.e. the embedding, the attention and MLP projections and an untied output projection)
becomes a `QuantizedTensor` holding exactly the block bytes of that tensor in a GGUF file,
split into arrays JAX can hold:

| type | per block of 32 weights (ggml's `block_*`)                        | bytes |
|------|--------------------------------------------------------------------|-------|
| Q8_0 | `d` float16, `qs` int8 [32]                                        | 34    |
| Q4_0 | `d` float16, `qs` uint8 [16] (element j: low nibble of byte j, element j + 16: high nibble) | 18 |
| Q4_1 | `d`, `m` float16, `qs` uint8 [16] as Q4_0                          | 20    |
| Q5_0 | `d` float16, `qh` uint32 (bit j: 5th bit of element j), `qs` as Q4_0 | 22  |

so the arrays hold as many bytes as the file does. Arrays keep ggml's layout: per layer
[rows, blocks per row, ...] of the canonical [out, in] tensor (Q/K rows in llama.cpp's
interleaved-RoPE order), with the params' stacked `layers` axis in front.

`dequantize` computes exactly what ggml's `dequantize_row_*` (and gguf-py's
`gguf.quants.dequantize`) compute, in f32: Q8_0 `d * q`, Q4_0 `d * (q - 8)`, Q5_0
`d * (q - 16)`, Q4_1 `d * q + m`, with `d`/`m` float16 upcast exactly. Each product `d * q` is
exact in f32 (11 + 8 significant bits at most), so fusing Q4_1's multiply-add into an FMA
rounds the same way and the result is bit-identical on any backend. The values are then
un-permuted (Q/K rows back to rotate-halves) and transposed back into the params' layout.

Where the bytes come from:
- `quantize_params`: the exporter's own path, `export.canonical.canonical_tensors(...,
  "interleaved")` then `gguf.quants.quantize` per tensor with the exporter's type rule
  (`gguf_export._tensor_type`), as `gguf_export._write` writes them.
- `from_gguf`: a GGUF file's tensor data as `gguf.GGUFReader` maps it (validated by the
  importer's `read_gguf`), so an imported model (SmolLM2 ships as Q4_1 with a Q8_0
  embedding) is a base without requantizing.
Everything else (norm scales, biases, and tensors of types this module does not hold) stays
a dense array in the params' dtype.

`dequantize_params(qparams)` gives the ordinary params tree; use it inside the jitted
function (`model_def.apply(dequantize_params(qparams), tokens)`) so only the blocks live
between steps. XLA materializes the dequantized weights of the whole forward inside that
function (the model scans over dense stacked params); the adapters' gradients never touch
the integer leaves, so pass the base as a non-differentiated argument.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from shakti_jax.config import ModelConfig
from shakti_jax.export.canonical import ExportError, canonical_tensors, check_exportable, check_finite
from shakti_jax.export.gguf_export import QuantType, _tensor_type, quant_type
from shakti_jax.imports.params import _LAYER_TENSORS, NUMPY_DTYPES, interleaved_to_halves
from shakti_jax.model.layout import layer_locations
from shakti_jax.model.model_def import ModelDef

Q = gguf.GGMLQuantizationType
# The block types held in memory, with byte offsets of each field inside a block.
_FIELDS: dict[str, dict[str, tuple[int, int]]] = {
    "Q8_0": {"d": (0, 2), "qs": (2, 34)},
    "Q4_0": {"d": (0, 2), "qs": (2, 18)},
    "Q4_1": {"d": (0, 2), "m": (2, 4), "qs": (4, 20)},
    "Q5_0": {"d": (0, 2), "qh": (2, 6), "qs": (6, 22)},
}
_FIELD_DTYPES = {"d": np.dtype("<f2"), "m": np.dtype("<f2"), "qh": np.dtype("<u4")}
BLOCK_TYPES = tuple(_FIELDS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One param's GGUF block data ([*stack, rows, blocks per row, ...], ggml's layout) and how
    it maps back to the param: `shape`/`dtype` of the param, `names` of the GGUF tensors
    (one per stacked layer), rows permuted per head for interleaved RoPE (`rope_heads` > 0),
    and whether the param is the transpose of the ggml matrix (every weight but the embedding).
    """

    qs: jax.Array  # Q8_0: int8 [..., 32]; Q4_0 / Q4_1 / Q5_0: uint8 nibbles [..., 16]
    d: jax.Array  # float16 [*stack, rows, blocks]
    m: jax.Array | None  # Q4_1: float16 block minimum
    qh: jax.Array | None  # Q5_0: uint32, bit j = 5th bit of element j
    qtype: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    stacked: bool = dataclasses.field(metadata=dict(static=True))  # a leading layers axis
    transposed: bool = dataclasses.field(metadata=dict(static=True))
    rope_heads: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def from_blocks(cls, raw: np.ndarray, qtype: str, **meta) -> QuantizedTensor:
        """From GGUF tensor bytes uint8 [*stack, rows, bytes per row] of type `qtype`."""
        if qtype not in _FIELDS:
            raise ValueError(f"{qtype} is not a block type held in memory (only {', '.join(BLOCK_TYPES)})")
        block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        raw = np.asarray(raw, np.uint8)
        if raw.shape[-1] % size:
            raise ValueError(f"{qtype} rows of {raw.shape[-1]} bytes are not whole blocks of {size}")
        blocks = raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)
        fields = {}
        for field, (start, end) in _FIELDS[qtype].items():
            part = np.ascontiguousarray(blocks[..., start:end])
            if field == "qs":
                value = part.view(np.int8) if qtype == "Q8_0" else part
            else:
                little = _FIELD_DTYPES[field]
                value = part.view(little)[..., 0].astype(little.newbyteorder("="))  # native order
            fields[field] = jnp.asarray(value)
        return cls(qs=fields["qs"], d=fields["d"], m=fields.get("m"), qh=fields.get("qh"), qtype=qtype,
                   **meta)

    @property
    def ggml_shape(self) -> tuple[int, ...]:
        """[*stack, rows, row length]: the GGUF tensors' canonical [out, in] shape, stacked."""
        return (*self.d.shape[:-1], self.d.shape[-1] * gguf.GGML_QUANT_SIZES[Q[self.qtype]][0])

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.qs, self.d, self.m, self.qh) if a is not None)

    def block_bytes(self) -> np.ndarray:
        """The GGUF tensor bytes again, uint8 [*stack, rows, bytes per row] (host memory)."""
        parts = []
        for field in _FIELDS[self.qtype]:
            value = np.asarray(getattr(self, field))
            if field != "qs":
                value = value.astype(_FIELD_DTYPES[field])[..., None]
            parts.append(np.ascontiguousarray(value).view(np.uint8))
        blocks = np.concatenate(parts, axis=-1)
        return blocks.reshape(*blocks.shape[:-2], -1)


def dequantize_ggml(qt: QuantizedTensor) -> jax.Array:
    """f32 [*stack, rows, row length] in ggml's layout: what `gguf.quants.dequantize` (and
    ggml's dequantize_row_*) give for the tensors' bytes, bit for bit."""
    d = qt.d.astype(jnp.float32)[..., None]
    if qt.qtype == "Q8_0":
        x = qt.qs.astype(jnp.float32) * d
    else:
        q = jnp.concatenate([qt.qs & 0x0F, qt.qs >> 4], axis=-1)  # elements 0..15, 16..31
        if qt.qtype == "Q4_0":
            x = (q.astype(jnp.int32) - 8).astype(jnp.float32) * d
        elif qt.qtype == "Q5_0":
            high = (qt.qh[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
            q = q.astype(jnp.int32) | (high.astype(jnp.int32) << 4)
            x = (q - 16).astype(jnp.float32) * d
        elif qt.qtype == "Q4_1":
            x = q.astype(jnp.float32) * d + qt.m.astype(jnp.float32)[..., None]
        else:
            raise ValueError(f"cannot dequantize {qt.qtype}")
    return x.reshape(qt.ggml_shape)


def dequantize(qt: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """The param in its own layout and dtype (or `dtype`): ggml's f32 values, Q/K rows back to
    rotate-halves, matrices back from [out, in]. Pure jnp, jit-able."""
    w = dequantize_ggml(qt)
    if qt.rope_heads:  # rows are axis -2; interleaved_to_halves permutes axis 0
        w = jnp.moveaxis(interleaved_to_halves(jnp.moveaxis(w, -2, 0), qt.rope_heads), 0, -2)
    if qt.transposed:
        w = jnp.swapaxes(w, -1, -2)
    return w.reshape(qt.shape).astype(qt.dtype if dtype is None else dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


def dequantize_params(tree: Any, dtype: Any = None) -> Any:
    """Every `QuantizedTensor` of a params tree dequantized (call inside jit); other leaves as they are."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


# ---- which param is which GGUF tensor ----

@dataclasses.dataclass(frozen=True)
class _Slot:
    path: tuple  # keys into the params dict
    names: tuple[str, ...]  # canonical / GGUF names, one per stacked layer (or one)
    stacked: bool
    transposed: bool  # param = ggml [out, in] transposed (reshaped); False for the embedding
    rope_heads: int = 0


def tensor_slots(cfg: ModelConfig) -> list[_Slot]:
    """Every param of `cfg` with its GGUF tensor(s), in the params' layout."""
    abstract = ModelDef.from_config(cfg).abstract_params
    slots = [_Slot(("embedding",), ("token_embd.weight",), False, False),
             _Slot(("final_norm", "scale"), ("output_norm.weight",), False, False)]
    if "lm_head" in abstract:
        slots.append(_Slot(("lm_head",), ("output.weight",), False, True))
    where = layer_locations(cfg)
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    for g, (kinds, repeats) in enumerate(cfg.layer_groups):
        for s in range(len(kinds)):
            layers = [next(i for i, loc in enumerate(where) if loc == (g, r, s)) for r in range(repeats)]
            block = abstract["groups"][g]["blocks"][s]
            for name, (module, leaf) in _LAYER_TENSORS:
                if leaf in block.get(module, {}):
                    kind = name.split(".")[0]
                    matrix = name.endswith(".weight") and not kind.endswith("_norm")
                    slots.append(_Slot(("groups", g, "blocks", s, module, leaf),
                                       tuple(f"blk.{i}.{name}" for i in layers), True, matrix,
                                       heads.get(kind, 0)))
    covered = {slot.path for slot in slots}
    missing = [path for path, _ in _leaves(abstract) if path not in covered]
    if missing:
        raise ExportError(f"param {'/'.join(map(str, missing[0]))} has no GGUF tensor")
    return slots


def _leaves(tree, path=()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _with(tree, replacements: dict[tuple, Any]):
    """A copy of the nested dict `tree` with leaves at the given paths replaced."""
    def rebuild(node, path):
        if path in replacements:
            return replacements[path]
        if isinstance(node, dict):
            return {k: rebuild(v, (*path, k)) for k, v in node.items()}
        return node
    return rebuild(tree, ())


def _config(model_def_or_cfg: ModelDef | ModelConfig) -> ModelConfig:
    return model_def_or_cfg.config if isinstance(model_def_or_cfg, ModelDef) else model_def_or_cfg


def _quant(name: str) -> QuantType:
    q = quant_type(name)
    if q.tensor_type is None or q.tensor_type.name not in _FIELDS:
        raise ExportError(f"quant {name!r}: a quantized base holds {', '.join(BLOCK_TYPES)} blocks "
                          f"(choose q8_0, q5_0, q4_0 or q4_1)")
    return q


# ---- building a quantized base ----

def quantize_params(model_def_or_cfg: ModelDef | ModelConfig, params: dict, quant: str = "q4_0") -> dict:
    """`params` with every tensor the GGUF exporter quantizes as a `QuantizedTensor` of `quant`
    (q8_0, q5_0, q4_0, q4_1: the bytes `write_gguf` writes for it). Norms and biases stay the arrays they are.

    Raises ExportError (as the exporter does) for a model the canonical form cannot describe,
    NaN/Inf weights, or rows that are not whole blocks.
    """
    cfg = _config(model_def_or_cfg)
    q = _quant(quant)
    check_exportable(cfg, allow_attention_change=True)  # the canonical form's own refusals
    tensors = canonical_tensors(cfg, params, "interleaved")  # the GGUF exporter's layout
    check_finite(tensors, params)
    canon = {t.name: t for t in tensors}
    replacements = {}
    for slot in tensor_slots(cfg):
        ts = [canon[name] for name in slot.names]
        qtype = _tensor_type(ts[0], q)  # the exporter's rule: matrices get the quant, vectors F32
        if qtype.name not in _FIELDS:
            continue
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if ts[0].shape[-1] % block:
            raise ExportError(f"{ts[0].name} has rows of {ts[0].shape[-1]} values, not a multiple of "
                              f"{q.name}'s block of {block}")
        raw = [gguf.quants.quantize(t.load(), qtype).view(np.uint8) for t in ts]  # as _write writes it
        leaf = _get(params, slot.path)
        replacements[slot.path] = QuantizedTensor.from_blocks(
            np.stack(raw) if slot.stacked else raw[0], qtype.name, shape=tuple(leaf.shape),
            dtype=np.dtype(leaf.dtype).name, names=slot.names, stacked=slot.stacked,
            transposed=slot.transposed, rope_heads=slot.rope_heads)
    return _with(params, replacements)


def from_gguf(path: str | Path, model_def: ModelDef | None = None) -> dict:
    """A quantized base straight from a GGUF file's block data (no requantization).

    The file is read and validated by the importer (`imports.gguf_reader.read_gguf`: the
    architecture, every key, the tensors' names and shapes). Tensors of the types in
    `BLOCK_TYPES` are held as their bytes, stacked per param when every layer of a stack has
    the same type; the rest (F32 norms, F16/BF16 or K-quant matrices, mixed stacks) are
    dequantized by the importer into dense arrays of the model's param dtype. `model_def`
    defaults to the file's own config; a given one must match the file's tensor shapes.
    """
    from shakti_jax.imports.gguf_reader import _INTERLEAVED, read_gguf
    from shakti_jax.imports.source import check_tensors

    path = Path(path)
    source = read_gguf(path)
    cfg = source.config if model_def is None else model_def.config
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}
    check_tensors(str(path), cfg, shapes, ignored=lambda name: name.endswith(".attn_sinks.weight"))
    interleaved = source.description["architecture"] in _INTERLEAVED
    dtype = NUMPY_DTYPES[cfg.param_dtype]
    abstract = ModelDef.from_config(cfg).abstract_params
    out = {}
    for slot in tensor_slots(cfg):
        leaf = _get(abstract, slot.path)
        types = {tensors[name].tensor_type.name for name in slot.names}
        (qtype,) = types if len(types) == 1 else (None,)
        if qtype in _FIELDS:
            raw = [np.asarray(tensors[name].data, np.uint8) for name in slot.names]
            out[slot.path] = QuantizedTensor.from_blocks(
                np.stack(raw) if slot.stacked else raw[0], qtype, shape=tuple(leaf.shape),
                dtype=np.dtype(dtype).name, names=slot.names, stacked=slot.stacked,
                transposed=slot.transposed, rope_heads=slot.rope_heads if interleaved else 0)
        else:  # as `imports.params.build_params` puts it
            dense = np.empty(leaf.shape, dtype)
            for r, name in enumerate(slot.names):
                w = source.read(name)
                target = dense[r] if slot.stacked else dense
                target[...] = (w.T if slot.transposed else w).reshape(target.shape)
            out[slot.path] = jnp.asarray(dense)
    return _with(abstract, out)


# ---- memory ----

@dataclasses.dataclass(frozen=True)
class MemoryReport:
    total: int  # bytes the tree holds: blocks of the quantized tensors + dense arrays
    bf16: int  # the same params as bf16 arrays
    quantized: int  # bytes of the QuantizedTensor leaves
    quantized_bf16: int  # those tensors as bf16
    by_type: dict[str, int]  # quantized bytes per block type

    @property
    def ratio(self) -> float:
        return self.total / self.bf16

    @property
    def quantized_ratio(self) -> float:
        return self.quantized / self.quantized_bf16 if self.quantized_bf16 else 1.0

    def __str__(self) -> str:
        line = (f"base {self.total / 2**20:.2f} MiB vs {self.bf16 / 2**20:.2f} MiB in bf16 "
                f"({self.ratio:.3f})")
        if not self.by_type:
            return line
        types = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(self.by_type.items()))
        return (f"{line}; quantized tensors {self.quantized / 2**20:.2f} MiB vs "
                f"{self.quantized_bf16 / 2**20:.2f} MiB ({self.quantized_ratio:.4f}; {types})")


def nbytes(tree: Any) -> MemoryReport:
    """In-memory bytes of a (partly) quantized params tree, next to the same params in bf16."""
    total = bf16 = quantized = quantized_bf16 = 0
    by_type: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            quantized += leaf.nbytes
            quantized_bf16 += 2 * leaf.size
            by_type[leaf.qtype] = by_type.get(leaf.qtype, 0) + leaf.nbytes
            total += leaf.nbytes
            bf16 += 2 * leaf.size
        else:
            total += int(np.dtype(leaf.dtype).itemsize * np.prod(leaf.shape))
            bf16 += int(2 * np.prod(leaf.shape))
    return MemoryReport(total, bf16, quantized, quantized_bf16, by_type)
