"""LoRA and QLoRA runs on the shared trainer: only adapters train and are saved, the frozen
base comes back from its pointer, a quantized base is the GGUF export's own blocks, and the
adapter GGUF in llama.cpp over the base's Q4_0 export reproduces the trained model."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from experiments.pretrain import get_config as pretrain_experiment
from experiments.sft import get_config as sft_experiment
from tests.gguf_reference import GGUFModel
from shakti_jax.config import ConfigError
from shakti_jax.lora import count_params
from shakti_jax.quant_base import dequantize_params, quantize_params
from shakti_jax.train.checkpoint import CheckpointError, _open_readonly, load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _small(config, steps: int, **train):
    config.train.update({**dict(steps=steps, batch_size=8, log_every=steps, eval_every=steps,
                                checkpoint_every=steps, eval_batches=2, progress_bar=False), **train})
    config.optim.warmup_steps = 1
    return config


@pytest.fixture(scope="module")
def base_workdir(tokenizer_path, tmp_path_factory) -> Path:
    """A tiny model pretrained for 30 steps: the frozen base of every run here."""
    workdir = tmp_path_factory.mktemp("lora") / "base"
    config = _small(pretrain_experiment("tiny"), 30, checkpoint_every=30)
    config.data.tokenizer = tokenizer_path
    Trainer(config, workdir).run()
    return workdir


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> Path:
    """200 prompt/completion records with one answer pattern: a tiny model learns it within
    20 steps, so a falling held-out answer loss shows the adapters learn (not noise)."""
    import json

    colours = ("red", "green", "blue", "yellow")
    path = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Which colour is item {i}?",
                                        "completion": f"Item {i} is {colours[i % 4]}."}) + "\n"
                            for i in range(200)))
    return path


def _lora_sft(answers: Path, base: Path, steps: int, quant: str = "", **train):
    config = _small(sft_experiment("tiny"), steps, init_from=str(base), **train)
    config.data.sources = (f"jsonl:{answers}?format=prompt_completion",)
    config.data.seq_len = 64
    config.optim.lr = 1e-2
    config.lora.update(targets=TARGETS, rank=4, alpha=8.0, base_quant=quant)
    return config


def _saved_state(workdir: Path) -> dict:
    """{path: shape} of the newest checkpoint's saved state (orbax metadata, no arrays read)."""
    manager = _open_readonly(workdir)
    tree = manager.item_metadata(manager.latest_step())["state"]
    manager.close()
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["", "q4_0"])
def test_lora_run_trains_and_saves_only_adapters(quant, answers, base_workdir, tmp_path):
    workdir = tmp_path / "lora"
    Trainer(_lora_sft(answers, base_workdir, 20, quant, eval_every=10), workdir).run()
    rows = read_metrics(workdir)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.1, evals  # the held-out answer loss falls (measured ~4.7 -> ~3.9)

    loaded = load_params(workdir)
    base = load_params(base_workdir)
    n_adapters = count_params(loaded.adapters)
    n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(base.params))
    saved = _saved_state(workdir)
    params = {k: v for k, v in saved.items() if k.startswith("params/")}
    moments = {k: v for k, v in saved.items() if k.startswith("opt_state/") and v}
    assert params and moments, list(saved)[:5]
    # only adapters are saved and optimised: params, Adam's mu and nu = 3 x adapter size
    assert all(k.endswith(("/lora_a", "/lora_b")) for k in params), list(params)[:3]
    assert sum(math.prod(v) for v in params.values()) == n_adapters
    assert sum(math.prod(v) for v in moments.values()) == 2 * n_adapters
    assert n_adapters < n_base / 5

    # load_params merges the adapters into the base (quantized as in training): the same
    # params as merging by hand, and not the base itself
    from shakti_jax.lora import merge

    dense = base.params
    if quant:
        dense = dequantize_params(quantize_params(base.config, jax.device_get(base.params), quant))
    by_hand = merge(dense, loaded.adapters, loaded.lora)
    for got, want, start in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(by_hand),
                                jax.tree.leaves(base.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.params),
                                                         jax.tree.leaves(base.params))]
    assert sum(changed) >= len(TARGETS)


@pytest.mark.slow
def test_qlora_adapter_gguf_over_the_q4_0_base_in_llama_cpp(answers, base_workdir, tmp_path):
    """QLoRA on a Q4_0 base: the base's own Q4_0 export dequantizes (gguf-py) to exactly the
    in-memory base, and llama.cpp with the exported adapter reproduces the JAX model (1e-3)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    workdir = tmp_path / "qlora"
    Trainer(_lora_sft(answers, base_workdir, 10, "q4_0"), workdir).run()

    def convert(*args):
        subprocess.run([sys.executable, "-m", "shakti_jax.convert", "--no_progress", *args],
                       check=True, capture_output=True, text=True)

    convert("--checkpoint", str(base_workdir), "--format", "gguf", "--quant", "q4_0",
            "--out", str(tmp_path / "base.gguf"))
    convert("--checkpoint", str(workdir), "--format", "lora", "--out", str(tmp_path / "adapter.gguf"))
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)

    # the file's Q4_0 blocks are the training base's blocks, byte for byte
    base = load_params(base_workdir)
    blocks = quantize_params(base.config, jax.device_get(base.params), "q4_0")
    wq = blocks["groups"][0]["blocks"][0]["attn"]["wq"]
    file_wq = {t.name: t for t in gguf.GGUFReader(tmp_path / "base.gguf").tensors}[wq.names[0]]
    np.testing.assert_array_equal(np.asarray(file_wq.data, np.uint8), wq.block_bytes()[0])

    # The chain file == JAX model == llama.cpp: the numpy reference over the two files equals
    # the trained JAX model (float math, 1e-4), and equals llama.cpp once it rounds activations
    # to Q8_0 before the Q4_0 matmuls as llama.cpp does (1e-3). JAX vs llama.cpp directly
    # differs by that rounding only (bounded as for any Q4_0 export in test_export).
    loaded = load_params(workdir)
    ids = [1] + list(range(40, 100))
    logits_jax = np.asarray(loaded.model_def.apply(loaded.params, np.asarray([ids], np.int32)))[0]
    reference = GGUFModel(tmp_path / "base.gguf", adapter=tmp_path / "adapter.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter.gguf"),
                          n_ctx=128, n_batch=128, n_ubatch=128, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(ids)
    logits_llama = np.array(llm.scores[:len(ids)], np.float64)
    llm.close()
    file_vs_jax = np.abs(reference.logits(ids, round_activations=False) - logits_jax).max()
    llama_vs_file = np.abs(reference.logits(ids) - logits_llama).max()
    llama_vs_jax = np.abs(logits_llama - logits_jax).max()
    effect = np.abs(logits_jax - np.asarray(base.model_def.apply(
        dequantize_params(blocks), np.asarray([ids], np.int32)))[0]).max()
    print(f"Q4_0 base + adapter: files vs JAX {file_vs_jax:.2e}, llama.cpp vs files {llama_vs_file:.2e}, "
          f"llama.cpp vs JAX {llama_vs_jax:.2e}; adapter effect {effect:.2e}")
    assert file_vs_jax < 1e-4
    assert llama_vs_file < 1e-3
    assert llama_vs_jax < 0.1
    assert effect > 1e-2  # the adapter changes the model


def test_lora_config_errors_are_one_line(answers, base_workdir, tmp_path):
    bad = [({"targets": ("q", "x")}, "lora.targets"), ({"targets": ("q",), "rank": 0}, "lora.rank"),
           ({"targets": ("q",), "base_quant": "q3_k"}, "lora.base_quant"),
           ({"targets": (), "base_quant": "q4_0"}, "lora.base_quant"),
           ({"targets": ("q",), "dropout": 0.1}, "lora.dropout")]
    for settings, key in bad:
        config = _lora_sft(answers, base_workdir, 2)
        config.lora.update(settings)
        with pytest.raises(ConfigError, match=key) as err:
            Trainer(config, tmp_path / "never")
        assert "\n" not in str(err.value)
    from experiments.dpo import get_config as dpo_experiment

    dpo = _small(dpo_experiment("tiny"), 2, init_from=str(base_workdir))
    dpo.lora.update(targets=("q",))
    with pytest.raises(ConfigError, match="dpo.reference='precomputed'"):
        Trainer(dpo, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_base(answers, base_workdir, tmp_path):
    """The adapters' checkpoint points at the base (workdir and step); resuming over another
    base step is refused instead of silently training on other weights."""
    base = tmp_path / "base"
    shutil.copytree(base_workdir, base)
    workdir = tmp_path / "lora"
    Trainer(_lora_sft(answers, base, 2), workdir).run()
    again = _lora_sft(answers, base, 4, allow_changes="train.steps")
    more = _small(pretrain_experiment("tiny"), 31, checkpoint_every=31, allow_changes="train.steps")
    more.data.tokenizer = _saved_tokenizer(base)
    Trainer(more, base).run()  # the base's newest step is now 31
    with pytest.raises(CheckpointError, match="LoRA base"):
        Trainer(again, workdir).run()
    again.train.init_from_step = 30  # the step it was trained on: resumes
    assert Trainer(again, workdir).run()["loss"] > 0


def _saved_tokenizer(workdir: Path) -> str:
    import json

    return json.loads((workdir / "config.json").read_text())["data"]["tokenizer"]
