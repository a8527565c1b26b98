"""Named tasks on local files (`kind:PATH`), parsed and checked before any model loads, and
run on any backend: what `python -m shakti_jax.eval` and `train.eval_tasks` share."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable, Sequence

from data_pipelines.errors import UserError
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.evaluation import task_files, tasks
from shakti_jax.evaluation.perplexity import perplexity

TASK_HELP = {
    "perplexity": "a UTF-8 text file: token / byte / word perplexity, bits per byte (limit: characters)",
    "crows_pairs": "a CrowS-Pairs CSV: likelihood_diff, pct_stereotype",
    "toxigen": "JSONL/CSV text + label: ToxiGen's prompt, acc, acc_norm",
    "bbq": "a BBQ JSONL file or directory: acc (ambiguous / disambiguated), bias scores",
    "pubmedqa": "PubMedQA JSON/JSONL: yes / no / maybe acc by log-likelihood",
    "pubmedqa_answers": "PubMedQA: generated answers: embedding relevancy, similarity and ROUGE-L to the long answer",
    "arc": "ARC JSONL (lm-eval's arc_easy / arc_challenge prompt)",
    "piqa": "PIQA JSONL (goal, sol1, sol2, label)",
    "hellaswag": "HellaSwag JSONL (lm-eval's preprocessing)",
    "mmlu": "MMLU JSONL (question, subject, choices, answer)",
    "winogrande": "WinoGrande JSONL (partial scoring)",
    "mc": "a multiple-choice spec (YAML/JSON: data, prompt, choices, gold, delimiter, fields)",
}


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str
    path: Path
    limit: int | None = None  # this task's own limit (`kind@N:PATH`), else the run's

    @property
    def name(self) -> str:
        return f"{self.kind}{'' if self.limit is None else f'@{self.limit}'}:{self.path}"

    def data_files(self) -> list[Path]:
        if self.kind == "mc":
            return [self.path, task_files.MCSpec(self.path).data]
        return task_files.files_of(self.path)

    def data_sha256(self) -> str:
        digest = hashlib.sha256()
        for file in self.data_files():
            digest.update(file.read_bytes())
        return digest.hexdigest()


def parse_tasks(text: str, flag: str = "--tasks") -> list[Task]:
    """`kind:PATH,kind@N:PATH,...` (`@N`: that task's first N items or characters); unknown
    kinds, missing files and bad specs fail here."""
    parsed = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        head, _, path = item.partition(":")
        kind, _, limit = head.partition("@")
        if kind not in TASK_HELP or not path:
            raise UserError(f"{flag}: unknown task {item!r} (known: {', '.join(k + ':PATH' for k in TASK_HELP)})")
        if limit and not (limit.isdigit() and int(limit) > 0):
            raise UserError(f"{flag} {item}: the limit after '@' must be a positive integer")
        if not Path(path).exists():
            raise UserError(f"{flag} {item}: {path} does not exist")
        task = Task(kind, Path(path), int(limit) if limit else None)
        if kind == "mc":
            task_files.MCSpec(task.path)  # a bad spec fails before any model loads
        parsed.append(task)
    if not parsed:
        raise UserError(f"{flag}: no tasks given")
    return parsed


def _answer_items(path: Path, limit: int | None) -> list[tuple[str, str, str]]:
    """(question, user message, gold long answer) of PubMedQA records."""
    items = []
    for record in task_files.read_records(path, limit):
        question, contexts, long_answer = record.need("QUESTION", "CONTEXTS", "LONG_ANSWER")
        user = "Abstract: {}\n\nQuestion: {}\nAnswer briefly.".format("\n".join(contexts), question)
        items.append((question, user, long_answer))
    return items


def _answers(backend, tokenizer: Tokenizer, items, max_new_tokens: int = 96) -> dict:
    """Greedy answers to each prompt (the model's chat template), scored offline."""
    from data_pipelines.chat import render_prompt
    from shakti_jax.evaluation import answer_metrics
    from shakti_jax.evaluation.embedding import default_encoder

    questions, golds = [q for q, _, _ in items], [g for _, _, g in items]
    prompts = [render_prompt(tokenizer, [("user", user)]) for _, user, _ in items]
    generated = backend.generate(prompts, max_new_tokens, tokenizer.stop_ids)
    answers = [tokenizer.decode(ids).strip() for ids in generated]
    encoder = default_encoder()
    relevancy = answer_metrics.embedding_relevancy(encoder, questions, answers)
    similarity = answer_metrics.answer_similarity(encoder, answers, golds)
    rouge = answer_metrics.rouge_l(answers, golds)
    return {"embedding_relevancy": relevancy["mean"], "answer_similarity": similarity["mean"],
            "rougeL_f": rouge["f"], "answer_tokens_mean": sum(map(len, generated)) / len(generated),
            "n": len(items), "samples": [{"question": q, "answer": a, "gold": g}
                                         for q, a, g in list(zip(questions, answers, golds))[:3]]}


Runner = Callable[..., dict]  # (backend, tokenizer, max_len) -> metrics


def prepare(task: Task, limit: int | None = None) -> Runner:
    """Read and check the task's data now (a bad record fails here, before any model loads);
    the returned function scores it on a backend. `limit` (unless the task has its own):
    perplexity's first N characters, otherwise the first N items of each file."""
    kind, path, limit = task.kind, task.path, task.limit if task.limit is not None else limit
    if kind == "perplexity":
        texts = [path.read_text(encoding="utf-8")[:limit]]
        return lambda backend, tokenizer, max_len: perplexity(backend, tokenizer, texts, max_len)
    if kind == "crows_pairs":
        pairs = task_files.read_crows_pairs(path, limit)
        return lambda backend, tokenizer, max_len: tasks.crows_pairs(backend, tokenizer, pairs)
    if kind == "toxigen":
        rows = task_files.read_labelled_texts(path, limit)
        return lambda backend, tokenizer, max_len: tasks.toxigen(backend, tokenizer, rows)
    if kind == "bbq":
        questions = task_files.read_bbq(path, limit)
        return lambda backend, tokenizer, max_len: tasks.bbq(backend, tokenizer, questions)
    if kind == "pubmedqa_answers":
        items = _answer_items(path, limit)
        return lambda backend, tokenizer, max_len: _answers(backend, tokenizer, items)
    if kind == "mc":
        spec = task_files.MCSpec(path)
        mc_items, delimiter = spec.read(limit), spec.delimiter
    else:
        mc_items, delimiter = task_files.read_format(kind, path, limit), " "
    return lambda backend, tokenizer, max_len: tasks.multiple_choice(backend, tokenizer, mc_items, delimiter)


def run_tasks(task_list: Sequence[Task], backend, tokenizer: Tokenizer, *, max_len: int,
              limit: int | None = None) -> dict[str, dict]:
    """Every task's metrics on one backend."""
    runners = {task.name: prepare(task, limit) for task in task_list}
    return {name: run(backend, tokenizer, max_len) for name, run in runners.items()}
