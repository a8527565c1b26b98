"""Offline metrics of generated answers, each reported under its own name.

embedding_relevancy: cosine between question and answer embeddings (a local sentence encoder);
answer_similarity: cosine between answer and gold-answer embeddings (a factuality proxy);
rouge_l: ROUGE-L of summaries against references (`rouge-score`, Porter stemming).
A pair with an empty (or whitespace-only) text has cosine 0. Each returns plain floats and lists
(JSON-serialisable); the caller names them (e.g. "rougeL_f").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rouge_score.rouge_scorer import RougeScorer

from data_pipelines.errors import UserError
from shakti_jax.evaluation.embedding import SentenceEncoder


def _check_pairs(a: Sequence[str], b: Sequence[str], what: str) -> None:
    if len(a) != len(b):
        raise UserError(f"{what}: {len(a)} vs {len(b)} texts; they must pair up one to one")
    if not a:
        raise UserError(f"{what}: no texts to score")


def _cosines(encoder: SentenceEncoder, a: Sequence[str], b: Sequence[str]) -> list[float]:
    """Per-pair cosine of the embeddings of a[i] and b[i]; 0 where either text is empty."""
    ea_ND, eb_ND = (encoder.encode(t).astype(np.float64) for t in (a, b))
    norms_N = np.linalg.norm(ea_ND, axis=1) * np.linalg.norm(eb_ND, axis=1)
    cos_N = (ea_ND * eb_ND).sum(1) / np.maximum(norms_N, 1e-12)
    return [float(c) if x.strip() and y.strip() else 0.0 for c, x, y in zip(cos_N, a, b)]


def embedding_relevancy(encoder: SentenceEncoder, questions: Sequence[str], answers: Sequence[str]) -> dict:
    """Mean (and per-item) cosine between each question and its answer."""
    _check_pairs(questions, answers, "embedding_relevancy")
    per_item = _cosines(encoder, questions, answers)
    return {"mean": float(np.mean(per_item)), "per_item": per_item}


def answer_similarity(encoder: SentenceEncoder, answers: Sequence[str], golds: Sequence[str]) -> dict:
    """Mean (and per-item) cosine between each answer and its gold answer."""
    _check_pairs(answers, golds, "answer_similarity")
    per_item = _cosines(encoder, answers, golds)
    return {"mean": float(np.mean(per_item)), "per_item": per_item}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-L F-measure, precision and recall, with per-item F-measures."""
    _check_pairs(predictions, references, "rouge_l")
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references)]
    per_item = [float(s.fmeasure) for s in scores]
    return {"f": float(np.mean(per_item)), "precision": float(np.mean([s.precision for s in scores])),
            "recall": float(np.mean([s.recall for s in scores])),
            "per_item": per_item}
