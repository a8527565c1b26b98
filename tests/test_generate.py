"""Cached decoding reproduces the full forward pass; ring caches stay O(window); sampling."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shakti_jax.config import get_config
from shakti_jax.generate import Generator, Sampling, generate, random_model, sample
from shakti_jax.model import init_cache

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    """(ModelDef, params): a window 16 layer, a block-sparse layer (16-token blocks), a global
    layer, twice (so the decode path runs two repeats of the scanned period)."""
    return random_model("tiny_sparse", num_layers=6)


@pytest.fixture(scope="module")
def generator(model):
    return Generator(*model)


def test_cached_decode_matches_full_forward_far_beyond_window(model):
    """Feed a known sequence token by token: every decode logit equals the full forward's."""
    model_def, params = model
    cfg = model_def.config
    net = model_def.bind(params)
    B, total = 3, 100  # window is 16, so decoding runs > 5 windows past it
    tokens_BT = jax.random.randint(jax.random.key(1), (B, total), 0, cfg.vocab_size)
    lengths_B = jnp.array([7, 20, 1])  # ragged prompts, one longer than the window
    full_BTV = net(tokens_BT)

    @jax.jit
    def prefill(tokens_BT, lengths_B):
        return net.prefill(tokens_BT, lengths_B, init_cache(cfg, B, total))

    @jax.jit
    def step(tokens_B1, pos_B1, caches):
        return net.decode(tokens_B1, pos_B1, caches)

    last_BV, caches = prefill(tokens_BT[:, :32], lengths_B)
    expected = full_BTV[jnp.arange(B), lengths_B - 1]
    assert float(jnp.max(jnp.abs(last_BV - expected))) <= 1e-5
    pos_B = lengths_B
    worst = 0.0
    while int(pos_B.max()) < total:
        pos_c = jnp.minimum(pos_B, total - 1)  # rows that finished repeat their last position
        logits_B1V, caches = step(tokens_BT[jnp.arange(B), pos_c][:, None], pos_c[:, None], caches)
        ref_BV = full_BTV[jnp.arange(B), pos_c]
        worst = max(worst, float(jnp.max(jnp.abs(logits_B1V[:, 0] - ref_BV))))
        pos_B = pos_B + 1
    assert worst <= 1e-5, worst


def test_greedy_cached_equals_no_cache(generator):
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(1, 40)), [3]]
    cached = generator(prompts, max_new_tokens=50)
    uncached = generator(prompts, max_new_tokens=50, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert [len(t) for t in cached.tokens] == [50, 50, 50]
    assert cached.prefill_tokens_per_sec > 0 and cached.decode_tokens_per_sec > 0


def test_batched_generation_equals_one_prompt_at_a_time(generator):
    prompts = [[4, 8, 15, 16, 23, 42], list(range(100, 130))]
    together = generator(prompts, max_new_tokens=20).tokens
    alone = [generator([p], max_new_tokens=20).tokens[0] for p in prompts]
    assert together == alone


def test_stops_at_eos(generator):
    first = generator([[1, 2, 3]], max_new_tokens=10).tokens[0]
    eos = first[3]
    stopped = generator([[1, 2, 3]], max_new_tokens=10, eos_id=eos).tokens[0]
    assert stopped == first[: first.index(eos)]
    assert len(generator([[1, 2, 3]], max_new_tokens=7).tokens[0]) == 7  # traced, same bucket


def test_second_call_with_the_same_shapes_does_not_compile(model):
    """Counted at XLA's backend compile: the first call of a bucket compiles prefill and
    decode, later calls in the bucket (other prompts, lengths, seeds, temperatures, top-k,
    EOS, new-token counts) compile nothing, and never touch a caller's model."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    generator = Generator(*model)
    generator([[1, 2, 3], [4, 5]], max_new_tokens=20, sampling=Sampling(0.7, top_k=5), seed=0)
    first = len(compiles)
    assert first >= 2
    out = generator([[9, 8, 7, 6, 5, 4], [3]], max_new_tokens=17, eos_id=4, seed=3,
                    sampling=Sampling(1.3, top_k=9, top_p=0.9))
    assert len(compiles) == first, compiles[first:]
    assert len(out.tokens) == 2 and len(generator.compiled_buckets) == 1


def test_ring_cache_memory_does_not_grow_with_length():
    cfg = get_config("tiny", attention_pattern=("window",), window=32)
    short = sum(c.nbytes for group in init_cache(cfg, 2, 64) for c in group)
    long = sum(c.nbytes for group in init_cache(cfg, 2, 4096) for c in group)
    assert short == long == cfg.num_layers * 2 * (32 * 2 * 16 * 4 * 2 + 32 * 4)
    mixed = get_config("tiny")  # one window layer, one global layer
    grow = [c.size for group in init_cache(mixed, 1, 200) for c in group]
    assert grow == [32, 200]


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    assert set(np.asarray(sample(logits, keys, Sampling(1.0, top_k=2)))) == {0, 1}
    # top_p 0.75: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> tokens {0, 1}
    assert set(np.asarray(sample(logits, keys, Sampling(1.0, top_p=0.75)))) == {0, 1}
    assert set(np.asarray(sample(logits, keys, Sampling(1.0, top_p=0.5)))) == {0}
    drawn = np.asarray(sample(logits, keys, Sampling(1.0)))
    assert set(drawn) == {0, 1, 2, 3}
    assert abs((drawn == 0).mean() - 0.5) < 0.08
    np.testing.assert_array_equal(np.asarray(sample(logits, keys, Sampling())), 0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_generation_rejects_bad_input(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(*model, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(*model, [[1, 100000]], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(*model, [[]], max_new_tokens=1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "shakti_jax.generate", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_and_no_cache_agree():
    args = ["--model", "tiny", "--prompt_ids", "1,2,3,4", "--prompt_ids", "9", "--max_new_tokens", "12", "--json"]
    cached, uncached = _cli(*args), _cli(*args, "--no_cache")
    assert cached.returncode == 0, cached.stderr
    a, b = json.loads(cached.stdout), json.loads(uncached.stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 2
    assert a["prefill_tokens_per_sec"] > 0 and a["decode_tokens_per_sec"] > 0


@pytest.mark.parametrize("args, message", [
    (["--model", "nope", "--prompt_ids", "1"], "unknown model"),
    (["--prompt_ids", "1,x"], "comma-separated"),
    (["--prompt", "hello"], "--tokenizer"),
    (["--tokenizer", "/no/such.model", "--prompt", "hi"], "such.model"),
    (["--prompt_ids", "1", "--top_p", "2"], "top_p"),
])
def test_cli_errors_are_one_line(args, message):
    res = _cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and res.stderr.strip().count("\n") == 0, res.stderr
    assert message in res.stderr


def test_cli_usage_error_is_one_line():
    res = _cli("--max_new_tokens", "many")
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and res.stderr.strip().count("\n") == 0, res.stderr
