import pytest
from rouge_score import rouge_scorer

from dskd_pipe.pipeline.rouge import mean_rouge_l, rouge_l, rouge_l_scores

PAIRS = [
    ("The cats are running in the garden.", "A cat runs in the garden"),
    ("Paris is the capital of France", "The capital of France is Paris."),
    ("", "Nothing was generated."),
    ("completely unrelated words", "The quick brown fox"),
    ("Machine learning models learned quickly", "machine-learning model learns quick"),
]


def _direct(pred, ref):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure


def test_figures_equal_rouge_score_called_directly():
    preds = [p for p, _ in PAIRS]
    refs = [[r] for _, r in PAIRS]
    assert rouge_l_scores(preds, refs) == [_direct(p, r) for p, r in PAIRS]
    assert mean_rouge_l(preds, refs) == pytest.approx(100 * sum(_direct(p, r) for p, r in PAIRS) / len(PAIRS))


def test_stemming_is_on():
    # "runs"/"running" and "cats"/"cat" match only when stemmed.
    assert rouge_l("cats running", ["cat runs"]) == pytest.approx(1.0)


def test_max_over_references():
    pred = "Paris is the capital of France"
    refs = ["Berlin.", "The capital of France is Paris.", "France"]
    assert rouge_l(pred, refs) == max(_direct(pred, r) for r in refs)
    assert rouge_l(pred, refs) > rouge_l(pred, ["Berlin."])
    assert rouge_l(pred, "Paris") == _direct(pred, "Paris")  # a bare string is one reference


def test_empty_prediction_scores_zero():
    assert rouge_l("", ["some reference"]) == 0.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        rouge_l_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("a", [])
    with pytest.raises(ValueError, match="at least one example"):
        mean_rouge_l([], [])
