"""The training loop: config -> mesh, data, state -> compiled sharded step -> metrics/checkpoints.

Re-running the same command resumes from the newest readable checkpoint (params, optimizer,
step and data-iterator state), so a killed run continues with exactly the batches and losses
of an uninterrupted one.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict
from tqdm import tqdm

from data_pipelines.atomic import write_atomic
from data_pipelines.pipeline import SkippedRecords, first_batches, open_sources
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.model_stats import summary
from shakti_jax.sharding import make_mesh, param_shardings, shardings_like
from shakti_jax.train.checkpoint import Checkpointer, restore_params
from shakti_jax.train.metrics import MetricsLogger, peak_flops_per_device
from shakti_jax.train.optimizer import make_optimizer
from shakti_jax.train.step import ModelParts, init_train_state, make_eval_step, make_train_step
from shakti_jax.train.tasks import DPOTask, make_task

NONFINITE_POLICIES = ("stop", "skip")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the message says why and what was kept."""


def check_config(config: ConfigDict, mesh_devices: int) -> ModelConfig:
    """Every check that can fail before compiling; raises a one-line ConfigError naming the key."""
    try:
        cfg = ModelConfig.from_dict(config.model.to_dict())
    except TypeError as err:
        raise ConfigError(f"model: {err}") from None
    train, data = config.train, config.data
    for key in ("steps", "batch_size", "micro_batches", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key}={train[key]!r}: must be a positive integer")
    if train.on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"train.on_nonfinite={train.on_nonfinite!r}: must be one of "
                          f"{NONFINITE_POLICIES}")
    if not 1 <= data.seq_len <= cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len}: must be in [1, model.max_seq_len="
                          f"{cfg.max_seq_len}]")
    processes = jax.process_count()
    if train.batch_size % processes:
        raise ConfigError(f"train.batch_size={train.batch_size}: must divide evenly over "
                          f"{processes} processes")
    if train.batch_size % train.micro_batches:
        raise ConfigError(f"train.batch_size={train.batch_size}: must be a multiple of "
                          f"train.micro_batches={train.micro_batches}")
    micro = train.batch_size // train.micro_batches
    if micro % mesh_devices:
        raise ConfigError(f"train.batch_size={train.batch_size}: each micro-batch of {micro} rows "
                          f"must divide over the mesh's {mesh_devices} batch shards "
                          f"(mesh.data x mesh.fsdp)")
    return cfg


def prepare_tokenizer(config: ConfigDict, workdir: Path, sources, vocab_size: int) -> Tokenizer:
    """The configured tokenizer, or one trained on the training documents into the workdir."""
    if config.data.tokenizer:
        tokenizer = Tokenizer.load(config.data.tokenizer)
    else:
        path = workdir / "tokenizer.model"
        if not path.exists():
            corpus = workdir / "tokenizer_corpus.txt"
            write_corpus_sample(sources, corpus)
            train_tokenizer([corpus], vocab_size, workdir / "tokenizer")
            corpus.unlink()
        tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces ({tokenizer.model_path})")
    return tokenizer


def write_corpus_sample(sources, path: Path, max_chars: int = 5_000_000) -> None:
    """The first documents of each source (in file order), up to `max_chars` in total."""
    path.parent.mkdir(parents=True, exist_ok=True)
    budget = max_chars // len(sources)
    with path.open("w", encoding="utf-8") as f:
        for _, docs in sources:
            used = 0
            for i in range(len(docs)):
                doc = docs[i]
                if doc.text is not None:
                    f.write(doc.text.replace("\r", "") + "\n")
                    used += len(doc.text)
                if used >= budget:
                    break


def train_state_layout(parts: ModelParts, tx, mesh, seed: int,
                       with_reference: bool = False) -> tuple[dict, dict]:
    """(shardings, abstract state with those shardings) of the train state on `mesh`: params
    (and a DPO reference) by the logical-axis rules, optimizer moments like their params,
    counters replicated."""
    from flax import nnx

    abstract = jax.eval_shape(lambda: init_train_state(parts, tx, seed,
                                                       with_reference=with_reference))
    params_sh = nnx.to_pure_dict(param_shardings(parts.abstract_params, mesh))
    replicated = NamedSharding(mesh, P())
    shardings = {"step": replicated, "nonfinite": replicated, "first_nonfinite": replicated,
                 "params": params_sh,
                 "opt_state": shardings_like(abstract["opt_state"], params_sh, mesh)}
    if with_reference:
        shardings["reference"] = params_sh
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return shardings, abstract


class Trainer:
    """Builds everything from an experiment config; `run()` trains to `train.steps`."""

    def __init__(self, config: ConfigDict, workdir: str | Path):
        self.config, self.workdir = config, Path(workdir)
        try:
            self.mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        except ValueError as err:
            raise ConfigError(f"{err} (config keys mesh.data / mesh.fsdp / mesh.tensor)") from None
        stage = config.get("stage", "pretrain")
        self.model_config = check_config(config, self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        self.is_main = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.skipped = SkippedRecords()
        init_from = config.train.get("init_from", "")
        sources = None
        if stage == "pretrain" and not config.data.tokenizer:
            sources = open_sources(list(config.data.sources))
            self.tokenizer = prepare_tokenizer(config, self.workdir, sources,
                                               self.model_config.vocab_size)
        else:
            self.tokenizer = _stage_tokenizer(config, init_from, self.model_config.vocab_size)
        self.task = make_task(config, self.tokenizer, self.skipped, sources)
        if stage == "dpo" and not self.task.uses_reference_params and jax.process_count() > 1:
            raise ConfigError("dpo.reference='precomputed' runs on one process; use 'memory'")
        self.parts = ModelParts.build(self.model_config, config.train.seed)
        self.tx, self.schedule = make_optimizer(config.optim, config.train.steps)
        self.state_shardings, self.abstract_state = train_state_layout(
            self.parts, self.tx, self.mesh, config.train.seed, self.task.uses_reference_params)
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.checkpointer = Checkpointer(self.workdir, keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoints)

    def _initial_state(self) -> tuple[dict, dict | None]:
        restored = self.checkpointer.restore_latest(self.abstract_state)
        if restored is not None:
            step, state, data_state, _ = restored
            self._log(f"resuming from checkpoint step {step}")
            return state, data_state
        seed, with_ref = self.config.train.seed, self.task.uses_reference_params
        init_from = self.config.train.get("init_from", "")
        if init_from:
            params, meta = restore_params(init_from, self.abstract_state["params"])
            self._log(f"initialised from {init_from} (step {meta['step']})")
            init = jax.jit(lambda p: init_train_state(self.parts, self.tx, seed, params=p,
                                                      with_reference=with_ref),
                           out_shardings=self.state_shardings, donate_argnums=0)
            return init(params), None
        init = jax.jit(lambda: init_train_state(self.parts, self.tx, seed, with_reference=with_ref),
                       out_shardings=self.state_shardings)
        return init(), None

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, local[k])
                for k in self.task.batch_layout(1)}

    def _abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                for k, (shape, dtype) in self.task.batch_layout(self.config.train.batch_size).items()}

    def compile_step(self):
        train = self.config.train
        step = make_train_step(self.parts, self.tx, self.schedule, self.task.objective(self.parts),
                               micro_batches=train.micro_batches, seed=train.seed)
        replicated = NamedSharding(self.mesh, P())
        jitted = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        compiled = jitted.lower(self.abstract_state, self._abstract_batch()).compile()
        self._log(_memory_line(compiled))
        return compiled

    def _eval_fn(self):
        reference_sh = self.state_shardings.get("reference")
        return jax.jit(make_eval_step(self.task.objective(self.parts)),
                       in_shardings=(self.state_shardings["params"], reference_sh,
                                     self.batch_sharding))

    def evaluate(self, state: dict, eval_fn) -> dict[str, float]:
        """The task's held-out metrics over up to `train.eval_batches` batches."""
        per_host = self.config.train.batch_size // jax.process_count()
        dataset = self.task.eval_dataset(per_host, jax.process_index(), jax.process_count())
        totals, count = {}, 0.0
        for local in first_batches(dataset, self.config.train.eval_batches):
            sums, n = jax.device_get(eval_fn(state["params"], state.get("reference"),
                                             self._global_batch(local)))
            host = {k: v * jax.process_count() for k, v in self.task.host_sums(local).items()}
            for k, v in {**sums, **host}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += float(n)
        return self.task.eval_summary(totals, count) if count else {}

    def precompute_reference(self, params: dict) -> None:
        """DPO with `dpo.reference=precomputed`: log-probs of every pair under the starting
        params, computed once and stored in WORKDIR/reference_logps.npy."""
        path = self.workdir / "reference_logps.npy"
        if path.exists():
            self.task.reference_table = np.load(path)
            return
        self._log("precomputing reference log-probs of every pair")
        logps = jax.jit(lambda p, b: _pair_logps(self.parts, p, b))  # one process: plain jit
        table = np.full((len(self.task.pairs), 2), np.nan, np.float32)
        parts = ("train", "eval") if self.config.data.holdout_every else ("train",)
        for part in parts:
            for local in self.task.all_pairs_dataset(self.config.train.batch_size, part):
                batch = {k: local[k] for k in ("inputs", "targets", "loss_mask", "segment_ids",
                                               "positions")}
                chosen, rejected = np.asarray(jax.device_get(logps(params, batch)))
                table[local["index"], 0], table[local["index"], 1] = chosen, rejected
        buffer = io.BytesIO()
        np.save(buffer, table)
        write_atomic(path, buffer.getvalue())
        self.task.reference_table = table

    def run(self) -> dict[str, Any]:
        """Train to `train.steps` (resuming if a checkpoint exists); returns the last metrics."""
        config, train, data = self.config, self.config.train, self.config.data
        state, data_state = self._initial_state()
        if isinstance(self.task, DPOTask) and not self.task.uses_reference_params:
            self.precompute_reference(state["params"])
        start = int(jax.device_get(state["step"]))
        per_host = train.batch_size // jax.process_count()
        iterator = iter(self.task.train_dataset(per_host, jax.process_index(), jax.process_count()))
        if data_state:
            iterator.set_state(data_state)
        step_fn = self.compile_step()
        eval_fn = self._eval_fn()
        flops_per_token = summary(self.model_config, seq_len=data.seq_len)["flops_per_token"]
        peak, peak_source = peak_flops_per_device(self.model_config.dtype)
        self._log(f"MFU is relative to {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
        logger = MetricsLogger(self.workdir, resume_step=start, enabled=self.is_main)
        meta = {"model": self.model_config.to_dict(), "tokenizer": str(self.tokenizer.model_path),
                "experiment": config.to_dict()}
        tokens_per_step = train.batch_size * self.task.rows_per_example * data.seq_len
        bar = tqdm(total=train.steps, initial=start, disable=not (self.is_main and train.progress_bar),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        last = {}
        if start == 0:  # the starting point of every curve: held-out metrics before step 1
            logger.write(0, self.evaluate(state, eval_fn))
        tick, tick_step = time.perf_counter(), start
        try:
            for step in range(start, train.steps):
                state, metrics = step_fn(state, self._global_batch(next(iterator)))
                done = step + 1
                bar.update(1)
                log_now = done % train.log_every == 0 or done == train.steps
                save_now = done % train.checkpoint_every == 0 or done == train.steps
                eval_now = done % train.eval_every == 0 or done == train.steps
                if log_now or save_now:
                    self._check_finite(state)
                row = {}
                if log_now:
                    elapsed = time.perf_counter() - tick
                    rate = tokens_per_step * (done - tick_step) / elapsed
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    row.update(tokens_per_sec=rate, step_time=elapsed / (done - tick_step),
                               mfu=rate * flops_per_token / (peak * jax.device_count()),
                               tokens_seen=done * tokens_per_step,
                               skipped_records=self.skipped.total,
                               trimmed_prompt_tokens=self.skipped.trimmed_tokens,
                               nonfinite_steps=int(jax.device_get(state["nonfinite"])))
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                    tick, tick_step = time.perf_counter(), done
                if eval_now:
                    row.update(self.evaluate(state, eval_fn))
                if row:
                    logger.write(done, row)
                    last = row
                if save_now:
                    self.checkpointer.save(done, state, iterator.get_state(), meta)
        finally:
            bar.close()
            self.checkpointer.wait()
            self.checkpointer.close()
            logger.close()
            close = getattr(iterator, "close", None)
            if close:
                close()
        return last

    def _check_finite(self, state: dict) -> None:
        bad, first = (int(x) for x in jax.device_get((state["nonfinite"], state["first_nonfinite"])))
        if bad and self.config.train.on_nonfinite == "stop":
            latest = self.checkpointer.latest_step()
            saved = "none" if latest is None else f"step {latest}"
            raise TrainingStopped(
                f"loss or gradients were not finite at step {first + 1}; stopped without saving "
                f"(last good checkpoint: {saved}; set train.on_nonfinite=skip to drop such steps)")

    def _log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def _stage_tokenizer(config: ConfigDict, init_from: str, vocab_size: int) -> Tokenizer:
    """data.tokenizer, else the tokenizer recorded in the init_from checkpoint."""
    path = config.data.tokenizer
    if not path and init_from:
        from shakti_jax.train.checkpoint import read_meta

        path = read_meta(init_from).get("tokenizer") or ""
    if not path:
        raise ConfigError("data.tokenizer is empty and train.init_from names no checkpoint "
                          "with a tokenizer; set one of them")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces ({path})")
    return tokenizer


def _pair_logps(parts: ModelParts, params: dict, batch: dict) -> jax.Array:
    from shakti_jax.train.dpo import sequence_logps

    logits = parts.model(params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    return sequence_logps(logits, batch["targets"], batch["loss_mask"]).reshape(2, -1)


def _memory_line(compiled) -> str:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return "compiled train step (no memory analysis on this backend)"
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    return (f"compiled train step per device: arguments {gib(analysis.argument_size_in_bytes)}, "
            f"outputs {gib(analysis.output_size_in_bytes)}, temporaries "
            f"{gib(analysis.temp_size_in_bytes)}, aliased {gib(analysis.alias_size_in_bytes)}")
