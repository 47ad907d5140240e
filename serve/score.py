"""Azure ML scoring script for the fine-tuned Llama (managed online endpoint, or `azmlinfsrv` locally).

Contract of the Azure ML inference server (azureml-inference-server-http):
- `init()` runs once per worker process when it starts: it loads the packaged model from
  AZUREML_MODEL_DIR (the registered folder may sit one or more levels below it).
- `run(request)` gets the raw HTTP request (`@rawhttp`), so this script decides about methods,
  query strings and body size before anything is parsed. A dict or list is returned as JSON with
  HTTP 200; an AMLResponse carries its own status. The worker never dies on a request: every
  exception is caught here, and a 500 means a fault of the server, never of the client.

Statuses: 400 a bad request (bounded message naming the field, never repeating client text);
405 anything but POST, including `GET /score?instruction=...` (a query string ends up in proxy and
access logs, so it is never used as input); 413 a body over `serve.max_body_bytes`; 429 the
decoding queue is full (`serve.queue`, with Retry-After); 503 the request's deadline passed
(`serve.request_timeout_s`, with Retry-After) or the decoding thread is down.

Liveness: `GET /` (azmlinfsrv's route) answers 503 when the decoding thread is dead or stuck, and
every response carries `x-serve-instance`, the value of SERVE_INSTANCE_ID given by whoever started
the server (the deploy stage checks it is talking to its own process).

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

from azureml_inference_server_http.api.aml_request import rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from serve import INSTANCE_HEADER  # noqa: E402
from serve.engine import DeadlineExceeded, DecoderDown, Engine, Overloaded  # noqa: E402
from serve.monitoring import RequestLog, clean  # noqa: E402
from serve.validation import RequestError  # noqa: E402

engine: Engine | None = None
request_log: RequestLog | None = None
max_body_bytes = 1_000_000
INSTANCE_ID = os.environ.get("SERVE_INSTANCE_ID", "")
# A body over the limit but at most this many times it is read and dropped, so that the client
# gets its 413 instead of a reset connection; a larger one is refused without reading it.
DRAIN_FACTOR = 8


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


def install_health_hook() -> bool:
    """Make azmlinfsrv's liveness route (GET /) report the decoding thread, and tag every response
    with INSTANCE_HEADER. init() runs while azmlinfsrv registers its blueprint, so hooks added to
    that blueprint now are registered with it (azureml-inference-server-http 1.5.1; a test checks)."""
    routes = sys.modules.get("azureml_inference_server_http.server.routes")
    blueprint = getattr(routes, "main_blueprint", None)
    if blueprint is None or getattr(blueprint, "_got_registered_once", True):
        print("[score] liveness hook not installed: not running inside azmlinfsrv's app setup", flush=True)
        return False
    from flask import request

    def liveness():
        if request.path == "/" and request.method == "GET" and engine is not None:
            healthy, why = engine.batcher.health()
            if not healthy:
                return AMLResponse({"status": "unhealthy", "reason": why}, 503, json_str=True)
        return None

    def tag(response):
        if INSTANCE_ID:
            response.headers[INSTANCE_HEADER] = INSTANCE_ID
        return response

    blueprint.before_request(liveness)
    blueprint.after_request(tag)
    return True


def init() -> None:
    global engine, request_log, max_body_bytes
    started = time.perf_counter()
    config = load_serve_config()
    model_root = os.environ.get("AZUREML_MODEL_DIR")
    if not model_root:
        raise RuntimeError("AZUREML_MODEL_DIR is not set (azmlinfsrv --model_dir models/merged sets it)")
    engine = Engine(model_root, config)
    request_log = RequestLog(config["log_path"] or None, max_bytes=config["log"]["max_bytes"],
                             backups=config["log"]["backups"], field_chars=config["log"]["field_chars"])
    max_body_bytes = int(config["max_body_bytes"])
    install_health_hook()
    print(f"[score] model {engine.model_dir} on {engine.device}, context {engine.context_length}, "
          f"batching max {engine.batcher.max_batch} window {engine.batcher.window_s * 1000:g} ms, "
          f"cache {'on' if engine.cache else 'off'}, pii filter {config['pii_filter']}, "
          f"log {config['log_path'] or 'off'}, data collection {'on' if request_log.collector_active else 'off'}, "
          f"loaded in {time.perf_counter() - started:.1f} s; default max_new_tokens "
          f"{engine.limits.max_new_tokens_default}", flush=True)
    for note in engine.notes:
        print(f"[score] note: {note}", flush=True)


def _request_id(headers) -> str:
    """The client's request id (bounded to 100 characters by azmlinfsrv), cleaned for logs."""
    headers = {k.lower(): v for k, v in dict(headers or {}).items()}
    given = headers.get("x-ms-client-request-id") or headers.get("x-request-id")
    return clean(given, 100) if given else str(uuid.uuid4())


def _json_error(status: int, body: dict, headers: dict | None = None) -> AMLResponse:
    return AMLResponse(body, status, headers or {}, json_str=True)


def read_body(request) -> bytes:
    """The body, refused (413) beyond max_body_bytes before it is read; refused (405) for any
    method but POST, so a query string is never taken as input."""
    if request.method != "POST":
        raise HttpRefusal(405, f"{request.method} is not allowed: send the request as a JSON body with POST",
                          {"Allow": "POST"})
    length = request.content_length
    if length is not None and length > max_body_bytes:
        if length <= DRAIN_FACTOR * max_body_bytes:  # read it away, so the client sees the 413
            _discard(request.stream, length)
        raise HttpRefusal(413, f"body of {length} bytes is over the limit of {max_body_bytes}")
    body = request.stream.read(max_body_bytes + 1)
    if len(body) > max_body_bytes:
        raise HttpRefusal(413, f"body is over the limit of {max_body_bytes} bytes")
    return body


def _discard(stream, length: int, chunk: int = 1 << 16) -> None:
    while length > 0:
        data = stream.read(min(chunk, length))
        if not data:
            return
        length -= len(data)


class HttpRefusal(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@rawhttp
def run(request, request_headers: dict | None = None):
    started = time.perf_counter()
    request_id = _request_id(request_headers if request_headers is not None else getattr(request, "headers", None))

    def elapsed_ms() -> float:
        return (time.perf_counter() - started) * 1000

    if engine is None:
        return _json_error(503, {"error": "model not loaded (init() failed or has not run)"})
    try:
        raw = read_body(request) if hasattr(request, "method") else request
        requests, is_batch = engine.parse(raw)
        answers = engine.answer(requests, is_batch)
    except HttpRefusal as exc:
        request_log.record(request_id=request_id, status=exc.status, latency_ms=elapsed_ms(), error=exc.message)
        return _json_error(exc.status, {"error": exc.message}, exc.headers)
    except RequestError as exc:
        request_log.record(request_id=request_id, status=400, latency_ms=elapsed_ms(), error=exc.message)
        return _json_error(400, exc.body())
    except Overloaded as exc:  # the queue is full (429) or the deadline passed (503, DeadlineExceeded)
        status = 503 if isinstance(exc, DeadlineExceeded) else 429
        request_log.record(request_id=request_id, status=status, latency_ms=elapsed_ms(), error=str(exc))
        return _json_error(status, {"error": str(exc), "retry_after_s": exc.retry_after_s},
                           {"Retry-After": str(int(exc.retry_after_s))})
    except DecoderDown as exc:
        request_log.record(request_id=request_id, status=503, latency_ms=elapsed_ms(), error=str(exc))
        return _json_error(503, {"error": f"{exc}; the server is restarting or needs a restart"})
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
