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


def test_deploy_local_smoke_tests_records_and_stops(merged, tmp_path, capsys, perf_dir):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml")
    code = main(["--model", str(merged), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params),
                 "--eval-metrics", str(write_eval(tmp_path / "eval.json", True, []))])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((tmp_path / "deploy.json").read_text())
    assert result["target"] == "local" and result["passed"] is True
    assert result["server"].startswith("azmlinfsrv ")
    # the free port and the timings are not metrics (their bytes would differ every run): logs/perf
    assert not {"url", "ready_seconds", "seconds"} & set(result)
    perf = json.loads((perf_dir / "deploy.json").read_text())
    assert perf["url"].startswith("http://127.0.0.1:") and perf["url"].endswith("/score")
    assert len(perf["latency_ms"]) == 2 and perf["ready_seconds"] > 0
    smoke = result["smoke"]
    assert [r["status"] for r in smoke["requests"]] == [200, 200]
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] >= 1 for r in smoke["requests"])
    assert smoke["batch_ok"] and smoke["invalid_request_status"] == 400 and smoke["healthy_after"]
    assert result["model"]["merge_check_passed"] is True
    assert result["server_stopped"] is True and port_closed(perf["url"]), "the stage leaves no server behind"
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
    code = main(["--model", str(broken), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params),
                 "--eval-metrics", str(write_eval(tmp_path / "eval.json", True, []))])
    err = capsys.readouterr().err
    assert code == 1
    assert "exited with status" in err and "Traceback (most recent call last)" not in err.split("end of its log")[0]
    result = json.loads((tmp_path / "deploy.json").read_text())
    assert result["passed"] is False and "azmlinfsrv exited" in result["error"]


def test_deploy_without_a_packaged_model_is_a_config_error(tmp_path, capsys):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml")
    code = main(["--model", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params),
                 "--eval-metrics", str(write_eval(tmp_path / "eval.json", True, []))])
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


# ---------------------------------------------------------------------------------------------
# Deploy owns its server (issue 13) and the gate guards it (issue 15)
# ---------------------------------------------------------------------------------------------

class Decoy:
    """Another process's server on a port: answers 200 "Healthy" to everything."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = b'{"response": "decoy", "prompt_tokens": 1, "completion_tokens": 1, "response_time_ms": 1}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_eval(path: Path, passed: bool, reasons: list[str]) -> Path:
    path.write_text(json.dumps({"gate": {"passed": passed, "reasons": reasons, "checks": []}}), encoding="utf-8")
    return path


def test_deploy_on_a_busy_port_fails_clearly_and_a_decoy_cannot_pass(merged, tmp_path, capsys):
    from stages.deploy import main

    decoy = Decoy()
    try:
        params = write_params(tmp_path / "params.yaml", port=decoy.port)
        code = main(["--model", str(merged), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params),
                     "--eval-metrics", str(write_eval(tmp_path / "eval.json", True, []))])
    finally:
        decoy.close()
    err = capsys.readouterr().err
    assert code == 1 and f"port {decoy.port} on 127.0.0.1 is already in use" in err and "deploy.port: 0" in err
    result = json.loads((tmp_path / "deploy.json").read_text())
    assert result["passed"] is False and "already in use" in result["error"]


def test_readiness_needs_the_servers_own_instance_id(tmp_path):
    """A decoy answering 200 on the port the stage polls is never taken for its server."""
    import subprocess
    import sys

    from stages.deploy import LocalServer, ServerError

    decoy = Decoy()
    server = LocalServer(tmp_path, {}, port=decoy.port, readiness_timeout_s=2, work_dir=tmp_path)
    server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(ServerError, match="another process answers on port"):
            server.wait_ready()
        assert not server.healthy()
    finally:
        server.process.kill()
        server.process.wait()
        decoy.close()


def test_deploy_refuses_a_model_that_failed_the_gate(tmp_path, capsys):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml")
    failed = write_eval(tmp_path / "eval.json", False, ["rouge_l 0.05 < 0.2 (min_tuned)", "fact_recall 0.01 < 0.08"])
    code = main(["--model", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "deploy.json"),
                 "--params", str(params), "--eval-metrics", str(failed)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1 and "deployment refused: the model failed the evaluation gate" in err
    assert "rouge_l 0.05 < 0.2 (min_tuned); fact_recall 0.01 < 0.08" in err and "deploy.require_gate: false" in err
    assert json.loads((tmp_path / "deploy.json").read_text())["refused"] == "gate"


def test_deploy_without_a_gate_verdict_is_a_config_error(tmp_path, capsys):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml")
    code = main(["--model", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "deploy.json"),
                 "--params", str(params), "--eval-metrics", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.json not found" in err and "dvc repro publish_eval" in err
    (tmp_path / "eval.json").write_text('{"tuned": {}}')
    code = main(["--model", str(tmp_path / "nothing"), "--metrics", str(tmp_path / "deploy.json"),
                 "--params", str(params), "--eval-metrics", str(tmp_path / "eval.json")])
    assert code == 2 and "has no gate verdict" in capsys.readouterr().err


def test_require_gate_false_deploys_a_failed_model_with_a_warning(merged, tmp_path, capsys):
    from stages.deploy import main

    params = write_params(tmp_path / "params.yaml", require_gate=False)
    failed = write_eval(tmp_path / "eval.json", False, ["rouge_l 0.05 < 0.2"])
    code = main(["--model", str(merged), "--metrics", str(tmp_path / "deploy.json"), "--params", str(params),
                 "--eval-metrics", str(failed)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "WARNING: deploying a model that failed the evaluation gate" in out.out and "rouge_l 0.05 < 0.2" in out.out
    result = json.loads((tmp_path / "deploy.json").read_text())
    assert result["passed"] is True and result["gate"] == {"passed": False, "reasons": ["rouge_l 0.05 < 0.2"],
                                                          "required": False}
