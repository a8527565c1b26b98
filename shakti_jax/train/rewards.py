"""Where online RL's rewards come from: Python functions of a reply, reward models, or a sum.

`rl.rewards` is a tuple of specs `NAME[:ARG][*WEIGHT]`, summed with their weights:

  keyword:WORD            1 if WORD occurs in the reply (case-insensitive), else 0
  arithmetic              1 if the reply's last integer equals the record's "answer" field
  python:MODULE:FUNCTION  any function f(fields, reply) -> float; `fields` is the prompt
                          record's fields plus "prompt" (the last user turn's text)
  model:WORKDIR           a reward model (stage=reward checkpoint: a model with a value
                          head) scoring prompt + reply at the reply's last token; it must use
                          the policy's tokenizer

A function that raises or returns a non-finite value stops the run before the step with a
one-line RewardError naming the reward, the prompt's index in the rollout and its record.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.errors import UserError
from shakti_jax.config import ConfigError

RewardFn = Callable[[Mapping[str, Any], str], float]


class RewardError(UserError):
    """A reward function raised or returned a non-finite value; the message says where."""


def keyword(word: str) -> RewardFn:
    word = word.lower()
    return lambda fields, reply: float(word in reply.lower())


def arithmetic(fields: Mapping[str, Any], reply: str) -> float:
    numbers = re.findall(r"-?\d+", reply)
    return float(bool(numbers) and str(fields["answer"]).strip() == numbers[-1])


@dataclasses.dataclass
class RewardModel:
    """A reward model's jitted scorer: values at each row's last real token."""

    model_def: Any
    params: dict

    @classmethod
    def load(cls, workdir: str, tokenizer) -> RewardModel:
        from shakti_jax.train.checkpoint import CheckpointError, load_params
        from data_pipelines.tokenizer import Tokenizer

        try:
            loaded = load_params(workdir)
        except CheckpointError as err:
            raise ConfigError(f"rl.rewards model:{workdir}: {err}") from None
        if not loaded.model_def.config.value_head:
            raise ConfigError(f"rl.rewards model:{workdir}: not a reward model (no value head; "
                              f"train one with stage=reward)")
        if loaded.tokenizer_path is None or \
                Tokenizer.load(loaded.tokenizer_path).fingerprint() != tokenizer.fingerprint():
            raise ConfigError(f"rl.rewards model:{workdir}: its tokenizer is not the policy's")
        return cls(loaded.model_def, loaded.params)

    def __post_init__(self):
        def score(params, tokens_BT, last_B):
            T = tokens_BT.shape[1]
            real_BT = (jnp.arange(T)[None, :] <= last_B[:, None]).astype(jnp.int32)
            values_BT = self.model_def.values(params, tokens_BT, None, real_BT)
            return jnp.take_along_axis(values_BT, last_B[:, None], axis=1)[:, 0]

        self.score = jax.jit(score)

    def __call__(self, sequences: Sequence[Sequence[int]], width: int) -> np.ndarray:
        tokens = np.zeros((len(sequences), width), np.int32)
        for row, seq in enumerate(sequences):
            tokens[row, :len(seq)] = seq
        last = np.asarray([len(s) - 1 for s in sequences], np.int32)
        return np.asarray(jax.device_get(self.score(self.params, tokens, last)), np.float64)


@dataclasses.dataclass(frozen=True)
class RewardSource:
    spec: str
    weight: float
    fn: RewardFn | None = None  # a Python function, or
    model: RewardModel | None = None  # a reward model


def parse_rewards(specs: Sequence[str], tokenizer) -> list[RewardSource]:
    """`rl.rewards` -> sources; a bad spec is a one-line ConfigError (before any compile)."""
    if not specs:
        raise ConfigError("rl.rewards: give at least one reward (keyword:WORD, arithmetic, "
                          "python:MODULE:FUNCTION or model:WORKDIR)")
    out = []
    for spec in specs:
        body, _, weight_text = spec.partition("*")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ConfigError(f"rl.rewards {spec!r}: the weight after '*' must be a number") from None
        name, _, arg = body.partition(":")
        if name == "keyword" and arg:
            out.append(RewardSource(spec, weight, fn=keyword(arg)))
        elif name == "arithmetic" and not arg:
            out.append(RewardSource(spec, weight, fn=arithmetic))
        elif name == "python" and arg.count(":") == 1:
            module, function = arg.split(":")
            try:
                fn = getattr(importlib.import_module(module), function)
            except (ImportError, AttributeError) as err:
                raise ConfigError(f"rl.rewards {spec!r}: {err}") from None
            out.append(RewardSource(spec, weight, fn=fn))
        elif name == "model" and arg:
            out.append(RewardSource(spec, weight, model=RewardModel.load(arg, tokenizer)))
        else:
            raise ConfigError(f"rl.rewards {spec!r}: not keyword:WORD, arithmetic, "
                              f"python:MODULE:FUNCTION or model:WORKDIR (with an optional *WEIGHT)")
    return out


def score_replies(sources: Sequence[RewardSource], fields: Sequence[Mapping[str, Any]],
                  replies: Sequence[str], sequences: Sequence[Sequence[int]], width: int,
                  wheres: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [R], each source's raw rewards by spec) for R replies; `sequences`
    are prompt + reply (+ EOS) ids for reward models, `wheres` name each reply's prompt (its
    index in the rollout and its record) for error messages."""
    total = np.zeros(len(replies))
    parts = {}
    for source in sources:
        if source.model is not None:
            values = source.model(sequences, width)
        else:
            values = np.empty(len(replies))
            for i, (f, reply) in enumerate(zip(fields, replies)):
                try:
                    values[i] = float(source.fn(f, reply))
                except Exception as err:  # noqa: BLE001 - any user function failure is reported
                    raise RewardError(f"rl.rewards {source.spec!r} raised {type(err).__name__}: {err} "
                                      f"on {wheres[i]}; the step was not applied") from None
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardError(f"rl.rewards {source.spec!r} returned {values[bad[0]]} on {wheres[bad[0]]}; "
                              f"the step was not applied")
        parts[source.spec] = values
        total += source.weight * values
    return total, parts
