"""The preprocess stage end to end on crafted and shipped data."""

import errno
import json
import os
import subprocess
import sys

import pytest

from stages.core.params import PreprocessParams, ModelParams
from stages.core.records import DataError, question_key
from stages.preprocess import preprocess

GOOD = {"system": "s", "instruction": "What is PM?", "output": "PM job code indicates Full Time Employee.", "category": "job_codes"}


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# Crafted inputs of a few records: all in train unless a test asks for splits (an empty split with
# a fraction above 0 fails the stage).
TRAIN_ONLY = {"train": 1.0, "val": 0.0, "test": 0.0}


def run(files, tokenizer, **overrides):
    overrides.setdefault("split", TRAIN_ONLY)
    return preprocess(files, PreprocessParams(**overrides), ModelParams(max_seq_length=64), tokenizer)


BAD_FILE = jsonl(
    GOOD,
    "{broken",
    {"system": "s", "instruction": "Only a question"},
    {**GOOD, "instruction": "What is FC?", "output": ""},
    {**GOOD, "instruction": "what is pm"},                        # near duplicate of line 1
    {**GOOD, "instruction": "Who do I email?", "output": "Write to jane@contoso.com."},
    {**GOOD, "instruction": "Long " + "word " * 2000, "output": "x"},
    {**GOOD, "instruction": "What is PT?", "output": "PT job code indicates Part Time Employee."},
)


def test_fail_mode_lists_every_invalid_line(tokenizer):
    with pytest.raises(DataError) as info:
        run({"a.jsonl": BAD_FILE}, tokenizer)
    assert [(p.line) for p in info.value.problems] == [2, 3, 4]
    assert "a.jsonl:2: malformed JSON" in str(info.value) and "a.jsonl:4: field 'output' is empty" in str(info.value)


def test_reject_mode_accounts_for_every_record(tokenizer):
    result = run({"a.jsonl": BAD_FILE}, tokenizer, on_invalid="reject")
    s = result.stats
    assert s["records_in"] == 8 and s["records_out"] == 3
    assert s["removed"] == {"invalid": 3, "pii": 0, "exact_duplicate": 0, "near_duplicate": 1,
                            "conflicting_duplicate": 0, "too_long": 1}
    assert s["pii_found"] == {"email": 1}
    assert sorted(r["line"] for r in result.rejects) == [2, 3, 4, 5, 7]
    outputs = [row["output"] for rows in result.splits.values() for row in rows]
    assert "Write to [EMAIL]." in outputs


def test_pii_reject_and_fail_policies(tokenizer):
    text = jsonl(GOOD, {**GOOD, "instruction": "Card?", "output": "Use 4111 1111 1111 1111."})
    result = run({"a": text}, tokenizer, on_pii="reject")
    assert result.stats["removed"]["pii"] == 1 and result.rejects[0]["reason"] == "pii: card in output"
    assert result.rejects[0]["record"]["output"] == "Use [CARD]."
    with pytest.raises(DataError, match="a:2: PII found: card in output"):
        run({"a": text}, tokenizer, on_pii="fail")


def test_too_long_fail_policy(tokenizer):
    with pytest.raises(DataError, match=r"1 record\(s\) too long \(longest \d+ tokens\): raise "
                                        r"model.max_seq_length \(now 64\) to \d+ or set preprocess.on_too_long: drop"):
        run({"a": jsonl({**GOOD, "output": "word " * 300})}, tokenizer, on_too_long="fail")


def test_too_long_records_are_counted_with_the_length_to_raise_to(tokenizer):
    long_one, longer = {**GOOD, "instruction": "Q1?", "output": "word " * 100}, {**GOOD, "instruction": "Q2?", "output": "word " * 200}
    result = run({"a": jsonl(GOOD, long_one, longer)}, tokenizer)
    longest = max(int(r["reason"].split()[1]) for r in result.rejects)
    assert longest > 200 and result.stats["removed"]["too_long"] == 2
    assert result.stats["warnings"] == [f"2 record(s) too long (longest {longest} tokens): raise model.max_seq_length "
                                        f"(now 64) to {longest} or set preprocess.on_too_long"]


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_input_fails(tokenizer, text):
    with pytest.raises(DataError) as info:
        run({"data/raw/a.jsonl": text}, tokenizer)
    assert str(info.value) == "data/raw/a.jsonl: no records (the input is empty or only blank lines)"


def test_no_surviving_record_fails_with_the_counts(tokenizer):
    with pytest.raises(DataError) as info:
        run({"a": jsonl({**GOOD, "output": "word " * 300}, {**GOOD, "output": "word " * 300})}, tokenizer)
    assert str(info.value) == "no record survived preprocessing: 2 in, all removed (exact_duplicate 1, too_long 1)"


def test_an_empty_split_fails(tokenizer):
    with pytest.raises(DataError) as info:
        run({"a": jsonl(GOOD, {**GOOD, "instruction": "What is FC?"})}, tokenizer,
            split={"train": 0.5, "val": 0.0, "test": 0.5})
    message = str(info.value)
    assert message.startswith("empty split(s): ") and "of 2 records): add records or raise preprocess.split." in message
    assert not message.endswith(":")


def test_a_small_test_split_is_flagged_in_the_warnings(tokenizer, root, params):
    files = {"corporate_qa.jsonl": (root / "data/raw/corporate_qa.jsonl").read_text()}
    strict = params.preprocess.model_copy(update={"min_test_records": 100})
    result = preprocess(files, strict, params.model, tokenizer)
    n = result.stats["splits"]["test"]
    assert result.stats["warnings"] == [
        f"the test split has {n} records (< preprocess.min_test_records 100): evaluation on so few cannot "
        "detect small differences between base and tuned; add records or raise preprocess.split.test"]


def test_unicode_line_separators_inside_strings_stay_data(tokenizer):
    text = jsonl(json.dumps({**GOOD, "output": "First part\u2028second part\u2029third\u0085end."}, ensure_ascii=False),
                 {**GOOD, "instruction": "What is FC?"}, "{broken")
    assert "\u2028" in text and len(text.splitlines()) > 3  # str.splitlines would cut the first record
    result = run({"a": text}, tokenizer, on_invalid="reject")
    assert result.stats["records_in"] == 3 and result.stats["records_out"] == 2
    assert [(r["line"], r["reason"].split(":")[0]) for r in result.rejects] == [(3, "invalid")]


def test_pii_rejects_are_stored_redacted(tokenizer):
    secret = {**GOOD, "instruction": "Whose card?", "output": "Jane (jane.doe@contoso.com) uses 4111 1111 1111 1111."}
    result = run({"a": jsonl(GOOD, secret)}, tokenizer, on_pii="reject")
    [reject] = result.rejects
    assert reject["line"] == 2 and reject["reason"] == "pii: card, email in output"
    assert reject["record"]["output"] == "Jane ([EMAIL]) uses [CARD]."
    assert "jane.doe" not in json.dumps(result.rejects) and "4111" not in json.dumps(result.rejects)


def test_rejects_never_hold_pii_in_clear_whatever_the_policy(tokenizer):
    with_pii = {**GOOD, "output": "Mail jane.doe@contoso.com, card 4111 1111 1111 1111."}
    result = run({"a": jsonl(with_pii, with_pii)}, tokenizer, on_pii="keep")  # the second is a duplicate
    [reject] = result.rejects
    assert reject["reason"].startswith("exact_duplicate") and reject["record"]["output"] == "Mail [EMAIL], card [CARD]."
    assert result.splits["train"][0]["output"] == with_pii["output"], "keep keeps the kept records as they are"


def test_shipped_data_splits(tokenizer, root, params):
    files = {"corporate_qa.jsonl": (root / "data/raw/corporate_qa.jsonl").read_text()}
    result = preprocess(files, params.preprocess, params.model, tokenizer)
    sizes = result.stats["splits"]
    assert result.stats["warnings"] == [], "the embedded data's splits are big enough and nothing is too long"
    assert sum(sizes.values()) == 1069 and result.stats["removed"] == dict.fromkeys(result.stats["removed"], 0)
    assert 0.75 < sizes["train"] / 1069 < 0.85 and 0.10 < sizes["val"] / 1069 < 0.20 and 0.03 < sizes["test"] / 1069 < 0.08
    keys = {name: {question_key(r["instruction"]) for r in rows} for name, rows in result.splits.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert all(isinstance(r["fact_seen_in_train"], bool) for r in result.splits["test"])
    assert result.stats["tokens"]["max"] <= params.model.max_seq_length
    # appending records never moves an old one
    extra = jsonl(*({**GOOD, "instruction": f"New question {i}?", "output": f"Answer {i}."} for i in range(50)))
    grown = preprocess({**files, "zz_new.jsonl": extra}, params.preprocess, params.model, tokenizer)
    for name, rows in result.splits.items():
        old = [r["instruction"] for r in rows]
        assert [r["instruction"] for r in grown.splits[name] if r["instruction"] in set(old)] == old


def train_only_params(tmp_path, root):
    """params.yaml with every record in train (for inputs of a few records)."""
    path = tmp_path / "params.yaml"
    text = (root / "params.yaml").read_text()
    split = "  split:\n    train: 0.80\n    val: 0.15\n    test: 0.05\n"
    assert split in text
    path.write_text(text.replace(split, "  split:\n    train: 1.0\n    val: 0.0\n    test: 0.0\n"))
    return path


def test_stage_cli_writes_outputs_and_fails_cleanly(tmp_path, root):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(jsonl(GOOD, {**GOOD, "instruction": "What is FC?"}), encoding="utf-8")
    out, stats = tmp_path / "processed", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "stages.preprocess", "--input", str(raw), "--output", str(out), "--stats", str(stats),
           "--params", str(train_only_params(tmp_path, root))]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert json.loads(stats.read_text())["records_out"] == 2

    (raw / "a.jsonl").write_text("\ufeff" + jsonl(GOOD, "{oops", {"system": "s"}).replace("\n", "\r\n"), encoding="utf-8")
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "a.jsonl:2: malformed JSON" in done.stderr and "a.jsonl:3: missing field(s): instruction, output" in done.stderr
    # the failed run left the previous outputs untouched
    assert json.loads(stats.read_text())["records_out"] == 2 and (out / "train.jsonl").exists()


def test_bad_params_fail_before_work(tmp_path, root):
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text().replace("on_pii: redact", "on_pii: hide"))
    done = subprocess.run([sys.executable, "-m", "stages.preprocess", "--params", str(params), "--output",
                           str(tmp_path / "o"), "--stats", str(tmp_path / "s.json")], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and "preprocess.on_pii" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_generator_reproduces_the_committed_dataset(root):
    done = subprocess.run([sys.executable, "-m", "stages.make_dataset", "--check"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("code,name,advice", [
    (errno.ENOSPC, "ENOSPC", "free disk space"),
    (errno.EROFS, "EROFS", "the file system is read-only"),
    (errno.EACCES, "EACCES", "no permission"),
])
def test_disk_full_or_read_only_output_is_one_clear_line_and_no_half_output(tmp_path, root, monkeypatch, capsys,
                                                                            code, name, advice):
    from stages import preprocess as stage

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(jsonl(GOOD, {**GOOD, "instruction": "What is FC?"}), encoding="utf-8")
    out, stats = tmp_path / "processed", tmp_path / "stats.json"
    argv = ["--input", str(raw), "--output", str(out), "--stats", str(stats),
            "--params", str(train_only_params(tmp_path, root))]
    assert stage.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (raw / "a.jsonl").write_text(jsonl(GOOD), encoding="utf-8")  # a different result, never written
    capsys.readouterr()

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    assert stage.main(argv) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"[preprocess] {os.strerror(code)} ({name}) at ") and advice in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the previous outputs are untouched"
    assert json.loads(stats.read_text())["records_out"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "processed", "raw", "stats.json"], \
        "no temporary file or folder left"


def test_atomic_text_write_leaves_no_temp_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from stages.core import io

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        io.write_json(target, {"a": 1})
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
