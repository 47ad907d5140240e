"""Metric functions against hand-computed values, and the packaged encoder really scoring."""

from __future__ import annotations

import math

import pytest

from stages.core import metrics as M


# --- exact match, length ratio -----------------------------------------------------------------------

def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    assert M.exact_match("The PM job code indicates Full Time Employee.", "pm  job code indicates full time employee") == 1.0
    assert M.exact_match("PM job code indicates Full Time Contractor.", "PM job code indicates Full Time Employee.") == 0.0
    assert M.normalize_answer("  An  Answer, with   punctuation!  ") == "answer with punctuation"


def test_length_ratio():
    assert M.length_ratio("one two three", "one two three four five six") == pytest.approx(0.5)
    assert M.length_ratio("", "a b") == 0.0
    assert M.length_ratio("a b c d", "a b") == 2.0


# --- ROUGE-L -----------------------------------------------------------------------------------------

def test_rouge_l_identical_disjoint_and_known_case():
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert M.rouge_l("alpha beta gamma", "delta epsilon zeta") == 0.0
    # LCS("the cat was found under the bed", "the cat was under the bed") = 6 words:
    # precision 6/7, recall 6/6, F = 2PR/(P+R) = 12/13
    assert M.rouge_l("the cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)
    # stemming: "approves" ~ "approve"
    assert M.rouge_l("manager approve claims", "manager approves claims") == pytest.approx(1.0)


# --- BLEU-4 ------------------------------------------------------------------------------------------

def test_corpus_bleu_identical_disjoint_and_known_case():
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert M.corpus_bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    assert M.corpus_bleu([], []) == 0.0
    # hypothesis 5 tokens, reference 6: n-gram precisions 5/5, 3/4, 1/3, 0/2; sacrebleu's default "exp"
    # smoothing turns the zero 4-gram precision into 1/(2*2); brevity penalty exp(1 - 6/5):
    # BLEU = exp(-0.2) * (1 * 3/4 * 1/3 * 1/4) ** (1/4) = exp(-0.2) * 0.5
    assert M.corpus_bleu(["the cat sat the mat"], ["the cat sat on the mat"]) == pytest.approx(
        math.exp(-0.2) * 0.5, abs=1e-6)
    # "a b c d e f" vs "a b c d e g": p1=5/6 p2=4/5 p3=3/4 p4=2/3, BP=1 -> (5/6*4/5*3/4*2/3)^(1/4)
    expected = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert M.corpus_bleu(["a b c d e f"], ["a b c d e g"]) == pytest.approx(expected, abs=1e-6)
    # brevity penalty: hypothesis 4 tokens against 5 -> exp(1 - 5/4)
    bp = math.exp(1 - 5 / 4)
    assert M.corpus_bleu(["a b c d"], ["a b c d e"]) == pytest.approx(bp, abs=1e-6)


def test_sentence_bleu_range():
    assert M.sentence_bleu("a b c d e", "a b c d e") == pytest.approx(1.0)
    assert 0.0 < M.sentence_bleu("a b c x y", "a b c d e") < 1.0
    assert M.sentence_bleu("", "a b c d e") == 0.0


# --- fact recall -------------------------------------------------------------------------------------

def _facts(text):
    return [(f.kind, f.text) for f in M.extract_facts(text)]


def test_extract_facts_kinds():
    assert _facts("PM job code indicates Full Time Employee.") == [("code", "PM"), ("name", "Full Time Employee")]
    assert _facts("Your line manager approves expense claims up to $2,500; claims above $2,500 also need director "
                  "approval.") == [("amount", "$2,500")]
    assert _facts("Submit expenses in ExpenseFlow within 30 days.") == [("name", "ExpenseFlow"), ("quantity", "30 days")]
    assert _facts("The Dublin office is open 8 AM to 6 PM Monday to Friday.") == [
        ("name", "Dublin"), ("time", "8 AM"), ("time", "6 PM"), ("name", "Monday"), ("name", "Friday")]
    assert _facts("Customer-facing APIs have a 99.9% monthly uptime target.") == [("percent", "99.9%")]
    assert _facts("Access is granted within 3 business days in AccessDesk.") == [
        ("quantity", "3 business days"), ("name", "AccessDesk")]
    assert _facts("Alcohol is reimbursable only as part of pre-approved client entertainment.") == []


def test_fact_recall_on_crafted_answers():
    ref = "FC job code indicates Full Time Contractor."
    assert M.fact_recall("FC job code indicates Full Time Contractor.", ref) == 1.0
    assert M.fact_recall("The FC code means a full time contractor", ref) == 1.0      # case, wording
    assert M.fact_recall("FC job code indicates Full Time Employee.", ref) == 0.5     # wrong worker type
    assert M.fact_recall("PM job code indicates Full Time Employee.", ref) == 0.0
    ref = "Submit expenses in ExpenseFlow within 30 days."
    assert M.fact_recall("Use ExpenseFlow; you have 30 days.", ref) == 1.0
    assert M.fact_recall("Use ExpenseFlow within 3 days.", ref) == 0.5               # 3 days is not 30 days
    assert M.fact_recall("Use ExpenseFlow within 30 day", ref) == 1.0                # plural is not a fact
    assert M.fact_recall("Claims up to $2500 need your manager.", "Managers approve claims up to $2,500.") == 1.0
    assert M.fact_recall("Claims up to $250 need your manager.", "Managers approve claims up to $2,500.") == 0.0
    assert M.fact_recall("anything", "Alcohol is not reimbursed.") is None           # no facts: not scored
    assert M.missing_facts("FC means Full Time Employee", "FC job code indicates Full Time Contractor.") == [
        "Full Time Contractor"]


# --- aggregation -------------------------------------------------------------------------------------

def test_score_answers_and_aggregate_without_encoder():
    preds = ["PM job code indicates Full Time Employee.", "no idea"]
    refs = ["PM job code indicates Full Time Employee.", "Alcohol is not reimbursed."]
    scores = M.score_answers(preds, refs, [True, False], semantic=None)
    assert scores[0]["exact_match"] == 1.0 and scores[0]["fact_recall"] == 1.0 and scores[0]["no_end_token"] == 0.0
    assert scores[1]["fact_recall"] is None and scores[1]["no_end_token"] == 1.0
    agg = M.aggregate(scores, preds, refs)
    assert agg["exact_match"] == 0.5
    assert agg["fact_recall"] == 1.0            # the record without facts is left out of the mean
    assert agg["no_end_token_rate"] == 0.5
    assert 0.0 < agg["bleu4"] < 1.0 and 0.0 < agg["rouge_l"] < 1.0


# --- BERTScore and similarity on the packaged encoder (no skips) ------------------------------------

@pytest.fixture(scope="module")
def scorer():
    return M.SemanticScorer("embedded", layer=6)


def test_encoder_resolves_to_the_packaged_model():
    from pathlib import Path

    path = Path(M.resolve_encoder("embedded"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert M.resolve_encoder("some/hub-model") == "some/hub-model"


def test_bertscore_and_similarity_on_packaged_encoder(scorer):
    refs = ["PM job code indicates Full Time Employee."] * 4
    preds = ["PM job code indicates Full Time Employee.",          # identical
             "The PM code means a full-time employee.",            # paraphrase
             "Bananas are rich in potassium and taste sweet.",      # unrelated
             ""]                                                    # empty answer
    bert = scorer.bertscore_f1(preds, refs)
    sim = scorer.similarity(preds, refs)
    assert bert[0] == pytest.approx(1.0, abs=1e-4) and sim[0] == pytest.approx(1.0, abs=1e-4)
    assert bert[1] > bert[2] + 0.2 and sim[1] > sim[2] + 0.3
    assert bert[3] == 0.0 and sim[3] == 0.0
    assert all(-1.0 <= v <= 1.0 for v in bert + sim)
    assert scorer.layer == 6


def test_bad_bertscore_layer_is_a_config_error():
    from stages.core.params import ConfigError

    with pytest.raises(ConfigError, match="bertscore_layer: 9 is outside 1..6"):
        M.SemanticScorer("embedded", layer=9)


def test_unknown_encoder_is_a_config_error(tmp_path):
    from stages.core.params import ConfigError

    with pytest.raises(ConfigError, match="evaluate.encoder"):
        M.SemanticScorer(str(tmp_path / "no-such-encoder"))
