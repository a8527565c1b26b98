"""LoRA adapters as a pure function over the params dict: `merge(base, adapters, cfg) -> params`.

A targeted projection W (stacked: [layers, *in, *out], e.g. wq [L, D, N, H], wo [L, N, H, D])
gets two adapter leaves kept in the base's own factor shapes:
- `lora_a` [L, *in, R]: the input side, PEFT's init (kaiming-uniform with a=sqrt(5), i.e.
  uniform(+-1/sqrt(fan_in)));
- `lora_b` [L, R, *out]: the output side, zeros, so fresh adapters leave the model unchanged;
and the merged weight is W + (alpha / R) * A @ B (contracting R), computed in float32 and cast
to W's dtype. The adapter tree mirrors the base params' paths (`groups/g/blocks/s/attn/wq` holds
`{"lora_a", "lora_b"}`), so each factor takes its base's logical axes for the dims it shares
(A: the input axes, B: the output axes; the rank axis unsharded) and is sharded like its base
through `shakti_jax.sharding.tree_shardings` (`adapter_axes`, `adapter_shardings`).

`merge` is jit-able and passes untargeted leaves through as the same objects; training calls
`model_def.apply(merge(base, adapters, cfg), ...)` with the base as a non-differentiated
argument (a QLoRA base: `merge(quant_base.dequantize_params(q), ...)`), so gradients reach the
adapters only.

Dropout: LoRA dropout acts on the adapter's input, `W x + B A drop(x)`, which no merged weight
can express (the dropped activations differ per token), so only `dropout=0.0` is accepted;
the model's own residual dropout (`model.dropout_rate`) still applies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.model.model_def import ModelDef
from shakti_jax.sharding import DEFAULT_RULES, tree_shardings

Params = dict[str, Any]
KeyPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """A projection LoRA can adapt: where it lives in a block, how many leading (input) dims
    its kernel has after the layers axis, and its llama.cpp tensor name."""
    path: tuple[str, str]
    n_in: int
    gguf_name: str


TARGETS: dict[str, Target] = {
    "q": Target(("attn", "wq"), 1, "attn_q"),  # [L, D, N, H]
    "k": Target(("attn", "wk"), 1, "attn_k"),  # [L, D, K, H]
    "v": Target(("attn", "wv"), 1, "attn_v"),  # [L, D, K, H]
    "o": Target(("attn", "wo"), 2, "attn_output"),  # [L, N, H, D]
    "gate": Target(("mlp", "w_gate"), 1, "ffn_gate"),  # [L, D, F]
    "up": Target(("mlp", "w_up"), 1, "ffn_up"),  # [L, D, F]
    "down": Target(("mlp", "w_down"), 1, "ffn_down"),  # [L, F, D]
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters, their rank and alpha (scale = alpha / rank)."""

    targets: tuple[str, ...] = ("q", "v")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad:
            raise ConfigError(f"lora.targets={targets!r}: unknown target {bad[0]!r}; "
                              f"choose from {', '.join(TARGETS)}")
        if not targets or len(set(targets)) != len(targets):
            raise ConfigError(f"lora.targets={targets!r}: give each target once, at least one")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank!r}: must be an integer >= 1")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha={self.alpha!r}: must be a finite number > 0 "
                              f"(llama.cpp reads alpha 0 as scale 1)")
        if self.dropout != 0.0:
            raise ConfigError(f"lora.dropout={self.dropout!r}: only 0.0 is supported; adapters are "
                              f"merged into the weights, where dropout on the adapter input cannot "
                              f"be expressed (use model.dropout_rate)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _config(model: ModelDef | ModelConfig) -> ModelConfig:
    return model.config if isinstance(model, ModelDef) else model


def target_paths(model: ModelDef | ModelConfig, lora: LoraConfig) -> Iterator[tuple[KeyPath, str]]:
    """(base param path, target name) of every adapted kernel, in params order."""
    cfg = _config(model)
    if "gate" in lora.targets and cfg.mlp != "swiglu":
        raise ConfigError(f"lora.targets={lora.targets!r}: model.mlp={cfg.mlp!r} has no gate "
                          f"projection to adapt")
    for g, (kinds, _) in enumerate(cfg.layer_groups):
        for s in range(len(kinds)):
            for name in lora.targets:
                yield ("groups", g, "blocks", s, *TARGETS[name].path), name


def _get(tree: Mapping, path: KeyPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: KeyPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _split(shape: tuple[int, ...], n_in: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """A stacked kernel's shape as (layers, input dims, output dims)."""
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def init_adapters(model_def: ModelDef, lora: LoraConfig, key: jax.Array) -> Params:
    """Fresh adapters: A uniform(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform), B zeros, in the
    model's param dtype. Call under jit with `out_shardings=adapter_shardings(...)` to create
    them sharded."""
    base = model_def.abstract_params
    dtype = model_def.config.param_dtype
    shapes = []
    for path, name in target_paths(model_def, lora):
        L, ins, outs = _split(_get(base, path).shape, TARGETS[name].n_in)
        shapes.append((path, (L, *ins, lora.rank), (L, lora.rank, *outs), 1.0 / math.sqrt(math.prod(ins))))
    # One draw for every A (one PRNG kernel, not one per leaf: much faster to compile).
    u = jax.random.uniform(key, (sum(math.prod(a) for _, a, _, _ in shapes),), jnp.float32, -1.0, 1.0)
    adapters: Params = {}
    start = 0
    for path, a_shape, b_shape, bound in shapes:
        size = math.prod(a_shape)
        a = (bound * u[start:start + size]).reshape(a_shape).astype(dtype)
        _set(adapters, path, {"lora_a": a, "lora_b": jnp.zeros(b_shape, dtype)})
        start += size
    return adapters


def adapter_axes(model_def: ModelDef, lora: LoraConfig) -> Params:
    """Logical axes of every adapter leaf: A takes its base's input axes, B its output axes,
    both the base's `layers` axis; the rank axis is None (replicated)."""
    base_axes = model_def.param_axes
    axes: Params = {}
    for path, name in target_paths(model_def, lora):
        layers, ins, outs = _split(_get(base_axes, path), TARGETS[name].n_in)
        _set(axes, path, {"lora_a": (layers, *ins, None), "lora_b": (layers, None, *outs)})
    return axes


def adapter_shardings(model_def: ModelDef, lora: LoraConfig, mesh: Mesh,
                      rules: Mapping = DEFAULT_RULES) -> Params:
    """NamedShardings of the adapters on `mesh` (sharded like their base kernels)."""
    shapes = jax.eval_shape(lambda: init_adapters(model_def, lora, jax.random.key(0)))
    return tree_shardings(shapes, adapter_axes(model_def, lora), mesh, rules)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in float32, shaped [L, *in, *out] from A [L, *in, R] and B [L, R, *out]."""
    L, R = a.shape[0], a.shape[-1]
    a_LIR = a.astype(jnp.float32).reshape(L, -1, R)
    b_LRO = b.astype(jnp.float32).reshape(L, R, -1)
    d_LIO = jnp.einsum("lir,lro->lio", a_LIR, b_LRO, precision=jax.lax.Precision.HIGHEST)
    return (scale * d_LIO).reshape(*a.shape[:-1], *b.shape[2:])


def merge(base_params: Params, adapters: Params, lora: LoraConfig) -> Params:
    """`base_params` with every adapted kernel replaced by W + scale * A @ B (float32, cast to
    W's dtype); every other leaf is the same object. Pure and jit-able."""

    def walk(base: Any, ad: Any, path: KeyPath) -> Any:
        if not isinstance(ad, Mapping):
            raise ValueError(f"adapters at {'/'.join(map(str, path))}: expected a dict, got "
                             f"{type(ad).__name__}")
        if "lora_a" in ad:
            w = base
            d = delta(ad["lora_a"], ad["lora_b"], lora.scale)
            if d.shape != w.shape:
                raise ValueError(f"adapters at {'/'.join(map(str, path))}: A @ B has shape "
                                 f"{d.shape}, the base kernel {w.shape}")
            return (w.astype(jnp.float32) + d).astype(w.dtype)
        missing = [k for k in ad if k not in base]
        if missing:
            raise ValueError(f"adapters at {'/'.join(map(str, (*path, missing[0])))}: "
                             f"no such base param")
        return {k: walk(v, ad[k], (*path, k)) if k in ad else v for k, v in base.items()}

    return walk(base_params, adapters, ())


def count_params(adapters: Params) -> int:
    """Number of adapter parameters."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(adapters))
