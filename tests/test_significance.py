"""Significant or within noise: the paired tests on crafted per-record scores whose answers can be
worked out by hand, and the gate's decisions on the same inputs."""

from __future__ import annotations

import pytest

from stages.core import significance as S
from stages.core.gate import Reference, compare, evaluate_gate
from stages.core.params import GateParams

GATE = GateParams(min_tuned={}, max_tuned={}, min_gain={}, max_regression=0.02, regression_metrics=["rouge_l"])


def records(scores: list[float], test_hash: str = "same", side: str = "tuned") -> dict:
    return {"test_set": {"n": len(scores), "hash": test_hash},
            "records": [{"id": f"r{i:02d}", side: {"rouge_l": s}} for i, s in enumerate(scores)]}


def mean(values):
    return sum(values) / len(values)


def decide(new: list[float], old: list[float], new_hash="same", old_hash="same"):
    """The comparison and the gate for a revision (new) against a reference (old)."""
    ref = Reference({"rouge_l": mean(old)}, "reference", records(old, old_hash))
    comp = compare({"rouge_l": mean(new)}, ref, GATE.regression_metrics, GATE.max_regression, records(new, new_hash))
    return comp, evaluate_gate({"tuned": {"rouge_l": mean(new)}, "base": {}}, GATE, comp)


# 63 records: the reference scores 0.30 .. 0.695; the drop is 0.11 plus a +0.02 / -0.02 / 0 pattern whose
# sum is zero, so the mean drop is exactly -0.11 and every record's drop lies in [-0.13, -0.09].
REFERENCE = [0.30 + 0.005 * (i % 80) for i in range(63)]
LARGE_DROP = [r - 0.11 + (0.02, -0.02, 0.0)[i % 3] for i, r in enumerate(REFERENCE)]


def test_a_large_real_drop_is_a_significant_regression():
    test = S.paired_test(LARGE_DROP, REFERENCE)
    assert test["n"] == 63 and test["delta"] == pytest.approx(-0.11)
    low, high = test["ci"]
    assert -0.13 <= low < -0.11 < high <= -0.09            # a mean of values that all lie in [-0.13, -0.09]
    # no random sign flip of 63 same-signed differences is as extreme, so p is the smallest a two-sided
    # 9,999-resample test gives: 2 x (0 + 1) / (9,999 + 1)
    assert test["p"] == pytest.approx(2 / 10_000)
    assert test["significant"] is True
    assert S.verdict("rouge_l", test, 0.02) == "regression"
    comp, gate = decide(LARGE_DROP, REFERENCE)
    assert comp["regressions"] == ["rouge_l"] and comp["comparable"] is True
    assert gate["passed"] is False
    reason = gate["reasons"][0]
    assert reason.startswith("rouge_l regressed by 0.1100 vs reference (tolerance 0.02; paired test -0.1100 [95% CI ")
    assert f"{low:+.4f}, {high:+.4f}], p=0.0002, n=63)" in reason


def test_a_small_drop_on_few_records_is_within_noise():
    # 3 records each 0.05 worse: beyond the 0.02 tolerance, but only 2 of the 2**3 = 8 sign patterns
    # (all down, all up) are as extreme, so the exact permutation p-value is 2/8.
    new, old = [0.45, 0.55, 0.65], [0.50, 0.60, 0.70]
    test = S.paired_test(new, old)
    assert test["delta"] == pytest.approx(-0.05) and test["p"] == pytest.approx(0.25)
    assert test["significant"] is False
    assert S.verdict("rouge_l", test, 0.02) == "within noise"
    comp, gate = decide(new, old)
    assert comp["regressions"] == [] and gate["passed"] is True
    check = gate["checks"][0]
    assert check["verdict"] == "within noise" and check["value"] == pytest.approx(-0.05)
    assert check["ci"] == [pytest.approx(-0.05), pytest.approx(-0.05)]


def test_identical_runs_show_no_change():
    test = S.paired_test(REFERENCE, REFERENCE)
    assert test == {"n": 63, "delta": 0.0, "ci": [0.0, 0.0], "p": 1.0, "significant": False, "sd": 0.0, "mde": 0.0}
    assert S.verdict("rouge_l", test, 0.02) == "no change"
    comp, gate = decide(REFERENCE, REFERENCE)
    assert comp["regressions"] == [] and gate["passed"] is True and gate["checks"][0]["verdict"] == "no change"


def test_a_noisy_drop_beyond_tolerance_is_within_noise():
    # 32 records gain 0.3, 31 lose 0.4: mean -0.0444 (beyond 0.02) but the spread is ~0.35 per record
    old = [0.5] * 63
    new = [0.8] * 32 + [0.1] * 31
    test = S.paired_test(new, old)
    assert test["delta"] == round((32 * 0.3 - 31 * 0.4) / 63, 6)  # results carry 6 decimals
    assert test["ci"][0] < 0 < test["ci"][1] and test["significant"] is False
    comp, gate = decide(new, old)
    assert comp["regressions"] == [] and gate["passed"] is True
    assert gate["checks"][0]["verdict"] == "within noise"


def test_a_significant_drop_inside_the_tolerance_passes():
    new = [r - 0.01 + (0.002, -0.002, 0.0)[i % 3] for i, r in enumerate(REFERENCE)]
    test = S.paired_test(new, REFERENCE)
    assert test["significant"] is True and S.verdict("rouge_l", test, 0.02) == "worse within tolerance"
    comp, gate = decide(new, REFERENCE)
    assert comp["regressions"] == [] and gate["passed"] is True


def test_an_improvement_is_not_a_regression():
    new = [r + 0.11 for r in REFERENCE]
    assert S.verdict("rouge_l", S.paired_test(new, REFERENCE), 0.02) == "improvement"
    # lower is better for the rate of answers without an end token
    drop_rate = S.paired_test([0.0] * 20, [1.0] * 20)
    assert S.verdict("no_end_token_rate", drop_rate, 0.02) == "improvement"


def test_different_test_sets_are_not_comparable_and_never_regress():
    comp, gate = decide(LARGE_DROP, REFERENCE, new_hash="abc", old_hash="def")
    assert comp["comparable"] is False and comp["regressions"] == []
    assert comp["not_comparable"] == "the test sets differ (different test-set hash)"
    assert gate["passed"] is True and gate["checks"] == []
    assert gate["notes"] == ["not comparable with reference: the test sets differ (different test-set hash); "
                             "no regression check against it"]


def test_without_per_record_scores_the_tolerance_decides_and_says_so():
    ref = Reference({"rouge_l": mean(REFERENCE)}, "old.json", None)
    comp = compare({"rouge_l": mean(LARGE_DROP)}, ref, ["rouge_l"], 0.02, records(LARGE_DROP))
    assert comp["regressions"] == ["rouge_l"] and comp["significance"] == {}
    assert comp["note"] == "no per-record scores for old.json: significance not tested, the tolerance alone decides"
    gate = evaluate_gate({"tuned": {"rouge_l": mean(LARGE_DROP)}}, GATE, comp)
    assert gate["reasons"] == ["rouge_l regressed by 0.1100 vs old.json (tolerance 0.02; no per-record scores, "
                               "significance not tested)"]


def test_the_interval_is_a_function_of_the_inputs():
    new = [0.8] * 32 + [0.1] * 31
    assert S.paired_test(new, [0.5] * 63) == S.paired_test(new, [0.5] * 63)


def test_records_are_matched_by_id_not_position():
    old = records(REFERENCE)
    shuffled = records(LARGE_DROP)
    shuffled["records"].reverse()
    tests = S.compare_records(shuffled["records"], old["records"], "tuned", "tuned")
    assert tests["rouge_l"]["delta"] == pytest.approx(-0.11)


def test_minimum_detectable_effect():
    # (z(0.975) + z(0.8)) * sd / sqrt(n) = (1.959964 + 0.841621) * 0.2 / sqrt(64)
    assert S.mde(0.2, 64) == pytest.approx(2.801585 * 0.2 / 8, abs=1e-6)
    assert S.mde(None, 64) is None and S.mde(0.2, 1) is None


def test_fact_recall_pairs_only_records_with_facts():
    test = S.paired_test([0.5, None, 1.0], [0.5, None, 0.0])
    assert test["n"] == 2 and test["delta"] == pytest.approx(0.5)


def test_a_failed_gain_check_quotes_the_tuned_vs_base_interval():
    tuned, base = [0.25, 0.30, 0.35], [0.20, 0.25, 0.30]
    metrics = {"tuned": {"rouge_l": 0.30}, "base": {"rouge_l": 0.25},
               "significance": {"tuned_vs_base": {"rouge_l": S.paired_test(tuned, base)}}}
    gate = evaluate_gate(metrics, GateParams(min_tuned={}, max_tuned={}, min_gain={"rouge_l": 0.1}))
    assert gate["reasons"] == ["rouge_l gain over base +0.0500 < required +0.1 (base 0.2500, tuned 0.3000; "
                               "tuned - base +0.0500 [95% CI +0.0500, +0.0500], p=0.25, n=3)"]


def test_the_split_warns_when_it_cannot_detect_the_gate_tolerance():
    from stages.evaluate import significance_block

    def rows(tuned, base):
        return {"test_set": {"n": len(tuned), "hash": "h"},
                "records": [{"id": f"r{i}", "tuned": {"rouge_l": t}, "base": {"rouge_l": b}}
                            for i, (t, b) in enumerate(zip(tuned, base))]}

    # 4 records whose differences are 0.1, 0.3, 0.1, 0.3: sd = 0.11547, MDE = 2.8016 * 0.11547 / 2 = 0.1617
    noisy = significance_block(rows([0.2, 0.4, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]), ["rouge_l"], 0.02)
    assert noisy["detectable_difference"]["rouge_l"] == pytest.approx(0.161750, abs=1e-5)
    assert noisy["warning"] == ("the test split (4 records) is too small to detect a drop of 0.02 "
                                "(evaluate.gate.max_regression) on rouge_l (detectable: 0.162); such drops will "
                                "read as within noise. Add test records (docs/evaluation.md).")
    steady = significance_block(rows([0.3] * 40, [0.1] * 40), ["rouge_l"], 0.02)
    assert steady["detectable_difference"]["rouge_l"] == 0.0 and steady["warning"] is None
    assert significance_block(rows([0.2, 0.4], [0.1, 0.1]), [], 0.02)["warning"] is None   # not gated
