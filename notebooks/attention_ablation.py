# %% [markdown]
# # Attention ablation: global vs sliding window vs block-sparse
#
# The Shakti sizes mix sliding-window layers with global ones (and the 100M adds block-sparse
# layers) to cut attention FLOPs and the KV cache on edge devices. Here the same tiny model,
# data and budget are trained with each layer pattern: held-out loss against step and
# against training FLOPs (`shakti_jax.model_stats`, the counts `python -m shakti_jax.info`
# prints), the KV-cache bytes at full context, and cached decode speed from the `Generator`.
# Small setting: the tiny model (2 layers, d=64) at 128 tokens with a 32-token window;
# `SHAKTI_NOTEBOOK_FULL=1`: shakti_100m's shape at 2048 tokens.

# %%
from IPython.display import Image, display

from notebooks.common import FIGURES, FULL, WORK, pretrain_config, record
from shakti_jax import model_stats, plots
from shakti_jax.config import ModelConfig, kind_mask
from shakti_jax.generate import Generator
from shakti_jax.train.checkpoint import load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SIZE, STEPS = ("shakti_100m", 2000) if FULL else ("tiny", 48)
# small: 16-token blocks (1 local, 1 global, 1 random per query block) and a 32-token window
SHAPE = {} if FULL else {"sparse": {"block_size": 16, "local_blocks": 1, "global_blocks": 1, "random_blocks": 1},
                         "window": 32}
PATTERNS = {"global": ("global",), "window": ("window",), "block_sparse": ("block_sparse",),
            "window + global": ("window", "global")}

# %% [markdown]
# The masks themselves, as `MaskSpec.allowed` gives them (the one predicate the XLA
# reference, the Pallas kernel, the tile plans and the FLOP counts all use).

# %%
base = ModelConfig.from_dict(pretrain_config(1, SIZE, **SHAPE).model.to_dict())
display(Image(plots.masks_figure({kind: kind_mask(base, kind) for kind in ("global", "window", "block_sparse")},
                                 base.max_seq_len // 2, FIGURES / "attention_masks.png")))

# %% [markdown]
# Train each pattern with the shared trainer (same seed, data order and schedule).

# %%
runs, stats = {}, {}
for name, pattern in PATTERNS.items():
    config = pretrain_config(STEPS, SIZE, attention_pattern=pattern, **SHAPE)
    workdir = WORK / "attention" / name.replace(" + ", "_")
    if not list(workdir.glob("checkpoints/*")):
        Trainer(config, workdir).run()
    runs[name] = read_metrics(workdir)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    stats[name] = model_stats.summary(cfg, config.data.seq_len)
    stats[name]["workdir"] = workdir

# %% [markdown]
# Cached decode speed of each trained model: 4 prompts of 32 tokens, 64 new tokens, greedy,
# timed after a warm-up call (the `Generator` compiles once per shape).

# %%
decode = {}
for name in PATTERNS:
    loaded = load_params(stats[name]["workdir"])
    generator = Generator(loaded.model_def, loaded.params)
    prompts = [list(range(1 + i, 33 + i)) for i in range(4)]
    generator(prompts, max_new_tokens=64)
    decode[name] = max(generator(prompts, max_new_tokens=64).decode_tokens_per_sec for _ in range(3))

# %%
fig, axes = plots.new(4, width=3.6)
held_out = {n: plots.metric_series(r, "eval_loss") for n, r in runs.items()}
plots.curves(axes[0], held_out, title="held-out loss", ylabel="loss", marker="o")
flops = {n: ([s * stats[n]["flops_per_token"] * config.train.batch_size * config.data.seq_len for s in x], y)
         for n, (x, y) in held_out.items()}
plots.curves(axes[1], flops, title="held-out loss vs training FLOPs", xlabel="FLOPs", ylabel="loss", marker="o")
plots.bars(axes[2], {n: {"KiB": s["kv_cache_bytes_at_context"] / 1024} for n, s in stats.items()},
           title=f"KV cache at {base.max_seq_len} tokens (bf16)", ylabel="KiB")
plots.bars(axes[3], {n: {"tok/s": v} for n, v in decode.items()}, title="cached decode (Generator)",
           ylabel="tokens / s")
for ax in axes[2:]:
    ax.tick_params(axis="x", labelrotation=20)
display(Image(plots.save(fig, FIGURES / "attention_ablation.png", title=f"{SIZE}, {STEPS} steps")))

# %%
summary = {name: {"final_eval_loss": held_out[name][1][-1], "first_eval_loss": held_out[name][1][0],
                  "flops_per_token": stats[name]["flops_per_token"],
                  "attention_flops_per_token": stats[name]["attention_flops_per_token"],
                  "kv_cache_bytes_at_context": stats[name]["kv_cache_bytes_at_context"],
                  "decode_tokens_per_sec": decode[name]} for name in PATTERNS}
record("attention_ablation", summary)
for name, row in summary.items():
    print(f"{name:>16}: held-out loss {row['first_eval_loss']:.3f} -> {row['final_eval_loss']:.3f}, "
          f"attention FLOPs/token {row['attention_flops_per_token']:,}, KV cache "
          f"{row['kv_cache_bytes_at_context'] / 1024:.0f} KiB, decode {row['decode_tokens_per_sec']:,.0f} tok/s")
