"""orbax checkpoints of the train state, the data-iterator state and a JSON description.

Layout: `WORKDIR/checkpoints/<step>/{state, data, meta}`. `meta` holds the model config, the
tokenizer path and the step, so `load_model(WORKDIR)` rebuilds a model for generation or
export without the experiment config. orbax writes each step to a temporary folder and
renames it when complete, so a killed save never looks finished; a finished but damaged
latest step is detected on restore and the previous one is used, with a message.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path


import jax
import orbax.checkpoint as ocp
from flax import nnx

from shakti_jax.config import ModelConfig
from shakti_jax.model import Transformer


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


class Checkpointer:
    """Async saves with a retention policy; restores the newest readable step."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, dict, dict] | None:
        """(step, state, data_state, meta) of the newest step that reads back, or None."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                got = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                reason = " ".join(str(err).split())[:200]
                fallback = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "starting fresh"
                kept = self._set_aside(step)
                print(f"checkpoint step {step} is unreadable ({type(err).__name__}: {reason}); "
                      f"moved it to {kept.name}; {fallback}", file=sys.stderr)
                continue
            return step, got["state"], got["data"], got["meta"]
        return None

    def _set_aside(self, step: int) -> Path:
        """Rename a damaged step out of orbax's view (kept for inspection, never re-read)."""
        source = self._manager.directory / str(step)
        target = source.with_name(f"{step}.unreadable-{int(time.time())}")
        source.rename(target)
        self._manager.reload()
        return target

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    model: Transformer
    step: int
    tokenizer_path: Path | None


@dataclasses.dataclass
class LoadedParams:
    config: ModelConfig
    params: dict  # the nested dict of nnx.Param values, as `nnx.to_pure_dict` gives it
    step: int
    tokenizer_path: Path | None


def load_params(workdir: str | Path, step: int | None = None) -> LoadedParams:
    """A training workdir's checkpoint params on the default device, without building a model
    (one copy of the weights in memory). `step=None` takes the newest step.

    Raises a one-line `FileNotFoundError` when there is none.
    """
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(directory) as manager:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints under {directory}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} under {directory} "
                                    f"(have {sorted(steps)})")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        cfg = ModelConfig.from_dict(meta["model"])
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        graphdef, params_state, rest = nnx.split(abstract, nnx.Param, ...)
        target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                         nnx.to_pure_dict(params_state))}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True)))["state"]
    tokenizer = meta.get("tokenizer")
    return LoadedParams(cfg, restored["params"], step, Path(tokenizer) if tokenizer else None)


def load_model(workdir: str | Path, step: int | None = None) -> LoadedModel:
    """The model (params only, on the default device) of a training workdir's checkpoint.

    `step=None` takes the newest step. Raises a one-line `FileNotFoundError` when there is none.
    """
    loaded = load_params(workdir, step)
    model = Transformer(loaded.config, nnx.Rngs(0))
    nnx.update(model, _as_state(model, loaded.params))
    return LoadedModel(loaded.config, model, loaded.step, loaded.tokenizer_path)


def read_meta(workdir: str | Path) -> dict:
    """The `meta` item (model config, tokenizer, step) of a workdir's newest checkpoint."""
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoints under {directory}")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(workdir: str | Path, abstract_params: dict) -> tuple[dict, dict]:
    """(params laid out as `abstract_params` (shapes, dtypes, shardings), meta) of a workdir's
    newest checkpoint: initialises a later stage from an earlier one, on any mesh."""
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoints under {directory} (train.init_from)")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                    abstract_params)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                {"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True)))["state"]
        except (ValueError, KeyError) as err:
            reason = " ".join(str(err).split())[:200]
            raise FileNotFoundError(f"checkpoint {directory / str(step)} does not fit this model "
                                    f"(train.init_from): {reason}") from None
    return restored["params"], meta


def _as_state(model: Transformer, params: dict) -> nnx.State:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return state


def save_model(workdir: str | Path, model: Transformer, *, step: int = 0,
               tokenizer_path: str | Path | None = None) -> Path:
    """Write `model`'s params as a checkpoint `load_model` reads (e.g. a random init to export)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    meta = {"model": model.cfg.to_dict(),
            "tokenizer": str(Path(tokenizer_path).absolute()) if tokenizer_path else None}
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    checkpointer.save(step, {"params": params}, {}, meta)
    checkpointer.close()
    return checkpoint_dir(workdir) / str(step)


