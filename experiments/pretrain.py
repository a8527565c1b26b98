"""Pretraining experiment configs: `--config=experiments/pretrain.py:<size>`.

Sizes: tiny (CPU, minutes), shakti_100m, shakti_250m, shakti_500m. Every field can be
overridden on the command line, e.g. `--config.train.steps=50 --config.mesh.fsdp=4`.

Hyperparameters for the Shakti sizes follow common small-LM practice (Chinchilla-style
token budgets of ~20 tokens/param, ~0.5M-token batches, AdamW b2=0.95, peak LR falling with
width, warmup ~1-2% of steps, cosine to 10%, clip 1.0, weight decay 0.1, z-loss 1e-4).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from shakti_jax.config import get_config as model_config

# size -> (seq_len, global batch rows, steps, peak lr, warmup, micro-batches)
_SIZES = {
    "tiny": (128, 16, 300, 3e-3, 30, 1),
    "shakti_100m": (2048, 256, 4_000, 6e-4, 100, 1),  # 2B tokens ~ 20 tokens/param
    "shakti_250m": (2048, 256, 10_000, 4e-4, 200, 2),  # 5.2B tokens
    "shakti_500m": (4096, 128, 20_000, 3e-4, 400, 4),  # 10.5B tokens
}


def get_config(size: str = "tiny") -> ConfigDict:
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(_SIZES)}")
    seq_len, batch, steps, lr, warmup, micro = _SIZES[size]
    tiny = size == "tiny"
    c = ConfigDict()
    c.stage = "pretrain"
    c.model = model_config(size, dtype="float32" if tiny else "bfloat16").to_dict()

    c.data = ConfigDict()
    # KIND:PATH[?field=...&weight=...] specs, see data_pipelines/sources.py.
    c.data.sources = ("default:",) if tiny else ("text:../shared/data/pretrain/tinyshakespeare.txt",)
    c.data.eval_sources = ()  # empty: hold out every `holdout_every`-th training document
    c.data.holdout_every = 50
    c.data.tokenizer = ""  # empty: train one on the training sources into WORKDIR/tokenizer
    c.data.seq_len = seq_len
    c.data.bad_records = "error"  # or "skip" (counted in the metrics)
    c.data.seed = 0
    c.data.num_threads = 2

    c.train = ConfigDict()
    c.train.steps = steps
    c.train.batch_size = batch  # global rows per optimizer step
    c.train.micro_batches = micro  # gradient accumulation
    c.train.seed = 0
    c.train.log_every = 10 if tiny else 50
    c.train.eval_every = 100 if tiny else 1000
    c.train.eval_batches = 8 if tiny else 50
    c.train.eval_tasks = ""  # e.g. "toxigen@200:FILE,perplexity@20000:FILE" (eval's --tasks), scored at each eval
    c.train.checkpoint_every = 100 if tiny else 1000
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.on_nonfinite = "stop"  # or "skip": drop the update and carry on
    c.train.progress_bar = True
    c.train.init_from = ""  # a previous stage's workdir (SFT, DPO); params only, any mesh
    c.train.init_from_step = 0  # 0: init_from's newest readable step
    c.train.resume_step = 0  # 0: resume from the newest readable step; N: from step N (newer set aside)
    c.train.allow_changes = ""  # comma-separated keys a rerun of this workdir may change: "train.steps"
    c.train.qat = ""  # "" or q8_0 | q5_0 | q4_0 | q4_1: train against the GGUF blocks the exporter writes
    c.train.qat_start = 0  # the first step that trains the fake-quantized weights
    c.train.profile_steps = ()  # (first, last): a jax.profiler trace of those steps in WORKDIR/profile

    c.optim = ConfigDict()
    c.optim.lr = lr
    c.optim.schedule = "cosine"  # cosine | wsd | constant
    c.optim.warmup_steps = warmup
    c.optim.min_lr_ratio = 0.1
    c.optim.decay_fraction = 0.2  # wsd: the final share of steps that decays
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.z_loss = 0.0 if tiny else 1e-4

    c.mesh = ConfigDict()
    # One axis may be -1: every device the others leave. Tiny: pure data parallel; the Shakti
    # sizes: FSDP over all devices (params, grads and Adam state sharded; no replicas).
    c.mesh.data = -1 if tiny else 1
    c.mesh.fsdp = 1 if tiny else -1
    c.mesh.tensor = 1
    return c
