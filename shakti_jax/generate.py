"""Generation: a `Generator` that compiles prefill + a decode loop once per shape bucket.

    python -m shakti_jax.generate --model tiny --tokenizer tok.model --prompt "Hello" --json

A `Generator` holds a ModelDef and params (never a caller's model, so nothing is switched to
eval mode behind anyone's back) and keeps one compiled (prefill, decode) pair per
(batch bucket, prompt-length bucket, new-token bucket, sampling mode, cache): a chat loop,
an evaluation run or RL rollouts pay one compilation per bucket, not per call. Temperature,
top-k, top-p, the EOS id, the seed and the number of new tokens are traced values.

Prompts of different lengths are right-padded into one batch; each row decodes from its own
position. `use_cache=False` recomputes the full forward pass at every step: slow, but it is
the reference the cached path must reproduce token for token.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from data_pipelines.cli import ArgumentParser, run_main
from data_pipelines.errors import UserError
from shakti_jax.config import get_config
from shakti_jax.model import ModelDef, init_cache

MODES = ("greedy", "sample", "filtered")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def mode(self) -> str:
        if self.temperature == 0.0:
            return "greedy"
        return "sample" if self.top_k == 0 and self.top_p == 1.0 else "filtered"


class SamplingKnobs(NamedTuple):
    """Sampling's values as traced scalars (inside a compiled decode loop)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, without the EOS that stopped it
    prefill_tokens_per_sec: float
    decode_tokens_per_sec: float
    # log p of each sampled token under softmax(logits / temperature) (raw logits when
    # greedy), the stopping EOS included: len(tokens[b]) + stopped[b] values per prompt
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    stopped: list[bool] = dataclasses.field(default_factory=list)  # ended by eos_id


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling | SamplingKnobs,
           mode: str | None = None) -> jax.Array:
    """Next token ids [B] from logits [B, V]. `mode` (default: the one a `Sampling` implies)
    picks what is computed; the values may be traced (`SamplingKnobs`)."""
    mode = mode or sampling.mode
    if mode == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if mode == "filtered":
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        top_k = jnp.asarray(sampling.top_k)
        kth_B1 = jnp.take(sorted_BV, jnp.maximum(top_k - 1, 0), axis=-1)[:, None]
        logits_BV = jnp.where((top_k > 0) & (logits_BV < kth_B1), -jnp.inf, logits_BV)
        sorted_BV = jnp.where((top_k > 0) & (sorted_BV < kth_B1), -jnp.inf, sorted_BV)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf), -1,
                            keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Generator:
    """Compile-once generation over `params` of `model_def` (see the module docstring)."""

    def __init__(self, model_def: ModelDef, params: dict):
        self.model_def, self.params = model_def, params
        self._compiled: dict[tuple, tuple[Any, Any]] = {}

    @property
    def compiled_buckets(self) -> list[tuple]:
        return list(self._compiled)

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), eos_id: int | None = None, seed: int = 0,
                 use_cache: bool = True, pad_id: int = 0, prompt_bucket: int = 0) -> Generation:
        """Continue each prompt by up to `max_new_tokens` tokens, stopping a row at `eos_id`.
        `prompt_bucket` pads prompts to at least that many tokens (a fixed shape for callers
        such as RL rollouts that must not compile again when prompt lengths vary)."""
        cfg = self.model_def.config
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max(lengths) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"longest prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds model.max_seq_len={cfg.max_seq_len}")
        bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside model.vocab_size={cfg.vocab_size}")

        rows = _pow2(len(prompts), 1)
        padded = min(_round_up(max(max(lengths), prompt_bucket), 16), cfg.max_seq_len)
        new_bucket = min(_pow2(max_new_tokens, 16), cfg.max_seq_len - max(lengths))
        new_bucket = max(new_bucket, max_new_tokens)
        total = min(padded + new_bucket, cfg.max_seq_len)
        key = (rows, padded, new_bucket, total, sampling.mode, use_cache)
        if key not in self._compiled:
            self._compiled[key] = self._compile(*key, pad_id)
        prefill, decode = self._compiled[key]

        width = padded if use_cache else total
        tokens = [[pad_id] * width for _ in range(rows)]
        for row, p in enumerate(prompts):
            tokens[row][: len(p)] = p
        lengths_B = jnp.asarray(lengths + [1] * (rows - len(prompts)), jnp.int32)
        tokens_BT = jnp.asarray(tokens, jnp.int32)
        knobs = (jnp.float32(sampling.temperature if sampling.mode != "greedy" else 1.0),
                 jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
                 jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(max_new_tokens))
        t0 = time.perf_counter()
        carry = jax.block_until_ready(prefill(self.params, tokens_BT, lengths_B))
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = jax.block_until_ready(decode(self.params, carry, jax.random.key(seed), knobs))
        t_decode = time.perf_counter() - t0
        out, n, logp, stopped = jax.device_get(result)
        count = range(len(prompts))
        return Generation([[int(t) for t in out[b, : n[b]]] for b in count], sum(lengths) / t_prefill,
                          max(int(n[: len(prompts)].sum()), 1) / t_decode,
                          [[float(x) for x in logp[b, : n[b] + stopped[b]]] for b in count],
                          [bool(stopped[b]) for b in count])

    def _compile(self, rows, padded, new_bucket, total, mode, use_cache, pad_id):
        model_def = self.model_def
        cfg = model_def.config

        if use_cache:
            def prefill(params, tokens_BT, lengths_B):
                caches = init_cache(cfg, tokens_BT.shape[0], total)
                logits_BV, caches = model_def.bind(params).prefill(tokens_BT, lengths_B, caches)
                return logits_BV, caches, lengths_B

            def step(params, caches, tok_B, pos_B):
                logits_B1V, caches = model_def.bind(params).decode(tok_B[:, None], pos_B[:, None],
                                                                   caches)
                return logits_B1V[:, 0], caches
        else:
            def last_logits(params, tokens_BT, lengths_B):
                logits_BTV = model_def.apply(params, tokens_BT)
                return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]

            def prefill(params, tokens_BT, lengths_B):
                return last_logits(params, tokens_BT, lengths_B), tokens_BT, lengths_B

            def step(params, tokens_BT, tok_B, pos_B):
                safe_B = jnp.minimum(pos_B, tokens_BT.shape[1] - 1)
                tokens_BT = tokens_BT.at[jnp.arange(tok_B.shape[0]), safe_B].set(tok_B)
                return last_logits(params, tokens_BT, safe_B + 1), tokens_BT

        width = padded if use_cache else total
        # the params' own layouts (a sharded policy is read where it lies, never copied)
        abstract_params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), self.params)
        tokens = jax.ShapeDtypeStruct((rows, width), jnp.int32)
        lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
        prefill_c = jax.jit(prefill).lower(abstract_params, tokens, lengths).compile()
        carry = jax.eval_shape(prefill, abstract_params, tokens, lengths)
        knobs = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
                 jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
                 jax.ShapeDtypeStruct((), jnp.int32))
        decode = _decode_loop(step, new_bucket, mode)
        decode_c = jax.jit(decode).lower(abstract_params, carry, jax.random.key(0), knobs).compile()
        return prefill_c, decode_c


def _decode_loop(step_fn, new_bucket: int, mode: str):
    """while_loop: sample from the last logits, record, then advance the state by one token."""

    def run(params, carry, rng, knobs):
        temperature, top_k, top_p, eos_id, max_new = knobs
        sampling = SamplingKnobs(temperature, top_k, top_p)
        logits_BV, model_state, pos_B = carry
        B = pos_B.shape[0]

        def body(c):
            i, logits_BV, model_state, pos_B, done_B, out_BN, n_B, logp_BN, eos_B, rng = c
            rng, key = jax.random.split(rng)
            tok_B = sample(logits_BV, key, sampling, mode)
            scaled_BV = logits_BV.astype(jnp.float32) / (1.0 if mode == "greedy" else temperature)
            logp_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
            logp_BN = logp_BN.at[:, i].set(jnp.where(done_B, 0.0, logp_B))
            eos_B = eos_B | (~done_B & (tok_B == eos_id))
            stop_B = done_B | (tok_B == eos_id)
            out_BN = out_BN.at[:, i].set(jnp.where(stop_B, 0, tok_B))
            n_B = n_B + (~stop_B).astype(jnp.int32)
            logits_BV, model_state = step_fn(params, model_state, tok_B, pos_B)
            return i + 1, logits_BV, model_state, pos_B + 1, stop_B, out_BN, n_B, logp_BN, eos_B, rng

        def cond(c):
            return (c[0] < max_new) & ~jnp.all(c[4])

        init = (jnp.int32(0), logits_BV, model_state, pos_B, jnp.zeros(B, bool),
                jnp.zeros((B, new_bucket), jnp.int32), jnp.zeros(B, jnp.int32),
                jnp.zeros((B, new_bucket), jnp.float32), jnp.zeros(B, bool), rng)
        final = jax.lax.while_loop(cond, body, init)
        return final[5], final[6], final[7], final[8]

    return run


def generate(model_def: ModelDef, params: dict, prompts: Sequence[Sequence[int]], **kwargs
             ) -> Generation:
    """One-off generation (a fresh Generator; keep a Generator to reuse its compilations)."""
    return Generator(model_def, params)(prompts, **kwargs)


def random_model(model_name: str, seed: int = 0, **overrides) -> tuple[ModelDef, dict]:
    """(ModelDef, params) of a randomly initialised model of a named size."""
    model_def = ModelDef.from_config(get_config(model_name, **overrides))
    return model_def, jax.jit(model_def.init, static_argnums=0)(seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="named model size (random init)")
    parser.add_argument("--checkpoint", help="training workdir: generate from its newest "
                                             "checkpoint (and its tokenizer) instead of --model")
    parser.add_argument("--step", type=int, help="with --checkpoint: this step, not the newest")
    parser.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json for text prompts")
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    parser.add_argument("--chat", action="store_true",
                        help="each --prompt is a user turn, rendered with the model's chat template; "
                             "stop at the end of the assistant's turn")
    parser.add_argument("--prompt_ids", action="append", default=[],
                        help="comma-separated token ids (repeatable), instead of text")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no_cache", action="store_true", help="recompute the full forward per step")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            result, texts = _run_cli(args)
        except ValueError as err:
            if isinstance(err, UserError):
                raise
            raise UserError(str(err)) from None
        if args.json:
            print(json.dumps({"tokens": result.tokens, "texts": texts,
                              "prefill_tokens_per_sec": result.prefill_tokens_per_sec,
                              "decode_tokens_per_sec": result.decode_tokens_per_sec}))
        else:
            for i, toks in enumerate(result.tokens):
                print(f"[{i}] {texts[i] if texts else toks}")
            print(f"prefill {result.prefill_tokens_per_sec:.1f} tok/s, "
                  f"decode {result.decode_tokens_per_sec:.1f} tok/s")
        return 0

    run_main(body)


def _run_cli(args):
    if args.checkpoint:
        from shakti_jax.train.checkpoint import load_params

        loaded = load_params(args.checkpoint, args.step)
        model_def, params = loaded.model_def, loaded.params
        args.tokenizer = args.tokenizer or (str(loaded.tokenizer_path) if loaded.tokenizer_path else None)
    else:
        model_def, params = random_model(args.model, args.seed, dtype=args.dtype)
    tokenizer = None
    if args.tokenizer:
        from data_pipelines.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    if args.prompt and tokenizer is None:
        raise ValueError("--prompt needs --tokenizer (or pass --prompt_ids)")
    if args.chat and tokenizer is None:
        raise ValueError("--chat needs a tokenizer (--tokenizer, or a --checkpoint that has one)")
    if args.chat:
        from data_pipelines.chat import render_prompt

        prompts = [render_prompt(tokenizer, [("user", p)]) for p in args.prompt]
    else:
        prompts = [tokenizer.encode(p, add_bos=tokenizer.add_bos) for p in args.prompt]
    for ids in args.prompt_ids:
        try:
            prompts.append([int(t) for t in ids.split(",")])
        except ValueError:
            raise ValueError(f"--prompt_ids {ids!r} is not a comma-separated list of integers") from None
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt_ids")
    vocab = model_def.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} pieces but "
                         f"model.vocab_size={vocab}")
    result = generate(model_def, params, prompts, max_new_tokens=args.max_new_tokens,
                      sampling=Sampling(args.temperature, args.top_k, args.top_p),
                      eos_id=None if tokenizer is None else tokenizer.eot_id if args.chat else tokenizer.eos_id,
                      seed=args.seed,
                      use_cache=not args.no_cache)
    texts = [tokenizer.decode(t) for t in result.tokens] if tokenizer else []
    return result, texts


if __name__ == "__main__":
    main()
