"""Fine-tuning an imported SmolLM2-135M-Instruct: `--config=experiments/smollm2.py:<recipe>`.

    python -m shakti_jax.import_model --source gguf:SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smollm2
    python -m shakti_jax.train --config=experiments/smollm2.py:sft_pubmedqa --workdir runs/smollm2-pubmedqa

The model (shapes, RoPE, tied embeddings) and its BPE tokenizer and ChatML template come from
`train.init_from`, the imported workdir; `model` here only sets how it runs. Recipes:
- sft_pubmedqa: PubMedQA question + abstract -> the long answer, rendered with SmolLM2's own
  chat template (loss on the answer and its <|im_end|>), 10% of questions held out.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.sft import get_config as sft_config

RECIPES = ("sft_pubmedqa",)


def get_config(recipe: str = "sft_pubmedqa") -> ConfigDict:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    c = sft_config("tiny")  # the data and trainer keys; the model comes from init_from
    c.model = ConfigDict({"dtype": "float32", "param_dtype": "float32", "dropout_rate": 0.0,
                          "remat": "none"})
    c.train.init_from = "runs/smollm2"
    c.data.seq_len = 512  # PubMedQA abstracts are trimmed from the left to fit
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    c.optim.lr = 5e-5  # fine-tuning a trained model: small steps
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    return c
