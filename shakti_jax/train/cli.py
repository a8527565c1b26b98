"""`python -m shakti_jax.train --config=experiments/pretrain.py:tiny --workdir=DIR [--config.a.b=v]`.

Re-running the same command resumes; a rerun with a different config stops with one line
naming the keys (accept intended changes with `--config.train.allow_changes=...`).
Multi-host: pass `--coordinator_address HOST:PORT --num_processes N --process_id I` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and run the same command on
every host. Started through absl's `app.run`, so `--help`, `--helpfull` and `--jax_*` work.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.cli import fail, one_line, run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:size]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, tokenizer)")
_COORDINATOR = flags.DEFINE_string("coordinator_address",
                                   os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "multi-host: HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes",
                                      int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                                      "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                                   "multi-host: this process's index")


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _load_config()
    if config is None or not _WORKDIR.value:
        fail("both --config=FILE[:size] and --workdir=DIR are required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    import jax

    if _NUM_PROCESSES.value > 1:
        if not _COORDINATOR.value:
            fail("--num_processes > 1 needs --coordinator_address HOST:PORT")
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from shakti_jax.train.trainer import Trainer

    trainer = Trainer(config, _WORKDIR.value)
    if jax.process_index() == 0:  # the resolved config (also saved as WORKDIR/config.json)
        print(f"config:\n{config}", flush=True)
    trainer.run()


def _load_config():
    """The experiment config; an override of a key the config lacks, or a file that fails to
    load, is one line."""
    try:
        config = _CONFIG.value
        if config is not None:
            config.to_dict()  # a config file that failed to load raises only when read
        return config
    except (AttributeError, KeyError, OSError, ValueError, TypeError) as err:
        fail(_config_error(err))


def _config_error(err: Exception) -> str:
    flag = getattr(err, "flagname", "") or ""
    if isinstance(err, flags.UnrecognizedFlagError) and flag.startswith("config."):
        return (f"unknown config key {flag[len('config.'):]!r}; see the experiment file for the "
                f"available keys")
    if isinstance(err, (AttributeError, KeyError)):  # an override names a key the config lacks
        inner = err
        while isinstance(inner, (AttributeError, KeyError)) and inner.args:
            inner = inner.args[0]  # ml-collections wraps the KeyError in an AttributeError
        text = " ".join(str(inner).split())
        key, _, hint = text.partition(" Did you mean")
        hint = f" (did you mean{hint.split(' instead of')[0]}?)" if hint else ""
        return f"unknown config key {key}{hint}; see the experiment file for the available keys"
    return _one_line(err)


def _one_line(err: Exception) -> str:
    """The first line of a flag error plus, if it wraps a traceback, the final exception line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return one_line(err)
    head = lines[0].split(": Error whilst")[0]
    reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
    if lines[-1].startswith("[Errno"):  # a config file that cannot be read
        reason = lines[-1]
    return f"{head}: {reason}"


def _flags_parser(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as err:
        fail(_config_error(err))


def main() -> None:
    import jax

    jax.config.config_with_absl()  # --jax_* flags (e.g. --jax_platforms=cpu) parse with ours
    app.run(lambda argv: run_main(lambda: _train(argv)), flags_parser=_flags_parser)


if __name__ == "__main__":
    main()
