"""ROUGE-L as the DSKD family reports it (spec/evaluation.md "Metric").

F1 of the longest common subsequence, Porter stemming on (rouge-score's `RougeScorer(["rougeL"], use_stemmer=True)`),
the maximum over an example's references, the mean over examples, x 100. rouge-score's default tokenizer lower-cases
and keeps only [a-z0-9] runs, so a text with no such characters scores 0; that is the published protocol, kept as is.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 1] of one prediction: the best over its references."""
    if isinstance(references, str):
        references = (references,)
    if not references:
        raise ValueError("rouge_l needs at least one reference.")
    # rouge-score's score(target, prediction): the reference comes first.
    return max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example ROUGE-L F1 in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    return [rouge_l(p, r) for p, r in zip(predictions, references)]


def mean_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F1 over examples, x 100 (the figure papers report)."""
    scores = rouge_l_scores(predictions, references)
    if not scores:
        raise ValueError("mean_rouge_l needs at least one example.")
    return 100.0 * sum(scores) / len(scores)


__all__ = ["rouge_l", "rouge_l_scores", "mean_rouge_l"]
