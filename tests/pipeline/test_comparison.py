"""pipeline/comparison.py: paired differences with the t-interval, verdicts, the summary over seeds and its table."""
from __future__ import annotations

import math

import pytest

from dskd_pipe.pipeline import comparison


def test_paired_difference_and_verdicts():
    d = comparison.paired_difference([0.9, 1.0, 1.1], [1.0, 1.2, 1.3], "lower")  # differences -0.1, -0.2, -0.2
    assert d["mean"] == pytest.approx(-1 / 6)
    sd = math.sqrt(((1 / 15) ** 2 * 0 + (-0.1 + 1 / 6) ** 2 + 2 * (-0.2 + 1 / 6) ** 2) / 2)
    assert d["sd"] == pytest.approx(sd)
    half = 4.303 * sd / math.sqrt(3)
    assert d["ci95"] == pytest.approx([-1 / 6 - half, -1 / 6 + half])
    assert d["verdict"] == "better"  # the interval lies below 0
    assert comparison.paired_difference([1.1, 1.2, 1.3], [1.0, 1.0, 1.1], "lower")["verdict"] == "worse"
    assert comparison.paired_difference([1.0, 1.3, 0.8], [1.0, 1.0, 1.1], "lower")["verdict"] == \
        "no measurable difference"
    assert comparison.paired_difference([30.0, 31.0], [29.0, 29.5], "higher")["verdict"] in ("better",
                                                                                            "no measurable difference")
    one = comparison.paired_difference([1.0], [2.0], "lower")
    assert one["ci95"] is None and one["verdict"] is None


def test_summary_pairs_methods_with_their_baseline_seed_by_seed():
    values = {"teacher": {"nll_char/t": 0.05}, "sft-seed1": {"nll_char/t": 0.20}, "sft-seed2": {"nll_char/t": 0.22},
              "sft-seed3": {"nll_char/t": 0.21}, "kd-seed1": {"nll_char/t": 0.15}, "kd-seed2": {"nll_char/t": 0.18},
              "kd-seed3": {"nll_char/t": 0.165}}
    groups = {"teacher": {"kind": "reference", "labels": {0: "teacher"}},
              "sft": {"kind": "method", "labels": {s: f"sft-seed{s}" for s in (1, 2, 3)}, "baseline": None},
              "kd": {"kind": "method", "labels": {s: f"kd-seed{s}" for s in (1, 2, 3)}, "baseline": "sft"}}
    s = comparison.summarise(values, groups, [1, 2, 3], ["t"])
    kd = s["rows"]["kd"]
    assert kd["metrics"]["nll_char/t"]["mean"] == pytest.approx(0.165)
    assert kd["metrics"]["nll_char/t"]["std"] == pytest.approx(math.sqrt(0.00045 / 3))  # population std
    assert kd["vs_baseline"]["nll_char/t"]["per_seed"] == pytest.approx([-0.05, -0.04, -0.045])
    assert s["rows"]["sft"]["vs_baseline"] == {}
    table = comparison.markdown(s)
    assert "| kd |  | 0.1650 ± 0.0122 | -0.0450 [-0.0574, -0.0326] ✓ |" in table
    assert "| teacher |  | 0.0500 |" in table
    assert "NLL/char on t (lower is better; paired 95% interval over training seeds): better: kd (vs sft)." in table
