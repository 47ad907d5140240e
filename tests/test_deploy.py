"""The deploy stage (target local): azmlinfsrv started, smoke-tested, recorded, stopped; and its failures.

Also the endpoint benchmark's command on a tiny workload (the full benchmark is in docs/serving.md).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_params(path: Path, **deploy) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["deploy"].update({"port": 0, "smoke_prompts": ["How do I submit an expense report?", "Wer genehmigt Urlaub? ✈"],
                             "readiness_timeout_s": 120, **deploy})
    params["serve"].update({"log_path": str(path.parent / "requests.jsonl"), "torch_threads": 1})
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def port_closed(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) != 0


def test_deploy_local_smoke_tests_records_and_stops(merged, tmp_path, capsys):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml")
    code = main(["--model", str(merged), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params)])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((tmp_path / "deploy.json").read_text())
    assert result["target"] == "local" and result["passed"] is True
    assert result["server"].startswith("azmlinfsrv ")
    assert result["url"].startswith("http://127.0.0.1:") and result["url"].endswith("/score")
    smoke = result["smoke"]
    assert [r["status"] for r in smoke["requests"]] == [200, 200]
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] >= 1 for r in smoke["requests"])
    assert smoke["batch_ok"] and smoke["invalid_request_status"] == 400 and smoke["healthy_after"]
    assert result["model"]["merge_check_passed"] is True
    assert result["server_stopped"] is True and port_closed(result["url"]), "the stage leaves no server behind"
    logged = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert {line["status"] for line in logged} == {200, 400}


def test_deploy_fails_cleanly_when_the_model_cannot_load(tmp_path, capsys):
    """init() fails (garbage weights): the stage reports it, records passed=false, leaves no process."""
    from stages.deploy import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    params = write_params(tmp_path / "params.yaml", readiness_timeout_s=90)
    code = main(["--model", str(broken), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 1
    assert "exited with status" in err and "Traceback (most recent call last)" not in err.split("end of its log")[0]
    result = json.loads((tmp_path / "deploy.json").read_text())
    assert result["passed"] is False and "azmlinfsrv exited" in result["error"]


def test_deploy_without_a_packaged_model_is_a_config_error(tmp_path, capsys):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml")
    code = main(["--model", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 2 and "holds no packaged model" in err and "dvc repro package" in err
    assert not (tmp_path / "deploy.json").exists()


def test_deploy_target_none_records_a_skip(tmp_path):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml", target="none")
    assert main(["--model", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params)]) == 0
    assert json.loads((tmp_path / "deploy.json").read_text()) == {"target": "none", "passed": True, "skipped": True}


def test_endpoint_bench_measures_levels_and_writes_metrics(merged, tmp_path):
    from bench.endpoint_bench import main

    params = write_params(tmp_path / "params.yaml")
    out = tmp_path / "bench.json"
    code = main(["--model", str(merged), "--params", str(params), "--concurrency", "1", "4", "--requests", "8",
                 "--max-new-tokens", "4", "--data", str(tmp_path / "no-data"), "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    levels = report["variants"]["batching"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 8 and level["errors"] == 0 and level["error_rate"] == 0
        assert level["requests_per_s"] > 0 and level["latency_p95_ms"] >= level["latency_p50_ms"] > 0
        assert level["input_tokens_mean"] > 0 and 1 <= level["output_tokens_mean"] <= 4
    assert report["variants"]["batching"]["speedup_vs_sequential"]["1"] == 1.0
    assert report["workload"]["max_new_tokens"] == 4 and report["model"]["method"] == "lora"
