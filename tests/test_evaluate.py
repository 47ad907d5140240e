"""The evaluate stage end to end on a tiny slice (5 test records, a 2-layer embedded Llama and a LoRA
adapter made here with peft in the train stage's layout), its bad-input errors, and the LLM judge
against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from evaluate_fixtures import TEST_RECORDS, make_adapter, write_data, write_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
METRIC_KEYS = {"rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
               "length_ratio", "no_end_token_rate", "val_loss", "val_perplexity"}
UNIT_METRICS = METRIC_KEYS - {"length_ratio", "val_loss", "val_perplexity"}


@pytest.fixture(scope="module")
def inputs(module_dir):
    """Data, params, an adapter, and the evaluate_base stage's output for them (work/eval_base)."""
    from stages.core import perf
    from stages.evaluate_base import main as base_main

    work = module_dir("evaluate")
    data = write_data(work / "data")
    params = write_params(ROOT / "params.yaml", work / "params.yaml")
    adapter = make_adapter(params, work / "adapter")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perf, "PERF_DIR", work / "perf")
        assert base_main(["--data", str(data), "--output", str(work / "eval_base"), "--params", str(params)]) == 0
    return work, data, params, adapter


def _run(work, data, params, adapter, name, *extra, base=None):
    """The evaluate stage; base: the evaluate_base output to read (default: the module's), "" = none."""
    from stages.evaluate import main

    metrics, report = work / name / "metrics" / "eval.json", work / name / "reports" / "eval"
    base = str(adapter.parent / "eval_base") if base is None else str(base)
    rc = main(["--data", str(data), "--adapter", str(adapter), "--base", base, "--metrics", str(metrics),
               "--report", str(report), "--params", str(params), *extra])
    return rc, metrics, report


@pytest.fixture(scope="module")
def stage_run(inputs):
    from stages.core import perf

    work, data, params, adapter = inputs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perf, "PERF_DIR", work / "perf")
        rc, metrics, report = _run(work, data, params, adapter, "plain")
    assert rc == 0
    return json.loads(metrics.read_text()), report


def test_writes_exactly_the_declared_outputs(stage_run):
    _, report = stage_run
    files = sorted(str(p.relative_to(report)) for p in report.rglob("*") if p.is_file())
    assert files == ["plots/by_category.json", "plots/headline.json", "plots/metrics.png", "predictions.jsonl",
                     "report.md"]
    assert not list(report.parent.glob(".eval.*")), "temporary folder left behind"
    metrics_dir = report.parent.parent / "metrics"
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["eval.json", "eval_records.json", "eval_summary.json"]


def test_summary_is_the_narrow_dvc_metric(stage_run):
    m, report = stage_run
    summary = json.loads((report.parent.parent / "metrics" / "eval_summary.json").read_text())
    assert summary == {"tuned": {k: m["tuned"][k] for k in ("rouge_l", "bleu4", "bertscore_f1", "fact_recall")},
                       "gate": {"passed": m["gate"]["passed"]}}


def test_per_record_scores_file(stage_run):
    m, report = stage_run
    path = report.parent.parent / "metrics" / "eval_records.json"
    text = path.read_text()
    data = json.loads(text)
    rows = data["records"]
    assert data["test_set"] == m["test_set"] and data["test_set"]["n"] == len(TEST_RECORDS) == len(rows)
    assert len(data["test_set"]["hash"]) == 64
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and all(len(i) == 12 for i in ids)
    assert text.count("\n") == len(rows) + 2                          # one record per line
    predictions = {json.loads(line)["id"]: json.loads(line) for line in (report / "predictions.jsonl").open()}
    assert set(predictions) == set(ids)
    for row in rows:
        assert set(row) == {"id", "category", "fact_seen_in_train", "base", "tuned"}
        for side in ("base", "tuned"):
            assert set(row[side]) == set(data["metrics"])
            for key, value in row[side].items():
                if isinstance(value, float):
                    assert value == round(value, 4)
                    assert value == pytest.approx(predictions[row["id"]][side][key], abs=5e-5)
    # the tuned-vs-base tests are computed from exactly these rounded scores
    from stages.core.significance import compare_records

    assert compare_records(rows, rows, "tuned", "base") == m["significance"]["tuned_vs_base"]


def test_metrics_keys_and_ranges(stage_run):
    m, _ = stage_run
    assert {"n_test", "n_val", "base", "tuned", "delta", "by_category", "by_fact_seen", "gate", "judge",
            "encoder", "test_set", "significance", "answer_budget"} <= set(m)
    assert "speed" not in m  # timings: logs/perf/evaluate.json (same inputs, same bytes)
    tests = m["significance"]["tuned_vs_base"]
    assert set(tests) == {"rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                          "length_ratio", "no_end_token_rate", "degenerate_rate"}
    budget = m["answer_budget"]
    assert set(budget) == {"max_new_tokens", "rule", "hit_rate"}
    assert budget["hit_rate"] == {"base": m["base"]["no_end_token_rate"], "tuned": m["tuned"]["no_end_token_rate"]}
    assert isinstance(m["gate"]["likely_causes"], list)
    for name, test in tests.items():
        assert test["n"] == len(TEST_RECORDS), name
        assert test["ci"][0] <= test["delta"] <= test["ci"][1] and 0 < test["p"] <= 1, name
        assert test["verdict"] in ("regression", "improvement", "within noise", "no change", "no direction"), name
    assert tests["rouge_l"]["delta"] == pytest.approx(m["delta"]["rouge_l"], abs=1e-3)  # rounded per record
    assert m["significance"]["detectable_difference"]["rouge_l"] == tests["rouge_l"]["mde"]
    assert m["n_test"] == len(TEST_RECORDS) and m["n_val"] == 3 and m["n_with_facts"] == len(TEST_RECORDS)
    for model in ("base", "tuned"):
        assert METRIC_KEYS <= set(m[model]), model
        for key in UNIT_METRICS:
            assert 0.0 <= m[model][key] <= 1.0, (model, key, m[model][key])
        assert m[model]["length_ratio"] >= 0.0
        assert m[model]["val_loss"] > 0 and m[model]["val_perplexity"] > 1
    assert m["delta"]["rouge_l"] == pytest.approx(m["tuned"]["rouge_l"] - m["base"]["rouge_l"], abs=1e-6)
    assert "judge_score" not in m["tuned"] and m["judge"] == {"enabled": False}
    assert m["encoder"]["name"] == "embedded" and m["encoder"]["bertscore_layer"] == 6


def test_per_topic_and_seen_breakdown_have_counts(stage_run):
    m, _ = stage_run
    assert {k: v["n"] for k, v in m["by_category"].items()} == {"expenses": 2, "it_access": 1, "job_codes": 2}
    assert {k: v["n"] for k, v in m["by_fact_seen"].items()} == {"seen": 3, "unseen": 2}
    for group in m["by_category"].values():
        assert METRIC_KEYS - {"val_loss", "val_perplexity"} <= set(group["tuned"])
        assert set(group) == {"n", "n_with_facts", "base", "tuned", "delta"}


def test_gate_and_speed(stage_run):
    m, report = stage_run
    gate = m["gate"]
    assert isinstance(gate["passed"], bool) and len(gate["checks"]) == 5
    assert {c["metric"] for c in gate["checks"] if c["check"] == "max_tuned"} == {"no_end_token_rate", "degenerate_rate"}
    # an untrained adapter on a random model cannot reach ROUGE-L 0.3: the gate must say so
    assert gate["passed"] is False and any(r.startswith("tuned rouge_l") for r in gate["reasons"])
    # ... and the report's first lines say why, from the run's figures: 5 test records, 6-token answers
    causes = gate["likely_causes"]
    assert any(c.startswith("a small test split: 5 test records") for c in causes), causes
    assert any(c.startswith("truncated answers: ") and "(6)" in c for c in causes), causes
    head = (report / "report.md").read_text().split("## Headline")[0]
    assert "Likely causes, from this run's own figures, and what to change:" in head
    assert "Answers: up to 6 new tokens (decoding.max_new_tokens 6)" in head
    s = json.loads((report.parent.parent.parent / "perf" / "evaluate.json").read_text())
    assert s["base_generated_tokens"] > 0 and s["tuned_tokens_per_s"] > 0 and s["total_s"] > 0
    assert s["generation_s"] <= s["models_s"] <= s["total_s"]


def test_predictions_file(stage_run):
    _, report = stage_run
    rows = [json.loads(line) for line in (report / "predictions.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [r[0] for r in TEST_RECORDS]
    for row, (_, output, category, seen) in zip(rows, TEST_RECORDS):
        assert row["reference"] == output and row["category"] == category and row["fact_seen_in_train"] is seen
        for model in ("base", "tuned"):
            entry = row[model]
            assert isinstance(entry["answer"], str) and isinstance(entry["ended"], bool)
            assert {"rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                    "length_ratio", "no_end_token", "missing_facts"} <= set(entry)
            assert entry["no_end_token"] == (0.0 if entry["ended"] else 1.0)
    # max_new_tokens is 6: every answer is short, and base and tuned differ (the adapter is not zero)
    assert any(r["base"]["answer"] != r["tuned"]["answer"] for r in rows)


def test_report_sections(stage_run):
    m, report = stage_run
    text = (report / "report.md").read_text()
    for needle in ("# Evaluation report", "**Quality gate: FAILED**", "## Headline", "| ROUGE-L |", "| BERTScore F1 |",
                   "| Fact recall |", "## Per topic", "| job_codes | 2 |", "## Fact seen in training vs not",
                   "## Worst 2 tuned answers", "### 1. ", "### 2. ", "(expenses, it_access, job_codes) are anecdotes", "test record `", "## Is the difference real?",
                   "| rouge_l | ", "| reference | ", "| base |", "## Quality gate",
                   "LLM judge: off", "![base vs tuned](plots/metrics.png)", "## Degenerate answers",
                   "Greedy decoding, no repetition guard (params decoding)."):
        assert needle in text, needle
    assert "### 0." not in text and "### 3." not in text
    assert "## Speed" not in text  # timings would change the cached report's hash on every run
    plot = json.loads((report / "plots" / "headline.json").read_text())
    assert [(row["metric"], row["model"]) for row in plot][:4] == [("ROUGE-L", "base"), ("ROUGE-L", "tuned"),
                                                                   ("BLEU-4", "base"), ("BLEU-4", "tuned")]
    assert plot[1]["value"] == m["tuned"]["rouge_l"]
    assert plot[-1]["metric"] == "Degenerate: loops, cut mid-sentence (rate), lower is better"
    topics = json.loads((report / "plots" / "by_category.json").read_text())
    assert {row["topic"] for row in topics} == {"expenses (n=2)", "it_access (n=1)", "job_codes (n=2)"}


def test_dvc_yaml_registers_the_stage_and_plots():
    import yaml

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc["stages"]["evaluate"]
    assert stage["params"] == ["cpu", "model", "train.method", "evaluate", "decoding"]
    assert {"data/processed/test.jsonl", "data/processed/val.jsonl", "models/adapter", "reports/eval_base",
            "stages/evaluate.py", "stages/evaluate_base.py", "stages/core/metrics.py", "stages/core/report.py",
            "stages/core/gate.py"} <= set(stage["deps"])
    assert "--base reports/eval_base" in stage["cmd"]
    # everything cached (the stage keeps its run cache); publish_eval copies the detail to git
    assert stage["outs"] == ["reports/eval"]
    assert stage["metrics"] == [{"metrics/eval_summary.json": {"cache": False}}]
    assert ("--metrics reports/eval/eval.json --records reports/eval/eval_records.json "
            "--summary metrics/eval_summary.json") in stage["cmd"]
    published = dvc["stages"]["publish_eval"]
    assert published["outs"] == [{"metrics/eval.json": {"cache": False}}, {"metrics/eval_records.json": {"cache": False}}]
    assert published["cmd"].endswith("reports/eval/eval.json=metrics/eval.json "
                                     "reports/eval/eval_records.json=metrics/eval_records.json")
    sources, templates = set(), set()
    for plot in dvc["plots"]:
        spec = next(iter(plot.values())) if isinstance(plot, dict) else None
        sources |= set(spec["y"]) if spec else {plot}
        templates |= {spec["template"]} if spec else set()
    assert {"reports/eval/plots/headline.json", "reports/eval/plots/by_category.json",
            "dvclive/train/plots/metrics/train/loss.tsv",
            "dvclive/train/plots/metrics/val/loss.tsv"} <= sources
    for name in templates:  # the custom templates exist and are valid JSON with DVC's data anchor
        assert '"<DVC_METRIC_DATA>"' in (ROOT / ".dvc" / "plots" / f"{name}.json").read_text()
    assert "plots" not in dvc["stages"]["train"]  # its curves are drawn by the top-level loss chart


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_test_records_are_listed_by_line(inputs, tmp_path, capsys):
    work, _, params, adapter = inputs
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text('{"instruction": "q", "output": "a"}\n{broken\n{"instruction": "q"}\n[1]\n')
    rc, _, report = _run(tmp_path, data, params, adapter, "bad")
    err = capsys.readouterr().err
    assert rc == 1 and "3 bad record(s)" in err
    assert "test.jsonl:2: not valid JSON" in err and "test.jsonl:3: missing or empty output" in err
    assert "test.jsonl:4: not a JSON object" in err and "Traceback" not in err
    assert not report.exists()


def test_missing_adapter_and_wrong_method(inputs, tmp_path, capsys):
    work, data, params, adapter = inputs
    rc, _, _ = _run(tmp_path, data, params, tmp_path / "nowhere", "x")
    assert rc == 1 and "run the train stage first" in capsys.readouterr().err
    text = params.read_text().replace("method: lora", "method: full")
    (tmp_path / "params.yaml").write_text(text)
    rc, _, _ = _run(tmp_path, data, tmp_path / "params.yaml", adapter, "y")
    assert rc == 2 and "holds a 'lora' model" in capsys.readouterr().err


# --- judge -------------------------------------------------------------------------------------------

class _JudgeHandler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _JudgeHandler.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                       "api_key": self.headers.get("api-key"), "body": body})
        answer = body["messages"][-1]["content"].split("ANSWER:", 1)[1]
        score = 5 if "Full Time Employee" in answer else 2
        reply = {"choices": [{"message": {"role": "assistant", "content": json.dumps({"score": score, "reason": "x"})}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server():
    _JudgeHandler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_judge_openai_compatible_and_azure(judge_server):
    from stages.core.judge import Judge, config_from_env

    judge = Judge(config_from_env({"EVAL_JUDGE_ENDPOINT": judge_server + "/v1", "EVAL_JUDGE_API_KEY": "k1",
                                   "EVAL_JUDGE_MODEL": "grader"}), timeout_s=5)
    assert judge.score("q", "PM job code indicates Full Time Employee.", "PM means Full Time Employee") == 5
    assert judge.score("q", "PM job code indicates Full Time Employee.", "no idea") == 2
    first = _JudgeHandler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k1"
    assert first["body"]["model"] == "grader" and first["body"]["temperature"] == 0
    azure = Judge(config_from_env({"AZURE_OPENAI_ENDPOINT": judge_server, "AZURE_OPENAI_API_KEY": "k2",
                                   "AZURE_OPENAI_DEPLOYMENT": "gpt4o"}), timeout_s=5)
    assert azure.score("q", "r", "Full Time Employee") == 5
    last = _JudgeHandler.requests[-1]
    assert last["path"] == "/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01"
    assert last["api_key"] == "k2" and "model" not in last["body"]
    assert "k2" not in azure.config.label and "gpt4o" in azure.config.label


def test_judge_failures_are_counted_not_invented(judge_server):
    from stages.core.judge import Judge, JudgeConfig, config_from_env, parse_score

    dead = Judge(JudgeConfig("http://127.0.0.1:9/chat/completions", {}, "m", "dead"), timeout_s=5)
    assert dead.score("q", "r", "a") is None and dead.failures[0].startswith("judge call failed")
    wrong_path = Judge(config_from_env({"EVAL_JUDGE_ENDPOINT": judge_server + "/v1", "EVAL_JUDGE_MODEL": "m"}), 5)
    wrong_path.config = JudgeConfig(judge_server + "/v1/chat/completions", {}, "m", "ok")
    assert wrong_path.score("q", "r", "Full Time Employee") == 5 and not wrong_path.failures
    assert parse_score('{"score": 4}') == 4 and parse_score("I'd say 3 out of 5") == 3
    assert parse_score('{"score": 9}') is None and parse_score("no number") is None


def test_judge_enabled_without_endpoint_is_a_config_error(monkeypatch):
    from stages.core.judge import config_from_env
    from stages.core.params import ConfigError

    with pytest.raises(ConfigError, match="EVAL_JUDGE_ENDPOINT"):
        config_from_env({})
    with pytest.raises(ConfigError, match="EVAL_JUDGE_MODEL"):
        config_from_env({"EVAL_JUDGE_ENDPOINT": "http://127.0.0.1:1"})
    with pytest.raises(ConfigError, match="AZURE_OPENAI_DEPLOYMENT"):
        config_from_env({"AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:1", "AZURE_OPENAI_API_KEY": "k"})


def test_stage_with_judge_and_reference(inputs, stage_run, judge_server, monkeypatch, tmp_path):
    """Judge on, and a reference metrics file: scores, the comparison and the gate's regression check."""
    work, data, _, adapter = inputs
    first, _ = stage_run
    params = write_params(ROOT / "params.yaml", tmp_path / "params.yaml",
                          judge={"enabled": True, "max_records": 2, "timeout_s": 5})
    monkeypatch.setenv("EVAL_JUDGE_ENDPOINT", judge_server)
    monkeypatch.setenv("EVAL_JUDGE_MODEL", "grader")
    better = {"tuned": {**first["tuned"], "bleu4": first["tuned"]["bleu4"] + 0.5}}
    (tmp_path / "prod.json").write_text(json.dumps(better))
    rc, metrics_path, report = _run(tmp_path, data, params, adapter, "judged", "--reference", str(tmp_path / "prod.json"))
    assert rc == 0
    m = json.loads(metrics_path.read_text())
    assert m["judge"]["enabled"] is True and m["judge"]["records"] == 2 and m["judge"]["failed_calls"] == 0
    assert len(_JudgeHandler.requests) == 4                 # 2 records x (base, tuned)
    assert 1 <= m["tuned"]["judge_score"] <= 5 and 1 <= m["base"]["judge_score"] <= 5
    assert m["reference"]["regressions"] == ["bleu4"]
    assert m["reference"]["delta"]["bleu4"] == pytest.approx(-0.5, abs=1e-6)
    assert any("bleu4 regressed by 0.5000" in r for r in m["gate"]["reasons"])
    assert m["reference"]["note"].startswith("no per-record scores for ")   # prod.json has none beside it
    text = (report / "report.md").read_text()
    assert "LLM judge: grader at 127.0.0.1" in text and "## Compared with" in text
    rows = [json.loads(line) for line in (report / "predictions.jsonl").read_text().splitlines()]
    assert [r["tuned"]["judge_score"] is not None for r in rows] == [True, True, False, False, False]


def test_stage_against_a_reference_with_per_record_scores(inputs, stage_run, tmp_path):
    """The same model against the first run's files (eval.json + eval_records.json beside it): the
    paired tests find no change and nothing regresses."""
    work, data, params, adapter = inputs
    reference = work / "plain" / "metrics" / "eval.json"
    rc, metrics_path, report = _run(tmp_path, data, params, adapter, "again", "--reference", str(reference))
    assert rc == 0
    ref = json.loads(metrics_path.read_text())["reference"]
    assert ref["comparable"] is True and ref["note"] is None and ref["regressions"] == []
    assert {t["verdict"] for t in ref["significance"].values()} == {"no change"}
    assert (metrics_path.with_name("eval_records.json").read_text()
            == reference.with_name("eval_records.json").read_text())          # same answers, same bytes
    assert "| rouge_l | " in (report / "report.md").read_text()


# --- the base model's evaluation: its own stage (evaluate_base) ----------------------------------------

def test_evaluate_base_writes_answers_scores_and_what_they_were_made_from(inputs):
    from stages.core.params import load_params
    from stages.core.records import content_hash
    from stages.evaluate_base import base_settings, read_split, record_id

    work, data, params, _ = inputs
    base = work / "eval_base"
    assert sorted(p.name for p in base.iterdir()) == ["answers.jsonl", "base.json"]
    assert not list(work.glob(".eval_base.*")), "temporary folder left behind"
    meta = json.loads((base / "base.json").read_text())
    test, val = read_split(data / "test.jsonl"), read_split(data / "val.jsonl")
    assert meta["test_set"] == {"n": len(TEST_RECORDS), "hash": content_hash(test)}
    assert meta["val_set"] == {"n": 3, "hash": content_hash(val)}
    assert meta["settings"] == base_settings(load_params(params))
    assert meta["settings"]["decoding"]["max_new_tokens"] == 6 and "train" not in json.dumps(meta["settings"])
    assert meta["val_loss"] > 0 and meta["generated_tokens"] > 0
    assert not {"seconds", "total_s", "tokens_per_s"} & set(meta)       # timings: logs/perf/evaluate_base.json
    assert json.loads((work / "perf" / "evaluate_base.json").read_text())["base_tokens_per_s"] > 0
    rows = [json.loads(line) for line in (base / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [record_id(r) for r in test]
    for row in rows:
        assert set(row) == {"id", "answer", "ended", "scores"} and isinstance(row["ended"], bool)
        assert set(row["scores"]) == {"rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match",
                                      "fact_recall", "length_ratio", "no_end_token", "degenerate"}


def test_reading_the_base_results_gives_the_same_outputs_as_computing_them_in_the_run(inputs, tmp_path):
    """evaluate_base then evaluate writes byte-identical metrics, per-record scores, predictions and
    report to the evaluate stage computing the base model in the same run (the way it worked before the
    evaluate_base stage). The base model here is initialised wider (init_std 0.1) so that its answers
    are words, not the empty answers of the fixture's base model, and every base score is exercised."""
    import yaml

    from stages.core import perf
    from stages.evaluate_base import main as base_main

    work, data, _, adapter = inputs
    params = write_params(ROOT / "params.yaml", tmp_path / "params.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["model"]["embedded"]["init_std"] = 0.1
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perf, "PERF_DIR", tmp_path / "perf")
        assert base_main(["--data", str(data), "--output", str(tmp_path / "eval_base"), "--params", str(params)]) == 0
        rc, via_base, via_report = _run(tmp_path, data, params, adapter, "via_base", base=tmp_path / "eval_base")
        assert rc == 0
        rc, inline, inline_report = _run(tmp_path, data, params, adapter, "inline", base="")
        assert rc == 0
    for name in ("eval.json", "eval_records.json", "eval_summary.json"):
        assert (inline.parent / name).read_bytes() == (via_base.parent / name).read_bytes(), name
    for name in ("predictions.jsonl", "report.md", "plots/headline.json", "plots/by_category.json"):
        assert (inline_report / name).read_bytes() == (via_report / name).read_bytes(), name
    m = json.loads(via_base.read_text())
    assert m["base"]["val_loss"] > 0 and m["base"]["bertscore_f1"] > 0 and m["base"]["length_ratio"] > 0
    rows = [json.loads(line) for line in (via_report / "predictions.jsonl").read_text().splitlines()]
    assert all(r["base"]["answer"] for r in rows) and any(r["base"]["answer"] != r["tuned"]["answer"] for r in rows)


def test_missing_base_results_name_the_command(inputs, tmp_path, capsys):
    work, data, params, adapter = inputs
    rc, metrics, report = _run(tmp_path, data, params, adapter, "nobase", base=tmp_path / "nowhere")
    err = capsys.readouterr().err
    assert rc == 1 and "base.json not found" in err and "dvc repro evaluate_base" in err
    assert "Traceback" not in err and not metrics.exists() and not report.exists()


def test_stale_base_results_are_refused_with_the_command(inputs, tmp_path, capsys):
    work, data, params, adapter = inputs
    other = tmp_path / "data"
    other.mkdir()
    lines = (data / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["output"] = "PM job code indicates Part Time Employee."          # the test split changed
    (other / "test.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    (other / "val.jsonl").write_text((data / "val.jsonl").read_text())
    rc, metrics, report = _run(tmp_path, other, params, adapter, "stale")
    err = capsys.readouterr().err
    assert rc == 1 and "is stale" in err and "the test split (test.jsonl: 5 records" in err
    assert "val split" not in err and "dvc repro evaluate_base" in err and "Traceback" not in err
    assert not metrics.exists() and not report.exists()

    changed = write_params(ROOT / "params.yaml", tmp_path / "params.yaml", decoding={"max_new_tokens": 7})
    rc, metrics, _ = _run(tmp_path, data, changed, adapter, "stale2")
    err = capsys.readouterr().err
    assert rc == 1 and "params decoding.max_new_tokens (7 now, 6 in the results)" in err
    assert "test split" not in err and "dvc repro evaluate_base" in err and not metrics.exists()


def test_only_the_base_inputs_make_base_results_stale(inputs):
    """A train param (the LoRA rank, epochs), the gate or the judge do not touch the base results;
    the base model, the encoder or the batch size do."""
    import yaml

    from stages.core.params import validate_params
    from stages.evaluate_base import StaleBaseError, load_base, read_split

    work, data, params, _ = inputs
    raw = yaml.safe_load(params.read_text())
    test, val = read_split(data / "test.jsonl"), read_split(data / "val.jsonl")

    def load(edit):
        changed = yaml.safe_load(yaml.safe_dump(raw))
        edit(changed)
        return load_base(work / "eval_base", validate_params(changed), test, val)

    def train_change(p):
        p["train"]["lora"]["r"] = 16
        p["train"]["epochs"] = 9
        p["train"]["method"] = "qlora"
        p["evaluate"]["gate"]["min_tuned"] = {"rouge_l": 0.9}
        p["evaluate"]["judge"]["enabled"] = True

    run = load(train_change)
    assert len(run.answers) == len(TEST_RECORDS) and run.val_loss > 0 and len(run.scores) == len(TEST_RECORDS)
    for edit, named in ((lambda p: p["model"]["embedded"].update(seed=1), "model.embedded"),
                        (lambda p: p["evaluate"].update(batch_size=3), "evaluate.batch_size"),
                        (lambda p: p["evaluate"].update(bertscore_layer=5), "evaluate.bertscore_layer"),
                        (lambda p: p["cpu"].update(threads=1), "cpu.threads")):
        with pytest.raises(StaleBaseError, match="dvc repro evaluate_base") as caught:
            load(edit)
        assert named in str(caught.value)
    with pytest.raises(StaleBaseError, match="val split"):
        load_base(work / "eval_base", validate_params(raw), test, val[:2])


def test_dvc_yaml_base_stage_depends_on_the_base_model_only():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    base = stages["evaluate_base"]
    assert base["params"] == ["cpu", "model", "decoding", "evaluate.batch_size", "evaluate.encoder",
                              "evaluate.bertscore_layer"]
    assert not [p for p in base["params"] if p == "train" or p.startswith("train.") or p == "evaluate"]
    produced_by_train = {out if isinstance(out, str) else next(iter(out)) for out in stages["train"]["outs"]}
    assert not produced_by_train & set(base["deps"]) and "models/adapter" not in base["deps"]
    assert {"data/processed/test.jsonl", "data/processed/val.jsonl", "stages/evaluate_base.py"} <= set(base["deps"])
    assert "stages/evaluate.py" not in base["deps"]     # editing the evaluate stage does not re-evaluate the base
    assert base["outs"] == ["reports/eval_base"] and "--output reports/eval_base" in base["cmd"]
    # the code that decides the base results: generation, model loading, chat format, val loss, scoring
    assert {f"stages/core/{m}.py" for m in ("metrics", "generate", "modeling", "chat", "training", "records")} \
        <= set(base["deps"])


def test_dvc_reruns_the_base_evaluation_for_base_inputs_only(tmp_path):
    """DVC itself, on this dvc.yaml and params.yaml with stand-in files: after `dvc commit`, a change of
    the LoRA rank or of the gate leaves evaluate_base up to date; max_new_tokens or the base model does not."""
    import shutil
    import subprocess
    import sys

    import yaml

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        paths = list(stage.get("deps", []))
        for key in ("outs", "metrics", "plots"):
            paths += [o if isinstance(o, str) else next(iter(o)) for o in stage.get(key, []) or []]
        for path in map(repo.joinpath, paths):
            if not path.exists():
                target = path if path.suffix else path / "stand-in"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"{path.name}\n")

    def dvc(*args):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("init", "--no-scm", "-q")
    dvc("commit", "-f", "-q")
    original = (repo / "params.yaml").read_text()

    def changed(edit) -> set[str]:
        raw = yaml.safe_load(original)
        edit(raw)
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            return set(json.loads(dvc("status", "--json") or "{}"))
        finally:
            (repo / "params.yaml").write_text(original)

    assert changed(lambda p: None) == set()
    assert changed(lambda p: p["train"]["lora"].update(r=p["train"]["lora"]["r"] * 2)) == {"train"}
    assert changed(lambda p: p["train"].update(method="full")) == {"train", "evaluate"}
    assert changed(lambda p: p["evaluate"]["gate"].update(max_regression=0.5)) == {"evaluate"}
    assert changed(lambda p: p["decoding"].update(max_new_tokens=7)) == {"evaluate_base", "evaluate", "package"}
    assert changed(lambda p: p["decoding"].update(no_repeat_ngram_size=4)) == {"evaluate_base", "evaluate", "package"}
    assert "evaluate_base" in changed(lambda p: p["model"].update(max_seq_length=p["model"]["max_seq_length"] + 1))


def test_auto_answer_length_from_a_crafted_split_reaches_the_card_and_the_endpoint(inputs, tmp_path, monkeypatch):
    """decoding.max_new_tokens auto on 20 references of 7..102 tokens: p95 (nearest rank) 97 tokens,
    x 1.25 rounded up to 8 = 128. Base and tuned answers get it, eval.json and the report state it, and
    package and the endpoint take it from there (issue 20: a model evaluated at 128 is served at 128)."""
    from serve.engine import Engine
    from stages.core import perf
    from stages.core.params import ServeParams, load_params
    from stages.evaluate_base import main as base_main
    from stages.package import package

    work, _, _, adapter = inputs
    monkeypatch.setattr(perf, "PERF_DIR", tmp_path / "perf")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"system": "You are a helpful corporate assistant.", "instruction": f"Policy question {k}?",
             "output": " ".join(["policy"] * k) + ".", "category": "policy"} for k in range(5, 105, 5)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    params = write_params(ROOT / "params.yaml", tmp_path / "params.yaml", decoding={"max_new_tokens": "auto"})
    assert base_main(["--data", str(data), "--output", str(tmp_path / "eval_base"), "--params", str(params)]) == 0
    assert json.loads((tmp_path / "eval_base" / "base.json").read_text())["settings"]["decoding"]["max_new_tokens"] == 128
    rc, metrics_path, report = _run(tmp_path, data, params, adapter, "auto", base=tmp_path / "eval_base")
    assert rc == 0
    m = json.loads(metrics_path.read_text())
    assert m["answer_budget"]["max_new_tokens"] == 128 and m["decoding"]["max_new_tokens"] == 128
    assert m["answer_budget"]["rule"] == ("auto: p95 of 20 test references is 97 tokens (longest 102); "
                                          "x1.25 rounded up to 8 = 128; using 128")
    assert "Answers: up to 128 new tokens (auto: p95 of 20 test references" in (report / "report.md").read_text()

    merged = tmp_path / "merged"
    package(adapter, merged, load_params(params).package, data_dir=data, eval_metrics=metrics_path)
    assert json.loads((merged / "serving.json").read_text())["max_new_tokens"] == 128
    assert json.loads((merged / "generation_config.json").read_text())["max_new_tokens"] == 128
    config = ServeParams(max_new_tokens_default="auto", max_new_tokens_limit=256, torch_threads=1,
                         log_path="").model_dump()
    engine = Engine(merged, config)
    try:
        assert engine.limits.max_new_tokens_default == 128
    finally:
        engine.batcher.close()


def _with_validation(adapter: Path, out: Path, **validation) -> Path:
    import shutil

    shutil.copytree(adapter, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["validation"] = validation
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_tuned_val_loss_is_train_s_only_when_train_measured_the_same_thing(inputs, stage_run, tmp_path):
    """A manifest whose validation record matches this split, method and dtype gives its loss (a crafted
    value here, so a recomputation would show); any mismatch computes it, as without a record."""
    from stages.core import perf
    from stages.core.records import content_hash
    from stages.evaluate_base import read_split

    work, data, params, adapter = inputs
    computed = stage_run[0]["tuned"]["val_loss"]
    same = {"loss": 1.234567, "step": 7, "records": 3, "split_hash": content_hash(read_split(data / "val.jsonl")),
            "dtype": "float32", "method": "lora"}
    reused = _with_validation(adapter, tmp_path / "reused", **same)
    other = _with_validation(adapter, tmp_path / "other", **{**same, "split_hash": "0" * 64})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perf, "PERF_DIR", tmp_path / "perf")
        rc_reused, reused_metrics, _ = _run(tmp_path, data, params, reused, "reused", base=work / "eval_base")
        rc_other, other_metrics, _ = _run(tmp_path, data, params, other, "other", base=work / "eval_base")
    assert rc_reused == rc_other == 0
    assert computed != 1.234567 and json.loads(reused_metrics.read_text())["tuned"]["val_loss"] == 1.234567
    assert json.loads(other_metrics.read_text())["tuned"]["val_loss"] == computed


def test_reusable_val_loss_names_what_differs():
    import torch

    from stages.core.records import content_hash
    from stages.evaluate import reusable_val_loss

    val = [{"system": "s", "instruction": "q", "output": "a"}]
    record = {"loss": 0.5, "step": 3, "split_hash": content_hash(val), "dtype": "float32", "method": "lora"}
    assert reusable_val_loss({"validation": record}, "lora", val, torch.float32)[0] == 0.5
    loss, why = reusable_val_loss({"validation": record}, "lora", val, torch.bfloat16)
    assert loss is None and "dtype 'float32' vs 'bfloat16'" in why
    loss, why = reusable_val_loss({"validation": {**record, "method": "qlora"}}, "qlora", val, torch.float32)
    assert loss is None and "4-bit" in why
    loss, why = reusable_val_loss({"validation": record}, "lora", val + val, torch.float32)
    assert loss is None and "split_hash" in why
    assert reusable_val_loss({}, "lora", val, torch.float32) == (None, "computed here (the train stage recorded none)")


def test_the_merged_fp32_model_gives_the_adapter_model_s_answers(inputs):
    """evaluate generates with the adapter merged (fp32): the same greedy answers as the unmerged
    PeftModel, and not the base model's (the fixture's adapter changes them)."""
    from stages.core.modeling import load_base_model, load_tokenizer, load_tuned_model
    from stages.core.params import load_params
    from stages.evaluate_base import generate_answers, read_split

    work, data, params_path, adapter = inputs
    params = load_params(params_path)
    tokenizer = load_tokenizer(str(adapter / "tokenizer"))
    test = read_split(data / "test.jsonl")

    def answers(model):
        return generate_answers(model.eval(), tokenizer, test, params.decoding, 4)[:2]

    merged = load_tuned_model(params.model, adapter, "lora", tokenizer=tokenizer, merge=True)
    assert not hasattr(merged, "peft_config")
    unmerged = load_tuned_model(params.model, adapter, "lora", tokenizer=tokenizer)
    assert answers(merged) == answers(unmerged) != answers(load_base_model(params.model, tokenizer=tokenizer))
