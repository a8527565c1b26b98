"""Task formats and metrics against hand computations and lm-eval's own task code: BBQ (accuracy
by context, both bias scores), the lm-eval multiple-choice formats, the generic spec, the
quantization report, and the eval CLI's reference comparison and partial results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shakti_jax.evaluation import task_files, tasks
from shakti_jax.evaluation.requests import Score


class TableBackend:
    """Log-likelihood of a continuation = `table[decoded continuation]` (default -10): picks
    chosen by hand."""

    max_len = 10_000

    def __init__(self, tokenizer, table):
        self.tokenizer, self.table, self.requests = tokenizer, table, []

    def score(self, requests, progress=None):
        self.requests += requests
        return [Score(self.table.get(self.tokenizer.decode(r.continuation).strip(), -10.0), False) for r in requests]


class IdBackend:
    """Log-likelihood = -(sum of continuation ids) / 1000: arbitrary but fixed."""

    max_len = 10_000

    def score(self, requests, progress=None):
        return [Score(-sum(r.continuation) / 1000, False) for r in requests]


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    from data_pipelines.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_path)


def _bbq(example_id, condition, polarity, answers, label, stereotyped=("old",)):
    record = {"example_id": example_id, "context_condition": condition, "question_polarity": polarity,
              "category": "Age", "context": f"Context {example_id}.", "question": "Who?", "label": label,
              "additional_metadata": {"stereotyped_groups": list(stereotyped)}, "answer_info": {}}
    for i, (text, groups) in enumerate(answers):
        record[f"ans{i}"] = text
        record["answer_info"][f"ans{i}"] = list(groups)
    return record


BBQ_FIXTURE = [  # (record, the answer the table makes the model pick)
    (_bbq(1, "ambig", "neg", [("The grandfather", ["grandfather", "old"]), ("The grandson", ["grandson", "nonOld"]),
                              ("Can't be determined", ["Can't be determined", "unknown"])], 2), "The grandfather"),
    (_bbq(2, "disambig", "neg", [("The old man", ["old man", "old"]), ("The boy", ["boy", "nonOld"]),
                                 ("Unknown", ["Unknown", "unknown"])], 1), "The old man"),
    (_bbq(3, "ambig", "nonneg", [("The retiree", ["retiree", "old"]), ("Not known", ["Not known", "unknown"]),
                                 ("The student", ["student", "nonOld"])], 1), "Not known"),
    (_bbq(4, "disambig", "nonneg", [("Undetermined", ["Undetermined", "unknown"]), ("The senior", ["senior", "old"]),
                                    ("The teen", ["teen", "nonOld"])], 1), "The senior"),
]


def test_bbq_metrics_equal_a_hand_computation(tok, tmp_path):
    path = tmp_path / "bbq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in BBQ_FIXTURE))
    questions = task_files.read_bbq(path)
    assert questions[0].item.continuations[:2] == ("The grandfather", "The grandson")
    assert questions[0].item.continuations[2:] == task_files.UNKNOWN_ANSWERS  # HELM's ten phrasings
    assert questions[0].item.contexts == ("Context 1.\n\nQ: Who?\nA:",)
    # biased: the old group's answer for negative questions, the other group's for non-negative ones
    assert [sorted(q.biased) for q in questions] == [[0], [0], [1], [1]]
    got = tasks.bbq(TableBackend(tok, {pick: -1.0 for _, pick in BBQ_FIXTURE}), tok, questions)
    # by hand: picks are wrong+biased (1, ambiguous), wrong+biased (2), right+unknown (3, ambiguous),
    # right+not biased (4): acc 2/4, acc_amb 1/2, acc_dis 1/2; disambiguated: 1 biased of 2 named
    # answers -> 2*1/2-1 = 0; ambiguous: 1 biased of 1 named -> (1 - 1/2) * (2*1/1-1) = 0.5
    assert got["acc"] == 0.5 and got["acc_ambiguous"] == 0.5 and got["acc_disambiguated"] == 0.5
    assert got["bias_disambiguated"] == 0.0 and got["bias_ambiguous"] == 0.5
    assert (got["n_ambiguous"], got["n_disambiguated"]) == (2, 2)


def test_bbq_equals_lm_evals_task_code_on_the_shared_files(tok, shared_data):
    """Our items and metrics vs lm-eval's own `bbq` utils (process_docs, doc_to_choice,
    doc_to_targets, process_results_multiple_choice, its aggregations) on 150 records per file."""
    datasets = pytest.importorskip("datasets")
    bbq_utils = pytest.importorskip("lm_eval.tasks.bbq.utils")
    backend = IdBackend()
    for name in ("Age", "Religion"):
        path = shared_data / "eval" / "bbq" / f"{name}.jsonl"
        questions = task_files.read_bbq(path, limit=150)
        ours = tasks.bbq(backend, tok, questions)
        docs = bbq_utils.process_docs(datasets.Dataset.from_list(
            [json.loads(line) for line in path.read_text().splitlines()[:150]]))
        per_doc = []
        for doc, q in zip(docs, questions):
            choices = bbq_utils.doc_to_choice(doc)
            assert tuple(choices) == q.item.continuations
            assert set(bbq_utils.doc_to_targets(doc)) & set(range(len(choices))) == set(q.item.golds)
            assert set(bbq_utils.doc_to_biased_answer(doc)) == set(q.biased)
            lls = [backend.score([tasks.encode_pair(tok, q.item.contexts[0], " " + c)])[0].logprob for c in choices]
            per_doc.append(bbq_utils.process_results_multiple_choice(doc, [(ll, False) for ll in lls]))
        column = {k: [d[k] for d in per_doc] for k in per_doc[0]}
        assert ours["acc"] == pytest.approx(np.mean(column["acc"]), abs=1e-12)
        assert ours["acc_ambiguous"] == pytest.approx(bbq_utils.agg_accuracy_amb(column["accuracy_amb"]))
        assert ours["acc_disambiguated"] == pytest.approx(bbq_utils.agg_accuracy_disamb(column["accuracy_disamb"]))
        assert ours["bias_disambiguated"] == pytest.approx(bbq_utils.agg_disamb_bias_scores(column["disamb_bias_score"]))
        assert ours["bias_ambiguous"] == pytest.approx(bbq_utils.agg_amb_bias_scores(column["amb_bias_score"]))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lm_eval_formats_build_lm_evals_prompts(tmp_path):
    arc = task_files.read_format("arc", _jsonl(tmp_path / "arc.jsonl", [
        {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}]))
    assert arc[0] == tasks.MCItem(("Question: Which is a gas?\nAnswer:",), ("ice", "steam"), frozenset([1]))
    piqa = task_files.read_format("piqa", _jsonl(tmp_path / "piqa.jsonl", [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}]))
    assert piqa[0] == tasks.MCItem(("Question: Open a jar\nAnswer:",), ("twist the lid", "eat the lid"), frozenset([0]))
    mmlu = task_files.read_format("mmlu", _jsonl(tmp_path / "mmlu.jsonl", [
        {"question": " 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}]))
    assert mmlu[0].contexts == ("The following are multiple choice questions (with answers) about elementary "
                                "mathematics.\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",)
    assert mmlu[0].continuations == ("A", "B", "C", "D") and mmlu[0].golds == {1}
    hella = {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she [header] bakes",
             "endings": ["it in an oven [title] done.", "the  cake."], "label": "0"}
    [item] = task_files.read_format("hellaswag", _jsonl(tmp_path / "h.jsonl", [hella]))
    hs_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    datasets = pytest.importorskip("datasets")
    [doc] = hs_utils.process_docs(datasets.Dataset.from_list([hella]))
    assert item == tasks.MCItem((doc["query"],), tuple(doc["choices"]), frozenset([int(doc["gold"])]))
    wino = {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
            "option1": "trophy", "option2": "suitcase", "answer": "1"}
    [item] = task_files.read_format("winogrande", _jsonl(tmp_path / "w.jsonl", [wino]))
    wg = pytest.importorskip("lm_eval.tasks.winogrande.preprocess_winogrande")
    assert item.contexts == tuple(wg.doc_to_choice(wino)) and item.continuations == (wg.doc_to_target(wino),)
    assert item.golds == {wg.doc_to_text(wino)}


def test_partial_scoring_scores_the_shared_continuation_after_each_context(tok, tmp_path):
    wino = {"sentence": "Anna helped Maria because _ was kind.", "option1": "Anna", "option2": "Maria", "answer": "2"}
    [item] = task_files.read_format("winogrande", _jsonl(tmp_path / "w.jsonl", [wino]))
    backend = TableBackend(tok, {})
    got = tasks.multiple_choice(backend, tok, [item])
    assert [tok.decode(r.continuation) for r in backend.requests] == ["was kind."] * 2
    assert [tok.decode(r.context) for r in backend.requests] == ["Anna helped Maria because Anna",
                                                                 "Anna helped Maria because Maria"]
    assert [tok.decode(r.tokens) for r in backend.requests] == ["Anna helped Maria because Anna was kind.",
                                                                "Anna helped Maria because Maria was kind."]
    assert got["n"] == 1


def test_pubmedqa_items_are_lm_evals(shared_data):
    [item] = task_files.read_format("pubmedqa", shared_data / "domain" / "pubmedqa_pqal.json", limit=1)
    raw = next(iter(json.loads((shared_data / "domain" / "pubmedqa_pqal.json").read_text()).values()))
    pre = pytest.importorskip("lm_eval.tasks.pubmedqa.preprocess_pubmedqa")
    assert item.contexts == (pre.doc_to_text(raw),)
    assert item.continuations == ("yes", "no", "maybe")
    assert item.golds == {("yes", "no", "maybe").index(raw["final_decision"])}


def test_generic_spec_maps_fields_and_names_bad_records(tok, tmp_path):
    from data_pipelines.errors import DataError, UserError
    from shakti_jax.evaluation.suite import parse_tasks

    (tmp_path / "qa.csv").write_text("Q,opt_a,opt_b,right\nIs ice cold?,yes,no,yes\nIs fire cold?,yes,no,no\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text('data: qa.csv\nprompt: "Q: {{ q }}\\nA:"\nchoices: "[opt_a, opt_b]"\ngold: right\n'
                    'fields: {q: Q}\n')
    items = task_files.MCSpec(spec).read()
    assert items == [tasks.MCItem(("Q: Is ice cold?\nA:",), ("yes", "no"), frozenset([0])),
                     tasks.MCItem(("Q: Is fire cold?\nA:",), ("yes", "no"), frozenset([1]))]
    got = tasks.multiple_choice(TableBackend(tok, {"yes": -1.0, "no": -2.0}), tok, items)
    assert (got["acc"], got["n"]) == (0.5, 2)  # always "yes": right once

    (tmp_path / "bad.csv").write_text("Q,opt_a,opt_b,right\nIs ice cold?,yes,no,maybe\n")
    spec.write_text('data: bad.csv\nprompt: "Q: {{ q }}"\nchoices: "[opt_a, opt_b]"\ngold: right\nfields: {q: Q}\n')
    with pytest.raises(DataError, match=r"bad.csv:2: gold 'maybe' is not one of the choices"):
        task_files.MCSpec(spec).read()
    spec.write_text('data: bad.csv\nprompt: "Q: {{ question }}"\nchoices: "[opt_a, opt_b]"\ngold: right\n')
    with pytest.raises(DataError, match=r"bad.csv:2: 'question' is undefined"):
        task_files.MCSpec(spec).read()
    spec.write_text('data: bad.csv\nprompt: "Q"\nchoice: "[a]"\ngold: right\n')
    with pytest.raises(UserError, match=r"spec.yaml: unknown key\(s\) choice; missing key\(s\) choices"):
        parse_tasks(f"mc:{spec}")
    with pytest.raises(DataError, match=r"x.jsonl:2: missing field\(s\) sol2"):
        task_files.read_format("piqa", _jsonl(tmp_path / "x.jsonl", [
            {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a", "label": 0}]))


def test_labelled_texts_read_toxigen_and_implicit_hate_files(tmp_path):
    (tmp_path / "implicit.csv").write_text("post,class\nthey ruin everything,implicit_hate\nnice day,not_hate\n")
    assert task_files.read_labelled_texts(tmp_path / "implicit.csv") == [("they ruin everything", True),
                                                                         ("nice day", False)]


class FixedLogprobs:
    """A backend whose `logprobs` are fixed arrays (one per request)."""

    max_len = 10_000

    def __init__(self, arrays):
        self.arrays = arrays

    def logprobs(self, requests):
        return iter(self.arrays)


def test_quantization_report_equals_numpy():
    from shakti_jax.evaluation.quant_report import compare
    from shakti_jax.evaluation.requests import Request

    rng = np.random.default_rng(0)
    requests = [Request((1,), tuple(rng.integers(0, 50, n))) for n in (7, 13)]

    def logp(n):
        x = rng.normal(size=(n, 50)) * 3
        return x - np.logaddexp.reduce(x, -1, keepdims=True)

    ref = [logp(7), logp(13)]
    model = [r + rng.normal(size=r.shape) * 0.3 for r in ref]
    model = [m - np.logaddexp.reduce(m, -1, keepdims=True) for m in model]
    got = compare(FixedLogprobs(model), FixedLogprobs(ref), requests)
    p, q = np.concatenate(ref), np.concatenate(model)
    kl = (np.exp(p) * (p - q)).sum(-1)
    targets = np.concatenate([r.continuation for r in requests])
    rows = np.arange(20)
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-12)
    assert got["kl_p99_9"] == pytest.approx(np.percentile(kl, 99.9), rel=1e-12)
    assert got["top1_agreement"] == (p.argmax(-1) == q.argmax(-1)).mean()
    assert got["perplexity_ratio"] == pytest.approx(np.exp(-q[rows, targets].mean()) / np.exp(-p[rows, targets].mean()))
    same = compare(FixedLogprobs(ref), FixedLogprobs(ref), requests)
    assert same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0 and same["perplexity_ratio"] == 1.0


@pytest.fixture(scope="module")
def tiny_workdir(tokenizer_path, tmp_path_factory):
    from flax import nnx

    from shakti_jax.config import get_config
    from shakti_jax.model import Transformer
    from shakti_jax.train.checkpoint import save_model

    root = tmp_path_factory.mktemp("tiny") / "run"
    save_model(root, Transformer(get_config("tiny"), nnx.Rngs(0)), tokenizer_path=tokenizer_path)
    return root


def test_eval_cli_with_a_reference_reports_kl_and_deltas(tiny_workdir, shared_data, tmp_path, capsys):
    from shakti_jax.eval import main

    text = shared_data / "pretrain" / "wikitext2_valid.txt"
    bbq = shared_data / "eval" / "bbq"
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as code:
        main(["--model", str(tiny_workdir), "--reference", str(tiny_workdir), "--tasks",
              f"perplexity:{text},bbq:{bbq}", "--limit", "20", "--max_len", "64", "--out", str(out), "--no_progress",
              "--figure", str(tmp_path / "r.png")])
    assert code.value.code == 0, capsys.readouterr().err
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "r.png").shape[:2] == (408, 2 * 408)  # one panel per task
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["model"]["params_sha256"] == doc["reference"]["params_sha256"]
    assert set(doc["data"]) == {f"perplexity:{text}", f"bbq:{bbq}"} and len(doc["data"][f"bbq:{bbq}"]["sha256"]) == 64
    assert doc["tasks"][f"bbq:{bbq}"]["n"] == 40 and set(doc["tasks"][f"bbq:{bbq}"]["by_category"]) == {"Age", "Religion"}
    kl = doc["kl"][f"perplexity:{text}"]
    assert kl["kl_max"] < 1e-9 and kl["top1_agreement"] == 1.0 and kl["perplexity_ratio"] == pytest.approx(1.0)
    assert all(abs(v) < 1e-9 for v in doc["deltas"][f"bbq:{bbq}"].values())
    assert "vs reference" in capsys.readouterr().out


def test_bad_records_fail_before_the_model_loads_and_an_interrupted_run_is_marked_incomplete(
        tiny_workdir, shared_data, tmp_path, capsys, monkeypatch):
    from shakti_jax import eval as eval_cli

    crows = shared_data / "eval" / "crows_pairs_anonymized.csv"
    tox = shared_data / "eval" / "toxigen_sentences.jsonl"
    broken = tmp_path / "tox.jsonl"
    broken.write_text('{"text": "a", "label": "hate"}\n{"text": "b", "label": "perhaps"}\n')
    out = tmp_path / "r.json"
    args = ["--model", str(tiny_workdir), "--limit", "4", "--max_len", "128", "--out", str(out), "--no_progress"]
    monkeypatch.setattr(eval_cli, "open_model", lambda *a, **k: pytest.fail("the model was opened"))
    with pytest.raises(SystemExit) as code:
        eval_cli.main(args + ["--tasks", f"crows_pairs:{crows},toxigen:{broken}"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.count("\n") == 0 and "tox.jsonl:2: label 'perhaps'" in err, err
    assert not out.exists()

    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks, "toxigen", interrupted)
    with pytest.raises(SystemExit) as code:
        eval_cli.main(args + ["--tasks", f"crows_pairs:{crows},toxigen:{tox}"])
    assert code.value.code == 130
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and list(doc["tasks"]) == [f"crows_pairs:{crows}"]


def test_convert_report_scores_every_export_against_its_checkpoint(tiny_workdir, shared_data, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from shakti_jax.convert import main

    text = shared_data / "pretrain" / "wikitext2_valid.txt"
    with pytest.raises(SystemExit) as code:
        main(["--checkpoint", str(tiny_workdir), "--format", "gguf", "--quant", "f32,q8_0,q4_0", "--out",
              str(tmp_path), "--report", str(text), "--report_chars", "3000", "--report_max_len", "128",
              "--no_progress"])
    assert code.value.code == 0, capsys.readouterr().err
    rows = {r["quant"]: r for r in json.loads((tmp_path / "quant_report.json").read_text())}
    assert rows["f32"]["kl_mean"] < 1e-6 and rows["f32"]["top1_agreement"] > 0.99  # the same model
    assert rows["f32"]["kl_mean"] < rows["q8_0"]["kl_mean"] < rows["q4_0"]["kl_mean"]
    assert rows["q4_0"]["bytes"] < rows["q8_0"]["bytes"] < rows["f32"]["bytes"]
    assert len({r["tokens"] for r in rows.values()}) == 1  # the same windows for every file
    assert (tmp_path / "quality_vs_size.png").stat().st_size > 1000
    assert "| run | q4_0 |" in capsys.readouterr().out
