"""Validation, normalisation, duplicates, PII and splits: the functions that decide what trains."""

import json

import pytest

from stages.core import pii
from stages.core.pii import find_pii, redact
from stages.core.records import (SPLITS, DataError, Problem, answer_key, deduplicate, jsonl_lines, normalize_text,
                                 parse_lines, question_key, split_of)

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


# ---------------------------------------------------------------------------------------------
# JSONL lines, meaning-bearing symbols, reserved domains and message-ids (issues 13 and 15)

def test_jsonl_lines_split_on_newline_only():
    text = '{"a": "x\u2028y\u2029z\u0085w\x1c"}\r\n{"b": 1}\n\n'
    assert jsonl_lines(text) == ['{"a": "x\u2028y\u2029z\u0085w\x1c"}', '{"b": 1}', ""]
    records, problems, counts = parse_lines(json.dumps({"system": "s", "instruction": "q\u2028?", "output": "a"},
                                                       ensure_ascii=False) + "\n{bad\n", "f")
    assert [r.line for r in records] == [1] and [p.line for p in problems] == [2] and counts["lines"] == 2


def test_data_error_without_problems_does_not_end_in_a_colon():
    assert str(DataError("train.jsonl has no records")) == "train.jsonl has no records"
    assert str(DataError("bad", [Problem("f", 2, "why")])) == "bad:\n  f:2: why"


@pytest.mark.parametrize("one,other", [
    ("Can I create my own functions in C?", "Can I create my own functions in C++?"),
    ("Can I create my own functions in C?", "Can I create my own functions in C#?"),
    ("How do I call C++ from C#?", "How do I call C from C?"),
    ("What is new in Python 3.11?", "What is new in Python 3.12?"),
    ("Is 3.11 supported?", "Is 3.1.1 supported?"),
    ("Does it run on .NET?", "Does it run on NET?"),
])
def test_near_duplicates_keep_meaning_bearing_symbols(one, other):
    assert question_key(one) != question_key(other)
    kept, removed = deduplicate(_records((one, "A"), (other, "B")))
    assert len(kept) == 2 and not removed


@pytest.mark.parametrize("one,other", [
    ("Can I create my own functions in C++?", "can i create my own functions in c++"),
    ("What's new in Python 3.11?", "Whats new in python 3.11 ?"),
    ("What is .NET?", "what is .NET"),
    ("e.g. what is PM?", "eg, what is PM"),
])
def test_near_duplicates_still_match_up_to_case_punctuation_and_spacing(one, other):
    assert question_key(one) == question_key(other)


@pytest.mark.parametrize("text", [
    "Send it to receiver@example.com in the sample.",
    "smtp.sendmail('sender@example.org', ['to@example.net'], msg)",
    "user@mail.example.com and admin@host.example and root@box.test",
    "See http://groups.google.com/groups?selm=34A3B7E2.5F1B@cwi.nl for the thread.",
    "https://mail.python.org/pipermail/?msgid=abc.123@python.org",
    "news:3a1b2c3d@news.cwi.nl",
])
def test_reserved_domains_and_message_ids_in_urls_are_not_pii(text):
    assert find_pii(text) == [] and redact(text) == (text, [])


@pytest.mark.parametrize("text,left", [
    ("Send it to receiver@contoso.com in the sample.", "Send it to [EMAIL] in the sample."),
    ("reach jane.doe@example.com.evil.io", "reach [EMAIL]"),
    ("bob@notexample.com", "[EMAIL]"),
    ("form at https://contoso.com/contact?email=jane.doe@gmail.com", "form at https://contoso.com/contact?email=[EMAIL]"),
    ("mailto:jane.doe@gmail.com or see http://x.org/?selm=1@news.org", "mailto:[EMAIL] or see http://x.org/?selm=1@news.org"),
])
def test_real_addresses_beside_them_are_still_caught(text, left):
    assert redact(text) == (left, ["email"])
