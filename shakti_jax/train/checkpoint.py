"""orbax checkpoints of the train state, each process's data-iterator state and a description.

Layout: `WORKDIR/checkpoints/<step>/{state, data, meta}`. `state` is the TrainState; `data`
holds one JSON file per process (grain's own checkpoint handler, so every host resumes from
its own position); `meta` holds the model config, the tokenizer (a path relative to the
workdir when it lives there), the experiment config and a checksum of every state array.

orbax writes each step to a temporary folder and renames it when complete, so a killed save
never looks finished. A finished step whose files do not read back, or whose arrays do not
match their checksums, is set aside by the trainer (renamed `<step>.unreadable-<time>`) and
the previous step is used; readers (`load_params`, `restore_params`, `read_meta`) open the
folder read-only, fall back the same way without renaming, and never create anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import grain
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines.errors import UserError
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.model import ModelDef
from shakti_jax.model.layout import is_per_layer, stack_layers
from shakti_jax.lora import LoraConfig
from shakti_jax.qat import QAT
from shakti_jax.train.tuning import Tuning

LAYOUT_HINT = ("it holds per-layer params from before layers were stacked; start a new workdir "
               "with --config.train.init_from={workdir} (params convert on load)")


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or does not fit; the message names the step."""


class ChecksumMismatch(Exception):
    """Arrays read back but differ from what was saved: the step is damaged."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


# -- integrity ---------------------------------------------------------------------------
def _checksum(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of the array's bits: exact under any sharding."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksum_jit = jax.jit(_checksum)


def _named(tree: Any) -> Any:
    """A dataclass state as {field: value}, so its key paths read like a dict's."""
    if dataclasses.is_dataclass(tree):
        return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    return tree


def tree_checksums(tree: Any) -> dict[str, int]:
    """{key path: checksum} of every array leaf (dataclass fields as dict keys)."""
    flat = jax.tree_util.tree_flatten_with_path(_named(tree))[0]
    if all(isinstance(x, np.ndarray) for _, x in flat):  # host arrays (an import): one at a time
        sums = [jax.device_get(_checksum_jit(x)) for _, x in flat]
    else:
        sums = jax.device_get(jax.jit(lambda xs: [_checksum(x) for x in xs])([x for _, x in flat]))
    return {jax.tree_util.keystr(path): int(s) for (path, _), s in zip(flat, sums)}


def _verify(tree: Any, expected: dict[str, int] | None, what: str) -> None:
    if not expected:
        return
    got = tree_checksums(tree)
    missing = [k for k in got if k not in expected]
    if missing:
        raise ChecksumMismatch(f"{what}: no checksum recorded for {missing[0]}")
    bad = [k for k, v in got.items() if expected[k] != v]
    if bad:
        raise ChecksumMismatch(f"{what}: {len(bad)} array(s) do not match their checksums "
                              f"(first {bad[0]})")


# -- the trainer's read-write manager ----------------------------------------------------
class Checkpointer:
    """Async saves keeping the newest `keep` steps; restores the newest readable step."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)  # a save killed midway leaves a tmp folder; drop it
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({**meta, "step": step,
                                            "checksums": tree_checksums(state)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_state: Any, data_iterator: Any | None,
                       at_most: int | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest step (<= `at_most`, when given) that reads back
        and matches its checksums (the iterator is restored in place), or None. Steps newer
        than `at_most` are renamed aside (kept, never re-read), since the run overwrites them."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if at_most is not None:
            if at_most not in steps:
                raise CheckpointError(f"train.resume_step={at_most}: no such checkpoint under "
                                      f"{self._manager.directory} (have {sorted(steps)})")
            for step in [s for s in steps if s > at_most]:
                kept = self._set_aside(step, "after-resume")
                print(f"train.resume_step={at_most}: moved the newer step {step} to {kept.name}",
                      file=sys.stderr)
            steps = [s for s in steps if s <= at_most]
        for i, step in enumerate(steps):
            try:
                tree = _state_tree(self._manager, step)
            except Exception:  # noqa: BLE001 - damaged metadata; the restore below says more
                tree = {}
            if is_per_layer(tree.get("params", {})):
                raise CheckpointError(f"checkpoint step {step} under {self._manager.directory}: "
                                      + LAYOUT_HINT.format(workdir=self._manager.directory.parent))
            items = {"state": ocp.args.StandardRestore(abstract_state),
                     "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                got = self._manager.restore(step, args=ocp.args.Composite(**items))
                _verify(got["state"], got["meta"].get("checksums"), f"step {step}")
            except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
                reason = " ".join(str(err).split())[:200]
                fallback = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "starting fresh"
                kept = self._set_aside(step)
                print(f"checkpoint step {step} is unreadable ({type(err).__name__}: {reason}); "
                      f"moved it to {kept.name}; {fallback}", file=sys.stderr)
                continue
            return step, got["state"], got["meta"]
        return None

    def _set_aside(self, step: int, why: str = "unreadable") -> Path:
        """Rename a step out of orbax's view (kept for inspection, never re-read)."""
        source = self._manager.directory / str(step)
        target = source.with_name(f"{step}.{why}-{int(time.time())}")
        source.rename(target)
        self._manager.reload()
        return target

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# -- read-only access for generation, export and init_from -------------------------------
def _open_readonly(workdir: str | Path) -> ocp.CheckpointManager:
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints under {directory}")
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager saves nothing
    try:
        return ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})
    finally:
        logging.set_verbosity(verbosity)


def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _state_tree(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.item_metadata(step)["state"].tree


def _candidate_steps(manager: ocp.CheckpointManager, step: int | None) -> list[int]:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoints under {manager.directory}")
    if step is None:
        return steps
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} under {manager.directory} "
                              f"(have {sorted(steps)})")
    return [step]


def _with_fallback(workdir: str | Path, step: int | None, read):
    """`read(manager, step)` on the requested step, or on the newest step that reads back
    (saying which newer steps were skipped); one-line CheckpointError when none does."""
    with _open_readonly(workdir) as manager:
        failures = []
        for candidate in _candidate_steps(manager, step):
            try:
                result = read(manager, candidate)
            except CheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
                failures.append(f"step {candidate} ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:120]})")
                continue
            if failures:
                print(f"skipped damaged checkpoint {'; '.join(failures)}; using step {candidate}",
                      file=sys.stderr)
            return candidate, result
    hint = "" if step is not None else "; pick an older one with --step"
    raise CheckpointError(f"checkpoint under {checkpoint_dir(workdir)} is damaged: "
                          f"{'; '.join(failures)}{hint}")


def _config_of(meta: dict, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(meta["model"])
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: its model description is unreadable ({err})") from None


def tokenizer_of(workdir: str | Path, meta: dict) -> Path | None:
    """The tokenizer a checkpoint names: relative paths are inside the workdir."""
    name = meta.get("tokenizer")
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else Path(workdir).absolute() / path


@dataclasses.dataclass
class LoadedParams:
    config: ModelConfig
    params: dict  # nested dict of arrays, the ModelDef's layout (a LoRA run's: base + adapters)
    step: int
    tokenizer_path: Path | None
    adapters: dict | None = None  # a LoRA run's adapters as saved
    lora: LoraConfig | None = None
    qat: QAT | None = None  # a QAT run's fake quantization: `qat.apply(params)` is the model it trained

    @property
    def model_def(self) -> ModelDef:
        return ModelDef.from_config(self.config)


def steps(workdir: str | Path) -> list[int]:
    """The finished steps of a workdir, oldest first ([] when it has no checkpoints)."""
    if not checkpoint_dir(workdir).is_dir():
        return []
    with _open_readonly(workdir) as manager:
        return sorted(manager.all_steps())


def newest_meta(workdir: str | Path) -> dict | None:
    """The meta of a workdir's newest step whose meta reads back, or None (no checkpoints)."""
    if not checkpoint_dir(workdir).is_dir():
        return None
    with _open_readonly(workdir) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return _restore_meta(manager, step)
            except Exception:  # noqa: BLE001 - a damaged step; the trainer sets it aside later
                continue
    return None


def read_meta(workdir: str | Path, step: int | None = None) -> dict:
    """The `meta` item (model config, tokenizer, step, experiment) of a checkpoint."""
    return _with_fallback(workdir, step, _restore_meta)[1]


def start_digest(workdir: str | Path, meta: dict) -> str:
    """Identifies a run's starting params: the `init_from` workdir, its step and checksums."""
    digest = f"{Path(workdir).absolute()}:{meta['step']}:{meta.get('checksums', {})}"
    return hashlib.sha256(digest.encode()).hexdigest()


def lora_base(meta: dict, where: str) -> tuple[dict, str]:
    """(dense base params, start digest) of a LoRA checkpoint's `lora.base` pointer, on the
    default device; a base whose checkpoint changed since the run started is refused."""
    base = meta["lora"]["base"]
    cfg = _config_of(meta, where)
    if "seed" in base:
        return jax.jit(ModelDef.from_config(cfg).init, static_argnums=0)(base["seed"]), f"seed:{base['seed']}"
    loaded = load_params(base["init_from"], base["step"])
    digest = start_digest(base["init_from"], read_meta(base["init_from"], base["step"]))
    if meta.get("start_digest") and digest != meta["start_digest"]:
        raise CheckpointError(f"{where}: its LoRA base {base['init_from']} step {base['step']} "
                              f"has changed since the adapters were trained (checksums differ)")
    return loaded.params, digest


def load_params(workdir: str | Path, step: int | None = None) -> LoadedParams:
    """A workdir's checkpoint params on the default device, without building a model (one
    copy of the weights in memory), verified against their checksums. `step=None` takes the
    newest step that reads back. Per-layer checkpoints from before stacking convert here. A
    LoRA run's params are its base (from the meta's pointer, quantized as in training) with the
    adapters merged in; `adapters` and `lora` hold them as trained. A QAT run's params are its
    latent weights (what the exporter quantizes into the trained blocks); `qat` gives the
    fake-quantized model it trained."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(manager, candidate):
        meta = _restore_meta(manager, candidate)
        cfg = _config_of(meta, f"checkpoint step {candidate} under {manager.directory}")
        tree = _state_tree(manager, candidate)
        tuning = Tuning.from_meta(meta)
        if is_per_layer(tree["params"]):
            target = {"params": jax.tree.map(_restore_target, tree["params"])}
        else:
            model_def = ModelDef.from_config(cfg)
            abstract = (jax.eval_shape(lambda: tuning.fresh_trainable(model_def, 0)) if tuning.lora
                        else model_def.abstract_params)
            target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
        restored = manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True)))["state"]
        checksums = {k[len("['params']"):]: v for k, v in (meta.get("checksums") or {}).items()
                     if k.startswith("['params']")}
        _verify(restored["params"], checksums, f"step {candidate}")
        return meta, cfg, _stacked(restored["params"], cfg)

    step, (meta, cfg, params) = _with_fallback(workdir, step, read)
    tuning = Tuning.from_meta(meta)
    if tuning.lora is None:
        return LoadedParams(cfg, params, step, tokenizer_of(workdir, meta), qat=tuning.qat)
    model_def = ModelDef.from_config(cfg)
    base, _ = lora_base(meta, f"checkpoint step {step} under {checkpoint_dir(workdir)}")
    merged = jax.jit(tuning.latent_params)(params, tuning.frozen(model_def, base))
    return LoadedParams(cfg, merged, step, tokenizer_of(workdir, meta), params, tuning.lora, tuning.qat)


def _restore_target(leaf) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def _stacked(params: dict, cfg: ModelConfig) -> dict:
    """Params in the stacked layout (converting a per-layer checkpoint's `blocks`)."""
    if not is_per_layer(params):
        return params
    per_layer = [params["blocks"][str(i)] if str(i) in params["blocks"] else params["blocks"][i]
                 for i in range(cfg.num_layers)]
    rest = {k: v for k, v in params.items() if k != "blocks"}
    stacked = stack_layers(jax.tree.map(np.asarray, per_layer), cfg)
    return {**rest, **jax.tree.map(jnp.asarray, stacked)}


def restore_params(workdir: str | Path, abstract_params: dict, step: int | None = None
                   ) -> tuple[dict, dict]:
    """(params laid out as `abstract_params` (shapes, dtypes, shardings), meta) of a
    workdir's checkpoint: initialises a later stage from an earlier one, on any mesh. A LoRA
    checkpoint starts the next stage from its merged params (base + adapters)."""

    def read(manager, candidate):
        meta = _restore_meta(manager, candidate)
        if meta.get("lora") or is_per_layer(_state_tree(manager, candidate).get("params", {})):
            return meta, None
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                    abstract_params)
        try:
            restored = manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                {"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True)))["state"]
        except (ValueError, KeyError) as err:
            reason = " ".join(str(err).split())[:200]
            raise CheckpointError(f"checkpoint {manager.directory / str(candidate)} does not fit "
                                  f"this model (train.init_from): {reason}") from None
        return meta, restored["params"]

    step, (meta, params) = _with_fallback(workdir, step, read)
    if params is None:  # per-layer layout or LoRA: load on the host, then place on the mesh
        params = jax.device_put(load_params(workdir, step).params,
                                jax.tree.map(lambda a: a.sharding, abstract_params))
    return params, meta


def save_params(workdir: str | Path, config: ModelConfig, params: dict, *, step: int = 0,
                tokenizer_path: str | Path | None = None, meta: dict | None = None) -> Path:
    """Write params as a checkpoint `load_params` reads (a random init to export, an import).
    A tokenizer inside `workdir` is recorded relative to it (the workdir can move); `meta`
    adds keys to the checkpoint's description."""
    tokenizer = None
    if tokenizer_path:
        tokenizer = Path(tokenizer_path).absolute()
        if tokenizer.is_relative_to(Path(workdir).absolute()):
            tokenizer = tokenizer.relative_to(Path(workdir).absolute())
    meta = {**(meta or {}), "model": config.to_dict(), "tokenizer": str(tokenizer) if tokenizer else None}
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    checkpointer.save(step, {"params": params}, None, meta)
    checkpointer.close()
    return checkpoint_dir(workdir) / str(step)


def save_model(workdir: str | Path, model, *, step: int = 0,
               tokenizer_path: str | Path | None = None) -> Path:
    """`save_params` for an NNX `Transformer` (tests, benchmarks)."""
    from flax import nnx

    return save_params(workdir, model.cfg, nnx.to_pure_dict(nnx.state(model)), step=step,
                       tokenizer_path=tokenizer_path)
