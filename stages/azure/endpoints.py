"""The managed online endpoint: specs, model registration and the blue/green deployment.

    python -m stages.azure.endpoints specs [--out build/azure] [--color green]   # offline, no credentials
    python -m stages.azure.endpoints deploy [--dry-run]                          # register + blue/green
    python -m stages.azure.endpoints status

`specs` writes, each with `$schema` and loadable by the SDK's loaders:
    endpoint.yml            ManagedOnlineEndpoint (name, auth_mode, public network access)
    model.yml               models/merged as a custom model, tagged with metrics and lineage
                            (git commit, sha256 of dvc.lock, data hash of models/adapter/manifest.json)
    serve-environment.yml   pinned image + serve/environment/requirements.txt (as a conda file)
    deployment-<color>.yml  ManagedOnlineDeployment: instance type/count, request settings matched to
                            the server's batching, LLM-sized probes, the code folder built by
                            serve.codefolder.build_code_folder with score.py, data collection
`deploy` registers the model and environment, then runs stages.azure.rollout's plan against the
endpoint (new colour at 0%, smoke test, params' traffic steps, rollback on failure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from stages.azure import config as az
from stages.azure import rollout as ro
from stages.core.io import read_json, write_text_atomic
from stages.core.params import ConfigError, Params

MODEL_DIR = Path("models/merged")
EVAL_METRICS = Path("metrics/eval.json")
SERVE_REQUIREMENTS = Path("serve/environment/requirements.txt")
SERVE_CONDA = Path("serve/environment/conda.yaml")
SERVE_PYTHON = "3.11"


# ---------------------------------------------------------------- environment

def requirements_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: the serving environment is built from it (serve/environment/)")
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise ConfigError(f"{path}:{number}: pip option {line!r} cannot go into an Azure ML conda file")
        lines.append(line)
    if not any(line.lower().startswith("azureml-inference-server-http") for line in lines):
        raise ConfigError(f"{path}: azureml-inference-server-http must be listed (it runs score.py)")
    return lines


def serving_conda(requirements: Path) -> dict:
    return {"name": "llama-serve", "channels": ["conda-forge", "nodefaults"],
            "dependencies": [f"python={SERVE_PYTHON}", "pip", {"pip": requirements_lines(requirements)}]}


def serving_environment_body(params: Params, spec_path: Path, repo_root: Path = az.REPO_ROOT,
                             requirements: Path | None = None) -> dict:
    """Pinned image + the serving requirements. serve/environment/conda.yaml wins when it exists;
    otherwise a conda file is generated next to the spec from serve/environment/requirements.txt."""
    import yaml

    env = params.azure.endpoint.environment
    conda_path = repo_root / SERVE_CONDA
    if requirements is not None or not conda_path.is_file():
        conda_path = spec_path.parent / "serve-conda.yaml"
        source = repo_root / SERVE_REQUIREMENTS if requirements is None else Path(requirements)
        write_text_atomic(conda_path, yaml.safe_dump(serving_conda(source), sort_keys=False))
    version = hashlib.sha256(env.image.encode() + b"\0" + conda_path.read_bytes()).hexdigest()[:16]
    return {"name": env.name, "version": version, "image": env.image,
            "conda_file": az.rel(conda_path, spec_path),
            "description": "Llama scoring: pinned image + serve/environment/requirements.txt"}


# ---------------------------------------------------------------- model

def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = f"{value:.6g}"


def model_body(params: Params, spec_path: Path, repo_root: Path = az.REPO_ROOT,
               model_dir: Path | None = None, metrics_path: Path | None = None,
               adapter_manifest: Path | None = None) -> dict:
    """The packaged model (models/merged) with lineage tags and the evaluation as properties."""
    model_dir = repo_root / MODEL_DIR if model_dir is None else Path(model_dir)
    metrics_path = repo_root / EVAL_METRICS if metrics_path is None else Path(metrics_path)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} not found: run `dvc repro package` (or `dvc pull`) first")
    tags = az.lineage_tags(repo_root, adapter_manifest or "models/adapter/manifest.json")
    tags["base_model"] = params.model.base
    metrics = read_json(metrics_path) or {}
    gate = metrics.get("gate", {})
    tags["eval_gate_passed"] = str(gate.get("passed", "unknown")).lower()
    properties: dict[str, str] = {}
    for side in ("tuned", "base"):
        _flatten(side, metrics.get(side, {}), properties)
    return {"name": params.azure.endpoint.model_name, "type": "custom_model", "path": az.rel(model_dir, spec_path),
            "description": f"Llama fine-tuned on company Q&A ({tags['train_method']}), merged weights + tokenizer",
            "tags": tags, "properties": properties}


# ---------------------------------------------------------------- endpoint + deployment

def endpoint_body(params: Params) -> dict:
    endpoint = params.azure.endpoint
    return {"name": endpoint.name, "auth_mode": endpoint.auth_mode,
            "public_network_access": endpoint.public_network_access,
            "description": "Llama 3 fine-tuned on company Q&A (blue/green deployments)",
            "tags": {"managed_by": "stages.azure.endpoints"}}


def max_concurrency(params: Params) -> int:
    """Requests in flight per instance, matched to the scoring server's batching: "auto" is
    serve.batching.max_batch; more than serve.threads would just queue inside the container."""
    setting = params.azure.endpoint.request_settings.max_concurrent_requests_per_instance
    value = params.serve.batching.max_batch if setting == "auto" else int(setting)
    if value > params.serve.threads:
        raise ConfigError(f"azure.endpoint.request_settings.max_concurrent_requests_per_instance ({value}) exceeds "
                          f"serve.threads ({params.serve.threads}): the server cannot take that many at once")
    if value < 1:
        raise ConfigError("azure.endpoint.request_settings.max_concurrent_requests_per_instance must be >= 1")
    return value


def probe(settings) -> dict:
    return {"initial_delay": settings.initial_delay_s, "period": settings.period_s, "timeout": settings.timeout_s,
            "failure_threshold": settings.failure_threshold, "success_threshold": settings.success_threshold}


def deployment_environment_variables(params: Params) -> dict:
    from serve.codefolder import deployment_environment_variables as server_settings

    env = dict(server_settings(params.serve))
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    return env


def deployment_body(params: Params, color: str, spec_path: Path, code_dir: Path, model, environment) -> dict:
    from serve.codefolder import SCORING_SCRIPT

    endpoint = params.azure.endpoint
    if color not in endpoint.deployment_colors:
        raise ConfigError(f"deployment colour {color!r} is not one of azure.endpoint.deployment_colors "
                          f"{endpoint.deployment_colors}")
    return {
        "name": color,
        "endpoint_name": endpoint.name,
        "model": model,
        "environment": environment,
        "code_configuration": {"code": az.rel(code_dir, spec_path), "scoring_script": SCORING_SCRIPT},
        "instance_type": endpoint.instance_type,
        "instance_count": endpoint.instance_count,
        "request_settings": {"request_timeout_ms": endpoint.request_settings.request_timeout_ms,
                             "max_concurrent_requests_per_instance": max_concurrency(params)},
        "liveness_probe": probe(endpoint.liveness_probe),
        "readiness_probe": probe(endpoint.readiness_probe),
        "environment_variables": deployment_environment_variables(params),
        "app_insights_enabled": True,
        "data_collector": {"collections": {"model_inputs": {"enabled": "true"},
                                           "model_outputs": {"enabled": "true"}}},
        "tags": {"color": color},
    }


def write_endpoint_specs(params: Params, out_dir: str | Path = az.BUILD_DIR, color: str | None = None,
                         repo_root: Path = az.REPO_ROOT, model_dir: Path | None = None,
                         metrics_path: Path | None = None, model_ref: str | None = None,
                         environment_ref: str | None = None, serve_requirements: Path | None = None,
                         adapter_manifest: Path | None = None) -> dict[str, Path]:
    """Write every online-endpoint spec into `out_dir`; returns their paths. By default the
    deployment embeds the model and environment (self-contained: `az ml online-deployment create
    -f` works on it); `deploy` passes the registered `azureml:name:version` references instead."""
    from serve.codefolder import build_code_folder

    out_dir = Path(out_dir)
    color = color or params.azure.endpoint.deployment_colors[0]
    code_dir = build_code_folder(out_dir / "endpoint_code", serve=params.serve, repo_root=repo_root)
    paths = {"endpoint": out_dir / "endpoint.yml", "model": out_dir / "model.yml",
             "environment": out_dir / "serve-environment.yml", "deployment": out_dir / f"deployment-{color}.yml",
             "code": code_dir}
    az.write_spec(paths["endpoint"], "online_endpoint", endpoint_body(params))
    model = model_body(params, paths["model"], repo_root, model_dir, metrics_path, adapter_manifest)
    az.write_spec(paths["model"], "model", model)
    environment = serving_environment_body(params, paths["environment"], repo_root, serve_requirements)
    az.write_spec(paths["environment"], "environment", environment)
    inline_model = dict(model, path=az.rel(Path(paths["model"].parent, model["path"]), paths["deployment"]))
    inline_env = dict(environment, conda_file=az.rel(Path(paths["environment"].parent, environment["conda_file"]),
                                                     paths["deployment"]))
    az.write_spec(paths["deployment"], "online_deployment",
                  deployment_body(params, color, paths["deployment"], code_dir,
                                  model_ref or inline_model, environment_ref or inline_env))
    return paths


# ---------------------------------------------------------------- Azure world for the rollout

class AzureWorld:
    """stages.azure.rollout.World on a live workspace (MLClient)."""

    def __init__(self, client, params: Params, deployment_spec, repo_root: Path = az.REPO_ROOT,
                 sleep=time.sleep):
        self.client, self.params, self.spec, self.repo_root, self.sleep = client, params, deployment_spec, repo_root, sleep
        self.name = params.azure.endpoint.name
        self._window_start = time.time()

    def gate(self) -> tuple[bool, str]:
        metrics = read_json(self.repo_root / EVAL_METRICS)
        if metrics is None:
            return False, f"{EVAL_METRICS} not found (run the evaluate stage)"
        gate = metrics.get("gate", {})
        return bool(gate.get("passed")), "; ".join(map(str, gate.get("reasons", []))) or "no reasons given"

    def create_deployment(self, color: str) -> None:
        from azure.ai.ml import load_online_deployment

        deployment = load_online_deployment(self.spec(color))
        self.client.online_deployments.begin_create_or_update(deployment).result()

    def smoke_test(self, color: str) -> tuple[bool, str]:
        rollout = self.params.azure.rollout
        for prompt in rollout.smoke_prompts:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
                budget = rollout.smoke_max_new_tokens  # auto: the endpoint's default, as evaluated
                json.dump({"instruction": prompt} | ({} if budget == "auto" else {"max_new_tokens": budget}), handle)
            try:
                raw = self.client.online_endpoints.invoke(endpoint_name=self.name, deployment_name=color,
                                                          request_file=handle.name)
            except Exception as exc:  # noqa: BLE001 - any failure of the call fails the smoke test
                return False, f"{prompt!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                Path(handle.name).unlink(missing_ok=True)
            try:
                answer = json.loads(raw)
            except ValueError:
                return False, f"{prompt!r}: answer is not JSON"
            if not isinstance(answer, dict) or not str(answer.get("response", "")).strip():
                return False, f"{prompt!r}: empty or malformed answer"
        return True, f"{len(rollout.smoke_prompts)} prompts answered"

    def set_traffic(self, traffic: dict, mirror: dict) -> None:
        endpoint = self.client.online_endpoints.get(self.name)
        endpoint.traffic = dict(traffic)
        endpoint.mirror_traffic = dict(mirror)
        self.client.online_endpoints.begin_create_or_update(endpoint).result()
        self._window_start = time.time()

    def observe(self, color: str, minutes: float) -> ro.Health:
        self.sleep(minutes * 60)
        return request_health(self.client, self.name, color, self._window_start, time.time())

    def delete_deployment(self, color: str) -> None:
        self.client.online_deployments.begin_delete(name=color, endpoint_name=self.name).result()


def request_health(client, endpoint_name: str, color: str, start: float, end: float) -> ro.Health:
    """Requests and 5xx answers of one deployment between two times (Azure Monitor metric
    RequestsPerMinute of the endpoint, split by deployment and status code class)."""
    import urllib.parse
    import urllib.request
    from datetime import datetime, timezone

    from azure.identity import DefaultAzureCredential

    endpoint = client.online_endpoints.get(endpoint_name)
    fmt = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    query = urllib.parse.urlencode({
        "api-version": "2023-10-01", "metricnames": "RequestsPerMinute", "aggregation": "Total",
        "interval": "PT1M", "timespan": f"{fmt(start - 60)}/{fmt(end)}",
        "$filter": f"deployment eq '{color}' and statusCodeClass eq '*'"})
    token = DefaultAzureCredential().get_token("https://management.azure.com/.default").token
    request = urllib.request.Request(f"https://management.azure.com{endpoint.id}/providers/microsoft.insights/metrics?{query}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read().decode("utf-8"))
    return health_from_metrics(body)


def health_from_metrics(body: dict) -> ro.Health:
    """Sum an Azure Monitor metrics answer (RequestsPerMinute split by statusCodeClass) into
    requests and 5xx errors."""
    requests = errors = 0
    for metric in body.get("value", []):
        for series in metric.get("timeseries", []):
            labels = {m["name"]["value"].lower(): m["value"] for m in series.get("metadatavalues", [])}
            total = int(sum(point.get("total") or 0 for point in series.get("data", [])))
            requests += total
            if labels.get("statuscodeclass", "").startswith("5"):
                errors += total
    return ro.Health(requests=requests, errors=errors)


def current_traffic(client, name: str) -> dict[str, int] | None:
    """The endpoint's traffic split, or None when the endpoint does not exist yet."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return dict(client.online_endpoints.get(name).traffic or {})
    except ResourceNotFoundError:
        return None


def deploy(params: Params, out_dir: Path, dry_run: bool = False, repo_root: Path = az.REPO_ROOT) -> int:
    from azure.ai.ml import load_environment, load_model, load_online_endpoint

    colors = params.azure.endpoint.deployment_colors
    if dry_run:
        paths = write_endpoint_specs(params, out_dir, repo_root=repo_root)
        plan = ro.plan_rollout(params.azure.rollout, colors, {colors[0]: 100})
        print("specs: " + ", ".join(str(p) for p in paths.values()))
        print("plan when blue is live: " + "; ".join(a.describe() for a in plan))
        return 0
    workspace = az.workspace_from_env()
    client = az.ml_client(workspace)
    name = params.azure.endpoint.name
    traffic = current_traffic(client, name)
    try:
        old, new = ro.pick_colors(colors, traffic or {})
    except ValueError as exc:
        raise ConfigError(f"endpoint {name}: {exc}") from None
    paths = write_endpoint_specs(params, out_dir, color=new, repo_root=repo_root)
    if traffic is None:
        print(f"creating endpoint {name}", flush=True)
        client.online_endpoints.begin_create_or_update(load_online_endpoint(paths["endpoint"])).result()
        traffic = {}
    model = client.models.create_or_update(load_model(paths["model"]))
    environment = client.environments.create_or_update(load_environment(paths["environment"]))
    print(f"registered model {model.name}:{model.version}, environment {environment.name}:{environment.version}",
          flush=True)

    def spec(color: str) -> Path:
        return write_endpoint_specs(params, out_dir, color=color, repo_root=repo_root,
                                    model_ref=f"azureml:{model.name}:{model.version}",
                                    environment_ref=f"azureml:{environment.name}:{environment.version}")["deployment"]

    world = AzureWorld(client, params, spec, repo_root)
    plan = ro.plan_rollout(params.azure.rollout, colors, traffic)
    result = ro.execute(plan, world, params.azure.rollout, colors, traffic)
    for line in result.log:
        print(f"  {line}", flush=True)
    print(f"rollout {result.status}: {new} ({result.reason or 'all steps passed'}); traffic {result.traffic}")
    return 0 if result.status == "promoted" else az.EXIT_FAILED


def status(params: Params) -> int:
    client = az.ml_client()
    traffic = current_traffic(client, params.azure.endpoint.name)
    if traffic is None:
        print(f"endpoint {params.azure.endpoint.name} does not exist")
        return az.EXIT_FAILED
    endpoint = client.online_endpoints.get(params.azure.endpoint.name)
    print(json.dumps({"endpoint": endpoint.name, "scoring_uri": endpoint.scoring_uri, "traffic": traffic,
                      "mirror_traffic": dict(endpoint.mirror_traffic or {})}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.azure.endpoints", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("specs", help="write the endpoint, model, environment and deployment YAML (offline)")
    s.add_argument("--out", type=Path, default=az.BUILD_DIR)
    s.add_argument("--color", default=None)
    d = sub.add_parser("deploy", help="register the model and roll it out blue/green")
    d.add_argument("--dry-run", action="store_true", help="write the specs and print the plan; no Azure calls")
    d.add_argument("--out", type=Path, default=az.BUILD_DIR)
    sub.add_parser("status", help="the endpoint's traffic split")
    for p in (s, d):
        p.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = az.load_settings(getattr(args, "params", Path("params.yaml")))
    if args.command == "specs":
        for kind, path in write_endpoint_specs(params, args.out, color=args.color).items():
            print(f"{kind}: {path}")
        return 0
    if args.command == "deploy":
        return deploy(params, args.out, dry_run=args.dry_run)
    return status(params)


if __name__ == "__main__":
    sys.exit(az.run_cli(main, "azure.endpoints"))
