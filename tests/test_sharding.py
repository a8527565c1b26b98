"""Logical-axis rules on 8 fake CPU devices: shardings follow the rules, results do not change."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from shakti_jax.config import get_config
from shakti_jax.model import ModelDef
from shakti_jax.sharding import logical_to_spec, make_mesh


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("heads", "mlp")) == P("tensor", None)  # tensor already taken
    assert logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)


def test_mesh_shape_errors():
    assert len(jax.devices()) == 8
    assert dict(make_mesh(fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh(fsdp=3)


@pytest.mark.parametrize("data, fsdp, tensor", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)])
def test_sharded_forward_matches_single_device(data, fsdp, tensor):
    cfg = get_config("tiny")
    model_def = ModelDef.from_config(cfg)
    params = model_def.init(0)
    tokens = jax.random.randint(jax.random.key(0), (8, 32), 0, cfg.vocab_size)
    expected = model_def.apply(params, tokens)

    mesh = make_mesh(data, fsdp, tensor)
    shardings = model_def.param_shardings(mesh)
    wq = shardings["groups"][0]["blocks"][0]["attn"]["wq"]
    # wq is [layers=1, embed=64, heads=4, head_dim=16]; 4 heads cannot split 8 ways: replicated
    assert wq.spec == P(None, "fsdp", "tensor" if cfg.num_heads % tensor == 0 else None, None)
    params = jax.device_put(params, shardings)
    batch_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None))
    got = jax.jit(model_def.apply)(params, jax.device_put(tokens, batch_sharding))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5)
    leaf = params["groups"][0]["blocks"][1]["mlp"]["w_up"]
    assert len(leaf.sharding.device_set) == 8
