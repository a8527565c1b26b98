# %% [markdown]
# # Quantization: file size, quality and decode speed per GGUF type
#
# The paper's Figure 5 (model size per quantization) and Figure 6 (tokens/s on devices), with
# the quality each type costs. One trained checkpoint is exported by `convert` to every type
# (its `--report` scores each file in llama.cpp against the checkpoint in JAX on held-out
# text: perplexity ratio, KL divergence, top-1 agreement), then llama.cpp decodes with each
# file on this machine. Small setting: the tiny model; `SHAKTI_NOTEBOOK_FULL=1`: shakti_100m.

# %%
import json

from IPython.display import Image, display

from notebooks.common import FIGURES, FULL, SHARED, WORK, pretrained, record
from shakti_jax import plots
from shakti_jax.convert import main as convert
from shakti_jax.export import llama_runtime

# K-quants (llama.cpp's quantizer) pack rows in 256-wide super-blocks: the tiny model's
# 64-wide rows have none, so they join in the full setting only.
QUANTS = ("f32", "f16", "q8_0", "q5_0", "q4_0", "q4_1") + (("q6_k", "q5_k_m", "q4_k_m") if FULL else ())
TEXT = SHARED / "pretrain" / "tinyshakespeare.txt"
checkpoint = pretrained("base", 2000 if FULL else 200)

# %% [markdown]
# Export every type in one `convert` call, with the quantization report (the same command a
# user runs: `python -m shakti_jax.convert --checkpoint DIR --format gguf --quant ... --report TEXT`).

# %%
exports = WORK / "quant_exports"
try:
    convert(["--checkpoint", str(checkpoint), "--format", "gguf", "--quant", ",".join(QUANTS),
             "--out", f"{exports}/", "--report", str(TEXT), "--report_chars", "200000" if FULL else "6000",
             "--report_max_len", "128", "--no_progress"])
except SystemExit as done:
    assert done.code == 0, f"convert failed ({done.code})"
rows = sorted(json.loads((exports / "quant_report.json").read_text()), key=lambda r: r["bytes"])

# %% [markdown]
# llama.cpp decode speed of each file: greedy, one token per call after a 32-token prefill.

# %%
for row in rows:
    llm = llama_runtime.load(row["file"], n_ctx=256)
    prompt = list(range(1, 33))
    llama_runtime.decode_tokens_per_sec(llm, prompt, 16)  # warm-up
    row["decode_tokens_per_sec"] = max(llama_runtime.decode_tokens_per_sec(llm, prompt, 64) for _ in range(3))
    del llm

# %%
fig, (ax,) = plots.new(1)
plots.bars(ax, {r["quant"]: {"MB": r["bytes"] / 1e6} for r in rows}, title="GGUF file size (paper Figure 5)",
           ylabel="MB")
display(Image(plots.save(fig, FIGURES / "quant_sizes.png")))
display(Image(plots.quality_vs_size_figure(rows, FIGURES / "quant_quality.png",
                                          title="llama.cpp vs the JAX checkpoint")))
fig, (ax,) = plots.new(1)
plots.bars(ax, {r["quant"]: {"tok/s": r["decode_tokens_per_sec"]} for r in rows},
           title="llama.cpp decode on this CPU (paper Figure 6)", ylabel="tokens / s")
display(Image(plots.save(fig, FIGURES / "quant_decode.png")))

# %%
record("quantization", {r["quant"]: {k: r[k] for k in ("bytes", "perplexity", "perplexity_ratio", "kl_mean",
                                                       "top1_agreement", "decode_tokens_per_sec")} for r in rows})
for r in rows:
    print(f"{r['quant']:>5}: {r['bytes'] / 1e6:6.2f} MB, perplexity x{r['perplexity_ratio']:.4f}, "
          f"mean KL {r['kl_mean']:.5f}, top-1 {r['top1_agreement']:.3f}, {r['decode_tokens_per_sec']:,.0f} tok/s")
