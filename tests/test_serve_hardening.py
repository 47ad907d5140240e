"""Issue 13's endpoint findings, each against the real azmlinfsrv on a loopback port.

Every row of the issue's table (degenerate temperatures, lone surrogates, deep nesting, unknown
keys, 100,000 keys, GET with a query string, slow-header clients), the request log (bounded,
rotated, redacted, never crashed by odd Unicode), overload (429 + Retry-After), the per-request
deadline (503), the liveness route when the decoding thread is stuck or dead, and a bounded burst
at concurrency 64.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stages.deploy import LocalServer, http, http_exchange
from test_serve import serve_config

# A real-looking address: example.com is a reserved documentation domain, which the PII filter
# deliberately leaves alone (stages/core/pii.py, issue 15), so it would not test redaction.
EMAIL = "jane.doe@contoso-mail.com"
ERROR_BODY_CAP = 4096


def post(server, body, timeout=120, headers=None):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    status, headers_out, raw = http_exchange("POST", server.score_url, data, timeout=timeout, headers=headers)
    try:
        return status, headers_out, json.loads(raw)
    except json.JSONDecodeError:
        return status, headers_out, raw


def fields(error: dict) -> list[str]:
    return [detail["field"] for detail in error["details"]]


@pytest.fixture(scope="module")
def server(merged, module_dir):
    work = module_dir("hardened")
    config = serve_config(work / "requests.jsonl", threads=16, max_body_bytes=2_000_000, read_timeout_s=3,
                          log={"max_bytes": 20_000, "backups": 2, "field_chars": 100})
    with LocalServer(merged, config, port=0, work_dir=work, readiness_timeout_s=180) as running:
        yield running


# ---------------------------------------------------------------------------------------------
# The table: every row gets the answer in its last column
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 0.0009])
def test_degenerate_temperature_is_greedy(server, temperature):
    body = {"instruction": "Who approves annual leave?", "max_new_tokens": 6}
    status, _, greedy = post(server, {**body, "temperature": 0})
    status_tiny, _, tiny = post(server, {**body, "temperature": temperature})
    assert status == status_tiny == 200, tiny
    assert tiny["response"] == greedy["response"]


@pytest.mark.parametrize("body,field", [
    ('{"instruction": "hi \\ud800 there"}', "instruction"),
    ('{"instruction": "hi", "system": "\\udfff"}', "system"),
    ('{"requests": [{"instruction": "ok"}, {"instruction": "\\ud83d"}]}', "requests[1].instruction"),
])
def test_lone_surrogate_is_400_naming_the_field(server, body, field):
    status, _, error = post(server, body)
    assert status == 400 and fields(error) == [field], error
    assert "surrogate" in error["error"]


def test_lone_surrogate_as_a_key_is_400(server):
    status, _, error = post(server, '{"instruction": "hi", "\\ud800": 1}')
    assert status == 400 and fields(error) == ["body"] and "1 unknown field" in error["error"], error


@pytest.mark.parametrize("where", ["body", "instruction"])
def test_deep_nesting_is_400(server, where):
    deep = "[" * 100_000 + "]" * 100_000
    status, _, error = post(server, deep if where == "body" else '{"instruction": ' + deep + "}")
    assert status == 400 and fields(error) == ["body"] and "nested too deeply" in error["error"], error


def test_unknown_key_is_not_echoed(server):
    status, _, error = post(server, {"instruction": "hi", EMAIL: "x", "instrution": "y"})
    text = json.dumps(error)
    assert status == 400 and "2 unknown fields" in error["error"] and "'instruction'" in error["error"]
    assert "jane" not in text and "example" not in text and "instrution" not in text


def test_100000_unknown_keys_get_a_bounded_error(server):
    body = json.dumps({f"key{i:05d}x": 0 for i in range(100_000)} | {"max_new_tokens": "x"})
    assert 1_000_000 < len(body) < 2_000_000
    status, headers, error = post(server, body)
    assert status == 400, error
    assert len(json.dumps(error)) < ERROR_BODY_CAP
    assert "100000 unknown fields" in error["error"] and set(fields(error)) == {"body", "instruction",
                                                                                "max_new_tokens"}
    assert "key000" not in json.dumps(error)


def test_many_problems_are_capped_with_a_count(server):
    batch = {"requests": [{"instruction": "", "max_new_tokens": 0, "temperature": -1}] * 4}
    status, _, error = post(server, batch)
    assert status == 400 and len(error["details"]) == 10 and error["more_problems"] == 2
    assert error["error"].endswith("and 2 more problem(s)")


def test_body_over_the_limit_is_413_without_parsing(server):
    status, _, error = post(server, {"instruction": "x" * 2_100_000})
    assert status == 413 and "over the limit of 2000000" in error["error"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_scoring_from_a_query_string_is_refused(server, method):
    status, headers, raw = http_exchange(method, f"{server.score_url}?instruction=my%20mail%20is%20{EMAIL}")
    assert status == 405 and b"jane" not in raw
    if method == "GET":  # PUT and DELETE are refused by the server's router, before the script
        assert headers.get("allow") == "POST" and b"POST" in raw


def _slow_client(port: int, stop: threading.Event, sockets: list) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sockets.append(sock)
    try:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
        while not stop.is_set():
            sock.sendall(b"X")  # one header byte at a time, never finishing the headers
            stop.wait(0.5)
    except OSError:
        pass  # the server dropped us: what it should do


def test_slow_header_clients_do_not_starve_others(server):
    """20 connections (more than the 16 request threads) trickle their headers; a normal client is
    still answered within the read deadline (3 s here) plus its own time."""
    stop, sockets = threading.Event(), []
    clients = [threading.Thread(target=_slow_client, args=(server.port, stop, sockets), daemon=True)
               for _ in range(20)]
    for client in clients:
        client.start()
    try:
        time.sleep(1.0)
        started = time.monotonic()
        status, _, answer = post(server, {"instruction": "Still served?", "max_new_tokens": 2}, timeout=20)
        waited = time.monotonic() - started
        assert status == 200, answer
        assert waited < 12, f"a normal client waited {waited:.1f} s behind slow ones"
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
    assert server.healthy()


# ---------------------------------------------------------------------------------------------
# The request log
# ---------------------------------------------------------------------------------------------

def test_request_log_is_bounded_redacted_and_rotated(server):
    # Everything above went through this server; add a few more, including a logged surrogate key.
    for _ in range(150):
        post(server, {"instruction": "x" * 150, EMAIL: 1})
    assert post(server, '{"instruction": "hi", "\\ud800": 1}')[0] == 400
    assert post(server, {"instruction": f"write to {EMAIL} " + "word " * 20, "max_new_tokens": 2})[0] == 200
    path = Path(server.serve["log_path"])
    files = [path, path.with_name(path.name + ".1"), path.with_name(path.name + ".2")]
    assert all(f.is_file() for f in files) and not path.with_name(path.name + ".3").exists()
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    records = [json.loads(line) for line in text.splitlines()]
    assert all(f.stat().st_size <= 20_000 for f in files)
    assert max(len(line) for line in text.splitlines()) < 1_500
    assert "jane.doe" not in text and "\\ud800" not in text
    assert any(r["instruction"] and "[EMAIL]" in r["instruction"] and r["instruction"].endswith("…")
               for r in records)
    assert any(r["status"] == 400 and "unknown field" in r["error"] for r in records)


def test_log_writer_survives_odd_unicode(tmp_path):
    from serve.monitoring import RequestLog

    log = RequestLog(tmp_path / "log.jsonl", use_collector=False, field_chars=50)
    entry = log.record(request_id="\ud800id", status=400, latency_ms=1.0, instruction="a\udfffb " + "y" * 100,
                       error="bad \ud83d key")
    line = json.loads((tmp_path / "log.jsonl").read_text(encoding="utf-8"))
    assert line == entry and line["instruction"].startswith("a?b ") and len(line["instruction"]) == 50
    assert line["request_id"] == "?id" and line["error"] == "bad ? key"


# ---------------------------------------------------------------------------------------------
# Overload, deadline, liveness: a scoring script that can stall or stop the decoding thread
# ---------------------------------------------------------------------------------------------

FAULTS = '''
import time
from azureml_inference_server_http.api.aml_request import rawhttp
from serve import score
from serve.score import init  # noqa: F401


@rawhttp
def run(request, request_headers=None):
    fault = request.headers.get("x-test-fault")
    batcher = score.engine.batcher if score.engine else None
    manager = getattr(batcher, "manager", None)  # the continuous engine's decoding loop
    if fault == "stall":  # every batch (static) or decoding step (continuous) from now on takes this long
        seconds = float(request.headers.get("x-test-seconds", "5"))
        decode = type(batcher)._decode
        batcher._decode = lambda jobs, t: (time.sleep(seconds), decode(batcher, jobs, t))
        if manager is not None:
            step = type(manager)._generation_step
            manager._generation_step = lambda: (time.sleep(seconds), step(manager))
        return {"stalled": seconds}
    if fault == "unstall":
        batcher.__dict__.pop("_decode", None)
        if manager is not None:
            manager.__dict__.pop("_generation_step", None)
        return {"stalled": 0}
    if fault == "kill":
        batcher.close()
        batcher._thread.join(10)
        return {"alive": batcher._thread.is_alive()}
    return score.run(request, request_headers)
'''


@pytest.fixture(scope="module")
def faulty(merged, module_dir):
    work = module_dir("faulty")
    script = work / "faults.py"
    script.write_text(FAULTS, encoding="utf-8")
    config = serve_config(work / "requests.jsonl", threads=16, request_timeout_s=2.0, stall_s=1.0,
                          queue={"max_pending": 4, "retry_after_s": 3})
    with LocalServer(merged, config, port=0, work_dir=work, readiness_timeout_s=180, entry_script=script) as running:
        yield running


def fault(server, name: str, **headers) -> dict:
    status, _, body = post(server, {}, headers={"x-test-fault": name, **headers})
    assert status == 200, body
    return body


def test_full_queue_is_429_with_retry_after_and_deadline_is_503(faulty):
    fault(faulty, "stall", **{"x-test-seconds": "1.5"})
    try:
        bodies = [{"instruction": f"question {i}", "max_new_tokens": 2} for i in range(10)]
        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(lambda body: post(faulty, body, timeout=30), bodies))
    finally:
        fault(faulty, "unstall")
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 429, 503} and statuses.count(429) >= 6, statuses
    for status, headers, body in results:
        if status in (429, 503):
            assert headers.get("retry-after") == "3" and body["retry_after_s"] == 3
    # 4 admitted at most; each decoding step takes 1.5 s and the deadline is 2 s: an answer needs a
    # prefill and a decoding step (3 s), so the admitted requests end in 503.
    assert statuses.count(503) >= 1 or statuses.count(200) == 4


def test_deadline_answers_503_while_the_decoder_is_slow(faulty):
    fault(faulty, "stall", **{"x-test-seconds": "4"})
    try:
        started = time.monotonic()
        status, headers, body = post(faulty, {"instruction": "slow?", "max_new_tokens": 2}, timeout=30)
        waited = time.monotonic() - started
        assert status == 503 and headers.get("retry-after") == "3", body
        assert "not answered within 2 s" in body["error"] and 1.8 < waited < 3.5
        time.sleep(1.5)  # the stalled step is now over stall_s (1 s): liveness fails while it lasts
        status, raw = http("GET", f"{faulty.base_url}/")
        assert status == 503 and b"one batch" in raw
    finally:
        fault(faulty, "unstall")
    time.sleep(3)
    assert faulty.healthy()


def test_liveness_reports_a_dead_decoding_thread(faulty):
    """Runs last in this module: it stops the decoding thread for good."""
    assert faulty.healthy()
    assert fault(faulty, "kill") == {"alive": False}
    status, raw = http("GET", f"{faulty.base_url}/")
    assert status == 503 and b"not running" in raw
    status, _, body = post(faulty, {"instruction": "anyone?"})
    assert status == 503 and "not running" in body["error"]


# ---------------------------------------------------------------------------------------------
# A bounded burst at concurrency 64
# ---------------------------------------------------------------------------------------------

BURST_P95_BOUND_S = 10.0


def test_burst_at_concurrency_64_is_200_or_429_with_retry_after(merged, tmp_path):
    """64 threads, 128 requests, the queue bounded at 8: only 200s and 429/503s with Retry-After,
    and the p95 latency of the 200s stays under the request deadline (the documented bound)."""
    config = serve_config(tmp_path / "requests.jsonl", threads=80, request_timeout_s=BURST_P95_BOUND_S,
                          queue={"max_pending": 8, "retry_after_s": 1})
    with LocalServer(merged, config, port=0, work_dir=tmp_path, readiness_timeout_s=180) as server:
        def one(i):
            started = time.monotonic()
            status, headers, _ = post(server, {"instruction": f"Burst question {i}?", "max_new_tokens": 8}, timeout=60)
            return status, headers, time.monotonic() - started

        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(one, range(128)))
        assert server.healthy()
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 8 and statuses.count(429) >= 1, statuses
    assert all(headers.get("retry-after") == "1" for status, headers, _ in results if status != 200)
    latencies = sorted(seconds for status, _, seconds in results if status == 200)
    p95 = latencies[max(0, int(round(0.95 * len(latencies))) - 1)]
    assert p95 < BURST_P95_BOUND_S, f"p95 of the 200s {p95:.2f} s"
