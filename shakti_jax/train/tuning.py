"""What a run trains: every param (full fine-tuning), or LoRA adapters over a frozen base that
is dense or held in a GGUF block format (QLoRA against the edge file's own weights).

The train state's `params` are the trainable leaves (the whole model, or only the adapters),
so the optimizer state and every checkpoint hold exactly those. The frozen base is a separate,
never-donated argument of the step (`{}` for full fine-tuning) and is rebuilt on every start
from a pointer in the checkpoint's meta (`lora.base`: the `train.init_from` workdir and step,
or the init seed), so an adapter checkpoint is a few MiB. `model_params(trainable, frozen)`
is the one place the two become the params the model runs (jit-able): for LoRA
`lora.merge(quant_base.dequantize_params(frozen), adapters)`.

Config (`config.lora`, absent or empty `targets`: full fine-tuning):
`targets` (q, k, v, o, gate, up, down), `rank`, `alpha`, `dropout` (0 only, see
`shakti_jax.lora`), `base_quant` ("" dense, or q8_0 / q5_0 / q4_0 / q4_1: the base is
quantized once with the GGUF exporter's own path, so it is bit for bit the file
`convert --quant` writes for the `init_from` checkpoint). A quantized base is replicated
over the mesh (one device is the use case); a dense one is sharded like the params.

Quantization-aware training (`train.qat`: "" or q8_0 / q5_0 / q4_0 / q4_1, from step
`train.qat_start`) is the last part of `model_params`: the params the model runs are
fake-quantized to the GGUF blocks the exporter will write for them (`shakti_jax.qat`), for
full fine-tuning and LoRA alike (a LoRA run's merged weights are what is exported).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.lora import LoraConfig, adapter_shardings, init_adapters, merge
from shakti_jax.model import ModelDef
from shakti_jax.qat import QAT
from shakti_jax.quant_base import BLOCK_TYPES, dequantize_params, quantize_params
from shakti_jax.sharding import DEFAULT_RULES

BASE_QUANTS = tuple(t.lower() for t in BLOCK_TYPES)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Full fine-tuning (`lora=None`) or LoRA over a dense / GGUF-quantized frozen base."""

    lora: LoraConfig | None = None
    base_quant: str = ""
    qat: QAT | None = None

    @classmethod
    def from_config(cls, config: ConfigDict, model_config: ModelConfig | None = None) -> Tuning:
        """From `config.lora` and `train.qat` (which needs `model_config`); a bad value is a
        one-line ConfigError naming the key."""
        qat = _qat(config.get("train") or {}, model_config)
        return dataclasses.replace(cls._lora_from_config(config), qat=qat)

    @classmethod
    def _lora_from_config(cls, config: ConfigDict) -> Tuning:
        section = config.get("lora") or {}
        targets = tuple(section.get("targets", ()) or ())
        quant = (section.get("base_quant", "") or "").lower()
        if not targets:
            if quant:
                raise ConfigError(f"lora.base_quant={quant!r}: a frozen base needs lora.targets")
            return cls()
        lora = LoraConfig(targets=targets, rank=section.get("rank", 8),
                          alpha=float(section.get("alpha", 16.0)),
                          dropout=section.get("dropout", 0.0))
        if quant and quant not in BASE_QUANTS:
            raise ConfigError(f"lora.base_quant={quant!r}: must be '' (dense) or one of {BASE_QUANTS}")
        if config.get("stage") == "dpo" and config.dpo.reference == "memory":
            raise ConfigError("dpo.reference='memory' keeps a full copy of the params; with "
                              "lora.targets the reference is the frozen base: use "
                              "dpo.reference='precomputed'")
        return cls(lora, quant)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Tuning:
        """From a checkpoint meta's `lora` entry (written by `meta`)."""
        qat = _qat((meta.get("experiment") or {}).get("train") or {}, ModelConfig.from_dict(meta["model"]))
        saved = meta.get("lora")
        if not saved:
            return cls(qat=qat)
        return cls(LoraConfig(targets=tuple(saved["targets"]), rank=saved["rank"],
                              alpha=saved["alpha"]), saved.get("base_quant", ""), qat)

    def meta(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint meta entry: the adapters' settings and where the base comes from
        (`{"init_from": abs path, "step": N}` or `{"seed": S}`); empty for full fine-tuning."""
        if self.lora is None:
            return {}
        return {"lora": {"targets": list(self.lora.targets), "rank": self.lora.rank,
                         "alpha": self.lora.alpha, "base_quant": self.base_quant, "base": dict(base)}}

    # -- the trainable leaves ---------------------------------------------------------------
    def trainable_shardings(self, model_def: ModelDef, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
        if self.lora is None:
            return model_def.param_shardings(mesh, rules)
        return adapter_shardings(model_def, self.lora, mesh, rules)

    def fresh_trainable(self, model_def: ModelDef, seed: int) -> dict:
        """Step-0 trainable leaves (call under jit): a random init, or fresh adapters (B = 0)."""
        if self.lora is None:
            return model_def.init(seed)
        return init_adapters(model_def, self.lora, jax.random.key(seed + 7))

    # -- the frozen base --------------------------------------------------------------------
    def frozen(self, model_def: ModelDef, base_params: dict | None, mesh: Mesh | None = None) -> dict:
        """The step's frozen argument from the starting params: `{}` (full fine-tuning), the
        params themselves (dense LoRA base), or their GGUF blocks (replicated on `mesh`; on
        the default device without one)."""
        if self.lora is None:
            return {}
        if not self.base_quant:
            return base_params
        blocks = quantize_params(model_def, jax.device_get(base_params), self.base_quant)
        return jax.device_put(blocks, NamedSharding(mesh, PartitionSpec()) if mesh else None)

    def model_params(self, trainable: dict, frozen: dict, step: Any = None) -> dict:
        """The params the model runs: the trainable tree itself, or the base with the adapters
        merged in, then fake-quantized under QAT (from `train.qat_start` when `step` is given;
        always without it). Pure, jit-able; gradients reach only `trainable`."""
        params = self.latent_params(trainable, frozen)
        return params if self.qat is None else self.qat.apply(params, step)

    def latent_params(self, trainable: dict, frozen: dict) -> dict:
        """`model_params` before QAT: what a checkpoint's weights are (and the exporter quantizes)."""
        if self.lora is None:
            return trainable
        base = dequantize_params(frozen) if self.base_quant else frozen
        return merge(base, trainable, self.lora)


def _qat(train: Mapping[str, Any], model_config: ModelConfig | None) -> QAT | None:
    quant = train.get("qat", "") or ""
    if not quant:
        return None
    if model_config is None:
        raise ValueError("train.qat needs the model config")
    return QAT.build(quant, model_config, int(train.get("qat_start", 0) or 0))


def abstract_of(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, e.g. the frozen base."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
