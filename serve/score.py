"""Azure ML scoring script for the fine-tuned Llama (managed online endpoint, or `azmlinfsrv` locally).

Contract of the Azure ML inference server (azureml-inference-server-http):
- `init()` runs once per worker process when it starts: it loads the packaged model from
  AZUREML_MODEL_DIR (the registered folder may sit one or more levels below it).
- `run(raw_data)` gets the request body as text and answers. A dict or list is returned as JSON
  with HTTP 200; an AMLResponse carries its own status (400 for a bad request, 500 when the model
  fails). The worker never dies on a request: every exception is caught here.

Request (POST /score, JSON):
    {"instruction": "What is PM job code?", "system": "...", "max_new_tokens": 200, "temperature": 0.7}
    only "instruction" is required; or a batch: {"requests": [<request>, ...]}
Response:
    {"response": "...", "prompt_tokens": 25, "completion_tokens": 12, "response_time_ms": 1200.0,
     "finish_reason": "stop"}
    a batch is answered with a JSON list of those, in order.
Errors (HTTP 400):
    {"error": "max_new_tokens: must be between 1 and 256, got 5000",
     "details": [{"field": "max_new_tokens", "message": "must be between 1 and 256, got 5000"}]}

Settings come from serve/serve_config.json next to this file (written by
serve.codefolder.build_code_folder from params.yaml's `serve:` section), or from the file named by
SERVE_CONFIG, or, in a repository checkout, from params.yaml.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
CODE_ROOT = HERE.parent
if str(CODE_ROOT) not in sys.path:  # the server loads this file by path, not as part of a package
    sys.path.insert(0, str(CODE_ROOT))

from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from serve.engine import Engine  # noqa: E402
from serve.monitoring import RequestLog  # noqa: E402
from serve.validation import RequestError  # noqa: E402

engine: Engine | None = None
request_log: RequestLog | None = None


def load_serve_config() -> dict:
    explicit = os.environ.get("SERVE_CONFIG")
    if explicit:
        return json.loads(Path(explicit).read_text(encoding="utf-8"))
    bundled = HERE / "serve_config.json"
    if bundled.is_file():
        return json.loads(bundled.read_text(encoding="utf-8"))
    params_file = CODE_ROOT / "params.yaml"
    if params_file.is_file():
        from stages.core.params import load_params

        return load_params(params_file).serve.model_dump()
    raise FileNotFoundError(f"no serve config: expected {bundled} (serve.codefolder.build_code_folder writes it), "
                            f"SERVE_CONFIG, or {params_file}")


def init() -> None:
    global engine, request_log
    started = time.perf_counter()
    config = load_serve_config()
    model_root = os.environ.get("AZUREML_MODEL_DIR")
    if not model_root:
        raise RuntimeError("AZUREML_MODEL_DIR is not set (azmlinfsrv --model_dir models/merged sets it)")
    engine = Engine(model_root, config)
    request_log = RequestLog(config["log_path"] or None)
    print(f"[score] model {engine.model_dir} on {engine.device}, context {engine.context_length}, "
          f"batching max {engine.batcher.max_batch} window {engine.batcher.window_s * 1000:g} ms, "
          f"cache {'on' if engine.cache else 'off'}, pii filter {config['pii_filter']}, "
          f"log {config['log_path'] or 'off'}, data collection {'on' if request_log.collector_active else 'off'}, "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)


def _request_id(headers: dict | None) -> str:
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    return headers.get("x-ms-client-request-id") or headers.get("x-request-id") or str(uuid.uuid4())


def _json_error(status: int, body: dict) -> AMLResponse:
    return AMLResponse(body, status, json_str=True)


def run(raw_data, request_headers: dict | None = None):
    started = time.perf_counter()
    request_id = _request_id(request_headers)

    def elapsed_ms() -> float:
        return (time.perf_counter() - started) * 1000

    if engine is None:
        return _json_error(503, {"error": "model not loaded (init() failed or has not run)"})
    try:
        requests, is_batch = engine.parse(raw_data)
        answers = engine.answer(requests, is_batch)
    except RequestError as exc:
        request_log.record(request_id=request_id, status=400, latency_ms=elapsed_ms(), error=exc.message)
        return _json_error(400, exc.body())
    except Exception as exc:
        traceback.print_exc()
        request_log.record(request_id=request_id, status=500, latency_ms=elapsed_ms(),
                           error=f"{type(exc).__name__}: {exc}")
        return _json_error(500, {"error": "the model failed to answer; see the server log", "request_id": request_id})

    latency = round(elapsed_ms(), 1)
    results = []
    for index, answer in enumerate(answers):
        results.append({"response": answer.response, "prompt_tokens": answer.prompt_tokens,
                        "completion_tokens": answer.completion_tokens, "response_time_ms": latency,
                        "finish_reason": answer.finish_reason})
        request_log.record(
            request_id=request_id, index=index if is_batch else None, status=200, latency_ms=latency,
            instruction=answer.request.instruction, system=answer.system, response=answer.response,
            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
            max_new_tokens=answer.request.max_new_tokens, temperature=answer.request.temperature,
            cache_hit=answer.cache_hit, batch_size=answer.batch_size, finish_reason=answer.finish_reason)
    return results if is_batch else results[0]
