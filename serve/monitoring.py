"""Request/response logging for the endpoint, with personal data redacted.

Every answered or rejected request becomes one record: time, request id, HTTP status, the
instruction, system prompt and answer with PII replaced by [EMAIL]/[PHONE]/[CARD]/[ID] (whatever
the output filter setting), the PII kinds found, token counts, latency, cache hit and the size of
the dynamic batch it was decoded in. Records go to

- a local JSONL file (`serve.log_path`; one line per request, appended with one write so
  several worker processes can share the file), and
- Azure ML data collection when the `azureml-ai-monitoring` package is importable and the
  deployment enables it (its `data_collector` with collections `model_inputs` and `model_outputs`;
  Azure ML then sets AZUREML_MDC_CONFIG_PATH or AZUREML_MDC_ENABLED). Otherwise (local runs) no
  collector is created.

Logging never fails a request: an I/O error is reported once on stderr and logging goes on.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from stages.core.pii import redact


def redacted(text: str | None) -> tuple[str | None, list[str]]:
    if text is None:
        return None, []
    return redact(text)


class RequestLog:
    def __init__(self, path: str | os.PathLike | None, use_collector: bool = True):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._warn("file", f"cannot create {self.path.parent}: {exc}")
        self._inputs = self._outputs = None
        if use_collector:
            self._init_collector()

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"[serve.monitoring] {message} (further errors of this kind are not reported)", file=sys.stderr)

    def _init_collector(self) -> None:
        # Azure ML sets these when the deployment's data_collector enables collections; without
        # them the collector would drop everything, so it is not created at all.
        if not (os.environ.get("AZUREML_MDC_CONFIG_PATH") or
                os.environ.get("AZUREML_MDC_ENABLED", "").lower() == "true"):
            return
        try:
            import pandas  # noqa: F401  (the collector takes DataFrames)
            from azureml.ai.monitoring import Collector
        except ImportError:
            return
        try:
            on_error = lambda exc: self._warn("collector", f"data collection: {exc}")  # noqa: E731
            self._inputs = Collector(name="model_inputs", on_error=on_error)
            self._outputs = Collector(name="model_outputs", on_error=on_error)
            from azureml.ai.monitoring.config import get_config

            config = get_config()
            if config is None or not config.enabled():
                self._inputs = self._outputs = None
        except Exception as exc:  # the collector must never stop the endpoint from starting
            self._warn("collector-init", f"data collection unavailable: {exc}")

    @property
    def collector_active(self) -> bool:
        return self._inputs is not None

    def record(self, *, request_id: str, status: int, latency_ms: float, instruction: str | None = None,
               system: str | None = None, response: str | None = None, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, cache_hit: bool | None = None, batch_size: int | None = None,
               finish_reason: str | None = None, error: str | None = None, index: int | None = None) -> dict:
        instruction, pii_in = redacted(instruction)
        system, pii_sys = redacted(system)
        response, pii_out = redacted(response)
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id, "index": index, "status": status,
            "latency_ms": round(latency_ms, 2), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "cache_hit": cache_hit, "batch_size": batch_size,
            "finish_reason": finish_reason, "system": system, "instruction": instruction,
            "response": response, "pii_in_request": sorted(set(pii_in + pii_sys)),
            "pii_in_response": sorted(set(pii_out)), "error": error,
        }
        self._write(entry)
        self._collect(entry)
        return entry

    def _write(self, entry: dict) -> None:
        if self.path is None:
            return
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as exc:
            self._warn("file", f"cannot write request log {self.path}: {exc}")

    def _collect(self, entry: dict) -> None:
        if self._inputs is None:
            return
        try:
            import pandas as pd

            inputs = {k: entry[k] for k in ("request_id", "index", "system", "instruction", "max_new_tokens",
                                            "temperature", "prompt_tokens")}
            outputs = {k: entry[k] for k in ("request_id", "index", "status", "response", "completion_tokens",
                                             "latency_ms", "finish_reason", "cache_hit", "batch_size", "error")}
            inputs["pii_in_request"] = ",".join(entry["pii_in_request"])
            outputs["pii_in_response"] = ",".join(entry["pii_in_response"])
            context = self._inputs.collect(pd.DataFrame([inputs]))
            self._outputs.collect(pd.DataFrame([outputs]), context)
        except Exception as exc:
            self._warn("collector", f"data collection failed: {exc}")
