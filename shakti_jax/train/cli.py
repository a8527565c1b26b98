"""`python -m shakti_jax.train --config=experiments/pretrain.py:tiny --workdir=DIR [--config.a.b=v]`.

Re-running the same command resumes. Multi-host: pass `--coordinator_address HOST:PORT
--num_processes N --process_id I` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) and run the same command on every host.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

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


def _run(argv, config) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if config is None or not _WORKDIR.value:
        _fail("both --config=FILE[:size] and --workdir=DIR are required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    import jax

    if _NUM_PROCESSES.value > 1:
        if not _COORDINATOR.value:
            _fail("--num_processes > 1 needs --coordinator_address HOST:PORT")
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)

    from data_pipelines.sources import DataError
    from data_pipelines.tokenizer import TokenizerError
    from shakti_jax.config import ConfigError
    from shakti_jax.train.trainer import Trainer, TrainingStopped

    try:
        Trainer(config, _WORKDIR.value).run()
    except (ConfigError, DataError, TokenizerError, TrainingStopped, FileNotFoundError) as err:
        _fail(str(err))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    try:
        argv = flags.FLAGS(sys.argv)
        config = _CONFIG.value
        if config is not None:
            config.to_dict()  # a config file that failed to load raises only when read
    except AttributeError as err:  # ml-collections: an override names a key the config lacks
        _fail(f"unknown config key {err}; see the experiment file for the available keys")
    except (flags.Error, OSError, ValueError, TypeError) as err:
        _fail(_one_line(err))
    _run(argv, config)


def _one_line(err: Exception) -> str:
    """The first line of a flag error plus, if it wraps a traceback, the final exception line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) == 1:
        return lines[0]
    head = lines[0].split(": Error whilst")[0]
    reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
    if lines[-1].startswith("[Errno"):  # a config file that cannot be read
        reason = lines[-1]
    return f"{head}: {reason}"
