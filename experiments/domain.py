"""Domain fine-tuning recipes (the paper's Table 1 by size and domain):
`--config=experiments/domain.py:<size>,<domain>[,dpo][,lora|,qlora]`.

    python -m shakti_jax.train --config=experiments/domain.py:smollm2,finance \
        --config.train.init_from=runs/smollm2 --workdir runs/smollm2-finance

size: tiny | shakti_100m | shakti_250m | shakti_500m | smollm2 (an imported SmolLM2-135M workdir,
whose model and tokenizer come from `train.init_from`). domain:
- healthcare: PubMedQA question + abstract -> long answer;
- finance: TAT-QA question over an annual-report table + text -> answer (`qa` format);
- legal: CUAD contract-clause questions (extract + Yes/No classify) -> answer (`qa` format);
- mixed: the 250M recipe, healthcare + finance + legal, weighted 2:1:1.
Every source holds out every 10th record and reports its own `eval_loss/NAME`. `,dpo` continues
from the SFT workdir (`train.init_from`) with DPO on the shared preference pairs; the paper's
finance / legal preference sets are not in ../shared/data, so that stage uses hh-rlhf's.
`,lora` trains rank-16 adapters on all seven projections over the frozen `init_from` base
(a few MiB per domain instead of a model copy); `,qlora` does the same over that base held in
Q4_0, the blocks `convert --quant q4_0` writes, so the adapters are tuned against the file the
device runs (export the adapter with `convert --format lora`).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.dpo import get_config as dpo_config
from experiments.sft import get_config as sft_config

_SHARED = "../shared/data"
DOMAINS = {
    "healthcare": (f"json:{_SHARED}/domain/pubmedqa_pqal.json?format=pubmedqa",),
    "finance": (f"jsonl:{_SHARED}/domain/tatqa_finance.jsonl?format=qa",),
    "legal": (f"jsonl:{_SHARED}/domain/cuad_legal.jsonl?format=qa",),
    "mixed": (f"json:{_SHARED}/domain/pubmedqa_pqal.json?format=pubmedqa&weight=2",
              f"jsonl:{_SHARED}/domain/tatqa_finance.jsonl?format=qa&weight=1",
              f"jsonl:{_SHARED}/domain/cuad_legal.jsonl?format=qa&weight=1"),
}
SIZES = ("tiny", "shakti_100m", "shakti_250m", "shakti_500m", "smollm2")
ADAPTERS = {"lora": "", "qlora": "q4_0"}  # recipe word -> lora.base_quant


def get_config(spec: str = "tiny,healthcare") -> ConfigDict:
    size, domain, *options = spec.split(",")
    adapter = options.pop() if options and options[-1] in ADAPTERS else None
    stage = options
    if size not in SIZES or domain not in DOMAINS or stage not in ([], ["dpo"]):
        raise ValueError(f"--config=experiments/domain.py:{spec}: expected SIZE,DOMAIN[,dpo][,lora|,qlora] "
                         f"with SIZE one of {SIZES} and DOMAIN one of {tuple(DOMAINS)}")
    imported = size == "smollm2"
    base = "tiny" if imported else size
    c = dpo_config(base) if stage else sft_config(base)
    if imported:  # the model comes from the imported workdir; this only sets how it runs
        c.model = ConfigDict({"dtype": "float32", "param_dtype": "float32", "dropout_rate": 0.0,
                              "remat": "none"})
        c.train.init_from = "runs/smollm2"
        c.data.seq_len = 1024 if stage else 768  # TAT-QA / CUAD contexts fit in ~800 tokens
        c.train.batch_size = 8
        c.optim.lr = 5e-7 if stage else 5e-5
        c.optim.warmup_steps = 10
    if not stage:
        c.data.sources = DOMAINS[domain]
        c.data.holdout_every = 10
        c.data.bad_records = "skip"  # answers longer than the context are counted, not fatal
    if adapter:
        c.lora.update(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=16, alpha=32.0,
                      base_quant=ADAPTERS[adapter])
        c.optim.lr *= 10  # adapters start at zero and have few params: larger steps
        if stage:
            c.dpo.reference = "precomputed"  # the reference is the frozen base
    return c
