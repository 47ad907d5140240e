"""deploy stage: run the packaged model behind the Azure ML inference server, locally or on Azure.

    python -m stages.deploy                 # params deploy.target: local | azure | none
    python -m stages.deploy serve           # local server in the foreground until Ctrl-C

The gate guards every target: the stage reads the evaluation's verdict from metrics/eval.json
(`gate.passed`, `gate.reasons`) and refuses a model that failed it, with one message quoting the
reasons (exit 1), unless `deploy.require_gate: false`.

target local: builds the endpoint's code folder (serve.codefolder, exactly what Azure ML gets),
starts `azmlinfsrv` (azureml-inference-server-http, the server Azure ML runs for scoring scripts)
with serve/score.py and models/merged on deploy.host:deploy.port (0: a free port; a fixed port that
is busy is an error), waits until its liveness route (GET /) answers with the per-start instance
id the stage gave it (so another process on the port cannot pass for it), sends the smoke prompts,
one batch and one invalid request to POST /score, writes metrics/deploy.json and stops the server
(the stage leaves no process behind).

target azure: runs `python -m stages.azure.endpoints deploy` (managed online endpoint; see
docs/azure.md) and records its exit status. target none: records that nothing was deployed.

azmlinfsrv always binds 0.0.0.0. For a loopback host this stage starts the same server entry point
(`azureml_inference_server_http.amlserver.run`, same arguments) with the bind address replaced, so
the model is not exposed to the network; with host 0.0.0.0 it runs the `azmlinfsrv` command itself.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .core import cli
from .core.io import read_json, write_json
from .core.perf import write_perf
from .core.params import ConfigError, DeployParams, load_params

STAGE = "deploy"
REPO_ROOT = Path(__file__).resolve().parents[1]
# azmlinfsrv's own entry point with the bind host replaced (it hard-codes 0.0.0.0).
# Azure ML mounts a registered model at AZUREML_MODEL_DIR=.../azureml-models/<name>/<version>/<folder>;
# the local server gets the same layout (a link to models/merged), so score.py finds it the same way.
MODEL_NAME = "corporate-qa-llama"
BIND_WRAPPER = ("import sys; from azureml_inference_server_http import amlserver; "
                "amlserver.DEFAULT_HOST = sys.argv.pop(1); sys.exit(amlserver.run())")


def log(message: str) -> None:
    print(f"[{STAGE}] {message}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_exchange(method: str, url: str, body: bytes | str | None = None, timeout: float = 120.0,
                  headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one HTTP request; HTTP errors are results."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def http(method: str, url: str, body: bytes | str | None = None, timeout: float = 120.0,
         headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one HTTP request; HTTP errors are results, not exceptions."""
    status, _, content = http_exchange(method, url, body, timeout, headers)
    return status, content


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class GateRefused(Exception):
    """The evaluation gate failed and deploy.require_gate is on."""


def check_gate(eval_metrics: str | Path, require: bool) -> dict:
    """The gate verdict from the evaluation's metrics (`gate`: {"passed": bool, "reasons": [str]}).

    Raises GateRefused for a failed gate when `require`; ConfigError when there is no verdict."""
    hint = " (run the evaluate stage: dvc repro publish_eval; or set deploy.require_gate: false)"
    metrics = read_json(eval_metrics, missing=hint)
    gate = metrics.get("gate") if isinstance(metrics, dict) else None
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise ConfigError(f"{eval_metrics} has no gate verdict (expected \"gate\": {{\"passed\": true|false, "
                          f"\"reasons\": [...]}}){hint}")
    reasons = [str(reason) for reason in gate.get("reasons") or []]
    verdict = {"passed": gate["passed"], "reasons": reasons, "required": require}
    if not gate["passed"]:
        quoted = "; ".join(reasons) or "no reasons recorded"
        if require:
            raise GateRefused(f"the model failed the evaluation gate ({eval_metrics}): {quoted}. "
                              "Not deployed; set deploy.require_gate: false to deploy it anyway")
        log(f"WARNING: deploying a model that failed the evaluation gate (deploy.require_gate: false): {quoted}")
    return verdict


class ServerError(Exception):
    """The local server did not start or stopped unexpectedly."""


class LocalServer:
    """azmlinfsrv serving `model_dir` with the code folder built from this repository.

    with LocalServer("models/merged", serve_config) as server:
        status, body = http("POST", server.score_url, json.dumps({"instruction": "..."}))
    """

    def __init__(self, model_dir: str | Path, serve: dict, host: str = "127.0.0.1", port: int = 0,
                 workers: int = 1, readiness_timeout_s: float = 180.0, work_dir: str | Path | None = None,
                 extra_env: dict | None = None, entry_script: str | Path | None = None):
        self.model_dir = Path(model_dir).resolve()
        self.serve = dict(serve)
        self.host, self.port = host, port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.workers = workers
        self.readiness_timeout_s = readiness_timeout_s
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="endpoint-"))
        self.extra_env = extra_env or {}
        # Another scoring script copied into the code folder's serve/ and run instead of score.py (tests).
        self.entry_script = Path(entry_script) if entry_script else None
        self.process: subprocess.Popen | None = None
        self.log_path = self.work_dir / "server.log"
        self.ready_seconds: float | None = None
        # Given to the server (SERVE_INSTANCE_ID), which returns it on every response: whoever
        # answers on the port without it is another process.
        self.instance_id = secrets.token_hex(16)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"

    @property
    def score_url(self) -> str:
        return f"{self.base_url}/score"

    def mount_model(self) -> Path:
        """<work>/azureml-models/<name>/1/<model folder name> -> the model: Azure ML's layout."""
        version_dir = self.work_dir / "azureml-models" / MODEL_NAME / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        link = version_dir / self.model_dir.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.model_dir, target_is_directory=True)
        return version_dir

    def command(self, entry_script: Path, model_root: Path) -> list[str]:
        args = ["--entry_script", str(entry_script), "--model_dir", str(model_root), "--port", str(self.port)]
        if self.host == "0.0.0.0":
            binary = shutil.which("azmlinfsrv") or str(Path(sys.executable).parent / "azmlinfsrv")
            return [binary, *args]
        return [sys.executable, "-c", BIND_WRAPPER, self.host, *args]

    def start(self) -> "LocalServer":
        from serve.codefolder import SCORING_SCRIPT, build_code_folder, deployment_environment_variables

        if not (self.model_dir / "config.json").is_file() and not any(self.model_dir.rglob("config.json")):
            raise ConfigError(f"{self.model_dir} holds no packaged model (run the package stage: dvc repro package)")
        if port_in_use(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is already in use by another process; "
                              "set deploy.port: 0 (any free port) or stop that process")
        serve = dict(self.serve)
        if serve.get("log_path"):  # relative to the repository, not to the server's working directory
            serve["log_path"] = str((REPO_ROOT / serve["log_path"]).resolve())
        code_dir = build_code_folder(self.work_dir / "code", serve=serve)
        entry = code_dir / SCORING_SCRIPT
        if self.entry_script is not None:
            entry = code_dir / "serve" / self.entry_script.name
            shutil.copy2(self.entry_script, entry)
        env = {k: v for k, v in os.environ.items() if k not in ("AZUREML_MODEL_DIR", "SERVE_CONFIG", "PYTHONPATH")}
        env.update(deployment_environment_variables(serve))
        env.update({"WORKER_COUNT": str(self.workers), "AML_APP_ROOT": str(code_dir),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1", "SERVE_INSTANCE_ID": self.instance_id})
        env.update(self.extra_env)
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(entry, self.mount_model()), cwd=code_dir, env=env,
                                        stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def answers_as_itself(self, headers: dict) -> bool:
        from serve import INSTANCE_HEADER

        return headers.get(INSTANCE_HEADER) == self.instance_id

    def wait_ready(self) -> float:
        """Until GET / answers 200 with this start's instance id; a 200 without it is another server."""
        started = time.monotonic()
        impostor = False
        while time.monotonic() - started < self.readiness_timeout_s:
            if self.process.poll() is not None:
                raise ServerError(f"azmlinfsrv exited with status {self.process.returncode} before it was ready; "
                                  f"end of its log:\n{self.log_tail()}")
            try:
                status, headers, _ = http_exchange("GET", f"{self.base_url}/", timeout=5)
                if status == 200 and self.answers_as_itself(headers):
                    self.ready_seconds = time.monotonic() - started
                    return self.ready_seconds
                impostor = impostor or status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                pass
            time.sleep(0.25)
        other = (f"; another process answers on port {self.port} (without this server's instance id)"
                 if impostor else "")
        raise ServerError(f"azmlinfsrv was not ready within {self.readiness_timeout_s:g} s "
                          f"(deploy.readiness_timeout_s){other}; end of its log:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Our process is running and it (not another one) answers its liveness route with 200."""
        try:
            if self.process is None or self.process.poll() is not None:
                return False
            status, headers, _ = http_exchange("GET", f"{self.base_url}/", timeout=10)
            return status == 200 and self.answers_as_itself(headers)
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (gunicorn master and its workers), then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:  # workers left behind by a killed master
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if getattr(self, "_log_handle", None):
            self._log_handle.close()
            self._log_handle = None
        if self._own_work_dir and self.process is not None and self.process.returncode is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Smoke test
# ---------------------------------------------------------------------------------------------

ANSWER_KEYS = ("response", "prompt_tokens", "completion_tokens", "response_time_ms")


def smoke_test(server: LocalServer, prompts: list[str], max_new_tokens: int | None = None) -> dict:
    """Each smoke prompt, one batch of them and one invalid request against POST /score. Without
    max_new_tokens the smoke requests leave it out, so the endpoint's default answers them: with
    serve.max_new_tokens_default auto, what the model was evaluated with (its serving.json)."""
    from stages.core.pii import redact

    checks, failures = [], []
    for prompt in prompts:
        started = time.perf_counter()
        status, headers, body = http_exchange("POST", server.score_url,
                                              json.dumps({"instruction": prompt} | (
                                                  {"max_new_tokens": max_new_tokens} if max_new_tokens else {})))
        latency = (time.perf_counter() - started) * 1000
        if not server.answers_as_itself(headers):
            failures.append(f"'{prompt}': answered by another process (no instance id of the server started here)")
        entry = {"instruction": redact(prompt)[0], "status": status, "latency_ms": round(latency, 1)}
        try:
            answer = json.loads(body)
        except json.JSONDecodeError:
            answer = None
        if status == 200 and isinstance(answer, dict) and all(k in answer for k in ANSWER_KEYS):
            entry.update(response=redact(answer["response"])[0][:300], prompt_tokens=answer["prompt_tokens"],
                         completion_tokens=answer["completion_tokens"], finish_reason=answer.get("finish_reason"))
        else:
            failures.append(f"'{prompt}': HTTP {status} {body[:200]!r}")
        checks.append(entry)
    status, body = http("POST", server.score_url,
                        json.dumps({"requests": [{"instruction": p, "max_new_tokens": 8} for p in prompts]}))
    batch_ok = status == 200 and isinstance(json.loads(body), list) and len(json.loads(body)) == len(prompts)
    if not batch_ok:
        failures.append(f"batch request: HTTP {status} {body[:200]!r}")
    status_bad, body_bad = http("POST", server.score_url, json.dumps({"instruction": "hi", "max_new_tokens": -1}))
    bad_ok = status_bad == 400 and "max_new_tokens" in body_bad.decode("utf-8", "replace")
    if not bad_ok:
        failures.append(f"invalid request answered HTTP {status_bad} {body_bad[:200]!r}, expected 400 naming max_new_tokens")
    healthy = server.healthy()
    if not healthy:
        failures.append("server not healthy after the smoke test")
    return {"requests": checks, "batch_ok": batch_ok, "invalid_request_status": status_bad, "healthy_after": healthy,
            "passed": not failures, "failures": failures}


def model_summary(model_dir: Path) -> dict:
    card_path = model_dir / "card.json"
    if not card_path.is_file():
        return {}
    card = json.loads(card_path.read_text(encoding="utf-8"))
    return {"name": card.get("name"), "method": card.get("model", {}).get("method"),
            "merge_check_passed": card.get("merge_check", {}).get("passed"),
            "data_hash": card.get("data_hash")}


def deploy_local(model_dir: Path, serve: dict, deploy: DeployParams) -> dict:
    import azureml_inference_server_http

    started = time.perf_counter()
    with LocalServer(model_dir, serve, host=deploy.host, port=deploy.port,
                     readiness_timeout_s=deploy.readiness_timeout_s) as server:
        log(f"azmlinfsrv ready at {server.base_url} in {server.ready_seconds:.1f} s")
        smoke = smoke_test(server, deploy.smoke_prompts)
        url = server.score_url
        ready = server.ready_seconds
    stopped = server.process.returncode is not None
    for entry in smoke["requests"]:
        log(f"smoke: HTTP {entry['status']} in {entry['latency_ms']:.0f} ms: {entry.get('response', '')[:80]!r}")
    # The port (free by default) and the timings vary per run: logs/perf/deploy.json, not metrics/.
    write_perf(STAGE, {"url": url, "ready_seconds": round(ready, 2), "seconds": round(time.perf_counter() - started, 2),
                       "latency_ms": [entry.pop("latency_ms") for entry in smoke["requests"]]})
    return {"target": "local", "passed": smoke["passed"] and stopped,
            "server": f"azmlinfsrv {azureml_inference_server_http.__version__}",
            "threads": serve["threads"], "smoke": smoke, "server_stopped": stopped,
            "model": model_summary(model_dir)}


def deploy_azure() -> dict:
    if not (REPO_ROOT / "stages" / "azure" / "endpoints.py").is_file():
        raise ConfigError("deploy.target is azure but stages/azure/endpoints.py does not exist")
    log("target azure: python -m stages.azure.endpoints deploy")
    result = subprocess.run([sys.executable, "-m", "stages.azure.endpoints", "deploy"], cwd=REPO_ROOT)
    return {"target": "azure", "passed": result.returncode == 0, "returncode": result.returncode}


def serve_forever(model_dir: Path, serve: dict, deploy: DeployParams, port: int | None) -> int:
    server = LocalServer(model_dir, serve, host=deploy.host, port=port if port is not None else deploy.port,
                         readiness_timeout_s=deploy.readiness_timeout_s, work_dir=REPO_ROOT / "build" / "endpoint")
    server.start()
    log(f"serving {model_dir} at {server.score_url} (liveness: GET {server.base_url}/); server log {server.log_path}; "
        "Ctrl-C stops it")
    log(f"try: curl -s -X POST {server.score_url} -H 'Content-Type: application/json' "
        "-d '{\"instruction\": \"How do I submit an expense report?\"}'")
    try:
        while server.process.poll() is None:
            time.sleep(1)
        log(f"server exited with status {server.process.returncode}")
        return 1
    except KeyboardInterrupt:
        log("stopping")
        return 0
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "serve"], default="run",
                        help="run: the DVC stage (deploy.target); serve: local server until Ctrl-C")
    parser.add_argument("--model", default="models/merged")
    parser.add_argument("--metrics", default="metrics/deploy.json")
    parser.add_argument("--eval-metrics", default="metrics/eval.json",
                        help="the evaluation's metrics holding the gate verdict (gate.passed, gate.reasons)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--port", type=int, default=None, help="serve: override deploy.port")
    args = parser.parse_args(argv)

    def work():
        params = load_params(args.params)
        serve = params.serve.model_dump()
        model_dir = Path(args.model)
        if args.command == "serve":
            return serve_forever(model_dir, serve, params.deploy, args.port)
        target = params.deploy.target
        try:
            gate = check_gate(args.eval_metrics, params.deploy.require_gate) if target != "none" else None
        except GateRefused as exc:
            write_json(args.metrics, {"target": target, "passed": False, "refused": "gate", "error": str(exc)})
            print(f"[{STAGE}] deployment refused: {exc}", file=sys.stderr)
            return 1
        try:
            if target == "local":
                result = deploy_local(model_dir, serve, params.deploy)
            elif target == "azure":
                result = deploy_azure()
            else:
                result = {"target": "none", "passed": True, "skipped": True}
        except ServerError as exc:
            result = {"target": target, "passed": False, "error": str(exc)[:4000]}
        if gate is not None:
            result["gate"] = gate
        write_json(args.metrics, result)
        if not result["passed"]:
            print(f"[{STAGE}] deployment failed: {result.get('error') or '; '.join(result.get('smoke', {}).get('failures', [])) or result}",
                  file=sys.stderr)
            return 1
        log(f"{target}: passed; wrote {args.metrics}")
        return 0

    return cli.run(work, STAGE)


if __name__ == "__main__":
    sys.exit(main())
