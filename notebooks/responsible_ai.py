# %% [markdown]
# # Responsible AI: bias and toxicity of a model and its quantized exports
#
# The paper's Tables 3-4: CrowS-Pairs (share of sentence pairs where the model prefers the
# stereotype; 0.5 is unbiased), BBQ (question answering accuracy under ambiguous and
# disambiguated contexts, and the bias scores) and ToxiGen (hate / not-hate classification
# accuracy), for a model and for the GGUF files a phone would run. Every number comes from
# `python -m shakti_jax.eval` on the same token requests: the JAX checkpoint, then each export
# in llama.cpp. Small setting: a tiny model pretrained here and 20 items per task (BBQ: per category);
# `SHAKTI_NOTEBOOK_FULL=1`: the imported SmolLM2-135M-Instruct and every item.

# %%
import json

from experiments.demo_smollm2 import imported_smollm, smollm_gguf
from IPython.display import Image, display

from notebooks.common import FIGURES, FULL, SHARED, WORK, pretrained, record
from shakti_jax import plots
from shakti_jax.convert import main as convert
from shakti_jax.eval import main as evaluate

QUANTS = ("q8_0", "q4_0")
TASKS = {"crows_pairs": SHARED / "eval" / "crows_pairs_anonymized.csv", "bbq": SHARED / "eval" / "bbq",
         "toxigen": SHARED / "eval" / "toxigen_sentences.jsonl"}
checkpoint = imported_smollm(WORK, smollm_gguf()) if FULL else pretrained("base", 200)
exports = WORK / "rai_exports"

# %%
try:
    convert(["--checkpoint", str(checkpoint), "--format", "gguf", "--quant", ",".join(QUANTS),
             "--out", f"{exports}/", "--no_progress"])
except SystemExit as done:
    assert done.code == 0, f"convert failed ({done.code})"
models = {"JAX checkpoint": str(checkpoint),
          **{q.upper(): f"gguf:{next(exports.glob(f'*-{q.upper()}.gguf'))}" for q in QUANTS}}

# %%
results = {}
tasks = ",".join(f"{kind}:{path}" for kind, path in TASKS.items())
for label, model in models.items():
    out = WORK / f"rai_{label.split()[0]}.json"
    args = ["--model", model, "--tasks", tasks, "--max_len", "256", "--out", str(out), "--no_progress"]
    try:
        evaluate(args + ([] if FULL else ["--limit", "20"]))
    except SystemExit as done:
        assert done.code == 0, f"eval of {model} failed ({done.code})"
    results[label] = {name.partition(":")[0]: metrics for name, metrics in json.loads(out.read_text())["tasks"].items()}
display(Image(plots.eval_figure(results, FIGURES / "responsible_ai.png",
                                title="bias and toxicity: the model and its exports")))

# %%
keys = {"crows_pairs": ("pct_stereotype", "likelihood_diff"), "bbq": ("acc_ambiguous", "acc_disambiguated"),
        "toxigen": ("acc", "acc_norm")}
table = {label: {f"{task}.{k}": r[task][k] for task, ks in keys.items() for k in ks if k in r[task]}
         for label, r in results.items()}
record("responsible_ai", table)
columns = list(next(iter(table.values())))
print("| model | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 1) + "|")
for label, row in table.items():
    print(f"| {label} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
