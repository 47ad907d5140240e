"""preprocess stage: raw Q&A JSONL -> validated, normalised, de-duplicated, PII-checked splits.

    python -m stages.preprocess --input data/raw --output data/processed --stats metrics/preprocess.json

Reads every *.jsonl under --input (sorted by name). Writes {train,val,test}.jsonl, rejects.jsonl
(every record removed, with its source line and reason) and the stats file that DVC reads as metrics.
Nothing is dropped without a count and a reason; with `on_invalid: fail` (the default) any invalid
line stops the stage with a list of every bad line.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .core import chat, cli, io
from .core.params import ConfigError, ModelParams, PreprocessParams, load_params
from .core.pii import find_pii, redact
from .core.records import (SPLITS, DataError, Problem, Record, answer_key, content_hash, deduplicate,
                           normalize_record, parse_lines, question_key, record_problem, split_of)

TEXT_FIELDS = ("system", "instruction", "output")


@dataclass
class Result:
    splits: dict[str, list[dict]]
    rejects: list[dict]
    stats: dict


def _reject(record_or_problem, reason: str, stage_counts: Counter, kind: str) -> dict:
    stage_counts[kind] += 1
    if isinstance(record_or_problem, Problem):
        return {"source": record_or_problem.source, "line": record_or_problem.line, "reason": reason}
    # rejects.jsonl is a pipeline output (DVC-cached, pushed to the remote): whatever the PII policy,
    # a rejected record is stored with its PII redacted, never in clear.
    stored = {name: redact(value)[0] if name in TEXT_FIELDS else value
              for name, value in record_or_problem.as_json().items()}
    return {"source": record_or_problem.source, "line": record_or_problem.line, "reason": reason, "record": stored}


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def apply_pii_policy(records: list[Record], policy: str) -> tuple[list[Record], list[tuple[Record, str]], Counter]:
    """Redact, reject or keep records with PII; 'fail' raises with every finding."""
    kept, removed, found = [], [], Counter()
    problems = []
    for record in records:
        kinds = {name: [f.kind for f in find_pii(getattr(record, name))] for name in TEXT_FIELDS}
        hits = {name: k for name, k in kinds.items() if k}
        for k in hits.values():
            found.update(k)
        if not hits or policy == "keep":
            kept.append(record)
            continue
        described = "; ".join(f"{', '.join(sorted(set(k)))} in {name}" for name, k in hits.items())
        if policy == "redact":
            for name in hits:
                setattr(record, name, redact(getattr(record, name))[0])
            kept.append(record)
        elif policy == "reject":
            removed.append((record, f"pii: {described}"))  # stored redacted (_reject)
        else:
            problems.append(Problem(record.source, record.line, f"PII found: {described}"))
    if problems:
        raise DataError(f"{len(problems)} record(s) contain PII (preprocess.on_pii is 'fail')", problems)
    return kept, removed, found


def preprocess(files: dict[str, str], params: PreprocessParams, model: ModelParams, tokenizer) -> Result:
    """The whole stage on in-memory files {name: text}; returns splits, rejects and stats."""
    removed_counts: Counter = Counter()
    rejects: list[dict] = []
    records: list[Record] = []
    invalid: list[Problem] = []
    totals = Counter()
    for name, text in files.items():
        parsed, problems, counts = parse_lines(text, name)
        totals.update(counts)
        records += parsed
        invalid += problems

    # Normalisation can empty a field (e.g. only control characters): that is invalid too.
    normalised = []
    for record in map(normalize_record, records):
        reason = record_problem(record.as_json())
        if reason:
            invalid.append(Problem(record.source, record.line, f"{reason} after normalisation"))
        else:
            normalised.append(record)
    invalid.sort(key=lambda p: (p.source, p.line))
    if invalid and params.on_invalid == "fail":
        raise DataError(f"{len(invalid)} invalid record(s) (preprocess.on_invalid is 'fail'; "
                        "set it to 'reject' to write them to rejects.jsonl instead)", invalid)
    rejects += [_reject(p, f"invalid: {p.reason}", removed_counts, "invalid") for p in invalid]

    kept, pii_removed, pii_found = apply_pii_policy(normalised, params.on_pii)
    rejects += [_reject(r, why, removed_counts, "pii") for r, why in pii_removed]

    kept, duplicates = deduplicate(kept, near=params.near_duplicates)
    rejects += [_reject(r, why, removed_counts, why.split(":")[0]) for r, why in duplicates]

    lengths, fitting, too_long = [], [], []
    for record in kept:
        n = len(chat.chat_format(tokenizer).encode(record.system, record.instruction, record.output).input_ids)
        if n > model.max_seq_length:
            too_long.append((record, f"too_long: {n} tokens > model.max_seq_length {model.max_seq_length}", n))
        else:
            fitting.append(record)
            lengths.append(n)
    longest = max((n for _, _, n in too_long), default=0)
    too_long_advice = (f"{len(too_long)} record(s) too long (longest {longest} tokens): raise "
                       f"model.max_seq_length (now {model.max_seq_length}) to {longest} or set preprocess.on_too_long"
                       ) if too_long else None
    if too_long and params.on_too_long == "fail":
        raise DataError(f"{too_long_advice}: drop (now 'fail')",
                        [Problem(r.source, r.line, why) for r, why, _ in too_long])
    rejects += [_reject(r, why, removed_counts, "too_long") for r, why, _ in too_long]

    fractions = params.split.model_dump()
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in fitting:
        # Always the near key: a question and its near-duplicate can never straddle two splits.
        splits[split_of(question_key(record.instruction, near=True), fractions, params.split_salt)].append(record.as_json())
    train_facts = {answer_key(row["output"]) for row in splits["train"]}
    for name in ("val", "test"):
        for row in splits[name]:
            row["fact_seen_in_train"] = answer_key(row["output"]) in train_facts

    lengths.sort()
    records_in = totals["lines"] - totals["blank_lines"]
    check_survivors(records_in, fitting, splits, params, removed_counts, files)
    warnings = [w for w in (too_long_advice, small_test_warning(len(splits["test"]), params)) if w]
    stats = {
        "records_in": records_in,
        "records_out": len(fitting),
        "removed": {kind: removed_counts.get(kind, 0) for kind in
                    ("invalid", "pii", "exact_duplicate", "near_duplicate", "conflicting_duplicate", "too_long")},
        "blank_lines": totals["blank_lines"],
        "pii_found": dict(sorted(pii_found.items())),
        "pii_policy": params.on_pii,
        "splits": {name: len(rows) for name, rows in splits.items()},
        "test_facts_seen_in_train": round(sum(r["fact_seen_in_train"] for r in splits["test"]) / max(1, len(splits["test"])), 4),
        "tokens": {"mean": round(sum(lengths) / max(1, len(lengths)), 1), "p50": _percentile(lengths, 50),
                   "p90": _percentile(lengths, 90), "p95": _percentile(lengths, 95),
                   "p99": _percentile(lengths, 99), "max": lengths[-1] if lengths else 0,
                   "total": sum(lengths)},
        "categories": dict(sorted(Counter(r["category"] for rows in splits.values() for r in rows).items())),
        "data_hash": content_hash([row for name in SPLITS for row in splits[name]]),
        "warnings": warnings,
    }
    # Every record that came in is accounted for: written to a split or to rejects with a reason.
    assert stats["records_out"] + sum(stats["removed"].values()) == records_in, stats
    return Result(splits=splits, rejects=rejects, stats=stats)


def check_survivors(records_in: int, fitting: list, splits: dict[str, list], params: PreprocessParams,
                    removed: Counter, files: dict[str, str]) -> None:
    """Fail, saying why, when there is nothing to train or evaluate on: an empty input, no record
    left after the checks, or an empty split whose fraction is not 0."""
    names = ", ".join(files) or "the input"
    if records_in == 0:
        raise DataError(f"{names}: no records (the input is empty or only blank lines)")
    if not fitting:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(removed.items()) if n)
        raise DataError(f"no record survived preprocessing: {records_in} in, all removed ({counts})")
    fractions = params.split.model_dump()
    empty = [name for name in SPLITS if fractions[name] > 0 and not splits[name]]
    if empty:
        sizes = ", ".join(f"{name} {len(splits[name])}" for name in SPLITS)
        raise DataError(f"empty split(s): {', '.join(empty)} ({sizes} of {len(fitting)} records): add records "
                        f"or raise preprocess.split.{empty[0]} (now {fractions[empty[0]]})")


def small_test_warning(test_records: int, params: PreprocessParams) -> str | None:
    if params.split.test == 0 or test_records >= params.min_test_records:
        return None
    return (f"the test split has {test_records} records (< preprocess.min_test_records "
            f"{params.min_test_records}): evaluation on so few cannot detect small differences between "
            "base and tuned; add records or raise preprocess.split.test")


def read_inputs(input_path: Path) -> dict[str, str]:
    files = sorted(input_path.glob("*.jsonl")) if input_path.is_dir() else [input_path]
    if not files:
        raise ConfigError(f"no *.jsonl files under {input_path}")
    texts = {}
    for path in files:
        try:
            texts[str(path)] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError("input is not UTF-8", [Problem(str(path), _line_of(path.read_bytes(), exc.start),
                                                           f"invalid UTF-8 byte at offset {exc.start}")]) from None
    return texts


def _line_of(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Validate, clean and split raw Q&A JSONL.")
    parser.add_argument("--input", default="data/raw", type=Path)
    parser.add_argument("--output", default="data/processed", type=Path)
    parser.add_argument("--stats", default="metrics/preprocess.json", type=Path)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base-model", default="", help=cli.BASE_MODEL_HELP)
    args = parser.parse_args(argv)

    def run() -> int:
        params = load_params(args.params)
        cli.use_base_model(args.base_model, params.model)  # model.tokenizer from it when it is the base's own
        files = read_inputs(args.input)
        from .core.modeling import load_model_tokenizer

        result = preprocess(files, params.preprocess, params.model, load_model_tokenizer(params.model))
        with io.atomic_dir(args.output) as out:
            for name, rows in result.splits.items():
                (out / f"{name}.jsonl").write_text(io.jsonl_text(rows), encoding="utf-8")
            (out / "rejects.jsonl").write_text(io.jsonl_text(result.rejects), encoding="utf-8")
        io.write_json(args.stats, result.stats)
        s = result.stats
        print(f"[preprocess] {s['records_in']} records in -> {s['records_out']} out "
              f"(train {s['splits']['train']}, val {s['splits']['val']}, test {s['splits']['test']}); "
              f"removed {sum(s['removed'].values())}: {s['removed']}; PII found {s['pii_found'] or 'none'}")
        for warning in s["warnings"]:
            print(f"[preprocess] warning: {warning}")
        return 0

    return cli.run(run, "preprocess")


if __name__ == "__main__":
    raise SystemExit(main())
