"""DPO configs: `--config=experiments/dpo.py:<size>`.

Starts from the SFT checkpoint named by `train.init_from` (empty: random init, for tests).
Default data: the hh-rlhf harmless pairs ("chosen" is the less harmful reply). `dpo.loss` is
sigmoid (with `label_smoothing`), ipo or hinge; `dpo.reference` is "memory" (a frozen sharded
copy of the starting params, scored in the same step) or "precomputed" (reference log-probs
of every pair computed once, before training, into WORKDIR/reference_logps.npy).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.sft import get_config as sft_config

_SHARED = "../shared/data"


def get_config(size: str = "tiny"):
    c = sft_config(size)
    tiny = size == "tiny"
    c.stage = "dpo"
    c.data.sources = (f"jsonl:{_SHARED}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.data.seq_len = 256 if tiny else 1024
    c.data.bad_records = "skip"  # a few hh pairs do not share their prompt; count, don't stop
    c.train.steps = 200 if tiny else 1_000
    c.train.batch_size = 8 if tiny else 32  # pairs; the forward batch is twice this
    c.optim.lr = 3e-5 if tiny else 5e-7  # tiny at 1e-4 already collapses to <|end|>
    c.optim.schedule = "cosine"
    c.dpo = ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.loss = "sigmoid"
    c.dpo.label_smoothing = 0.0
    c.dpo.reference = "memory"
    return c
