"""Task items from local files, in the formats lm-evaluation-harness reads them.

Every reader returns what `tasks.py` scores and names the file and line of a bad record:
CrowS-Pairs CSV, labelled texts (ToxiGen / implicit hate), BBQ JSONL, PubMedQA, the lm-eval
formats of ARC, PIQA, HellaSwag, MMLU and WinoGrande, and a generic multiple-choice spec
(a YAML/JSON file: data file, jinja prompt, choices and gold as jinja expressions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import jinja2
import yaml

from data_pipelines.errors import DataError
from shakti_jax.evaluation.records import Record, files_of, read_records
from shakti_jax.evaluation.tasks import BBQItem, MCItem

# lm-eval's `bbq` task offers every one of these (HELM's list) in place of the item's own
UNKNOWN_ANSWERS = ("Unknown", "Cannot answer", "Can't be determined", "Cannot be determined", "Can't answer",
                   "Not known", "Not enough info", "Not enough information", "Not answerable", "Undetermined")
PUBMEDQA_CHOICES = ("yes", "no", "maybe")
HATE_LABELS = {"hate": True, "neutral": False, "1": True, "0": False, "true": True, "false": False,
               "implicit_hate": True, "explicit_hate": True, "not_hate": False}


def read_crows_pairs(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(sent_more, sent_less) rows of a CrowS-Pairs CSV."""
    rows = read_records(path, limit)
    if rows and not {"sent_more", "sent_less"} <= set(rows[0]):
        missing = {"sent_more", "sent_less"} - set(rows[0])
        raise DataError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
    pairs = []
    for row in rows:
        more, less = row.need("sent_more", "sent_less")
        if not more or not less:
            raise DataError(f"{row.where}: empty sent_more or sent_less")
        pairs.append((more, less))
    return pairs


def read_labelled_texts(path: Path, limit: int | None = None) -> list[tuple[str, bool]]:
    """(text, hateful) from JSONL/CSV with a `text` (or `post`) and a `label` (or `class`):
    hate / neutral, 1 / 0, true / false, or implicit-hate's implicit_hate / explicit_hate / not_hate."""
    rows = []
    for record in read_records(path, limit):
        text = record.get("text", record.get("post"))
        label = record.get("label", record.get("class"))
        if text is None or label is None:
            raise DataError(f"{record.where}: needs 'text' (or 'post') and 'label' (or 'class')")
        hateful = HATE_LABELS.get(str(label).strip().lower())
        if hateful is None:
            raise DataError(f"{record.where}: label {label!r} is not one of {', '.join(HATE_LABELS)}")
        rows.append((text, hateful))
    return rows


def _groups(answer_info: list[str]) -> list[str]:
    """An answer's group names, lower case, as lm-eval's `_process_groups_in_answers` splits them."""
    text = "_".join(answer_info)
    for old, new in (("M-", "M_"), ("F-", "F_"), ("lowSES-", "lowSES_"), ("highSES-", "highSES_")):
        text = text.replace(old, new)
    for old, new in (("lowSES", "low SES"), ("highSES", "high SES"), ("nonObese", "non Obese"),
                     ("nonDisabled", "non Disabled"), ("nonTrans", "non Trans")):
        text = text.replace(old, new)
    if "woman" in text:
        text = text.replace("woman", "F_woman")
    elif "man" in text:
        text = text.replace("man", "M_man")
    return text.replace("girl", "F_girl").replace("boy", "M_boy").lower().split("_")


def bbq_item(record: Record) -> BBQItem:
    """One BBQ record as lm-eval's `bbq` task builds it: prompt "{context}\\n\\nQ: {question}\\nA:",
    the two named answers then all `UNKNOWN_ANSWERS`; the biased answers are the stereotyped
    group's for negative questions and the other group's for non-negative ones."""
    context, question, label, condition, polarity, info, meta, category = record.need(
        "context", "question", "label", "context_condition", "question_polarity", "answer_info",
        "additional_metadata", "category")
    answers = record.need("ans0", "ans1", "ans2")
    unknown = [a for a in answers if a in UNKNOWN_ANSWERS]
    if len(unknown) != 1:
        raise DataError(f"{record.where}: expected exactly one 'unknown' answer among ans0..ans2")
    choices = [a for a in answers if a != unknown[0]] + list(UNKNOWN_ANSWERS)
    stereotyped = {g.lower() for g in meta.get("stereotyped_groups", [])}
    biased_texts = set()
    for key, answer in zip(("ans0", "ans1", "ans2"), answers):
        groups = _groups(info[key]) if any(info[key]) else ["latino"] if "Latina" in answer else []
        if polarity == "neg" and not stereotyped.isdisjoint(groups):
            biased_texts.add(answer)
        elif polarity == "nonneg" and groups and groups[-1] != "unknown" and stereotyped.isdisjoint(groups):
            biased_texts.add(answer)
    target = answers[int(label)]
    golds = (range(2, len(choices)) if target in UNKNOWN_ANSWERS else [choices.index(target)])
    return BBQItem(MCItem.of(f"{context}\n\nQ: {question}\nA:", choices, golds),
                   ambiguous=condition == "ambig",
                   biased=frozenset(i for i, c in enumerate(choices) if c in biased_texts),
                   unknown=frozenset(range(2, len(choices))), category=category)


def read_bbq(path: Path, limit: int | None = None) -> list[BBQItem]:
    """BBQ items of a JSONL file, or of every file of a directory (`limit` per file)."""
    return [bbq_item(r) for file in files_of(path) for r in read_records(file, limit)]


def pubmedqa_item(record: Record) -> MCItem:
    """lm-eval's `pubmedqa`: "Abstract: {contexts}\\nQuestion: {q}\\nAnswer:", yes / no / maybe."""
    question, contexts, decision = record.need("QUESTION", "CONTEXTS", "final_decision")
    if decision not in PUBMEDQA_CHOICES:
        raise DataError(f"{record.where}: final_decision {decision!r} is not yes / no / maybe")
    text = "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(contexts), question)
    return MCItem.of(text, PUBMEDQA_CHOICES, PUBMEDQA_CHOICES.index(decision))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def arc_item(r: Record) -> MCItem:
    question, choices, key = r.need("question", "choices", "answerKey")
    return MCItem.of(f"Question: {question}\nAnswer:", choices["text"], list(choices["label"]).index(key))


def piqa_item(r: Record) -> MCItem:
    goal, sol1, sol2, label = r.need("goal", "sol1", "sol2", "label")
    return MCItem.of(f"Question: {goal}\nAnswer:", (sol1, sol2), int(label))


def hellaswag_item(r: Record) -> MCItem:
    activity, ctx_a, ctx_b, endings, label = r.need("activity_label", "ctx_a", "ctx_b", "endings", "label")
    query = _hellaswag_clean(f"{activity}: {ctx_a} {ctx_b.capitalize()}")
    return MCItem.of(query, [_hellaswag_clean(e) for e in endings], int(label))


def mmlu_item(r: Record) -> MCItem:
    question, choices, answer = r.need("question", "choices", "answer")
    subject = str(r.get("subject", "")).replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
    return MCItem.of(f"{head}{question.strip()}{options}\nAnswer:", ("A", "B", "C", "D"), int(answer))


def winogrande_item(r: Record) -> MCItem:
    """Partial scoring: the sentence up to the blank filled with each option is the context,
    the rest of the sentence is the one continuation."""
    sentence, option1, option2, answer = r.need("sentence", "option1", "option2", "answer")
    blank = sentence.find("_")
    if blank < 0:
        raise DataError(f"{r.where}: the sentence has no '_' blank")
    contexts = tuple(sentence[:blank] + option for option in (option1, option2))
    return MCItem(contexts, (sentence[blank + 1:].strip(),), frozenset([int(answer) - 1]))


MC_FORMATS: dict[str, Callable[[Record], MCItem]] = {
    "pubmedqa": pubmedqa_item, "arc": arc_item, "piqa": piqa_item, "hellaswag": hellaswag_item,
    "mmlu": mmlu_item, "winogrande": winogrande_item,
}


def read_format(kind: str, path: Path, limit: int | None = None) -> list[MCItem]:
    """Items of one of `MC_FORMATS` from a file (or every file of a directory)."""
    make = MC_FORMATS[kind]
    items = []
    for file in files_of(path):
        for record in read_records(file, limit):
            try:
                items.append(make(record))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                if isinstance(err, DataError):
                    raise
                raise DataError(f"{record.where}: not a {kind} record ({type(err).__name__}: {err})") from None
    return items


SPEC_KEYS = {"data", "prompt", "choices", "gold", "delimiter", "fields"}


class MCSpec:
    """A multiple-choice task without code, from a YAML/JSON file:

        data: questions.jsonl          # .jsonl / .json / .csv, relative to the spec
        prompt: "Question: {{ q }}\\nAnswer:"   # jinja over the record's fields
        choices: "[opt_a, opt_b]"      # a jinja expression, or a literal list
        gold: "label"                  # a jinja expression: an index, or the right choice's text
        delimiter: " "                 # between prompt and choice (lm-eval's target_delimiter)
        fields: {q: Question}          # optional: name in the templates -> column of the file
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            spec = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise DataError(f"{self.path}: unreadable task spec ({err})") from None
        if not isinstance(spec, dict):
            raise DataError(f"{self.path}: a task spec is a mapping of {', '.join(sorted(SPEC_KEYS))}")
        unknown = set(spec) - SPEC_KEYS
        missing = {"data", "prompt", "choices", "gold"} - set(spec)
        if unknown or missing:
            raise DataError(f"{self.path}: " + "; ".join(
                [f"unknown key(s) {', '.join(sorted(unknown))}"] * bool(unknown)
                + [f"missing key(s) {', '.join(sorted(missing))}"] * bool(missing)))
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            self.prompt = env.from_string(spec["prompt"])
            self.choices = (spec["choices"] if isinstance(spec["choices"], list)
                            else env.compile_expression(spec["choices"]))
            self.gold = env.compile_expression(str(spec["gold"]))
        except jinja2.TemplateSyntaxError as err:
            raise DataError(f"{self.path}: bad template or expression ({err})") from None
        self.data = (self.path.parent / spec["data"]).resolve()
        self.delimiter = spec.get("delimiter", " ")
        self.fields = dict(spec.get("fields") or {})

    def item(self, record: Record) -> MCItem:
        names = {**record, **{name: record.get(column) for name, column in self.fields.items()}}
        try:
            context = self.prompt.render(names)
            choices = self.choices if isinstance(self.choices, list) else self.choices(**names)
            gold = self.gold(**names)
        except jinja2.UndefinedError as err:
            raise DataError(f"{record.where}: {err} (spec {self.path})") from None
        choices = [str(c) for c in choices]
        if isinstance(gold, str) and not gold.strip().lstrip("-").isdigit():
            if gold not in choices:
                raise DataError(f"{record.where}: gold {gold!r} is not one of the choices {choices}")
            gold = choices.index(gold)
        gold = int(gold)
        if not 0 <= gold < len(choices):
            raise DataError(f"{record.where}: gold index {gold} outside {len(choices)} choices")
        return MCItem.of(context, choices, gold)

    def read(self, limit: int | None = None) -> list[MCItem]:
        return [self.item(r) for r in read_records(self.data, limit)]
