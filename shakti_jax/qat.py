"""Quantization-aware training against GGUF's own block formats (Q8_0, Q5_0, Q4_0, Q4_1).

`QAT.apply(params)` replaces every tensor the GGUF exporter quantizes (the table of
`quant_base.tensor_slots`; `gguf_export._tensor_type`: every matrix, embedding and output
included; norms and biases stay F32) by the values llama.cpp will compute with: gguf-py's
quantizer (`gguf.quants.quantize`, the exporter's own path) followed by its dequantization,
written here in f32 jnp with the same operations in the same order, so the fake-quantized
weights equal `gguf.quants.dequantize(gguf.quants.quantize(w))` bit for bit (tests). Blocks
run along a GGUF row (a weight's input features, the embedding's model dimension), which a
param holds as its leading axes (transposed weights) or its last axis (the embedding); the
rows' RoPE permutation does not move values between blocks, so it is not needed here.

Gradients are straight-through (a custom VJP: `dq` exactly in the forward pass, the identity
for the gradient; no learned scales or clipping). With a
`start` step, steps before it train the plain weights (`apply(params, step)`).

Per type, for each block `x` of 32 f32 values (as gguf-py computes it):
- Q8_0: `d = max|x| / 127`, `q = roundf(x / d)` (half away from zero), value `f16(d) * q`;
- Q4_0 / Q5_0: `d = x[argmax|x|] / -8` (/ -16), `q = clip(trunc(x / d + 8.5), 0, 15)`
  (+16.5, 0..31), value `f16(d) * (q - 8)` (q - 16);
- Q4_1: `d = (max - min) / 15`, `q = clip(trunc((x - min) / d + 0.5), 0, 15)`, value
  `f16(d) * q + f16(min)`;
where `/ d` is a multiply by `1 / d` (0 when d is 0). The model then runs the values in its
compute dtype (f32 keeps them exact; bf16 rounds them as it rounds any weight).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.export.canonical import canonical_tensors
from shakti_jax.export.gguf_export import QUANT_TYPES
from shakti_jax.quant_base import _get, _with, tensor_slots

QAT_TYPES = ("q8_0", "q5_0", "q4_0", "q4_1")
BLOCK = 32


@dataclasses.dataclass(frozen=True)
class _Target:
    path: tuple  # keys into the params dict
    row_len: int  # values per GGUF row: the block axis
    transposed: bool  # param = [*stack, row_len..., rows...]; else [..., rows, row_len]
    stacked: bool  # a leading layers axis


@dataclasses.dataclass(frozen=True)
class QAT:
    """Fake quantization of a model's GGUF-quantized tensors to `qtype` from step `start`."""

    qtype: str  # ggml's name: Q8_0, Q5_0, Q4_0, Q4_1
    start: int
    targets: tuple[_Target, ...]

    @classmethod
    def build(cls, quant: str, cfg: ModelConfig, start: int = 0, key: str = "train.qat") -> QAT:
        """The plan for `quant` on `cfg`; a type the exporter cannot write blocks of, or a
        tensor whose rows are not whole blocks, is a one-line ConfigError naming `key`."""
        name = quant.lower()
        if name not in QAT_TYPES:
            known = ", ".join(QUANT_TYPES)
            raise ConfigError(f"{key}={quant!r}: QAT simulates the exporter's block types "
                              f"{', '.join(QAT_TYPES)} (the export types are {known}; K-quants come "
                              f"from llama.cpp's own search and cannot be simulated exactly)")
        if start < 0:
            raise ConfigError(f"{key}_start={start}: must be >= 0")
        shapes = {t.name: t.shape for t in canonical_tensors(cfg, None, "interleaved")}
        qtype = QUANT_TYPES[name].tensor_type
        targets = []
        for slot in tensor_slots(cfg):
            shape = shapes[slot.names[0]]
            if len(shape) != 2:  # norms and biases: F32 in every export
                continue
            if shape[1] % BLOCK:
                raise ConfigError(f"{key}={name}: {slot.names[0]} has rows of {shape[1]} values, "
                                  f"not a multiple of {qtype.name}'s block of {BLOCK}")
            targets.append(_Target(slot.path, shape[1], slot.transposed, slot.stacked))
        return cls(qtype.name, start, tuple(targets))

    def apply(self, params: dict, step: Any = None) -> dict:
        """`params` with every target fake-quantized (straight-through gradients); with `step`,
        only from `start` on. Pure jnp, jit-able."""
        replaced = {}
        for t in self.targets:
            w = _get(params, t.path)
            quantized = _straight_through(w, jax.lax.stop_gradient(self.dequantized(w, t)).astype(w.dtype))
            replaced[t.path] = quantized if step is None else jnp.where(step >= self.start, quantized, w)
        return _with(params, replaced)

    def dequantized(self, w: jax.Array, t: _Target) -> jax.Array:
        """f32 values of `w` after a GGUF round trip, in `w`'s shape."""
        x = w.astype(jnp.float32)
        if t.transposed:  # [*stack, row_len, rows]: blocks along axis -2
            stack = x.shape[:1] if t.stacked else ()
            blocks = x.reshape(*stack, t.row_len // BLOCK, BLOCK, -1)
            out = _round_trip(blocks, self.qtype, axis=-2)
        else:  # [..., row_len]: blocks along the last axis
            blocks = x.reshape(*x.shape[:-1], t.row_len // BLOCK, BLOCK)
            out = _round_trip(blocks, self.qtype, axis=-1)
        return out.reshape(w.shape)

    def relative_error(self, params: dict) -> jax.Array:
        """||dq - w|| / ||w|| over every target: the per-step quantization-error metric."""
        err = norm = jnp.float32(0)
        for t in self.targets:
            w = _get(params, t.path).astype(jnp.float32)
            err += jnp.sum(jnp.square(self.dequantized(w, t) - w))
            norm += jnp.sum(jnp.square(w))
        return jnp.sqrt(err / jnp.maximum(norm, 1e-30))


@jax.custom_vjp
def _straight_through(w: jax.Array, dq: jax.Array) -> jax.Array:
    """`dq` in the forward pass, bit for bit (an add of `w - w` would turn -0.0 into +0.0);
    the identity gradient to `w`."""
    return dq


_straight_through.defvjp(lambda w, dq: (dq, None), lambda _, g: (g, jnp.zeros_like(g)))


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a * b` rounded to f32 on its own. XLA's compiled code contracts a multiply and the add
    after it into one FMA (rounding once, where gguf-py's numpy rounds twice: a product near a
    rounding tie then lands one step away, as one weight of the tiny test model did in Q5_0), and neither an optimization barrier nor a bitcast
    stops it; a select in between does (`p == p` is false only for NaN, which
    `check_finite` refuses before export anyway)."""
    p = a * b
    return jnp.where(p == p, p, 0.0)


def _divide(a: jax.Array, c: int) -> jax.Array:
    """`a / c` correctly rounded, as numpy divides. XLA rewrites a division by a constant into
    a multiply by its rounded reciprocal (off by an ulp for some `a`: a different f16 scale for
    the whole block); a divisor XLA cannot fold keeps the true division."""
    return a / jnp.where(a == a, np.float32(c), np.float32(1))


def _recip(d: jax.Array) -> jax.Array:
    return jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))


def _f16(d: jax.Array) -> jax.Array:
    return d.astype(jnp.float16).astype(jnp.float32)


def _roundf(v: jax.Array) -> jax.Array:
    """gguf-py's `np_roundf` (half away from zero), the same operations."""
    a = jnp.abs(v)
    floored = jnp.floor(a)
    return jnp.sign(v) * (floored + jnp.floor(2 * (a - floored)))


def _round_trip(x: jax.Array, qtype: str, axis: int) -> jax.Array:
    """gguf-py's quantize then dequantize of blocks of 32 along `axis` (f32)."""
    if qtype == "Q8_0":
        d = _divide(jnp.max(jnp.abs(x), axis=axis, keepdims=True), 127)
        return _f16(d) * _roundf(_product(x, _recip(d))).astype(jnp.int8)  # int8: -0 is 0
    if qtype in ("Q4_0", "Q5_0"):
        half = 8 if qtype == "Q4_0" else 16
        imax = jnp.argmax(jnp.abs(x), axis=axis, keepdims=True)
        d = _divide(jnp.take_along_axis(x, imax, axis=axis), -half)
        q = jnp.clip(jnp.trunc(_product(x, _recip(d)) + np.float32(half + 0.5)), 0, 2 * half - 1)
        return _f16(d) * (q - half)
    if qtype == "Q4_1":
        hi, lo = jnp.max(x, axis=axis, keepdims=True), jnp.min(x, axis=axis, keepdims=True)
        d = _divide(hi - lo, 15)
        q = jnp.clip(jnp.trunc(_product(x - lo, _recip(d)) + np.float32(0.5)), 0, 15)
        return _f16(d) * q + _f16(lo)
    raise ValueError(f"no QAT for {qtype}")

