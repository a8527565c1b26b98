"""DPO: preference pairs as stacked [chosen; rejected] rows; eval: reward accuracy and margins.

The reference is either a frozen copy of the starting params in the task state (`memory`:
sharded like the params, checkpointed) or log-probs of every pair computed once before
training (`precomputed`), stored in `WORKDIR/reference_logps.npz` keyed by a digest of the
pairs, the tokenizer, the sequence length and the starting params, so a table made for
other data or another start is never reused.
"""

from __future__ import annotations

import hashlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.atomic import write_atomic
from data_pipelines.pipeline import dpo_batches
from data_pipelines.records import RECORD_KINDS, load_pairs
from data_pipelines.sources import SourceSpec
from shakti_jax.config import ConfigError
from shakti_jax.model import ModelDef
from shakti_jax.train import batches
from shakti_jax.train.dpo import LOSSES, dpo_loss, sequence_logps
from shakti_jax.train.step import Objective
from shakti_jax.train.tasks.base import PrepareContext, Task, source_names

REFERENCES = ("memory", "precomputed")
TABLE = "reference_logps.npz"


class PairTask(Task):
    """Preference pairs from every `data.sources` (mixed by weight) as stacked [chosen;
    rejected] rows, with per-source held-out sets: what DPO and the reward model share."""

    rows_per_example = 2

    def __init__(self, config, tokenizer, skipped, model_config):
        super().__init__(config, tokenizer, skipped, model_config)
        specs = list(config.data.sources)
        self.sources = [(spec, load_pairs(spec)) for spec in specs]
        self.weights = [SourceSpec.parse(spec, kinds=RECORD_KINDS).weight for spec in specs]
        self.names = source_names(specs)
        self.pairs = [pair for _, pairs in self.sources for pair in pairs]  # `index` order

    def eval_summary(self, sums, count):
        return {f"eval_{k}": v / count for k, v in sums.items()}

    def _dataset(self, batch_size, process_index, process_count, part, seed, drop_remainder=True,
                 source: int | None = None, seq_len: int | None = None):
        """All sources mixed by weight, or only source number `source` (per-source eval)."""
        sources, weights, first = self.sources, self.weights, 0
        if source is not None:
            first = sum(len(pairs) for _, pairs in self.sources[:source])
            sources, weights = [self.sources[source]], None
        common = self._common(process_index, process_count)
        if seq_len is not None:
            common["seq_len"] = seq_len
        return dpo_batches(sources, self.tokenizer, batch_size=batch_size, seed=seed,
                           holdout_every=self.config.data.holdout_every, part=part,
                           drop_remainder=drop_remainder, weights=weights, first_index=first,
                           **common)


class DPOTask(PairTask):
    def __init__(self, config, tokenizer, skipped, model_config):
        super().__init__(config, tokenizer, skipped, model_config)
        dpo = config.dpo
        if dpo.loss not in LOSSES:
            raise ConfigError(f"dpo.loss={dpo.loss!r}: must be one of {LOSSES}")
        if dpo.reference not in REFERENCES:
            raise ConfigError(f"dpo.reference={dpo.reference!r}: must be one of {REFERENCES}")
        if not dpo.beta > 0:
            raise ConfigError(f"dpo.beta={dpo.beta!r}: must be > 0")
        if dpo.reference == "precomputed" and jax.process_count() > 1:
            raise ConfigError("dpo.reference='precomputed' runs on one process; use 'memory'")
        self.in_memory = dpo.reference == "memory"
        self.reference_table: np.ndarray | None = None  # [pairs, 2] when precomputed
        if not self.in_memory:
            self.batch_schema = {**batches.TOKENS, **batches.REFERENCE_LOGPS}

    # -- state and objective --------------------------------------------------------------
    def init_task_state(self, params):
        return {"reference": jax.tree.map(jnp.copy, params)} if self.in_memory else {}

    def task_state_shardings(self, param_shardings, replicated):
        return {"reference": param_shardings} if self.in_memory else {}

    def objective(self, model_def: ModelDef) -> Objective:
        dpo = self.config.dpo
        return dpo_objective(model_def, beta=dpo.beta, loss=dpo.loss,
                             label_smoothing=dpo.label_smoothing)

    # -- data -----------------------------------------------------------------------------
    def train_dataset(self, batch_size, process_index, process_count):
        ds = self._dataset(batch_size, process_index, process_count, "train", self.config.data.seed)
        return ds if self.in_memory else ds.map(self._attach_reference)

    def eval_datasets(self, batch_size, process_index, process_count):
        if not self.config.data.holdout_every:
            return {}
        out = {}
        for s, name in enumerate(self.names):
            ds = self._dataset(batch_size, process_index, process_count, "eval", None, source=s)
            out[name] = ds if self.in_memory else ds.map(self._attach_reference)
        return out

    def _attach_reference(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = self.reference_table[batch["index"]]
        return {**batch, "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}

    # -- the precomputed reference --------------------------------------------------------
    def _digest(self, start_digest: str) -> str:
        h = hashlib.sha256()
        for pair in self.pairs:
            h.update(json.dumps([pair.prompt, pair.chosen, pair.rejected, pair.where],
                                ensure_ascii=False, default=str).encode())
        h.update(self.tokenizer.fingerprint())
        h.update(json.dumps([self.config.data.seq_len, self.config.data.holdout_every,
                             self.config.data.bad_records, start_digest]).encode())
        return h.hexdigest()

    def prepare(self, ctx: PrepareContext) -> None:
        """With `dpo.reference=precomputed`: the log-probs of every pair under the starting
        params, computed once (one process) or read back when the digest matches."""
        if self.in_memory:
            return
        path, digest = ctx.workdir / TABLE, self._digest(ctx.start_digest)
        if path.exists():
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["digest"]) == digest:
                    self.reference_table = saved["logps"]
                    return
            ctx.log(f"{path.name} was made for other pairs, tokenizer or starting params; "
                    f"recomputing it")
        ctx.log("precomputing reference log-probs of every pair")

        @jax.jit
        def pair_logps(params, batch):
            logits = ctx.model_def.apply(params, batch["inputs"], batch["positions"],
                                         batch["segment_ids"])
            return sequence_logps(logits, batch["targets"], batch["loss_mask"]).reshape(2, -1)

        table = np.full((len(self.pairs), 2), np.nan, np.float32)
        parts = ("train", "eval") if self.config.data.holdout_every else ("train",)
        batch_size = self.config.train.batch_size
        for part in parts:
            for local in self._dataset(batch_size, 0, 1, part, None, drop_remainder=False):
                inputs = {k: local[k] for k in batches.TOKENS}
                chosen, rejected = np.asarray(jax.device_get(pair_logps(ctx.params, inputs)))
                table[local["index"], 0], table[local["index"], 1] = chosen, rejected
        buffer = io.BytesIO()
        np.savez(buffer, logps=table, digest=np.asarray(digest))
        write_atomic(path, buffer.getvalue())
        self.reference_table = table


def dpo_objective(model_def: ModelDef, *, beta: float, loss: str,
                  label_smoothing: float) -> Objective:
    """DPO over stacked [chosen; rejected] rows; the reference is the task state's frozen
    params (in memory) or the batch's precomputed `ref_chosen` / `ref_rejected`; count = pairs."""

    def logps(params, mb, key):
        logits = model_def.apply(params, mb["inputs"], mb["positions"], mb["segment_ids"],
                                 dropout_key=key)
        return sequence_logps(logits, mb["targets"], mb["loss_mask"])

    def objective(params, task_state, mb, key):
        policy = logps(params, mb, key)
        pairs = policy.shape[0] // 2
        if "reference" in task_state:
            ref = jax.lax.stop_gradient(logps(task_state["reference"], mb, None))
            ref_c, ref_r = ref[:pairs], ref[pairs:]
        else:
            ref_c, ref_r = mb["ref_chosen"], mb["ref_rejected"]
        per_pair, metrics = dpo_loss(policy[:pairs], policy[pairs:], ref_c, ref_r, beta=beta,
                                     loss=loss, label_smoothing=label_smoothing)
        sums = {"loss": per_pair.sum(), **{k: v.sum() for k, v in metrics.items()}}
        return per_pair.sum(), sums, jnp.asarray(pairs, jnp.float32)

    return objective
