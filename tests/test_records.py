"""Validation, normalisation, duplicates, PII and splits: the functions that decide what trains."""

import json

import pytest

from stages.core import pii
from stages.core.records import (SPLITS, answer_key, deduplicate, normalize_text, parse_lines, question_key,
                                 split_of)

GOOD = {"system": "s", "instruction": "What is PM?", "output": "PM job code indicates Full Time Employee."}


def line(**overrides):
    return json.dumps({**GOOD, **overrides})


def test_parse_reports_every_bad_line_with_number_and_reason():
    text = "\n".join([line(), "{not json", json.dumps({"system": "s", "instruction": "q"}), "",
                      line(instruction=3), line(output="  "), "[1]", line(system=None)])
    records, problems, counts = parse_lines(text, "f.jsonl")
    assert [r.line for r in records] == [1]
    assert [(p.line, p.reason.split(":")[0]) for p in problems] == [
        (2, "malformed JSON"), (3, "missing field(s)"), (5, "field 'instruction' must be a string, got int"),
        (6, "field 'output' is empty"), (7, "expected a JSON object, got list"),
        (8, "field 'system' must be a string, got NoneType")]
    assert str(problems[0]).startswith("f.jsonl:2: malformed JSON")
    assert counts == {"lines": 8, "blank_lines": 1, "bom": 0}


def test_bom_and_crlf_are_accepted():
    records, problems, counts = parse_lines("\ufeff" + line() + "\r\n" + line(instruction="Q2") + "\r\n", "f")
    assert not problems and len(records) == 2 and counts["bom"] == 1
    assert records[0].instruction == "What is PM?"


def test_missing_category_defaults_and_extra_fields_are_kept_aside():
    records, _, _ = parse_lines(line(id=7), "f")
    assert records[0].category == "uncategorised" and records[0].extra == {"id": 7}


def test_normalize_text_unicode_whitespace_and_controls():
    assert normalize_text("  Ｆｕｌｌ\u00a0Time\t\tEmployee\u200b \r\n\r\n\r\n\r\nNext ") == "Full Time Employee\n\nNext"
    assert normalize_text("caf\u0065\u0301") == "café"


def test_question_key_near_duplicates():
    assert question_key("What is PM job code?") == question_key("  what is PM   job code ")
    assert question_key("What is PM job code?") != question_key("What is FC job code?")
    assert question_key("What is PM?", near=False) != question_key("what is pm", near=False)


def _records(*pairs):
    text = "\n".join(line(instruction=q, output=a) for q, a in pairs)
    return parse_lines(text, "f")[0]


def test_deduplicate_exact_near_and_conflicting():
    recs = _records(("What is PM?", "A"), ("What is PM?", "A"), ("what is pm", "A"), ("WHAT IS PM??", "B"),
                    ("What is FC?", "C"))
    kept, removed = deduplicate(recs, near=True)
    assert [r.line for r in kept] == [1, 5]
    assert [(r.line, why.split(":")[0]) for r, why in removed] == [
        (2, "exact_duplicate"), (3, "near_duplicate"), (4, "conflicting_duplicate")]
    assert "f:1" in removed[2][1]


def test_deduplicate_exact_only_keeps_near_variants():
    kept, removed = deduplicate(_records(("What is PM?", "A"), ("what is pm", "A")), near=False)
    assert len(kept) == 2 and not removed


FRACTIONS = {"train": 0.8, "val": 0.15, "test": 0.05}


def test_split_is_deterministic_and_roughly_proportional():
    keys = [f"question number {i}" for i in range(4000)]
    first = [split_of(k, FRACTIONS, "v1") for k in keys]
    assert first == [split_of(k, FRACTIONS, "v1") for k in keys]
    share = {name: first.count(name) / len(keys) for name in SPLITS}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["val"] - 0.15) < 0.03 and abs(share["test"] - 0.05) < 0.02
    assert [split_of(k, FRACTIONS, "v2") for k in keys] != first  # the salt reshuffles


def test_appending_records_never_moves_an_old_record():
    old = [f"q{i}" for i in range(500)]
    before = {k: split_of(k, FRACTIONS, "v1") for k in old}
    after = {k: split_of(k, FRACTIONS, "v1") for k in old + [f"new{i}" for i in range(500)]}
    assert all(after[k] == before[k] for k in old)


def test_answer_key_ignores_case_and_punctuation():
    assert answer_key("PM job code indicates Full Time Employee.") == answer_key("pm job code indicates full time employee")


@pytest.mark.parametrize("text,kinds", [
    ("Mail jane.doe@contoso.com now", ["email"]),
    ("Call +1 (425) 555-0100 today", ["phone"]),
    ("call 020 7946 0958", ["phone"]),
    ("Card 4111 1111 1111 1111 expires", ["card"]),
    ("SSN 123-45-6789", ["id"]),
    ("NI number AB123456C", ["id"]),
])
def test_pii_found(text, kinds):
    assert [f.kind for f in pii.find_pii(text)] == kinds


@pytest.mark.parametrize("text", [
    "Claims above $2,500 need director approval within 30 days.",
    "The public API allows 1,000 requests per minute; 99.9% uptime.",
    "Branches are named feature/PAY-42-add-export.",
    "Deployments are frozen from December 20 to January 3; logged on 2026-11-24 12:30.",
    "Version 3.11.7 released in 2026, build 20241201.",
])
def test_no_pii_false_positives_on_policy_text(text):
    assert pii.find_pii(text) == []


def test_card_numbers_must_pass_luhn():
    assert [f.kind for f in pii.find_pii("4111 1111 1111 1111")] == ["card"]
    assert "card" not in [f.kind for f in pii.find_pii("4111 1111 1111 1112")]


def test_redact_replaces_each_span():
    text, kinds = pii.redact("Write to jane@contoso.com or +44 20 7946 0958.")
    assert text == "Write to [EMAIL] or [PHONE]." and kinds == ["email", "phone"]


def test_shipped_dataset_has_no_pii(root):
    for row in map(json.loads, (root / "data/raw/corporate_qa.jsonl").read_text().splitlines()):
        assert not pii.find_pii(row["instruction"] + " " + row["output"]), row
