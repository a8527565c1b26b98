"""notebooks/: every notebook executed headless in its small setting (a cell error fails the
test), its figures written, and its numbers (the `<name>.json` it records) checked: the
relations each ablation exists to show, and agreement between a model and its exports."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("jupytext")


def test_the_notebooks_run_and_their_numbers_hold(shared_data, tmp_path):
    from notebooks.execute import NOTEBOOKS, execute

    figures, work = tmp_path / "figures", tmp_path / "work"
    for name in NOTEBOOKS:  # in order, in one worker: the later ones share a pretrained model
        assert execute(name, figures, work).is_file()
    numbers = {name: json.loads((figures / f"{name}.json").read_text()) for name in NOTEBOOKS}
    for png in ("attention_masks", "attention_ablation", "quant_sizes", "quant_quality", "quant_decode",
                "domain_curves", "domain_eval", "responsible_ai"):
        assert (figures / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    attention = numbers["attention_ablation"]
    kv = {k: v["kv_cache_bytes_at_context"] for k, v in attention.items()}
    flops = {k: v["attention_flops_per_token"] for k, v in attention.items()}
    assert kv["window"] < kv["window + global"] < kv["global"] == kv["block_sparse"], kv
    assert flops["window"] < flops["block_sparse"] < flops["global"], flops
    assert all(v["final_eval_loss"] < v["first_eval_loss"] - 0.5 for v in attention.values()), attention

    quant = numbers["quantization"]
    sizes = [quant[q]["bytes"] for q in ("f32", "f16", "q8_0", "q5_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True) and quant["q4_1"]["bytes"] > quant["q4_0"]["bytes"]
    assert quant["f32"]["kl_mean"] < 1e-6 and quant["f32"]["top1_agreement"] > 0.999
    assert quant["f16"]["kl_mean"] < quant["q8_0"]["kl_mean"] < quant["q5_0"]["kl_mean"] < quant["q4_0"]["kl_mean"]
    assert all(v["decode_tokens_per_sec"] > 0 for v in quant.values())

    domain = numbers["domain_finetuning"]
    assert domain["sft_eval_loss"][-1] < domain["sft_eval_loss"][0] - 0.1, domain["sft_eval_loss"]
    assert all(0 <= v <= 1 for v in domain["pubmedqa_acc"].values())
    assert set(domain["answers"]) == {"base", "SFT", "SFT + DPO"}

    rai = numbers["responsible_ai"]
    for label in ("Q8_0", "Q4_0"):  # the exports score the same items as the checkpoint, closely
        for key, value in rai["JAX checkpoint"].items():
            tolerance = 0.02 if key == "crows_pairs.likelihood_diff" and label == "Q8_0" else 0.15
            scale = abs(value) if key.endswith("likelihood_diff") else 1.0
            assert abs(rai[label][key] - value) <= tolerance * scale, (label, key, rai[label][key], value)
