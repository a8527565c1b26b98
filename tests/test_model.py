"""Model-level properties: packing, logical axis names, dtypes, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shakti_jax.config import get_config
from shakti_jax.model import Transformer


def test_packed_row_equals_documents_run_alone():
    model = Transformer(get_config("tiny_sparse"), nnx.Rngs(0))
    doc_a = jax.random.randint(jax.random.key(1), (1, 23), 0, 512)
    doc_b = jax.random.randint(jax.random.key(2), (1, 41), 0, 512)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(23), jnp.arange(41)])[None]
    segments = jnp.concatenate([jnp.ones(23, jnp.int32), 2 * jnp.ones(41, jnp.int32)])[None]
    together = model(packed, positions, segments)
    # the window and local/global block rules apply to row positions, so document A (at row
    # start) matches exactly; document B is compared on a global-only model below
    np.testing.assert_allclose(together[:, :23], model(doc_a), atol=1e-5)
    dense = Transformer(get_config("tiny", attention_pattern=("global",)), nnx.Rngs(0))
    np.testing.assert_allclose(dense(packed, positions, segments)[:, 23:], dense(doc_b), atol=1e-5)


def test_every_parameter_has_logical_axes_matching_its_rank():
    model = Transformer(get_config("shakti_100m").replace(num_layers=1), nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    known = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    for var in leaves:
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.shape) and set(axes) <= known


def test_bfloat16_compute_keeps_one_dtype_and_f32_logits():
    cfg = get_config("tiny", dtype="bfloat16")
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 512)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    ref = Transformer(get_config("tiny"), nnx.Rngs(0))(tokens)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_dropout_only_in_training_mode():
    model = Transformer(get_config("tiny", dropout_rate=0.5), nnx.Rngs(0, dropout=1))
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 512)
    a, b = model(tokens), model(tokens)
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(tokens), model(tokens))


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads(tie):
    model = Transformer(get_config("tiny", tie_embeddings=tie), nnx.Rngs(0))
    assert (model.lm_head is None) == tie
    assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 512)
