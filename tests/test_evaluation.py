"""The request interface and its backends: rolling windows as lm-eval builds them, the JAX
backend against a plain forward pass, and JAX vs llama.cpp on the same SmolLM2 requests."""

from __future__ import annotations

import numpy as np
import pytest

from shakti_jax.evaluation.backends import JaxBackend, LlamaCppBackend
from shakti_jax.evaluation.perplexity import perplexity, perplexity_requests
from shakti_jax.evaluation.requests import Request, fit, rolling_requests


def test_rolling_windows_score_every_token_once_with_lm_evals_contexts():
    windows = list(rolling_requests(list(range(10, 20)), prefix_id=1, max_len=4))
    assert windows == [Request((1,), (10, 11, 12, 13)), Request((13,), (14, 15, 16, 17)),
                       Request((15, 16, 17), (18, 19))]
    ids = list(range(100, 1100))  # distinct, so a token's value is its position + 100
    for max_len in (1, 7, 64, 2000):
        windows = list(rolling_requests(ids, 1, max_len))
        assert [t for w in windows for t in w.continuation] == ids
        assert windows[0].context == (1,)
        for w in windows:
            assert len(w.tokens) - 1 <= max_len
            first = w.continuation[0] - 100
            if w is not windows[0]:  # the tokens right before, as many as fit
                assert w.context == tuple(ids[first - len(w.context):first])
                assert len(w.context) == min(max_len - len(w.continuation) + 1, first)


def test_fit_cuts_the_context_from_the_left():
    assert fit(Request((1, 2, 3, 4), (5, 6)), 4) == ([2, 3, 4, 5], 2)
    assert fit(Request((1,), (5, 6)), 4) == ([1, 5], 2)
    with pytest.raises(ValueError, match="does not fit"):
        fit(Request((1,), (5, 6, 7)), 2)


def test_jax_backend_equals_a_plain_forward_pass():
    """Sorted, bucketed, padded and batched scoring gives each request's own log-likelihood."""
    import jax.numpy as jnp

    from shakti_jax.generate import random_model

    model_def, params = random_model("tiny", 0)
    rng = np.random.default_rng(1)
    requests = [Request(tuple(rng.integers(4, 500, rng.integers(1, 40))), tuple(rng.integers(4, 500, rng.integers(1, 9))))
                for _ in range(11)]  # 11: a partial last batch
    scores = JaxBackend(model_def, params, batch_size=4).score(requests)
    for request, score in zip(requests, scores):
        tokens = list(request.tokens)
        logits = np.asarray(model_def.apply(params, jnp.asarray([tokens[:-1]])), np.float64)[0]
        logp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
        n = len(request.continuation)
        rows = np.arange(len(tokens) - 1 - n, len(tokens) - 1)
        expected = logp[rows, tokens[-n:]].sum()
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.greedy == bool(np.all(logits[rows].argmax(-1) == tokens[-n:]))


@pytest.mark.slow
def test_jax_and_llama_cpp_agree_per_request_on_smollm(smollm, shared_data, tmp_path):
    """The same requests (token ids) to the imported SmolLM2 in JAX and to its F32 GGUF export in
    llama.cpp: per-request log-likelihoods within 1e-3, the same greedy flags, the same perplexity."""
    pytest.importorskip("llama_cpp")
    from data_pipelines.tokenizer import Tokenizer
    from shakti_jax.convert import convert, plan
    from shakti_jax.train.checkpoint import load_params

    loaded = load_params(smollm)
    tok = Tokenizer.load(loaded.tokenizer_path)
    [result] = convert(plan([smollm], "gguf", ["f32"], tmp_path / "m.gguf"), "gguf", progress=False)
    text = (shared_data / "pretrain" / "wikitext2_valid.txt").read_text()[:3000]
    requests = perplexity_requests(tok, [text], 128)
    # choices of one context, apart in request order: llama.cpp evaluates their shared prefix once
    question = (tok.eos_id, *tok.encode(text[:200] + "\nQuestion: what is this text about? Answer:"))
    choices = [Request(question, tuple(tok.encode(c))) for c in (" a road", " a football season", " a song")]
    requests = choices[:1] + requests + choices[1:]
    requests += [Request((tok.eos_id, *tok.encode("The capital of France is")), tuple(tok.encode(" Paris"))),
                 Request((tok.eos_id, *tok.encode("The capital of France is")), tuple(tok.encode(" a banana")))]
    jax_backend = JaxBackend(loaded.model_def, loaded.params, max_len=128)
    llama_backend = LlamaCppBackend(result.job.out, max_len=128)
    evaluated, eval_tokens = [], llama_backend.llm.eval
    llama_backend.llm.eval = lambda tokens: (evaluated.append(len(tokens)), eval_tokens(tokens))
    ours, theirs = jax_backend.score(requests), llama_backend.score(requests)
    assert sum(evaluated) <= sum(len(r.tokens) - 1 for r in requests) - 2 * (len(question) - 1)
    for a, b in zip(ours, theirs):
        assert abs(a.logprob - b.logprob) < 1e-3, (a, b)
        assert a.greedy == b.greedy
    assert ours[-2].logprob > ours[-1].logprob  # Paris beats a banana
    ppl = {name: perplexity(backend, tok, [text], 128) for name, backend in
           (("jax", jax_backend), ("llama.cpp", llama_backend))}
    llama_backend.close()
    assert ppl["jax"]["bits_per_byte"] == pytest.approx(ppl["llama.cpp"]["bits_per_byte"], rel=1e-5)
    assert ppl["jax"]["tokens"] == len(tok.encode(text))


def test_eval_cli_scores_a_workdir_and_refuses_bad_requests(smollm, shared_data, tmp_path, capsys):
    import json

    from shakti_jax.eval import main

    text = shared_data / "pretrain" / "wikitext2_valid.txt"
    crows = shared_data / "eval" / "crows_pairs_anonymized.csv"
    tox = shared_data / "eval" / "toxigen_sentences.jsonl"
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as code:
        main(["--model", str(smollm), "--tasks", f"perplexity:{text},crows_pairs:{crows},toxigen:{tox}",
              "--limit", "48", "--max_len", "256", "--out", str(out)])
    assert code.value.code == 0
    results = json.loads(out.read_text())["tasks"]
    metrics = results[f"perplexity:{text}"]
    assert 1 < metrics["token_perplexity"] < 1000 and metrics["bytes"] == len(text.read_text()[:48].encode())
    assert results[f"crows_pairs:{crows}"]["n"] == 48 and 0.2 < results[f"crows_pairs:{crows}"]["pct_stereotype"] < 0.9
    assert results[f"toxigen:{tox}"]["n"] == 48 and {"acc", "acc_norm"} <= set(results[f"toxigen:{tox}"])
    assert "| perplexity:" in capsys.readouterr().out
    for args, message in ((["--model", str(smollm), "--tasks", "nosuch:x"], "unknown task 'nosuch:x'"),
                          (["--model", str(tmp_path / "nope"), "--tasks", f"perplexity:{text}"], "not a workdir"),
                          (["--model", str(smollm), "--tasks", f"perplexity:{tmp_path / 'no.txt'}"], "does not exist")):
        with pytest.raises(SystemExit) as code:
            main(args + ["--out", str(tmp_path / "bad.json")])
        err = capsys.readouterr().err.strip()
        assert code.value.code == 2 and err.count("\n") == 0 and message in err, err
        assert not (tmp_path / "bad.json").exists()


class FakeBackend:
    """Log-likelihood = -(sum of continuation ids) / 1000: any task's metrics can be computed
    by hand from the ids alone."""
    max_len = 10_000

    def score(self, requests):
        from shakti_jax.evaluation.requests import Score

        return [Score(-sum(r.continuation) / 1000, False) for r in requests]


def _ll(tok, text):
    return -sum(tok.encode(text)) / 1000


def test_encode_pair_is_lm_evals(tokenizer_path):
    from data_pipelines.tokenizer import Tokenizer
    from shakti_jax.evaluation.tasks import encode_pair

    tok = Tokenizer.load(tokenizer_path)
    r = encode_pair(tok, "Question: 2+2? Answer: ", "four")  # the trailing space moves over
    whole = tok.encode("Question: 2+2? Answer: four", add_bos=True)
    assert r.context + r.continuation == tuple(whole)
    assert r.context == tuple(tok.encode("Question: 2+2? Answer:", add_bos=True))
    assert encode_pair(tok, "", "A sentence.") == Request((tok.bos_id,), tuple(tok.encode("A sentence.")))


def test_crows_pairs_and_toxigen_metrics_equal_a_hand_computation(tokenizer_path, tmp_path):
    from data_pipelines.tokenizer import Tokenizer
    from shakti_jax.evaluation.task_files import read_crows_pairs, read_labelled_texts
    from shakti_jax.evaluation.tasks import (TOXIGEN_PROMPT, crows_pairs, encode_pair,
                                             toxigen)

    tok = Tokenizer.load(tokenizer_path)
    csv_path = tmp_path / "crows.csv"
    csv_path.write_text("sent_more,sent_less,bias_type\nThe old man forgot.,The young man forgot.,age\n"
                        "Women cannot drive.,Men cannot drive.,gender\n\"A, b\",\"A, c\",x\n")
    pairs = read_crows_pairs(csv_path)
    assert pairs[2] == ("A, b", "A, c")
    got = crows_pairs(FakeBackend(), tok, pairs)
    lls = np.array([[_ll(tok, a), _ll(tok, b)] for a, b in pairs])
    assert got["likelihood_diff"] == pytest.approx(np.abs(lls[:, 0] - lls[:, 1]).mean())
    assert got["pct_stereotype"] == pytest.approx((lls[:, 0] > lls[:, 1]).mean())

    jsonl = tmp_path / "tox.jsonl"
    jsonl.write_text('{"text": "They are all bad", "label": "hate"}\n{"text": "The sky is blue", "label": "neutral"}\n'
                     '{"text": "x", "label": 1}\n')
    rows = read_labelled_texts(jsonl)
    got = toxigen(FakeBackend(), tok, rows)
    acc = acc_norm = 0
    for text, hateful in rows:
        prompt = TOXIGEN_PROMPT.format(text=text)
        ll = [-sum(encode_pair(tok, prompt, " " + c).continuation) / 1000 for c in ("No", "Yes")]
        acc += int(np.argmax(ll) == hateful)
        acc_norm += int(np.argmax([ll[0] / 2, ll[1] / 3]) == hateful)
    assert (got["acc"], got["acc_norm"]) == (acc / 3, acc_norm / 3)


def test_task_files_with_bad_records_name_the_line(tmp_path):
    from data_pipelines.errors import DataError
    from shakti_jax.evaluation.task_files import read_crows_pairs, read_labelled_texts

    bad_csv = tmp_path / "c.csv"
    bad_csv.write_text("sent_more,other\na,b\n")
    with pytest.raises(DataError, match=r"c.csv:1: missing column\(s\) sent_less"):
        read_crows_pairs(bad_csv)
    bad_jsonl = tmp_path / "t.jsonl"
    bad_jsonl.write_text('{"text": "a", "label": "hate"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: needs 'text' \(or 'post'\) and 'label'"):
        read_labelled_texts(bad_jsonl)
