"""Supervised fine-tuning configs: `--config=experiments/sft.py:<size>`.

Starts from the pretraining checkpoint named by `train.init_from` (a pretraining workdir, any
mesh) and its tokenizer; an empty `init_from` starts from a random init (tests), which then
needs `data.tokenizer`. Default data: PubMedQA (question + abstract -> long answer), the
paper's healthcare domain. Sources are `KIND:PATH?format=...` specs of
`data_pipelines.records` (prompt_completion, messages, alpaca, pubmedqa); several mix.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.pretrain import get_config as pretrain_config

_SHARED = "../shared/data"


def get_config(size: str = "tiny"):
    c = pretrain_config(size)
    tiny = size == "tiny"
    c.stage = "sft"
    c.model.dropout_rate = 0.0 if tiny else c.model.dropout_rate
    c.data.sources = (f"json:{_SHARED}/domain/pubmedqa_pqal.json?format=pubmedqa",)
    c.data.holdout_every = 10  # 10% of conversations held out for the answer-loss eval
    c.data.bad_records = "skip"  # answers longer than the context are counted, not fatal
    c.data.seq_len = 256 if tiny else 2048  # long PubMedQA prompts are trimmed from the left
    c.train.init_from = ""
    c.train.steps = 200 if tiny else 2_000
    c.train.batch_size = 8 if tiny else 64
    c.train.micro_batches = 1
    c.train.eval_every = 50 if tiny else 200
    c.train.eval_batches = 8 if tiny else 20
    c.train.checkpoint_every = 100 if tiny else 500
    c.optim.lr = 1e-3 if tiny else 2e-5
    c.optim.warmup_steps = 10 if tiny else 50
    c.optim.weight_decay = 0.0
    c.optim.z_loss = 0.0
    c.lora = ConfigDict()  # see shakti_jax/train/tuning.py
    c.lora.targets = ()  # empty: full fine-tuning; e.g. ("q", "k", "v", "o", "gate", "up", "down")
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.base_quant = ""  # "" dense base, or q8_0 | q5_0 | q4_0 | q4_1 (QLoRA on GGUF blocks)
    return c
