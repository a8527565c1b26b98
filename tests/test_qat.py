"""Quantization-aware training: the fake-quantized weights are gguf-py's round trip bit for
bit (and the blocks the exporter writes for a QAT checkpoint), gradients are straight-through,
llama.cpp runs the exported file as the JAX QAT model, and bad settings fail in one line."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shakti_jax.config import ConfigError, get_config
from shakti_jax.export.canonical import canonical_tensors
from shakti_jax.model import ModelDef
from shakti_jax.qat import QAT, QAT_TYPES, _round_trip
from tests.conftest import tiny_experiment

Q = gguf.GGMLQuantizationType
# 4 layers of (window, global): stacked repeats; untied output; q/k/v biases (which stay F32)
CFG = get_config("tiny").replace(name="qat-test", num_layers=4, tie_embeddings=False, attention_bias=True)


def _gguf_round_trip(w: np.ndarray, qtype: str) -> np.ndarray:
    t = Q[qtype]
    return gguf.quants.dequantize(gguf.quants.quantize(np.asarray(w, np.float32), t), t)


def _bits(x) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("quant", QAT_TYPES)
def test_round_trip_equals_gguf_py_bit_for_bit_on_two_million_values(quant):
    """Jitted blocks vs gguf-py's quantize + dequantize, compared as bits (so -0.0 vs 0.0 and
    a multiply-add fused into one FMA, which moves a few of these values a whole step, fail)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1 << 16, 32)) * rng.uniform(1e-3, 1.0, (1 << 16, 1))).astype(np.float32)
    x[:64] = 0.0  # all-zero blocks: d = 0
    x[64:128, :5] = x[64:128, 5:10]  # repeated maxima
    # a Q5_0 block whose x * (1 / d) + 16.5 is 12.9999995 rounded in two steps (13) but
    # 12.99999905 in one FMA (12): a weight of the tiny model that an FMA moved
    x[128] = 0.0
    x[128, :2] = np.float32(16 * -0.0031066143), np.float32(-0.010873152)
    ours = jax.jit(lambda b: _round_trip(b, quant.upper(), axis=-1))(x)
    np.testing.assert_array_equal(_bits(ours), _bits(_gguf_round_trip(x, quant.upper())))
    # the same blocks held along axis -2 (a transposed weight's layout)
    ours_t = jax.jit(lambda b: _round_trip(b, quant.upper(), axis=-2))(x.reshape(-1, 8, 32).swapaxes(1, 2))
    np.testing.assert_array_equal(_bits(np.asarray(ours_t).swapaxes(1, 2).reshape(x.shape)), _bits(ours))


@pytest.mark.parametrize("quant", QAT_TYPES)
def test_every_exported_matrix_is_its_gguf_round_trip_and_the_rest_is_untouched(quant):
    model_def = ModelDef.from_config(CFG)
    params = jax.device_get(model_def.init(0))
    plan = QAT.build(quant, CFG)
    fake = jax.device_get(jax.jit(plan.apply)(params))
    matrices = 0
    for ours, theirs in zip(canonical_tensors(CFG, fake, "interleaved"), canonical_tensors(CFG, params, "interleaved")):
        expected = _gguf_round_trip(theirs.load(), plan.qtype) if theirs.is_matrix else theirs.load()
        np.testing.assert_array_equal(_bits(ours.load()), _bits(expected), err_msg=theirs.name)
        matrices += theirs.is_matrix
    assert matrices == 2 + 7 * CFG.num_layers  # embedding, output, 7 projections per layer
    assert 0.005 < float(plan.relative_error(params)) < {"q8_0": 0.01, "q5_0": 0.06, "q4_0": 0.12, "q4_1": 0.12}[quant]


def test_gradients_are_straight_through_and_start_waits():
    model_def = ModelDef.from_config(CFG)
    params = model_def.init(0)
    plan = QAT.build("q4_0", CFG, start=5)
    weights = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) % 7, params)
    grads = jax.grad(lambda p: sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(plan.apply(p)),
                                                                   jax.tree.leaves(weights))))(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    before, after = plan.apply(params, jnp.int32(4)), plan.apply(params, jnp.int32(5))
    wq = ("groups", 0, "blocks", 0, "attn", "wq")
    pick = lambda tree: np.asarray(tree["groups"][0]["blocks"][0]["attn"]["wq"])  # noqa: E731
    np.testing.assert_array_equal(pick(before), pick(params))
    assert not np.array_equal(pick(after), pick(params))
    assert any(t.path == wq for t in plan.targets)


def test_bad_qat_settings_are_one_line_config_errors(tokenizer_path, tmp_path):
    from shakti_jax.train.trainer import Trainer

    for quant in ("q4_k_m", "q6_k", "int4", "f16"):
        with pytest.raises(ConfigError, match=f"train.qat='{quant}'") as err:
            QAT.build(quant, CFG)
        assert "\n" not in str(err.value)
    odd = CFG.replace(ffn_dim=80)  # ffn_down rows of 80 values
    with pytest.raises(ConfigError, match="blk.0.ffn_down.weight has rows of 80 values, not a multiple of Q4_0's block of 32"):
        QAT.build("q4_0", odd)
    config = tiny_experiment(tokenizer_path, seq_len=32, warmup_steps=1, steps=2, qat="q3_k")
    with pytest.raises(ConfigError, match="train.qat='q3_k'"):
        Trainer(config, tmp_path / "never")
    config.train.update(qat="q4_0", qat_start=-1)
    with pytest.raises(ConfigError, match="train.qat_start=-1"):
        Trainer(config, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_a_qat_run_exports_the_blocks_it_trained_and_llama_cpp_runs_them(tokenizer_path, tmp_path, capsys):
    """Pretrain 8 steps with QAT Q4_0 from step 4: the error metric is logged, the Q4_0 export
    of the checkpoint dequantizes (gguf-py) to the trained weights bit for bit, and llama.cpp
    on that file equals the JAX QAT model up to its own activation rounding (the numpy
    reference, as for every quantized export)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from shakti_jax.convert import main as convert_main
    from shakti_jax.evaluation.models import open_model
    from shakti_jax.train.checkpoint import load_params
    from shakti_jax.train.metrics import read_metrics
    from shakti_jax.train.trainer import Trainer
    from tests.gguf_reference import GGUFModel

    workdir = tmp_path / "qat"
    config = tiny_experiment(tokenizer_path, seq_len=64, warmup_steps=1, steps=8, batch_size=8, log_every=2,
                             eval_every=8, checkpoint_every=8, eval_batches=2, qat="q4_0", qat_start=4)
    last = Trainer(config, workdir).run()
    assert np.isfinite(last["loss"])
    errors = [row["qat_error"] for row in read_metrics(workdir) if "qat_error" in row]
    assert len(errors) >= 4 and all(0.01 < e < 0.2 for e in errors)

    loaded = load_params(workdir)
    assert loaded.qat is not None and loaded.qat.qtype == "Q4_0" and loaded.qat.start == 4
    trained = jax.device_get(jax.jit(loaded.qat.apply)(loaded.params))
    for quant in ("q4_0", "q8_0"):
        with pytest.raises(SystemExit) as code:
            convert_main(["--checkpoint", str(workdir), "--format", "gguf", "--quant", quant,
                          "--out", str(tmp_path / f"m-{quant}.gguf"), "--no_progress"])
        assert code.value.code == 0
    warnings = capsys.readouterr().err
    assert "q8_0 writes its latent weights" in warnings and "q4_0 writes" not in warnings
    reader = gguf.GGUFReader(tmp_path / "m-q4_0.gguf")
    stored = {t.name: t for t in reader.tensors}
    for t in canonical_tensors(loaded.config, trained, "interleaved"):
        file_tensor = stored[t.name]
        values = gguf.quants.dequantize(np.asarray(file_tensor.data), file_tensor.tensor_type).reshape(t.shape)
        np.testing.assert_array_equal(_bits(values), _bits(t.load()), err_msg=t.name)

    model = open_model(str(workdir), max_len=64)
    assert model.info["qat"] == "Q4_0"
    ids = [1] + list(range(40, 100))
    logits_jax = np.asarray(loaded.model_def.apply(trained, np.asarray([ids], np.int32)))[0]
    reference = GGUFModel(tmp_path / "m-q4_0.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m-q4_0.gguf"), n_ctx=128, n_batch=128, n_ubatch=128,
                          n_threads=2, logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(ids)
    logits_llama = np.array(llm.scores[:len(ids)], np.float64)
    llm.close()
    file_vs_jax = np.abs(reference.logits(ids, round_activations=False) - logits_jax).max()
    llama_vs_file = np.abs(reference.logits(ids) - logits_llama).max()
    print(f"QAT Q4_0: file vs JAX {file_vs_jax:.2e}, llama.cpp vs file {llama_vs_file:.2e}, "
          f"llama.cpp vs JAX {np.abs(logits_llama - logits_jax).max():.2e}")
    assert file_vs_jax < 1e-4
    assert llama_vs_file < 1e-3
