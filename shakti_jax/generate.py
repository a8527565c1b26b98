"""Generation: prefill + a jitted decode loop over the KV cache, with sampling.

    python -m shakti_jax.generate --model tiny --tokenizer tok.model --prompt "Hello" --json

Prompts of different lengths are right-padded into one batch; each row decodes from its own
position. `use_cache=False` recomputes the full forward pass at every step: slow, but it is
the reference the cached path must reproduce token for token.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from data_pipelines.cli import ArgumentParser, fail
from shakti_jax.config import ConfigError, ModelConfig, get_config
from shakti_jax.model import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, without the EOS that stopped it
    prefill_tokens_per_sec: float
    decode_tokens_per_sec: float


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids [B] from logits [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf), -1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_id: int | None = None, seed: int = 0,
             use_cache: bool = True, pad_id: int = 0) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens, stopping a row at `eos_id`."""
    cfg = model.cfg
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

    B, padded = len(prompts), _bucket(max(lengths))
    total = min(padded + max_new_tokens, cfg.max_seq_len) if use_cache else padded + max_new_tokens
    tokens_BT = jnp.full((B, total if not use_cache else padded), pad_id, jnp.int32)
    for row, p in enumerate(prompts):
        tokens_BT = tokens_BT.at[row, : len(p)].set(jnp.asarray(p, jnp.int32))
    lengths_B = jnp.asarray(lengths, jnp.int32)
    model.eval()
    graphdef, state = nnx.split(model)
    loop = _cached_loop if use_cache else _uncached_loop
    prefill_fn, decode_fn = loop(graphdef, cfg, total, max_new_tokens, sampling, eos_id)

    args = (state, tokens_BT, lengths_B)
    prefill_c = jax.jit(prefill_fn).lower(*args).compile()
    t0 = time.perf_counter()
    carry = jax.block_until_ready(prefill_c(*args))
    t_prefill = time.perf_counter() - t0
    rng = jax.random.key(seed)
    decode_c = jax.jit(decode_fn).lower(state, carry, rng).compile()
    t0 = time.perf_counter()
    out_BN, n_B = jax.block_until_ready(decode_c(state, carry, rng))
    t_decode = time.perf_counter() - t0

    out, n = jax.device_get(out_BN), jax.device_get(n_B)
    tokens = [[int(t) for t in out[b, : n[b]]] for b in range(B)]
    return Generation(tokens, sum(lengths) / t_prefill, max(int(n.sum()), 1) / t_decode)


def _bucket(length: int) -> int:
    """Pad prompt batches to a multiple of 16 so nearby lengths share one compilation."""
    return -(-length // 16) * 16


def _decode_loop(step_fn, max_new_tokens, sampling, eos_id):
    """while_loop: sample from the last logits, record, then advance the state by one token."""

    def run(state, carry, rng):
        logits_BV, model_state, pos_B = carry
        B = pos_B.shape[0]

        def body(c):
            i, logits_BV, model_state, pos_B, done_B, out_BN, n_B, rng = c
            rng, key = jax.random.split(rng)
            tok_B = sample(logits_BV, key, sampling)
            stop_B = done_B | (tok_B == eos_id) if eos_id is not None else done_B
            out_BN = out_BN.at[:, i].set(jnp.where(stop_B, 0, tok_B))
            n_B = n_B + (~stop_B).astype(jnp.int32)
            logits_BV, model_state = step_fn(state, model_state, tok_B, pos_B)
            return i + 1, logits_BV, model_state, pos_B + 1, stop_B, out_BN, n_B, rng

        def cond(c):
            return (c[0] < max_new_tokens) & ~jnp.all(c[4])

        init = (0, logits_BV, model_state, pos_B, jnp.zeros(B, bool),
                jnp.zeros((B, max_new_tokens), jnp.int32), jnp.zeros(B, jnp.int32), rng)
        final = jax.lax.while_loop(cond, body, init)
        return final[5], final[6]

    return run


def _cached_loop(graphdef, cfg: ModelConfig, total: int, max_new_tokens, sampling, eos_id):
    def prefill(state, tokens_BT, lengths_B):
        model = nnx.merge(graphdef, state)
        caches = init_cache(cfg, tokens_BT.shape[0], total)
        logits_BV, caches = model.prefill(tokens_BT, lengths_B, caches)
        return logits_BV, caches, lengths_B

    def step(state, caches, tok_B, pos_B):
        model = nnx.merge(graphdef, state)
        logits_B1V, caches = model.decode(tok_B[:, None], pos_B[:, None], caches)
        return logits_B1V[:, 0], caches

    return prefill, _decode_loop(step, max_new_tokens, sampling, eos_id)


def _uncached_loop(graphdef, cfg: ModelConfig, total: int, max_new_tokens, sampling, eos_id):
    def last_logits(state, tokens_BT, lengths_B):
        logits_BTV = nnx.merge(graphdef, state)(tokens_BT)
        return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]

    def prefill(state, tokens_BT, lengths_B):
        return last_logits(state, tokens_BT, lengths_B), tokens_BT, lengths_B

    def step(state, tokens_BT, tok_B, pos_B):
        tokens_BT = tokens_BT.at[jnp.arange(tok_B.shape[0]), pos_B].set(tok_B)
        return last_logits(state, tokens_BT, pos_B + 1), tokens_BT

    return prefill, _decode_loop(step, max_new_tokens, sampling, eos_id)


def load_model(model_name: str, seed: int = 0, **overrides) -> Transformer:
    """A randomly initialised model of a named size."""
    return Transformer(get_config(model_name, **overrides), nnx.Rngs(seed))


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="named model size (random init)")
    parser.add_argument("--checkpoint", help="training workdir: generate from its newest "
                                             "checkpoint (and its tokenizer) instead of --model")
    parser.add_argument("--tokenizer", help="sentencepiece .model for text prompts")
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
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
    try:
        result, texts = _run_cli(args)
    except (ConfigError, ValueError, OSError) as err:
        fail(str(err))
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


def _run_cli(args):
    if args.checkpoint:
        from shakti_jax.train.checkpoint import load_model as load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        model = loaded.model
        args.tokenizer = args.tokenizer or (str(loaded.tokenizer_path) if loaded.tokenizer_path else None)
    else:
        model = load_model(args.model, args.seed, dtype=args.dtype)
    tokenizer = None
    if args.tokenizer:
        from data_pipelines.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    if args.prompt and tokenizer is None:
        raise ValueError("--prompt needs --tokenizer (or pass --prompt_ids)")
    prompts = [tokenizer.encode(p, add_bos=True) for p in args.prompt] if args.prompt else []
    for ids in args.prompt_ids:
        try:
            prompts.append([int(t) for t in ids.split(",")])
        except ValueError:
            raise ValueError(f"--prompt_ids {ids!r} is not a comma-separated list of integers") from None
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt_ids")
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} pieces but "
                         f"model.vocab_size={model.cfg.vocab_size}")
    result = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                      sampling=Sampling(args.temperature, args.top_k, args.top_p),
                      eos_id=tokenizer.eos_id if tokenizer else None, seed=args.seed,
                      use_cache=not args.no_cache)
    texts = [tokenizer.decode(t) for t in result.tokens] if tokenizer else []
    return result, texts


if __name__ == "__main__":
    sys.exit(main())
