"""Model-level properties: packing, logical axis names, dtypes, dropout, stacked layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shakti_jax.config import ConfigError, get_config
from shakti_jax.model import ModelDef
from shakti_jax.model.layout import layer_locations, layer_params, stack_layers


def _model(name="tiny", **overrides):
    model_def = ModelDef.from_config(get_config(name, **overrides))
    return model_def, model_def.init(0)


def test_packed_documents_see_exactly_what_they_see_alone():
    """Window, block-sparse (local + global + random blocks) and global layers: every packed
    document, wherever it starts in the row, gets the logits it gets alone."""
    model_def, params = _model("tiny_sparse")  # 16-token blocks, random blocks on
    lengths = (23, 41, 55)
    docs = [jax.random.randint(jax.random.key(i), (1, n), 0, 512) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(docs, axis=1)
    positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
    segments = jnp.concatenate([jnp.full(n, i + 1, jnp.int32) for i, n in enumerate(lengths)])[None]
    together = model_def.apply(params, packed, positions, segments)
    start = 0
    for doc, n in zip(docs, lengths):
        np.testing.assert_allclose(together[:, start:start + n], model_def.apply(params, doc),
                                   atol=1e-5)
        start += n


def test_scan_equals_loop_in_loss_and_grads():
    """The same stacked params under lax.scan and under a Python loop (f32): 1e-6."""
    cfg = get_config("tiny_sparse", num_layers=7)  # two whole periods of 3 and a remainder of 1
    assert cfg.layer_groups == ((("window", "block_sparse", "global"), 2), (("window",), 1))
    scanned, looped = ModelDef.from_config(cfg), ModelDef.from_config(cfg.replace(scan_layers=False))
    params = scanned.init(0)
    tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, cfg.vocab_size)

    def loss(model_def):
        return lambda p: jnp.mean(jax.nn.log_softmax(model_def.apply(p, tokens))[..., 7])

    (a, ga), (b, gb) = (jax.value_and_grad(loss(m))(params) for m in (scanned, looped))
    assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_changes_nothing_but_memory(remat):
    cfg = get_config("tiny", num_layers=4, dropout_rate=0.1)
    plain, rematted = ModelDef.from_config(cfg), ModelDef.from_config(cfg.replace(remat=remat))
    params = plain.init(0)
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, cfg.vocab_size)
    key = jax.random.key(9)

    def loss(model_def):
        return lambda p: jnp.mean(model_def.apply(p, tokens, dropout_key=key) ** 2)

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (plain, rematted))
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


def test_bad_remat_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="model.remat='some'"):
        get_config("tiny", remat="some")


def test_layer_layout_round_trips_per_layer_params():
    cfg = get_config("tiny_sparse", num_layers=5)  # one period of 3, a remainder of 2
    params = jax.tree.map(np.asarray, ModelDef.from_config(cfg).init(0))
    assert [loc[0] for loc in layer_locations(cfg)] == [0, 0, 0, 1, 1]
    per_layer = [layer_params(params, cfg, i) for i in range(cfg.num_layers)]
    assert per_layer[4]["attn"]["wq"].shape == (64, 4, 16)
    restacked = stack_layers(per_layer, cfg)
    for got, want in zip(jax.tree.leaves(restacked), jax.tree.leaves({"groups": params["groups"]}),
                         strict=True):
        np.testing.assert_array_equal(got, want)


def test_every_parameter_has_logical_axes_matching_its_rank():
    model_def = ModelDef.from_config(get_config("shakti_100m").replace(num_layers=10))
    known = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    shapes = jax.tree_util.tree_flatten_with_path(model_def.abstract_params)[0]
    axes = jax.tree.leaves(model_def.param_axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(shapes) == len(axes) == 3 + 5 * 9  # embedding, head, final norm; 9 per slot
    for (path, shape), names in zip(shapes, axes):
        assert len(names) == len(shape.shape) and set(names) <= known
        stacked = jax.tree_util.keystr(path).startswith("['groups']")
        assert (names[0] == "layers") == stacked
        if stacked:
            assert shape.shape[0] == 2  # 10 layers = 2 repeats of the 5-layer period


def test_bfloat16_compute_keeps_one_dtype_and_f32_logits():
    model_def, params = _model(dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 512)
    logits = model_def.apply(params, tokens)
    assert logits.dtype == jnp.float32
    ref_def, _ = _model()
    ref = ref_def.apply(params, tokens)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_dropout_only_with_a_key():
    model_def, params = _model(dropout_rate=0.5)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 512)
    a = model_def.apply(params, tokens, dropout_key=jax.random.key(1))
    b = model_def.apply(params, tokens, dropout_key=jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model_def.apply(params, tokens, dropout_key=jax.random.key(1)), a)
    np.testing.assert_array_equal(model_def.apply(params, tokens), model_def.apply(params, tokens))


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads(tie):
    model_def, params = _model(tie_embeddings=tie)
    assert ("lm_head" not in params) == tie
    assert model_def.apply(params, jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 512)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_at_chosen_indices_are_the_full_logits_there(tie):
    """The scorer's head-only-where-scored path: the same numbers as gathering full logits."""
    model_def, params = _model(tie_embeddings=tie)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 512)
    at_BK = jnp.array([[20, 21, 22, 23], [3, 4, 4, 4]])
    full = model_def.apply(params, tokens)
    some = model_def.apply(params, tokens, logits_at_BK=at_BK)
    assert some.shape == (2, 4, 512)
    np.testing.assert_allclose(some, jnp.take_along_axis(full, at_BK[..., None], axis=1), rtol=0, atol=1e-5)
