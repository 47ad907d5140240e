"""Issue 20's rules on crafted inputs: the degenerate-answer flag, the answer budget (evaluate.
max_new_tokens: auto) and the likely causes a failed gate reports."""

from __future__ import annotations

import pytest

from stages.core.gate import likely_causes
from stages.core.generate import answer_budget
from stages.core.metrics import aggregate, degenerate_reason, score_answers


@pytest.mark.parametrize("answer, finished, reason", [
    ("The join() method is a string method, not a list or tuple method. The join() method is a string method, "
     "not a list or tuple method. The join() method", False,
     'repeats the sentence "the join() method is a string method, not a list or tuple method" 2 times'),
    ("In Python the function is defined as a single expression, the function is defined as a single expression, "
     "so the function is defined as a single expression.", True,
     'repeats the words "the function is defined as a single expression" 3 times'),
    ("Employees get 25 days of paid leave and the", False, "cut at max_new_tokens mid-sentence"),
])
def test_loops_and_cut_answers_are_flagged_with_the_reason(answer, finished, reason):
    assert degenerate_reason(answer, finished) == reason


@pytest.mark.parametrize("answer, finished", [
    # a numbered list whose items share their wording
    ("1. Open Settings > Flags and click Create.\n2. Open Settings > Environments and click Create.\n"
     "3. Open Settings > Keys and click Create.\n4. Open Settings > Users and click Create.", True),
    # a bulleted list of plans with the same phrase in every item
    ("- Free plan: you can create flags and invite users.\n- Team plan: you can create flags, invite users and "
     "add environments.\n- Enterprise plan: you can create flags, invite users and export the audit log.", True),
    # an answer that hit the limit at the end of a sentence is long, not degenerate
    ("Employees get 25 days of paid leave.", False),
    ("Yes. Yes.", True),  # too short to be a loop
])
def test_lists_and_legitimate_repetition_are_not_flagged(answer, finished):
    assert degenerate_reason(answer, finished) is None


def test_the_rate_is_a_metric():
    answers = ["A b c d. A b c d.", "Fine answer.", "cut in the", "Also fine."]
    rows = score_answers(answers, ["x"] * 4, [True, True, False, True], None)
    assert [r["degenerate"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert aggregate(rows, answers, ["x"] * 4)["degenerate_rate"] == 0.5


def test_auto_budget_follows_the_references():
    lengths = list(range(10, 110))  # 100 references of 10..109 tokens: p95 (nearest rank) = 104
    budget = answer_budget("auto", 512, lengths)
    assert budget.max_new_tokens == 136  # 104 x 1.25 = 130 -> 136
    assert budget.rule == ("auto: p95 of 100 test references is 104 tokens (longest 109); x1.25 rounded up to 8 "
                           "= 136; using 136")
    assert answer_budget("auto", 100, lengths).max_new_tokens == 100
    assert "capped by decoding.max_new_tokens_cap" in answer_budget("auto", 100, lengths).rule
    assert answer_budget("auto", 512, [3, 4, 5]).max_new_tokens == 32  # the floor
    assert answer_budget(64, 512, lengths).max_new_tokens == 64


def test_auto_budget_counts_tokens_with_the_end_token(tokenizer):
    from stages.core.generate import reference_tokens

    text = "Employees get 25 days of paid leave."
    assert reference_tokens(tokenizer, [text]) == [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1]


def _metrics(**tuned):
    base = {"no_end_token_rate": 0.0, "degenerate_rate": 0.0, "val_loss": 2.0}
    return {"n_test": 63, "base": base, "tuned": {**base, **tuned}, "answer_budget": {"max_new_tokens": 64, "rule": "decoding.max_new_tokens 64"},
            "significance": {"detectable_difference": {"rouge_l": 0.05}}}


def test_likely_causes_name_what_applies_and_what_to_change():
    assert likely_causes(_metrics(val_loss=1.5), {"steps": 108}) == []
    causes = likely_causes(_metrics(val_loss=2.5, no_end_token_rate=0.63, degenerate_rate=0.4),
                           {"steps": 7, "length_rule": "109 records, batch 16: 7 steps per epoch; training 1 epoch"})
    assert [c.split(":")[0] for c in causes] == ["few steps", "truncated answers", "loops", "a learning rate that diverged"]
    assert "raise train.min_steps" in causes[0] and "63% of tuned answers hit max_new_tokens (64)" in causes[1]
    assert "set decoding.max_new_tokens to auto" in causes[1]
    # an early stop is not "few steps"
    assert not likely_causes(_metrics(val_loss=1.5), {"steps": 12, "early_stopped": True})
    small = likely_causes({**_metrics(val_loss=1.0), "n_test": 13,
                           "significance": {"detectable_difference": {"rouge_l": 0.21}}}, {"steps": 60})
    assert small == ["a small test split: 13 test records, and it can only detect ROUGE-L changes above about 0.210; "
                     "add records or raise preprocess.split.test"]
