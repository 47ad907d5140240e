"""The preprocess stage end to end on crafted and shipped data."""

import json
import subprocess
import sys

import pytest

from stages.core.params import PreprocessParams, ModelParams
from stages.core.records import DataError, question_key
from stages.preprocess import preprocess

GOOD = {"system": "s", "instruction": "What is PM?", "output": "PM job code indicates Full Time Employee.", "category": "job_codes"}


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def run(files, tokenizer, **overrides):
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
    with pytest.raises(DataError, match="a:2: PII found: card in output"):
        run({"a": text}, tokenizer, on_pii="fail")


def test_too_long_fail_policy(tokenizer):
    with pytest.raises(DataError, match="exceed model.max_seq_length"):
        run({"a": jsonl({**GOOD, "output": "word " * 300})}, tokenizer, on_too_long="fail")


def test_shipped_data_splits(tokenizer, root, params):
    files = {"corporate_qa.jsonl": (root / "data/raw/corporate_qa.jsonl").read_text()}
    result = preprocess(files, params.preprocess, params.model, tokenizer)
    sizes = result.stats["splits"]
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


def test_stage_cli_writes_outputs_and_fails_cleanly(tmp_path, root):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(jsonl(GOOD, {**GOOD, "instruction": "What is FC?"}), encoding="utf-8")
    out, stats = tmp_path / "processed", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "stages.preprocess", "--input", str(raw), "--output", str(out), "--stats", str(stats),
           "--params", str(root / "params.yaml")]
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
