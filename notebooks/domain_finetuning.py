# %% [markdown]
# # Domain fine-tuning: before and after SFT and DPO
#
# The paper fine-tunes each size on a domain (healthcare, finance, legal) with SFT and then
# aligns it with DPO. Here the healthcare recipe (`experiments/domain.py`: PubMedQA question +
# abstract -> long answer, every 10th question held out) runs on the shared trainer from a
# base model, then DPO on the preference pairs; the curves come from each run's
# metrics.jsonl, the domain metric from `python -m shakti_jax.eval` (PubMedQA yes / no /
# maybe by log-likelihood), and the answers from the `Generator`. Small setting: a tiny model
# pretrained here; `SHAKTI_NOTEBOOK_FULL=1`: the imported SmolLM2-135M-Instruct.

# %%
import json

from data_pipelines.records import load_conversations
from experiments.demo_smollm2 import answer, imported_smollm, smollm_gguf
from experiments.domain import get_config
from IPython.display import Image, display

from notebooks.common import FIGURES, FULL, SHARED, WORK, pretrained, record
from shakti_jax import plots
from shakti_jax.eval import main as evaluate
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SIZE = "smollm2" if FULL else "tiny"
PUBMEDQA = SHARED / "domain" / "pubmedqa_pqal.json"
SFT_STEPS, DPO_STEPS = (200, 100) if FULL else (40, 16)
base = imported_smollm(WORK, smollm_gguf()) if FULL else pretrained("base", 200)


def stage(recipe: str, init_from, steps: int, name: str):
    workdir = WORK / "domain" / name
    c = get_config(recipe)
    c.train.update(init_from=str(init_from), steps=steps, log_every=max(1, steps // 8),
                   eval_every=max(1, steps // 4), checkpoint_every=steps, progress_bar=False,
                   async_checkpoints=False)
    if not list(workdir.glob("checkpoints/*")):
        Trainer(c, workdir).run()
    return workdir


sft = stage(f"{SIZE},healthcare", base, SFT_STEPS, "sft")
dpo = stage(f"{SIZE},healthcare,dpo", sft, DPO_STEPS, "dpo")

# %%
sft_rows, dpo_rows = read_metrics(sft), read_metrics(dpo)
fig, axes = plots.new(4, width=3.4)
plots.curves(axes[0], {"train": plots.metric_series(sft_rows, "loss"),
                       "held out": plots.metric_series(sft_rows, "eval_loss")},
             title="SFT on PubMedQA: answer loss", ylabel="loss")
plots.curves(axes[1], {"train": plots.metric_series(dpo_rows, "loss"),
                       "held out": plots.metric_series(dpo_rows, "eval_loss")},
             title="DPO on hh-rlhf pairs: loss", ylabel="loss")
plots.curves(axes[2], {"held out": plots.metric_series(dpo_rows, "eval_rewards/accuracy")},
             title="DPO: held-out reward accuracy", ylabel="accuracy", marker="o")
plots.curves(axes[3], {"held out": plots.metric_series(dpo_rows, "eval_rewards/margin")},
             title="DPO: held-out reward margin", ylabel="beta x log-ratio margin", marker="o")
display(Image(plots.save(fig, FIGURES / "domain_curves.png", title=f"{SIZE}: healthcare SFT, then DPO")))

# %% [markdown]
# PubMedQA accuracy of each model with the evaluation CLI (the same command a user runs).

# %%
results = {}
for label, workdir in (("base", base), ("SFT", sft), ("SFT + DPO", dpo)):
    out = WORK / "domain" / f"eval_{label.replace(' + ', '_')}.json"
    try:
        evaluate(["--model", str(workdir), "--tasks", f"pubmedqa:{PUBMEDQA}", "--limit", "200" if FULL else "40",
                  "--max_len", "1024" if FULL else "256", "--out", str(out), "--no_progress"])
    except SystemExit as done:
        assert done.code == 0, f"eval failed ({done.code})"
    results[label] = json.loads(out.read_text())["tasks"]
display(Image(plots.eval_figure(results, FIGURES / "domain_eval.png",
                                title="PubMedQA (log-likelihood of yes / no / maybe)")))

# %% [markdown]
# Two held-out questions (every 10th record is held out), answered by each model (small
# setting: the abstract cut to its last 250 characters, so the prompt fits the 256-token context).

# %%
held_out = [c.messages for i, c in enumerate(load_conversations(f"json:{PUBMEDQA}?format=pubmedqa"))
            if i % 10 == 9][:2]
questions = [[(role, text if FULL else text[-250:]) for role, text in c[:-1]] for c in held_out]
answers = {label: answer(w, questions, 40) for label, w in (("base", base), ("SFT", sft), ("SFT + DPO", dpo))}
for i, conversation in enumerate(held_out):
    print("Q:", conversation[-2][1].rsplit("Question: ", 1)[-1][:200])
    print("   reference:", conversation[-1][1][:200])
    for label in answers:
        print(f"   {label}: {answers[label][i]!r}")

# %%
task = f"pubmedqa:{PUBMEDQA}"
record("domain_finetuning", {
    "sft_eval_loss": plots.metric_series(sft_rows, "eval_loss")[1],
    "dpo_eval_accuracy": plots.metric_series(dpo_rows, "eval_rewards/accuracy")[1],
    "dpo_eval_margin": plots.metric_series(dpo_rows, "eval_rewards/margin")[1],
    "pubmedqa_acc": {label: r[task]["acc"] for label, r in results.items()},
    "answers": answers})
