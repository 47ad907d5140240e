"""Request/response logging for the endpoint, with personal data redacted.

Every answered or rejected request becomes one record: time, request id, HTTP status, the
instruction, system prompt and answer with PII replaced by [EMAIL]/[PHONE]/[CARD]/[ID] (whatever
the output filter setting), the PII kinds found, token counts, latency, cache hit and the size of
the dynamic batch it was decoded in. Records are bounded: every text is redacted, cut to
`serve.log.field_chars` characters, and stripped of what UTF-8 cannot encode (lone surrogates
become "?"). A rejected request is recorded with the server's own error message only, which
never repeats client text (serve.validation); the request body and its keys are never stored.
Records go to

- a local JSONL file (`serve.log_path`; one line per request, appended with one write so
  several worker processes can share the file), rotated when it passes `serve.log.max_bytes`
  (requests.jsonl -> requests.jsonl.1 -> ... up to `serve.log.backups` files; older are
  deleted), and
- Azure ML data collection when the `azureml-ai-monitoring` package is importable and the
  deployment enables it (its `data_collector` with collections `model_inputs` and `model_outputs`;
  Azure ML then sets AZUREML_MDC_CONFIG_PATH or AZUREML_MDC_ENABLED). Otherwise (local runs) no
  collector is created.

Logging never fails a request: an error is reported once on stderr and logging goes on.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from stages.core.pii import redact


def clean(text: str, limit: int) -> str:
    """`text` safe to store: what UTF-8 cannot encode replaced, PII redacted, at most `limit` characters."""
    text = str(text)[: limit * 2].encode("utf-8", "replace").decode("utf-8")  # a lone surrogate -> "?"
    text = redact(text)[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redacted(text: str | None, limit: int) -> tuple[str | None, list[str]]:
    if text is None:
        return None, []
    text = str(text).encode("utf-8", "replace").decode("utf-8")
    text, kinds = redact(text)
    return (text if len(text) <= limit else text[: limit - 1] + "…"), kinds


class RequestLog:
    def __init__(self, path: str | os.PathLike | None, use_collector: bool = True, max_bytes: int = 10_000_000,
                 backups: int = 3, field_chars: int = 2000):
        self.path = Path(path) if path else None
        self.max_bytes, self.backups, self.field_chars = int(max_bytes), int(backups), int(field_chars)
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
        try:
            entry = self._entry(request_id, status, latency_ms, instruction, system, response, prompt_tokens,
                                completion_tokens, max_new_tokens, temperature, cache_hit, batch_size,
                                finish_reason, error, index)
        except Exception as exc:  # a record that cannot be built must not fail the request
            self._warn("record", f"cannot build a request log record: {type(exc).__name__}")
            return {}
        self._write(entry)
        self._collect(entry)
        return entry

    def _entry(self, request_id, status, latency_ms, instruction, system, response, prompt_tokens,
               completion_tokens, max_new_tokens, temperature, cache_hit, batch_size, finish_reason, error,
               index) -> dict:
        limit = self.field_chars
        instruction, pii_in = redacted(instruction, limit)
        system, pii_sys = redacted(system, limit)
        response, pii_out = redacted(response, limit)
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": clean(request_id, 100), "index": index, "status": status,
            "latency_ms": round(latency_ms, 2), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "cache_hit": cache_hit, "batch_size": batch_size,
            "finish_reason": finish_reason, "system": system, "instruction": instruction,
            "response": response, "pii_in_request": sorted(set(pii_in + pii_sys)),
            "pii_in_response": sorted(set(pii_out)), "error": None if error is None else clean(error, limit),
        }

    def _write(self, entry: dict) -> None:
        if self.path is None:
            return
        try:
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8", "replace")
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    # An exclusive lock across worker processes: one of them rotates, none writes meanwhile.
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if not self._is_current(fd):  # another process rotated meanwhile
                        os.close(fd)
                        fd = -1
                        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    if os.fstat(fd).st_size + len(line) > self.max_bytes:
                        os.close(fd)
                        fd = -1
                        self._rotate()
                        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    os.write(fd, line)
                finally:
                    if fd >= 0:
                        os.close(fd)
        except Exception as exc:
            self._warn("file", f"cannot write request log {self.path}: {type(exc).__name__}: {exc}")

    def _is_current(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _rotate(self) -> None:
        """requests.jsonl -> .1 -> .2 ... keeping `backups` files; with 0 backups the log restarts empty."""
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for number in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

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
