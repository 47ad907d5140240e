"""Is a metric's change bigger than the noise of the test split? Paired tests over test records.

Two answers per metric, both from scipy and both seeded, so the same inputs always give the same
numbers:
- a 95% confidence interval of the mean per-record difference (new - old), from
  `scipy.stats.bootstrap` with `paired=True` (percentile method, 9,999 resamples);
- a two-sided p-value from `scipy.stats.permutation_test` with `permutation_type="samples"`
  (random sign flips of the per-record differences; exact when 2**n <= 9,999, i.e. n <= 13).

A difference is *significant* when p < 0.05 AND the interval excludes zero: the permutation test
guards the tiny samples where a bootstrap interval is too narrow (3 records that all drop give an
interval that excludes zero, but 2 of the 8 sign patterns are as extreme: p = 0.25).

A metric is a **regression** when it got worse by more than the tolerance (the point estimate) AND
the change is significant; a change that is not significant is "within noise", whatever its size.

Every test is on per-record scores. The headline BLEU-4 is corpus BLEU (not a mean of records); its
test uses the per-record sentence BLEU-4 instead, so its interval is for the mean sentence BLEU.

The minimum detectable effect (MDE) of a paired test with n records whose differences have
standard deviation sd, at two-sided alpha 0.05 and 80% power (normal approximation):
    MDE = (z(0.975) + z(0.80)) * sd / sqrt(n) = 2.80 * sd / sqrt(n)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ALPHA = 0.05
POWER = 0.80
CONFIDENCE = 0.95
RESAMPLES = 9_999
SEED = 11  # any fixed number: the interval must be a function of the inputs
DIGITS = 6

# Per-record score (predictions / eval_records) -> the headline metric it averages to, and direction.
# +1 higher is better, -1 lower is better, 0 no direction (length_ratio is best at 1.0).
TESTED = {
    "rouge_l": ("rouge_l", 1),
    "bleu4": ("bleu4", 1),
    "bertscore_f1": ("bertscore_f1", 1),
    "semantic_similarity": ("semantic_similarity", 1),
    "exact_match": ("exact_match", 1),
    "fact_recall": ("fact_recall", 1),
    "length_ratio": ("length_ratio", 0),
    "no_end_token": ("no_end_token_rate", -1),
    "degenerate": ("degenerate_rate", -1),
}
HEADLINE_TO_RECORD = {headline: record for record, (headline, _) in TESTED.items()}


def direction(metric: str) -> int:
    """+1 / -1 / 0 for a headline or per-record metric name."""
    for record, (headline, sign) in TESTED.items():
        if metric in (record, headline):
            return sign
    return -1 if metric in ("val_loss", "val_perplexity") else 1


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), DIGITS) + 0.0  # + 0.0: no "-0.0" in the files


def z_power() -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))


def mde(sd: float | None, n: int) -> float | None:
    """Smallest mean paired difference the test detects at ALPHA with POWER (see the module doc)."""
    if sd is None or n < 2:
        return None
    return _round(z_power() * sd / math.sqrt(n))


def paired_pairs(new: Sequence[float | None], old: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """The records where both scores exist (fact recall is None for a reference without facts)."""
    if len(new) != len(old):
        raise ValueError(f"paired scores differ in length: {len(new)} vs {len(old)}")
    kept = [(a, b) for a, b in zip(new, old) if a is not None and b is not None]
    return [float(a) for a, _ in kept], [float(b) for _, b in kept]


def paired_test(new: Sequence[float | None], old: Sequence[float | None], seed: int = SEED) -> dict:
    """{"n", "delta", "ci": [low, high], "p", "significant", "sd", "mde"} for mean(new - old)."""
    import numpy as np
    from scipy import stats

    a, b = paired_pairs(new, old)
    n = len(a)
    if n == 0:
        return {"n": 0, "delta": None, "ci": None, "p": None, "significant": False, "sd": None, "mde": None}
    x, y = np.asarray(a), np.asarray(b)
    diff = x - y
    delta = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else None
    rng = np.random.default_rng(seed)
    if n > 1 and float(np.ptp(diff)) > 0.0:
        boot = stats.bootstrap((x, y), _mean_difference, paired=True, vectorized=True, n_resamples=RESAMPLES,
                               confidence_level=CONFIDENCE, method="percentile", rng=rng)
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    else:  # every record moved by the same amount (identical runs: by zero); no resample can vary it
        low = high = delta
    if n > 1 and delta != 0.0:
        p = float(stats.permutation_test((x, y), _mean_difference, permutation_type="samples", vectorized=True,
                                         n_resamples=RESAMPLES, alternative="two-sided", rng=rng).pvalue)
    else:
        p = 1.0
    significant = p < ALPHA and (low > 0 or high < 0)
    return {"n": n, "delta": _round(delta), "ci": [_round(low), _round(high)], "p": _round(p),
            "significant": bool(significant), "sd": _round(sd), "mde": mde(sd, n)}


def _mean_difference(x, y, axis=-1):
    return (x - y).mean(axis=axis)


def verdict(metric: str, test: dict, tolerance: float) -> str:
    """One of: "regression", "worse within tolerance", "improvement", "within noise", "no change",
    "no direction", "untested" (see the module doc for the rule)."""
    if test.get("delta") is None:
        return "untested"
    sign = direction(metric)
    if test["delta"] == 0 and (test.get("ci") or [0, 0]) == [0, 0]:
        return "no change"
    if not test.get("significant"):
        return "within noise"
    if sign == 0:
        return "no direction"
    worse = -sign * test["delta"]
    if worse <= 0:
        return "improvement"
    return "regression" if worse > tolerance + 1e-12 else "worse within tolerance"


def compare_records(new_rows: list[dict], old_rows: list[dict], new_side: str, old_side: str,
                    metrics: Sequence[str] | None = None, tolerance: float = 0.0, seed: int = SEED) -> dict:
    """Paired tests of `new_side` scores in new_rows against `old_side` scores in old_rows, matched by
    record id, for every per-record metric: {headline metric: test + "verdict"}. The caller checks
    that the two lists cover the same test set (`same_test_set`)."""
    old_by_id = {row["id"]: row for row in old_rows}
    matched = [(row, old_by_id[row["id"]]) for row in new_rows if row["id"] in old_by_id]
    out = {}
    for record_metric, (headline, _) in TESTED.items():
        if metrics is not None and headline not in metrics:
            continue
        new = [(n.get(new_side) or {}).get(record_metric) for n, _ in matched]
        old = [(o.get(old_side) or {}).get(record_metric) for _, o in matched]
        if not any(v is not None for v in new) or not any(v is not None for v in old):
            continue
        test = paired_test(new, old, seed)
        test["verdict"] = verdict(headline, test, tolerance)
        out[headline] = test
    return out


def same_test_set(new: dict, old: dict) -> str | None:
    """None when two per-record files cover the same test set, else why not (for the reader)."""
    new_hash, old_hash = (new.get("test_set") or {}).get("hash"), (old.get("test_set") or {}).get("hash")
    if not new_hash or not old_hash:
        return "one side has no test-set hash"
    if new_hash != old_hash:
        new_ids = {r.get("id") for r in new.get("records", [])}
        old_ids = {r.get("id") for r in old.get("records", [])}
        if new_ids != old_ids:
            return (f"the test sets differ ({len(new_ids - old_ids)} record(s) only here, "
                    f"{len(old_ids - new_ids)} only there)")
        return "the test sets differ (same questions, different references or metadata)"
    return None


def describe(metric: str, test: dict) -> str:
    """'-0.1100 [95% CI -0.1400, -0.0800], p=0.0001' for gate reasons, reports and comments."""
    if test.get("delta") is None:
        return "no paired scores"
    ci = test.get("ci") or [None, None]
    return f"{test['delta']:+.4f} [95% CI {ci[0]:+.4f}, {ci[1]:+.4f}], p={test['p']:.3g}, n={test['n']}"
