"""The training loop: config -> workdir -> state -> compiled sharded step -> metrics/checkpoints.

`Trainer.run` reads as its phases: claim the workdir (lock, config check), restore or
initialise the state, let the task run its pre-pass, build the step, loop. Re-running the
same command resumes from the newest readable checkpoint (params, optimizer, step, every
host's data-iterator position and skipped-record counts), so a killed run continues with
exactly the batches and losses of an uninterrupted one. The loop names no stage: the task
(`shakti_jax.train.tasks`) owns data, objective, extra state and pre-passes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from data_pipelines.atomic import write_atomic
from data_pipelines.pipeline import SkippedRecords, first_batches
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.evaluation.backends import JaxBackend
from shakti_jax.evaluation.suite import Runner, parse_tasks, prepare
from shakti_jax.lora import count_params
from shakti_jax.model import ModelDef
from shakti_jax.model_stats import summary
from shakti_jax.quant_base import nbytes
from shakti_jax.sharding import make_mesh
from shakti_jax.train.checkpoint import (CheckpointError, Checkpointer, newest_meta, read_meta, restore_params,
                                         start_digest, tokenizer_of)
from shakti_jax.train.metrics import MetricsLogger, peak_flops_per_device
from shakti_jax.train.optimizer import make_optimizer
from shakti_jax.train.state import TrainState
from shakti_jax.train.step import BuiltStep, build_step
from shakti_jax.train.tasks import PrepareContext, make_task
from shakti_jax.train.tuning import Tuning
from shakti_jax.train.workdir import WorkdirLock, check_config_change, prepare_tokenizer, workdir_tokenizer

NONFINITE_POLICIES = ("stop", "skip")


class TrainingStopped(ConfigError):
    """The run stopped on purpose (non-finite loss); the message says why and what was kept."""


def check_config(config: ConfigDict, mesh_devices: int, init_model: dict | None = None) -> ModelConfig:
    """Every check that can fail before compiling; raises a one-line ConfigError naming the key.

    `init_model` is the model config of `train.init_from`'s checkpoint: `config.model` then
    only needs the keys it changes (an imported model's experiment names dtype, dropout, ...).
    """
    try:
        cfg = ModelConfig.from_dict({**(init_model or {}), **config.model.to_dict()})
    except TypeError as err:
        raise ConfigError(f"model: {err}") from None
    train, data = config.train, config.data
    for key in ("steps", "batch_size", "micro_batches", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints"):
        if isinstance(train[key], bool) or not isinstance(train[key], int) or train[key] < 1:
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
    for key in ("resume_step", "init_from_step"):
        value = train.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"train.{key}={value!r}: must be an integer >= 0 (0: the newest)")
    block = cfg.sparse.block_size
    if "block_sparse" in cfg.layer_kinds and config.get("stage") == "pretrain" and data.seq_len % block:
        raise ConfigError(f"data.seq_len={data.seq_len}: must be a multiple of model.sparse."
                          f"block_size={block} (packed documents start on layout blocks)")
    profile = tuple(train.get("profile_steps", ()))
    if profile and (len(profile) != 2 or not 0 <= profile[0] < profile[1] <= train.steps):
        raise ConfigError(f"train.profile_steps={profile!r}: must be (first, last) with "
                          f"0 <= first < last <= train.steps")
    return cfg


class DataState:
    """One process's data position for grain's checkpoint handler: the iterator's state and
    the skipped-record counts, so neither restarts on resume."""

    def __init__(self, iterator, skipped: SkippedRecords):
        self.iterator, self.skipped = iterator, skipped

    def get_state(self) -> bytes:
        return json.dumps({"iterator": self.iterator.get_state(),
                           "skipped": self.skipped.get_state()}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        self.iterator.set_state(saved["iterator"])
        self.skipped.set_state(saved["skipped"])

    def start_prefetch(self) -> None:
        start = getattr(self.iterator, "start_prefetch", None)
        if start:
            start()


def task_runners(config: ConfigDict) -> dict[str, Runner]:
    """`train.eval_tasks` (the `--tasks` syntax of `python -m shakti_jax.eval`) as metric
    prefixes -> runners; every task's data is read and checked here, before any compile."""
    text = config.train.get("eval_tasks", "")
    if not text:
        return {}
    runners = {}
    for task in parse_tasks(text, flag="train.eval_tasks"):
        name = f"{task.kind}:{task.path.stem}"
        if name in runners:
            raise ConfigError(f"train.eval_tasks: two {task.kind} tasks on files named {task.path.stem!r}")
        runners[name] = prepare(task)
    return runners


def task_metrics(runners: dict[str, Runner], backend: JaxBackend, tokenizer) -> dict[str, float]:
    """Each task's scalar metrics as `kind:file/metric` (nested tables stay in eval's JSON)."""
    row = {}
    for name, run in runners.items():
        for key, value in run(backend, tokenizer, backend.max_len).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{name}/{key}"] = float(value)
    return row


class Trainer:
    """Builds everything from an experiment config; `run()` trains to `train.steps`."""

    def __init__(self, config: ConfigDict, workdir: str | Path):
        self.config, self.workdir = config, Path(workdir).absolute()
        try:
            self.mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        except ValueError as err:
            raise ConfigError(f"{err} (config keys mesh.data / mesh.fsdp / mesh.tensor)") from None
        self.model_config = check_config(config, self.mesh.shape["data"] * self.mesh.shape["fsdp"],
                                         self._init_model())
        self.optimizer = make_optimizer(config.optim, config.train.steps)
        self.is_main = jax.process_index() == 0
        self.model_def = ModelDef.from_config(self.model_config)
        self.tuning = Tuning.from_config(config, self.model_config)
        self.eval_tasks = task_runners(config)

    def _init_model(self) -> dict | None:
        """The model config of `train.init_from`'s checkpoint, or None without one."""
        init_from = self.config.train.get("init_from", "")
        if not init_from:
            return None
        try:
            return read_meta(init_from, self.config.train.get("init_from_step") or None)["model"]
        except CheckpointError as err:
            raise ConfigError(f"train.init_from={init_from!r}: {err}") from None

    # -- phases ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to `train.steps` (resuming if a checkpoint exists); returns the last metrics."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = WorkdirLock(self.workdir)
        if self.is_main:
            lock.acquire()
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict[str, Any]:
        train = self.config.train
        saved = newest_meta(self.workdir)
        check_config_change(self.config, saved.get("experiment") if saved else None, self.workdir)
        if self.is_main:
            write_atomic(self.workdir / "config.json",
                         json.dumps(self.config.to_dict(), indent=2, default=str).encode())
        self.skipped = SkippedRecords()
        self.task = self._make_task()
        frozen, self.base_pointer, self.base_digest = self._frozen_base()
        step = build_step(self.task, self.model_def, self.optimizer, self.mesh,
                          batch_size=train.batch_size, micro_batches=train.micro_batches,
                          seed=train.seed, tuning=self.tuning, frozen=frozen)
        self._log(step.memory_line())
        data = DataState(self._train_iterator(), self.skipped)
        checkpointer = Checkpointer(self.workdir, keep=train.keep_checkpoints,
                                    async_save=train.async_checkpoints)
        try:
            state, start_digest = self._restore_or_init(checkpointer, step, data)
            self.task.prepare(PrepareContext(self.model_def, step.model_params(state.params),
                                             self.workdir, start_digest, self._log))
            return self._loop(state, step, data, checkpointer, start_digest)
        finally:
            checkpointer.wait()
            checkpointer.close()

    def _train_iterator(self):
        per_host = self.config.train.batch_size // jax.process_count()
        return iter(self.task.train_dataset(per_host, jax.process_index(), jax.process_count()))

    def _make_task(self):
        init_from = self.config.train.get("init_from", "")
        init_tokenizer = None
        if init_from:
            meta = read_meta(init_from, self.config.train.get("init_from_step") or None)
            init_tokenizer = tokenizer_of(init_from, meta)
        self.tokenizer = prepare_tokenizer(self.config, self.workdir, init_tokenizer,
                                           self.model_config.vocab_size)
        return make_task(self.config, self.tokenizer, self.skipped, self.model_config)

    def _frozen_base(self) -> tuple[dict, dict, str]:
        """A LoRA run's frozen base (the step's frozen argument), its pointer for the checkpoint
        meta and its start digest; `({}, {}, "")` for full fine-tuning."""
        if self.tuning.lora is None:
            return {}, {}, ""
        train = self.config.train
        param_sh = self.model_def.param_shardings(self.mesh)
        if train.get("init_from"):
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    self.model_def.abstract_params, param_sh)
            base, meta = restore_params(train.init_from, abstract, train.get("init_from_step") or None)
            pointer = {"init_from": str(Path(train.init_from).absolute()), "step": meta["step"]}
            digest = start_digest(train.init_from, meta)
        else:
            base = jax.jit(self.model_def.init, static_argnums=0, out_shardings=param_sh)(train.seed)
            pointer, digest = {"seed": train.seed}, f"seed:{train.seed}"
        frozen = self.tuning.frozen(self.model_def, base, self.mesh)
        lora = self.tuning.lora
        adapters = count_params(jax.eval_shape(lambda: self.tuning.fresh_trainable(self.model_def, 0)))
        self._log(f"LoRA on {','.join(lora.targets)} (rank {lora.rank}, alpha {lora.alpha:g}): "
                  f"{adapters:,} trainable params; frozen {nbytes(frozen)}")
        return frozen, pointer, digest

    def _restore_or_init(self, checkpointer: Checkpointer, step: BuiltStep, data: DataState
                         ) -> tuple[TrainState, str]:
        restored = checkpointer.restore_latest(step.abstract_state, data,
                                               self.config.train.get("resume_step") or None)
        seed, init_from = self.config.train.seed, self.config.train.get("init_from", "")
        if restored is not None:
            at, state, meta = restored
            if self.tuning.lora and meta.get("start_digest") != self.base_digest:
                raise CheckpointError(f"{self.workdir}: the LoRA base (train.init_from={init_from!r}) "
                                      f"is not the checkpoint these adapters were trained on; "
                                      f"resume with the same base or use a new workdir")
            self._log(f"resuming from checkpoint step {at}")
            return state, meta.get("start_digest", "")
        data.iterator = self._train_iterator()  # failed restores may have moved the old one
        self.skipped.set_state(SkippedRecords().get_state())  # nor the counts
        if self.tuning.lora:  # fresh adapters over the base `_frozen_base` loaded
            return step.init(None), self.base_digest
        if init_from:
            at = self.config.train.get("init_from_step") or None
            target = step.abstract_state.params
            fresh_head = "value_head" in target and not self._init_model().get("value_head")
            if fresh_head:  # a reward model or PPO policy started from a plain LM
                target = {k: v for k, v in target.items() if k != "value_head"}
            params, meta = restore_params(init_from, target, at)
            if fresh_head:
                head = step.abstract_state.params["value_head"]
                params["value_head"] = jax.jit(lambda: self.model_def.init(seed)["value_head"],
                                               out_shardings=head.sharding)()
            self._log(f"initialised from {init_from} (step {meta['step']})"
                      + ("; the value head is new" if fresh_head else ""))
            return step.init(params), start_digest(init_from, meta)
        return step.init(None), f"seed:{seed}"

    def _loop(self, state: TrainState, step: BuiltStep, data: DataState,
              checkpointer: Checkpointer, start_digest: str) -> dict[str, Any]:
        config, train = self.config, self.config.train
        start = int(jax.device_get(state.step))
        flops_per_token = summary(self.model_config, seq_len=config.data.seq_len)["flops_per_token"]
        peak, peak_source = peak_flops_per_device(self.model_config.dtype)
        self._log(f"MFU is relative to {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
        meta = {"model": self.model_config.to_dict(), "tokenizer": workdir_tokenizer(self.workdir).name,
                "experiment": config.to_dict(), "start_digest": start_digest,
                **self.tuning.meta(self.base_pointer)}
        tokens_per_step = train.batch_size * self.task.rows_per_example * config.data.seq_len
        logger = MetricsLogger(self.workdir, resume_step=start, enabled=self.is_main)
        per_host = train.batch_size // jax.process_count()
        held_out = self.task.eval_datasets(per_host, jax.process_index(), jax.process_count())
        scorer = JaxBackend(self.model_def, None, batch_size=16)
        has_eval = bool(held_out) or bool(self.eval_tasks) or self.task.has_online_eval
        if not held_out and not self.task.has_online_eval:
            self._log("no held-out data (data.holdout_every=0 and no data.eval_sources): "
                      "held-out loss is off" + ("" if self.eval_tasks else ", and so are eval metrics (no train.eval_tasks)"))
        profile = tuple(train.get("profile_steps", ()))
        bar = tqdm(total=train.steps, initial=start, disable=not (self.is_main and train.progress_bar),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        last: dict[str, Any] = {}
        try:
            if start == 0 and has_eval:  # the starting point of every curve, before step 1
                first = self.evaluate(state, step, held_out, scorer)
                if first:
                    logger.write(0, first)
            tick, tick_step = time.perf_counter(), start
            for i in range(start, train.steps):
                if profile and i == profile[0]:
                    jax.profiler.start_trace(str(self.workdir / "profile"))
                local = self.task.next_batch(data.iterator, i, state, step)
                state, metrics = step.train(state, step.global_batch(local))
                done = i + 1
                if profile and done == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                bar.update(1)
                log_now = done % train.log_every == 0 or done == train.steps
                save_now = done % train.checkpoint_every == 0 or done == train.steps
                eval_now = has_eval and (done % train.eval_every == 0 or done == train.steps)
                if log_now or save_now:
                    self._check_finite(state, checkpointer)
                row: dict[str, Any] = {}
                if log_now:
                    elapsed = time.perf_counter() - tick
                    rate = tokens_per_step * (done - tick_step) / elapsed
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    row.update(tokens_per_sec=rate, step_time=elapsed / (done - tick_step),
                               mfu=rate * flops_per_token / (peak * jax.device_count()),
                               tokens_seen=done * tokens_per_step,
                               skipped_records=self.skipped.total,
                               trimmed_prompt_tokens=self.skipped.trimmed_tokens,
                               nonfinite_steps=int(jax.device_get(state.nonfinite)),
                               **self.task.log_metrics())
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                    tick, tick_step = time.perf_counter(), done
                if eval_now:
                    row.update(self.evaluate(state, step, held_out, scorer))
                if row:
                    logger.write(done, row)
                    last = row
                if save_now:
                    checkpointer.save(done, state, data, meta)
        finally:
            bar.close()
            logger.close()
            close = getattr(data.iterator, "close", None)
            if close:
                close()
        return last

    # -- helpers --------------------------------------------------------------------------
    def evaluate(self, state: TrainState, step: BuiltStep, datasets: dict, scorer: JaxBackend
                 ) -> dict[str, float]:
        """The task's held-out metrics over up to `train.eval_batches` batches of each held-out
        dataset (sums over every process's batches, on device): overall, and per source as
        `eval_loss/NAME` when there are several; then `train.eval_tasks` scored on the current
        params (the same requests and metrics as `python -m shakti_jax.eval`)."""
        row = {}
        if self.eval_tasks:
            scorer.params = step.model_params(state.params)
            row = task_metrics(self.eval_tasks, scorer, self.tokenizer)
        if self.task.has_online_eval:
            row.update(self.task.online_eval(self.model_def, step.model_params(state.params)))
        totals: dict[str, float] = {}
        count = 0.0
        for name, dataset in datasets.items():
            own: dict[str, float] = {}
            own_count = 0.0
            for local in first_batches(dataset, self.config.train.eval_batches):
                sums, n = jax.device_get(step.evaluate(state.params, state.task_state,
                                                       step.global_batch(local)))
                for k, v in sums.items():
                    own[k] = own.get(k, 0.0) + float(v)
                    totals[k] = totals.get(k, 0.0) + float(v)
                own_count += float(n)
            count += own_count
            if len(datasets) > 1 and own_count:
                row.update({f"{k}/{name}": v for k, v in self.task.eval_summary(own, own_count).items()})
        return {**(self.task.eval_summary(totals, count) if count else {}), **row}

    def _check_finite(self, state: TrainState, checkpointer: Checkpointer) -> None:
        bad, first = (int(x) for x in jax.device_get((state.nonfinite, state.first_nonfinite)))
        if bad and self.config.train.on_nonfinite == "stop":
            latest = checkpointer.latest_step()
            saved = "none" if latest is None else f"step {latest}"
            raise TrainingStopped(
                f"loss, gradients or updated params were not finite at step {first + 1}; "
                f"stopped without saving (last good checkpoint: {saved}; set "
                f"train.on_nonfinite=skip to drop such steps)")

    def _log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

