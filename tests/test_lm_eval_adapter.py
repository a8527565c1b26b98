"""lm-evaluation-harness through our backends: the requests lm-eval builds are token-identical to
ours, and its metrics equal ours, on local task YAMLs (multiple choice, rolling perplexity, and
built-in tasks reused with local data) run offline on SmolLM2."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from shakti_jax.evaluation.lm_eval_adapter import ShaktiLM, evaluate  # noqa: E402
from shakti_jax.evaluation.perplexity import perplexity  # noqa: E402
from shakti_jax.evaluation.requests import Request, Score  # noqa: E402
from shakti_jax.evaluation.tasks import TOXIGEN_PROMPT, encode_pair, multiple_choice, toxigen  # noqa: E402

BUILTIN_TASKS = Path(lm_eval.__file__).parent / "tasks"


class Memo:
    """A backend that scores each distinct request once and records what every call asked for,
    so lm-eval's run and ours score the same requests once and can be compared token by token."""

    def __init__(self, backend):
        self.backend, self.max_len, self.scores, self.calls = backend, backend.max_len, {}, []

    def score(self, requests):
        self.calls.append(list(requests))
        new = list(dict.fromkeys(r for r in requests if r not in self.scores))
        self.scores.update(zip(new, self.backend.score(new)))
        return [self.scores[r] for r in requests]


class Recorder:
    """Log-likelihood -(sum of continuation ids); records requests; generates "yes. no"."""
    max_len = 10_000

    def __init__(self):
        self.requests, self.generated = [], []

    def score(self, requests):
        self.requests += requests
        return [Score(-float(sum(r.continuation)), False) for r in requests]

    def generate(self, prompts, max_new_tokens, stop_ids):
        self.generated.append((prompts, max_new_tokens, stop_ids))
        return [self.tokenizer.encode("yes. no") for _ in prompts]


@pytest.fixture(autouse=True, scope="module")
def restore_hf_environment():
    """`evaluate` sets HF_* variables for the process; put them back after this module."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def smol(smollm):
    """SmolLM2 opened through the registered `shakti` model's arg string, behind a Memo; 64-token
    windows keep it fast on a CPU (requests are compared whole, before the backend cuts them)."""
    shakti = lm_eval.api.registry.get_model("shakti")
    adapter = shakti.create_from_arg_string(f"model={smollm},max_len=64,batch_size=16")
    assert isinstance(adapter, ShaktiLM) and adapter.max_len == 64
    return Memo(adapter.model), adapter.tokenizer


def write_task(folder: Path, name: str, rows: list[dict], **config) -> None:
    """A task YAML reading `rows` from a local JSONL (test split)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {"task": name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(data)}},
              "training_split": None, "validation_split": None, "test_split": "test", **config}
    (folder / f"{name}.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML


def one_call(memo: Memo, run) -> tuple[object, list[Request]]:
    """`run()` and the requests of the one backend call it makes."""
    before = len(memo.calls)
    result = run()
    assert len(memo.calls) == before + 1  # everything scored in one call
    return result, memo.calls[-1]


def run_lm_eval(memo: Memo, tok, folder: Path, task: str, limit: int | None = None):
    """lm-eval's metrics of `task` (a YAML in `folder`) and the requests it scored."""
    results, requests = one_call(memo, lambda: evaluate(memo, tok, [task], folder, limit,
                                                        builtin_tasks=False))
    return results[task], requests


def test_requests_are_encode_pairs_with_lm_evals_bos_handling(tokenizer_path):
    """A BOS-adding tokenizer: lm-eval's loglikelihood requests (empty and trailing-space
    contexts) are our encode_pair's; generation delegates to the backend or says why not."""
    from data_pipelines.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    assert tok.add_bos
    backend = Recorder()
    backend.tokenizer = tok
    adapter = ShaktiLM(backend, tok)
    pairs = [("", "A whole sentence."), ("Question: 2+2? Answer: ", "four"), ("Q", " a b")]
    got = adapter.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    assert backend.requests == [encode_pair(tok, *pair) for pair in pairs]
    assert backend.requests[0].context == (tok.bos_id,) and backend.requests[1].context[0] == tok.bos_id
    assert got == [(-float(sum(r.continuation)), False) for r in backend.requests]

    requests = [Instance("generate_until", {}, ("Hi", {"until": "\n"}), 0),
                Instance("generate_until", {}, ("Yo", {"until": ["."], "max_gen_toks": 5}), 1)]
    assert adapter.generate_until(requests) == ["yes. no", "yes"]  # each cut at its own `until`
    assert backend.generated == [([tok.encode("Hi", add_bos=True)], 256, tok.stop_ids),
                                 ([tok.encode("Yo", add_bos=True)], 5, tok.stop_ids)]
    with pytest.raises(NotImplementedError, match="Memo only scores log-likelihoods: generate_until tasks need a backend with generate"):
        ShaktiLM(Memo(backend), tok).generate_until(requests)


def test_multiple_choice_task_equals_ours(smol, shared_data, tmp_path):
    """lm-eval's built-in ToxiGen YAML on local rows: the same requests as our `toxigen`, the
    same acc and acc_norm."""
    memo, tok = smol
    lines = (shared_data / "eval" / "toxigen_sentences.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:40]]  # 25 hate, 15 neutral
    rows = [{"text": r["text"], "label": int(r["label"] == "hate")} for r in rows]
    write_task(tmp_path, "toxigen_local", rows, include=str(BUILTIN_TASKS / "toxigen" / "toxigen.yaml"),
               doc_to_target="label")
    theirs, their_requests = run_lm_eval(memo, tok, tmp_path, "toxigen_local")
    labelled = [(r["text"], r["label"] == 1) for r in rows]
    ours, our_requests = one_call(memo, lambda: toxigen(memo, tok, labelled))
    assert collections.Counter(their_requests) == collections.Counter(our_requests)
    assert len(our_requests) == 80 and their_requests[0].context == tuple(
        tok.encode(TOXIGEN_PROMPT.format(text=rows[0]["text"])))  # SmolLM2 adds no BOS
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    print(f"toxigen x{len(rows)}: acc {ours['acc']:.3f} acc_norm {ours['acc_norm']:.3f}")


def test_rolling_loglikelihood_task_equals_our_perplexity(smol, shared_data, tmp_path):
    """Paragraphs of WikiText-2 as a loglikelihood_rolling task: lm-eval's windows are ours
    and word/byte perplexity and bits per byte equal `perplexity()` to 1e-9."""
    memo, tok = smol
    lines = (shared_data / "pretrain" / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines()
    # stripped: lm-eval counts words as len(re.split(r"\s+", text)), one more per edge space
    texts = [line.strip() for line in lines if len(line) > 300][:4]
    write_task(tmp_path, "wiki_local", [{"text": t} for t in texts], output_type="loglikelihood_rolling",
               doc_to_text="", doc_to_target="text",
               metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])
    theirs, their_requests = run_lm_eval(memo, tok, tmp_path, "wiki_local")
    ours, our_requests = one_call(memo, lambda: perplexity(memo, tok, texts, memo.max_len))
    assert collections.Counter(their_requests) == collections.Counter(our_requests)
    assert len(our_requests) >= 2 * len(texts)  # several windows per text
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs[f"{metric},none"] == pytest.approx(ours[metric], rel=1e-9, abs=0)
    print(f"wikitext x{len(texts)}: bits_per_byte {ours['bits_per_byte']:.4f}, "
          f"word_perplexity {ours['word_perplexity']:.2f}")


def test_builtin_pubmedqa_on_local_data_equals_ours(smol, shared_data, tmp_path):
    """lm-eval's own pubmedqa YAML (its doc_to_text function) over local PubMedQA items."""
    memo, tok = smol
    items = list(json.loads((shared_data / "domain" / "pubmedqa_pqal.json").read_text()).values())[:20]
    rows = [{k: item[k] for k in ("QUESTION", "CONTEXTS", "final_decision")} for item in items]
    write_task(tmp_path, "pubmedqa_local", rows, include=str(BUILTIN_TASKS / "pubmedqa" / "pubmedqa.yaml"))
    theirs, their_requests = run_lm_eval(memo, tok, tmp_path, "pubmedqa_local", limit=16)
    choices = ("yes", "no", "maybe")
    ours_items = [("Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(r["CONTEXTS"]), r["QUESTION"]),
                   choices, choices.index(r["final_decision"])) for r in rows[:16]]
    ours, our_requests = one_call(memo, lambda: multiple_choice(memo, tok, ours_items))
    assert collections.Counter(their_requests) == collections.Counter(our_requests)
    assert 0 <= theirs["acc,none"] == ours["acc"] <= 1
    print(f"pubmedqa x16 (of 20, limit=16): acc {ours['acc']:.3f}")
