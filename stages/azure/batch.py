"""Batch scoring on Azure ML (the reference template's second deployment option): a batch
endpoint whose model deployment runs the online endpoint's scoring logic over JSONL files.

    python -m stages.azure.batch specs [--out build/azure]      # offline, no credentials
    python -m stages.azure.batch deploy                         # register + create/update
    python -m stages.azure.batch invoke --input data.jsonl      # run a job, wait, download predictions

Specs: batch-endpoint.yml (BatchEndpoint) and batch-deployment.yml (ModelBatchDeployment): the
registered model, the serving environment, the endpoint code folder (serve.codefolder) plus
stages/azure/batch_score.py as the scoring script, the compute cluster, mini batches of
azure.batch.mini_batch_size files and output rows appended to azure.batch.output_file_name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from stages.azure import config as az
from stages.azure import endpoints as ep
from stages.core.params import ConfigError, Params

DRIVER = Path(__file__).resolve().parent / "batch_score.py"
DRIVER_NAME = "batch_score.py"


def batch_endpoint_body(params: Params) -> dict:
    return {"name": params.azure.batch.endpoint_name,
            "description": "Batch scoring of JSONL files with the fine-tuned Llama (same score.py as online)",
            "tags": {"managed_by": "stages.azure.batch"}}


def batch_compute(params: Params) -> str:
    return params.azure.batch.compute or params.azure.compute.cluster_name


def build_batch_code_folder(params: Params, dest: Path, repo_root: Path = az.REPO_ROOT) -> Path:
    from serve.codefolder import build_code_folder

    code = build_code_folder(dest, serve=params.serve, repo_root=repo_root)
    shutil.copy2(DRIVER, code / DRIVER_NAME)
    return code


def batch_deployment_body(params: Params, spec_path: Path, code_dir: Path, model, environment) -> dict:
    batch = params.azure.batch
    if batch.records_per_call > params.serve.max_batch_requests:
        raise ConfigError(f"azure.batch.records_per_call ({batch.records_per_call}) exceeds serve.max_batch_requests "
                          f"({params.serve.max_batch_requests}): the scoring script would reject every group")
    max_nodes = params.azure.compute.max_nodes
    if not batch.compute and batch.instance_count > max_nodes:
        raise ConfigError(f"azure.batch.instance_count ({batch.instance_count}) exceeds azure.compute.max_nodes ({max_nodes})")
    env_vars = ep.deployment_environment_variables(params)
    env_vars["BATCH_RECORDS_PER_CALL"] = str(batch.records_per_call)
    return {
        "name": batch.deployment_name,
        "endpoint_name": batch.endpoint_name,
        "type": "model",
        "model": model,
        "environment": environment,
        "code_configuration": {"code": az.rel(code_dir, spec_path), "scoring_script": DRIVER_NAME},
        "compute": f"azureml:{batch_compute(params)}",
        "resources": {"instance_count": batch.instance_count},
        "settings": {
            "max_concurrency_per_instance": batch.max_concurrency_per_instance,
            "mini_batch_size": batch.mini_batch_size,
            "output_action": "append_row",
            "output_file_name": batch.output_file_name,
            "retry_settings": {"max_retries": batch.max_retries, "timeout": batch.retry_timeout_s},
            "error_threshold": batch.error_threshold,
            "logging_level": "info",
            "environment_variables": env_vars,
        },
        "description": "JSONL in, one JSON line per record out",
    }


def write_batch_specs(params: Params, out_dir: str | Path = az.BUILD_DIR, repo_root: Path = az.REPO_ROOT,
                      model_dir: Path | None = None, metrics_path: Path | None = None,
                      model_ref: str | None = None, environment_ref: str | None = None,
                      serve_requirements: Path | None = None, adapter_manifest: Path | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"endpoint": out_dir / "batch-endpoint.yml", "deployment": out_dir / "batch-deployment.yml",
             "model": out_dir / "model.yml", "environment": out_dir / "serve-environment.yml"}
    code = build_batch_code_folder(params, out_dir / "batch_code", repo_root)
    paths["code"] = code
    az.write_spec(paths["endpoint"], "batch_endpoint", batch_endpoint_body(params))
    model = ep.model_body(params, paths["model"], repo_root, model_dir, metrics_path, adapter_manifest)
    az.write_spec(paths["model"], "model", model)
    environment = ep.serving_environment_body(params, paths["environment"], repo_root, serve_requirements)
    az.write_spec(paths["environment"], "environment", environment)
    inline_model = dict(model, path=az.rel(out_dir / model["path"], paths["deployment"]))
    inline_env = dict(environment, conda_file=az.rel(out_dir / environment["conda_file"], paths["deployment"]))
    az.write_spec(paths["deployment"], "batch_deployment",
                  batch_deployment_body(params, paths["deployment"], code, model_ref or inline_model,
                                        environment_ref or inline_env))
    return paths


def load_batch_deployment_spec(path: str | Path):
    """ModelBatchDeployment from its YAML (the SDK's loader for `type: model` batch deployments)."""
    from azure.ai.ml.entities._load_functions import load_model_batch_deployment

    return load_model_batch_deployment(path)


def deploy(params: Params, out_dir: Path) -> int:
    from azure.ai.ml import load_batch_endpoint, load_environment, load_model

    client = az.ml_client()
    paths = write_batch_specs(params, out_dir)
    client.batch_endpoints.begin_create_or_update(load_batch_endpoint(paths["endpoint"])).result()
    model = client.models.create_or_update(load_model(paths["model"]))
    environment = client.environments.create_or_update(load_environment(paths["environment"]))
    paths = write_batch_specs(params, out_dir, model_ref=f"azureml:{model.name}:{model.version}",
                              environment_ref=f"azureml:{environment.name}:{environment.version}")
    deployment = load_batch_deployment_spec(paths["deployment"])
    client.batch_deployments.begin_create_or_update(deployment).result()
    endpoint = client.batch_endpoints.get(params.azure.batch.endpoint_name)
    defaults = endpoint.defaults
    if defaults is None or isinstance(defaults, dict):
        endpoint.defaults = {**(defaults or {}), "deployment_name": params.azure.batch.deployment_name}
    else:  # the service's BatchEndpointDefaults object
        defaults.deployment_name = params.azure.batch.deployment_name
    client.batch_endpoints.begin_create_or_update(endpoint).result()
    print(f"batch endpoint {endpoint.name}: deployment {deployment.name} (model {model.name}:{model.version})")
    return 0


def invoke(params: Params, input_path: Path, download: Path) -> int:
    from azure.ai.ml import Input

    if not input_path.exists():
        raise ConfigError(f"{input_path} not found")
    client = az.ml_client()
    job = client.batch_endpoints.invoke(endpoint_name=params.azure.batch.endpoint_name,
                                        input=Input(type="uri_folder" if input_path.is_dir() else "uri_file",
                                                    path=str(input_path)))
    print(f"batch job {job.name}", flush=True)
    client.jobs.stream(job.name)
    if client.jobs.get(job.name).status != "Completed":
        return az.EXIT_FAILED
    client.jobs.download(job.name, download_path=str(download), output_name="score")
    print(f"predictions under {download}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.azure.batch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("specs")
    s.add_argument("--out", type=Path, default=az.BUILD_DIR)
    d = sub.add_parser("deploy")
    d.add_argument("--out", type=Path, default=az.BUILD_DIR)
    i = sub.add_parser("invoke")
    i.add_argument("--input", type=Path, required=True, help="a JSONL file or a folder of them")
    i.add_argument("--download", type=Path, default=az.BUILD_DIR / "batch-results")
    for p in (s, d, i):
        p.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = az.load_settings(args.params)
    if args.command == "specs":
        for kind, path in write_batch_specs(params, args.out).items():
            print(f"{kind}: {path}")
        return 0
    az.workspace_from_env()
    if args.command == "deploy":
        return deploy(params, args.out)
    return invoke(params, args.input, args.download)


if __name__ == "__main__":
    sys.exit(az.run_cli(main, "azure.batch"))
