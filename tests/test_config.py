"""Config validation, parameter counts of the named sizes, and the info CLI."""

import json
import subprocess
import sys

import pytest

from shakti_jax.config import CONFIGS, NOMINAL_PARAMS, ConfigError, get_config
from shakti_jax.model_stats import summary
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_named_sizes_within_ten_percent_of_nominal(name):
    total = summary(get_config(name))["total_params"]
    assert abs(total / NOMINAL_PARAMS[name] - 1) <= 0.10, total


def test_published_numbers_are_honoured():
    c100, c250, c500 = (get_config(n) for n in ("shakti_100m", "shakti_250m", "shakti_500m"))
    assert (c100.num_layers, c100.d_model, c100.ffn_dim) == (10, 640, 2560)
    assert (c250.num_layers, c250.d_model) == (16, 1024)
    assert (c500.num_layers, c500.d_model, c500.num_heads, c500.max_seq_len) == (24, 2048, 16, 4096)


def test_counts_match_hand_computation_for_tiny():
    cfg = get_config("tiny")  # D=64, N=4, K=2, H=16, F=128 swiglu, V=512 tied, 2 layers
    D, N, K, H, F, V, L = 64, 4, 2, 16, 128, 512, 2
    attention = D * N * H * 2 + D * K * H * 2
    expected = V * D + L * (attention + 3 * D * F + 2 * D) + D
    info = summary(cfg)
    assert info["total_params"] == expected
    assert info["non_embedding_params"] == expected - V * D
    assert info["kv_cache_bytes_per_token"] == L * 2 * K * H * 2
    # window layer (W=32) at context 256: mean over i of min(i+1, 32)
    mean_window = sum(min(i + 1, 32) for i in range(256)) / 256
    assert info["visible_keys_per_query"]["window"] == pytest.approx(mean_window, abs=0.01)
    fwd = 2 * (L * (attention + 3 * D * F) + V * D) + 4 * N * H * (mean_window + 128.5)
    assert info["flops_per_token"] == pytest.approx(3 * fwd)
    # Q4_0: 18 bytes per 32 weights for matrices, f32 norms
    matrices = expected - (2 * L + 1) * D
    assert info["weight_bytes"]["q4_0"] == matrices * 18 // 32 + (2 * L + 1) * D * 4


@pytest.mark.parametrize("overrides, key", [
    (dict(num_heads=4, num_kv_heads=3), "model.num_heads"),
    (dict(window=1000), "model.window"),
    (dict(mlp="gelu"), "model.mlp"),
    (dict(attention_pattern=("global", "dense")), "model.attention_pattern"),
    (dict(head_dim=15), "model.head_dim"),
    (dict(d_model=0), "model.d_model"),
    (dict(dropout_rate=1.5), "model.dropout_rate"),
    (dict(dtype="float16"), "model.dtype"),
])
def test_invalid_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        get_config("tiny", **overrides)
    assert "\n" not in str(err.value)


def test_unknown_name_and_key():
    with pytest.raises(ConfigError, match="unknown model"):
        get_config("shakti_7b")
    with pytest.raises(ConfigError, match="num_layerz"):
        get_config("tiny", num_layerz=3)


def test_every_named_config_is_valid_and_distinct():
    assert len({c.name for c in CONFIGS.values()}) == len(CONFIGS)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "shakti_jax.info", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_info_cli_json():
    res = _cli("--model", "shakti_500m", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in ("total_params", "non_embedding_params", "flops_per_token", "kv_cache_bytes_per_token"):
        assert info[key] > 0
    assert set(info["weight_bytes"]) == {"f32", "bf16", "q8_0", "q5_0", "q4_0"}
    assert info["weight_bytes"]["f32"] / info["weight_bytes"]["q4_0"] > 6.5


def test_info_cli_bad_model_is_one_line():
    res = _cli("--model", "nope")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:")
