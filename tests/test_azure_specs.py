"""Every Azure ML spec the repository generates loads through the SDK's own loaders, offline, with
the values params.yaml `azure:` defines; the job launcher's plan; secrets; credential errors.
Live submission tests are marked `azure` and run only with AZURE_SUBSCRIPTION_ID,
AZURE_RESOURCE_GROUP and AZURE_WORKSPACE_NAME set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.azure import config as az
from stages.azure.launch import RankInfo, Step, collect, plan_for_rank, tracked_results, upstream_stages
from stages.core.params import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME")


def _quiet_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WORKSPACE_ENV and k != "AZURE_KEY_VAULT_URL"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or _quiet_env(), timeout=180)


def _schema_of(path: Path) -> str:
    return yaml.safe_load(path.read_text())["$schema"]


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


@pytest.fixture
def inputs(tmp_path):
    """A packaged model, evaluation metrics, the adapter manifest and serving requirements."""
    model = tmp_path / "models" / "merged"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    metrics = tmp_path / "metrics" / "eval.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"base": {"rougeL": 0.11, "bleu4": 0.02},
                                   "tuned": {"rougeL": 0.62, "bleu4": 0.41, "semantic_similarity": 0.9},
                                   "gate": {"passed": True, "reasons": []}}))
    manifest = tmp_path / "models" / "adapter" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"method": "lora", "data_hash": "d4t4h45h", "git_commit": "abc1234"}))
    real = ROOT / "serve" / "environment" / "requirements.txt"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(real.read_text() if real.is_file() else
                            "torch==2.13.0\ntransformers==5.24.0\nazureml-inference-server-http==1.5.1\n")
    return {"model_dir": model, "metrics_path": metrics, "adapter_manifest": manifest,
            "serve_requirements": requirements, "out": tmp_path / "specs"}


# ---------------------------------------------------------------- training job + compute

def test_training_job_dry_run_loads_with_params_values(tmp_path, params):
    from azure.ai.ml import load_environment, load_job

    out = tmp_path / "azure" / "train-job.yml"
    result = _run("stages.azure.jobs", "submit", "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert _schema_of(out).endswith("commandJob.schema.json")
    job = load_job(out)
    tj, compute = params.azure.training_job, params.azure.compute
    assert job.type == "command"
    assert job.compute in (compute.cluster_name, f"azureml:{compute.cluster_name}")
    assert job.resources.instance_count == tj.instance_count
    assert job.resources.shm_size == tj.shm_size
    assert job.distribution.type == "pytorch"
    assert job.distribution.process_count_per_instance == tj.processes_per_node
    assert job.limits.timeout == tj.timeout_minutes * 60
    assert job.queue_settings.job_tier == tj.job_tier and job.queue_settings.priority == tj.priority
    assert job.experiment_name == tj.experiment_name
    assert job.identity.type in ("managed", "managed_identity")
    assert f"--target {tj.repro_target}" in job.command and "${{outputs.results}}" in job.command
    assert "results" in job.outputs
    assert Path(out.parent, job.code).resolve() == ROOT
    env_vars = job.environment_variables
    assert "HF_TOKEN" not in env_vars and env_vars["HF_TOKEN_SECRET_NAME"] == params.azure.secrets.hf_token_secret_name
    assert job.tags["git_commit"] == env_vars["GIT_COMMIT"]
    # the environment: pinned image through the Docker context built from the repo's pins
    context = out.parent / job.environment.build.path
    dockerfile = (context / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={tj.environment.image}" in dockerfile
    assert (context / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    assert "+cpu" not in (context / "requirements.lock").read_text()
    env = load_environment(out.parent / "train-environment.yml")
    assert env.name == tj.environment.name
    assert env.version == yaml.safe_load(out.read_text())["environment"]["version"]


def test_job_stage_target_must_exist(tmp_path, params):
    from stages.azure.jobs import write_training_specs

    bad = params.model_copy(update={"azure": params.azure.model_copy(update={
        "training_job": params.azure.training_job.model_copy(update={"repro_target": "nope"})})})
    with pytest.raises(ConfigError, match="dvc.yaml has no stage 'nope'"):
        write_training_specs(bad, tmp_path / "job.yml")


def test_compute_spec_loads(tmp_path, params):
    from azure.ai.ml import load_compute

    out = tmp_path / "compute.yml"
    result = _run("stages.azure.jobs", "compute", "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr
    compute = load_compute(out)
    c = params.azure.compute
    assert (compute.name, compute.size) == (c.cluster_name, c.vm_size) == ("llama-h100-cluster", "Standard_NC40ads_H100_v5")
    assert (compute.min_instances, compute.max_instances) == (c.min_nodes, c.max_nodes) == (0, 4)
    assert compute.idle_time_before_scale_down == c.idle_seconds_before_scale_down == 300
    assert compute.tier == c.tier and compute.identity.type == "system_assigned"
    assert compute.location == params.azure.location


def test_training_dockerfile_default_image_is_the_params_image(params):
    text = (ROOT / "stages/azure/environments/train/Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={params.azure.training_job.environment.image}\n" in text


def test_gpu_requirements_that_contradict_the_lock_stay_out_of_the_image(tmp_path, params):
    from stages.azure.jobs import build_training_context, filter_requirements

    text = "# c\nbitsandbytes==0.50.2\nunsloth==2026.10.9\nUnsloth_Zoo==2026.10.9\nliger-kernel==0.8.5\n"
    kept = [line for line in filter_requirements(text, ["unsloth", "unsloth-zoo"]).splitlines()
            if line and not line.startswith("#")]
    assert kept == ["bitsandbytes==0.50.2", "liger-kernel==0.8.5"]
    context, _ = build_training_context(params, tmp_path / "ctx")
    if (ROOT / "requirements-gpu.txt").is_file():
        gpu = (context / "requirements-gpu.txt").read_text()
        active = [line for line in gpu.splitlines() if line.strip() and not line.startswith("#")]
        assert not any(line.lower().startswith(tuple(params.azure.training_job.gpu_requirements_exclude))
                       for line in active)


def test_lock_for_gpu_strips_local_versions():
    from stages.azure.jobs import lock_for_gpu

    assert lock_for_gpu("# c\ntorch==2.13.0+cpu\npeft==0.21.2\n") == "# c\ntorch==2.13.0\npeft==0.21.2\n"


def test_amlignore_keeps_caches_and_local_secrets_out():
    from azure.ai.ml._utils._asset_utils import get_ignore_file

    ignore = get_ignore_file(ROOT)
    assert Path(ignore.path).name == ".amlignore"
    for excluded in (".git/config", ".dvc/cache/files/md5/ab/cd", ".dvc/tmp/lock", ".dvc/config.local",
                     ".venv/bin/python", "models/merged/model.safetensors", "data/processed/train.jsonl",
                     ".cache/azurite/x", "build/azure/train-job.yml", "stages/__pycache__/x.pyc"):
        assert ignore.is_file_excluded(ROOT / excluded), excluded
    for kept in ("stages/azure/launch.py", "dvc.yaml", "params.yaml", ".dvc/config", "data/raw/corporate_qa.jsonl"):
        assert not ignore.is_file_excluded(ROOT / kept), kept


# ---------------------------------------------------------------- the launcher every job process runs

def test_single_process_plan_is_pull_repro_push_collect():
    plan = plan_for_rank(RankInfo(0, 0, 1), "package", "train", [], "/out", remote="azure")
    assert [s.describe() for s in plan] == ["secrets", "run dvc pull -r azure --allow-missing", "run dvc repro package",
                                           "run dvc push -r azure", "collect /out"]


def test_multi_node_plans():
    upstream = ["preprocess"]
    rank0 = plan_for_rank(RankInfo(0, 0, 4), "package", "train", upstream, "/out", remote="azure")
    assert [s.kind for s in rank0] == ["secrets", "run", "run", "decide", "signal_ready", "run", "run", "collect"]
    assert rank0[2] == Step("run", ("dvc", "repro", "preprocess")) and rank0[5] == Step("run", ("dvc", "repro", "--no-run-cache", "package"))
    leader = plan_for_rank(RankInfo(2, 0, 4), "package", "train", upstream, "/out", remote="azure")
    assert [s.kind for s in leader] == ["secrets", "run", "run", "decide", "signal_ready", "worker_stage"]
    follower = plan_for_rank(RankInfo(3, 1, 4), "package", "train", upstream, "/out", remote="azure")
    assert [s.kind for s in follower] == ["secrets", "wait_ready", "worker_stage"]
    assert rank0[6] == Step("run", ("dvc", "push", "-r", "azure"))
    assert not any(s.args[:2] == ("dvc", "push") for s in leader + follower)   # only rank 0 writes


def test_upstream_and_results_from_real_dvc_yaml():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    upstream = upstream_stages(dvc_yaml, "train")
    assert "preprocess" in upstream and "train" not in upstream and "package" not in upstream
    results = tracked_results(dvc_yaml)
    assert results[0] == "dvc.lock" and "metrics/train.json" in results
    # git-tracked outs come back too: the full evaluation, its per-record scores and the loss curves
    assert {"metrics/eval.json", "metrics/eval_records.json", "metrics/eval_summary.json",
            "dvclive/train"} <= set(results)
    assert "models/adapter" not in results and "models/checkpoints" not in results
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        upstream_stages(dvc_yaml, "nope")


def test_collect_and_apply_results(tmp_path):
    from stages.azure.jobs import apply_results

    dvc_yaml = {"stages": {"t": {"metrics": [{"metrics/train.json": {"cache": False}}],
                                 "plots": [{"dvclive/plots": {"cache": False}}], "outs": ["models/adapter"]}}}
    job_dir, repo = tmp_path / "job", tmp_path / "repo"
    (job_dir / "metrics").mkdir(parents=True)
    (job_dir / "dvclive/plots").mkdir(parents=True)
    (job_dir / "dvc.lock").write_text("schema: '2.0'\n")
    (job_dir / "metrics/train.json").write_text('{"loss": 1}')
    (job_dir / "dvclive/plots/loss.tsv").write_text("step\tloss\n")
    copied = collect(tmp_path / "download" / "named-outputs" / "results", dvc_yaml, root=job_dir)
    assert copied == ["dvc.lock", "metrics/train.json", "dvclive/plots"]
    repo.mkdir()
    applied = apply_results(tmp_path / "download", dvc_yaml, repo)
    assert applied == copied
    assert (repo / "metrics/train.json").read_text() == '{"loss": 1}' and (repo / "dvclive/plots/loss.tsv").exists()
    assert not (repo / "models").exists()


# ---------------------------------------------------------------- online endpoint

def test_online_specs_load_with_expected_values(inputs, params):
    from azure.ai.ml import load_environment, load_model, load_online_deployment, load_online_endpoint
    from stages.azure.endpoints import write_endpoint_specs

    paths = write_endpoint_specs(params, inputs["out"], color="green", **{k: v for k, v in inputs.items() if k != "out"})
    e = params.azure.endpoint
    endpoint = load_online_endpoint(paths["endpoint"])
    assert (endpoint.name, endpoint.auth_mode, endpoint.public_network_access) == (e.name, e.auth_mode, e.public_network_access)
    assert _schema_of(paths["endpoint"]).endswith("managedOnlineEndpoint.schema.json")

    d = load_online_deployment(paths["deployment"])
    assert _schema_of(paths["deployment"]).endswith("managedOnlineDeployment.schema.json")
    assert (d.name, d.endpoint_name, d.instance_type, d.instance_count) == ("green", e.name, e.instance_type, e.instance_count)
    assert d.request_settings.request_timeout_ms == e.request_settings.request_timeout_ms > e.p99_latency_ms
    assert d.request_settings.max_concurrent_requests_per_instance == params.serve.batching.max_batch
    assert d.request_settings.max_concurrent_requests_per_instance <= params.serve.threads
    assert d.liveness_probe.initial_delay == e.liveness_probe.initial_delay_s >= 300   # an LLM loads for minutes
    assert d.readiness_probe.period * d.readiness_probe.failure_threshold >= 600
    assert d.readiness_probe.failure_threshold == e.readiness_probe.failure_threshold
    assert d.code_configuration.scoring_script == "serve/score.py"
    code = inputs["out"] / d.code_configuration.code
    assert (code / "serve/score.py").is_file() and (code / "serve/serve_config.json").is_file()
    assert (code / "stages/core/chat.py").is_file() and not (code / "stages/azure").exists()
    assert d.environment_variables["WORKER_COUNT"] == "1"
    assert d.environment.image == e.environment.image
    assert any("azureml-inference-server-http" in dep for dep in d.environment.conda_file["dependencies"][2]["pip"])
    assert Path(d.model.path).resolve() == inputs["model_dir"].resolve()
    assert d.data_collector.collections["model_inputs"].enabled in ("true", True)

    model = load_model(paths["model"])
    assert model.name == e.model_name and model.type == "custom_model"
    assert model.tags["data_hash"] == "d4t4h45h" and model.tags["train_method"] == "lora"
    assert model.tags["trained_at_commit"] == "abc1234"
    assert model.tags["git_commit"] == az.git_commit(ROOT) != "unknown"
    assert model.tags["dvc_lock_sha256"] == az.file_sha256(ROOT / "dvc.lock")
    assert model.tags["eval_gate_passed"] == "true"
    assert model.properties["tuned.rougeL"] == "0.62" and model.properties["base.bleu4"] == "0.02"

    env = load_environment(paths["environment"])
    assert env.name == e.environment.name and env.image == e.environment.image
    assert env.conda_file["dependencies"][0] == "python=3.11"


def test_deployment_references_registered_assets(inputs, params):
    from azure.ai.ml import load_online_deployment
    from stages.azure.endpoints import write_endpoint_specs

    paths = write_endpoint_specs(params, inputs["out"], model_ref="azureml:llama-corporate-qa:7",
                                 environment_ref="azureml:llama-serve:abc",
                                 **{k: v for k, v in inputs.items() if k != "out"})
    d = load_online_deployment(paths["deployment"])
    assert d.name == params.azure.endpoint.deployment_colors[0]
    assert d.model == "llama-corporate-qa:7" and d.environment == "llama-serve:abc"


def test_missing_model_and_bad_concurrency_are_config_errors(inputs, params, tmp_path):
    from stages.azure.endpoints import max_concurrency, write_endpoint_specs

    with pytest.raises(ConfigError, match="dvc repro package"):
        write_endpoint_specs(params, inputs["out"], model_dir=tmp_path / "absent",
                             serve_requirements=inputs["serve_requirements"])
    settings = params.azure.endpoint.request_settings.model_copy(update={"max_concurrent_requests_per_instance": params.serve.threads + 1})
    bad = params.model_copy(update={"azure": params.azure.model_copy(update={
        "endpoint": params.azure.endpoint.model_copy(update={"request_settings": settings})})})
    with pytest.raises(ConfigError, match="exceeds serve.threads"):
        max_concurrency(bad)
    with pytest.raises(ConfigError, match="must exceed p99_latency_ms"):
        from stages.core.params import validate_params
        validate_params({"azure": {"endpoint": {"p99_latency_ms": 100000}}})


def test_serving_requirements_must_hold_the_inference_server(tmp_path):
    from stages.azure.endpoints import requirements_lines

    path = tmp_path / "r.txt"
    path.write_text("torch==2.13.0\n")
    with pytest.raises(ConfigError, match="azureml-inference-server-http"):
        requirements_lines(path)
    path.write_text("-r other.txt\nazureml-inference-server-http==1.5.1\n")
    with pytest.raises(ConfigError, match=r"r.txt:1: pip option"):
        requirements_lines(path)


def test_deploy_dry_run_prints_plan(inputs, params, capsys, monkeypatch):
    import stages.azure.endpoints as ep

    real = ep.write_endpoint_specs
    monkeypatch.setattr(ep, "write_endpoint_specs", lambda p, out, **kw: real(
        p, out, **kw, **{k: v for k, v in inputs.items() if k != "out"}))
    assert ep.deploy(params, inputs["out"], dry_run=True) == 0
    printed = capsys.readouterr().out
    assert "create deployment green" in printed and "set traffic {'blue': 100, 'green': 0}, mirror {'green': 10}" in printed


# ---------------------------------------------------------------- batch endpoint

def test_batch_specs_load_with_expected_values(inputs, params):
    from azure.ai.ml import load_batch_endpoint
    from stages.azure.batch import load_batch_deployment_spec, write_batch_specs

    paths = write_batch_specs(params, inputs["out"], **{k: v for k, v in inputs.items() if k != "out"})
    b = params.azure.batch
    assert load_batch_endpoint(paths["endpoint"]).name == b.endpoint_name
    d = load_batch_deployment_spec(paths["deployment"])
    assert type(d).__name__ == "ModelBatchDeployment"
    assert (d.name, d.endpoint_name, d.compute) == (b.deployment_name, b.endpoint_name, params.azure.compute.cluster_name)
    assert d.resources.instance_count == b.instance_count
    s = d.settings
    assert (s.mini_batch_size, s.max_concurrency_per_instance, s.output_file_name) == (
        b.mini_batch_size, b.max_concurrency_per_instance, b.output_file_name)
    assert s.output_action in ("append_row", "APPEND_ROW") or str(s.output_action).lower().endswith("append_row")
    assert s.retry_settings.max_retries == b.max_retries and s.retry_settings.timeout == b.retry_timeout_s
    assert s.environment_variables["BATCH_RECORDS_PER_CALL"] == str(b.records_per_call)
    assert d.code_configuration.scoring_script == "batch_score.py"
    code = inputs["out"] / d.code_configuration.code
    assert (code / "batch_score.py").is_file() and (code / "serve/score.py").is_file()


class _FakeScore:
    """Stands in for serve.score: answers each request, rejects instructions containing 'bad'."""

    def __init__(self):
        self.calls = 0

    def run(self, raw):
        self.calls += 1
        body = json.loads(raw)
        items = body["requests"] if "requests" in body else [body]
        if any("bad" in item.get("instruction", "") for item in items):
            from azureml_inference_server_http.api.aml_response import AMLResponse
            return AMLResponse({"error": "instruction: bad"}, 400, json_str=True)
        answers = [{"response": item["instruction"].upper(), "prompt_tokens": 3, "completion_tokens": 2,
                    "finish_reason": "stop"} for item in items]
        return answers if "requests" in body else answers[0]


def test_batch_driver_scores_every_line(tmp_path, monkeypatch):
    from stages.azure import batch_score

    fake = _FakeScore()
    monkeypatch.setattr(batch_score, "score", fake)
    monkeypatch.setenv("BATCH_RECORDS_PER_CALL", "2")
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join([json.dumps({"id": "a", "instruction": "one", "output": "ref", "category": "x"}),
                               "not json", json.dumps({"instruction": "two"}), "",
                               json.dumps({"id": 4, "instruction": "bad one"}), json.dumps({"instruction": "three"})]) + "\n")
    rows = [json.loads(r) for r in batch_score.run([str(part)])]
    assert [r["line"] for r in rows] == [1, 2, 3, 5, 6]
    assert rows[0] == {"file": "part.jsonl", "line": 1, "id": "a", "response": "ONE", "prompt_tokens": 3,
                       "completion_tokens": 2, "finish_reason": "stop"}
    assert rows[1]["error"].startswith("invalid JSON line")
    assert rows[2]["response"] == "TWO"
    assert rows[3] == {"file": "part.jsonl", "line": 5, "id": 4, "error": "instruction: bad"}
    assert rows[4]["response"] == "THREE"


def test_batch_records_per_call_within_serving_limit(params, inputs):
    from stages.azure.batch import write_batch_specs

    bad = params.model_copy(update={"azure": params.azure.model_copy(update={
        "batch": params.azure.batch.model_copy(update={"records_per_call": params.serve.max_batch_requests + 1})})})
    with pytest.raises(ConfigError, match="exceeds serve.max_batch_requests"):
        write_batch_specs(bad, inputs["out"], **{k: v for k, v in inputs.items() if k != "out"})


# ---------------------------------------------------------------- credentials and secrets

@pytest.mark.parametrize("command", [
    ("stages.azure.jobs", "submit"),
    ("stages.azure.endpoints", "deploy"),
    ("stages.azure.batch", "deploy"),
])
def test_missing_workspace_variables_exit_2_naming_them(command):
    result = _run(*command)
    assert result.returncode == 2, result.stderr
    for name in WORKSPACE_ENV:
        assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_one_missing_variable_is_named_alone():
    env = _quiet_env()
    env.update({"AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000", "AZURE_RESOURCE_GROUP": "rg"})
    result = _run("stages.azure.jobs", "submit", env=env)
    assert result.returncode == 2
    assert "missing environment variable AZURE_WORKSPACE_NAME:" in result.stderr
    assert "Traceback" not in result.stderr


def test_workspace_from_env():
    ws = az.workspace_from_env({"AZURE_SUBSCRIPTION_ID": " sub ", "AZURE_RESOURCE_GROUP": "rg",
                                "AZURE_WORKSPACE_NAME": "ws"})
    assert ws == az.Workspace("sub", "rg", "ws")
    with pytest.raises(ConfigError, match="AZURE_RESOURCE_GROUP, AZURE_WORKSPACE_NAME"):
        az.workspace_from_env({"AZURE_SUBSCRIPTION_ID": "s", "AZURE_RESOURCE_GROUP": " "})


def test_hf_token_comes_from_key_vault_and_is_never_printed(params, capsys):
    from stages.azure import keyvault

    gated = params.model_copy(update={"model": params.model.model_copy(
        update={"base": "meta-llama/Llama-3.2-1B-Instruct", "tokenizer": "meta-llama/Llama-3.2-1B-Instruct"})})
    assert not keyvault.needs_hf_token(params)          # the embedded default needs no token
    assert keyvault.needs_hf_token(gated)
    env = {"AZURE_KEY_VAULT_URL": "https://kv-llama.vault.azure.net/"}
    seen = []
    source = keyvault.provide_hf_token(gated, env, fetch=lambda url, name: seen.append((url, name)) or "hf_s3cr3t")
    assert source == "key vault" and env["HF_TOKEN"] == "hf_s3cr3t"
    assert seen == [("https://kv-llama.vault.azure.net/", params.azure.secrets.hf_token_secret_name)]
    assert "hf_s3cr3t" not in capsys.readouterr().out
    assert keyvault.provide_hf_token(gated, {"HF_TOKEN": "x"}) == "environment"
    with pytest.raises(ConfigError, match="AZURE_KEY_VAULT_URL"):
        keyvault.provide_hf_token(gated, {})


def test_fetch_secret_uses_bearer_token_and_rest_api():
    import io

    from stages.azure.keyvault import fetch_secret, key_vault_url_from_id

    class Credential:
        def get_token(self, scope):
            assert scope == "https://vault.azure.net/.default"
            return type("T", (), {"token": "tok"})()

    captured = {}

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def opener(request, timeout):
        captured["url"], captured["auth"] = request.full_url, request.headers["Authorization"]
        return Response(b'{"value": "hf_abc"}')

    assert fetch_secret("https://kv.vault.azure.net/", "hf-token", Credential(), opener) == "hf_abc"
    assert captured == {"url": "https://kv.vault.azure.net/secrets/hf-token?api-version=7.4", "auth": "Bearer tok"}
    assert key_vault_url_from_id("/subscriptions/s/resourceGroups/r/providers/Microsoft.KeyVault/vaults/kv-llama") \
        == "https://kv-llama.vault.azure.net/"


# ---------------------------------------------------------------- live workspace (credentials only)

@pytest.mark.azure
def test_live_workspace_has_the_cluster_and_accepts_the_job_spec(tmp_path, params):
    from azure.ai.ml import load_job

    client = az.ml_client()
    compute = client.compute.get(params.azure.compute.cluster_name)
    assert compute.size.lower() == params.azure.compute.vm_size.lower()
    result = _run("stages.azure.jobs", "submit", "--dry-run", "--out", str(tmp_path / "job.yml"), env=dict(os.environ))
    assert result.returncode == 0
    job = client.jobs.validate(load_job(tmp_path / "job.yml")) if hasattr(client.jobs, "validate") else None
    assert job is None or getattr(job, "passed", True)


@pytest.mark.azure
def test_live_endpoint_traffic_is_a_valid_colour_split(params):
    from stages.azure.endpoints import current_traffic
    from stages.azure.rollout import pick_colors

    traffic = current_traffic(az.ml_client(), params.azure.endpoint.name)
    if traffic is not None:
        pick_colors(params.azure.endpoint.deployment_colors, traffic)


# ---------------------------------------------------------------- the rollout executor's Azure calls (fake client)

class _Poller:
    def __init__(self, value=None):
        self.value = value

    def result(self):
        return self.value


class _FakeEndpoints:
    def __init__(self, answers):
        self.endpoint = type("E", (), {"name": "llama-corporate-qa", "traffic": {"blue": 100}, "mirror_traffic": {},
                                       "id": "/subscriptions/s/resourceGroups/r/providers/x/onlineEndpoints/e"})()
        self.answers, self.updates, self.invoked = list(answers), [], []

    def get(self, name):
        return self.endpoint

    def begin_create_or_update(self, endpoint):
        self.updates.append((dict(endpoint.traffic), dict(endpoint.mirror_traffic)))
        return _Poller(endpoint)

    def invoke(self, endpoint_name, deployment_name, request_file):
        self.invoked.append((deployment_name, json.loads(Path(request_file).read_text())))
        return self.answers.pop(0)


class _FakeDeployments:
    def __init__(self):
        self.created, self.deleted = [], []

    def begin_create_or_update(self, deployment):
        self.created.append((deployment.name, deployment.model))
        return _Poller(deployment)

    def begin_delete(self, name, endpoint_name):
        self.deleted.append(name)
        return _Poller()


def _fake_client(answers):
    return type("C", (), {"online_endpoints": _FakeEndpoints(answers), "online_deployments": _FakeDeployments()})()


def _world(params, inputs, client, tmp_path, health):
    import stages.azure.endpoints as ep

    (tmp_path / "metrics").mkdir(exist_ok=True)
    (tmp_path / "metrics" / "eval.json").write_text(inputs["metrics_path"].read_text())

    def spec(color):
        return ep.write_endpoint_specs(params, inputs["out"], color=color, model_ref="azureml:llama-corporate-qa:3",
                                       environment_ref="azureml:llama-serve:1",
                                       **{k: v for k, v in inputs.items() if k != "out"})["deployment"]

    world = ep.AzureWorld(client, params, spec, repo_root=tmp_path, sleep=lambda s: None)
    sequence = list(health)
    world.observe = lambda color, minutes: sequence.pop(0)
    return world


def test_azure_world_promotes_through_the_sdk_calls(params, inputs, tmp_path):
    from stages.azure import rollout as ro

    answer = json.dumps({"response": "Use the expense portal.", "prompt_tokens": 9, "completion_tokens": 5})
    client = _fake_client([answer] * len(params.azure.rollout.smoke_prompts))
    world = _world(params, inputs, client, tmp_path, [ro.Health(500, 0)] * len(params.azure.rollout.steps))
    colors, traffic = params.azure.endpoint.deployment_colors, {"blue": 100}
    result = ro.execute(ro.plan_rollout(params.azure.rollout, colors, traffic), world, params.azure.rollout, colors, traffic)
    assert result.status == "promoted", result.log
    assert client.online_deployments.created == [("green", "llama-corporate-qa:3")]
    assert [c for c, _ in client.online_endpoints.invoked] == ["green"] * len(params.azure.rollout.smoke_prompts)
    assert client.online_endpoints.invoked[0][1]["instruction"] == params.azure.rollout.smoke_prompts[0]
    assert client.online_endpoints.updates[0] == ({"blue": 100, "green": 0}, {"green": 10})
    assert client.online_endpoints.updates[-1] == ({"blue": 0, "green": 100}, {})
    assert client.online_deployments.deleted == ["blue"]


def test_azure_world_rolls_back_on_a_bad_smoke_answer(params, inputs, tmp_path):
    from stages.azure import rollout as ro

    client = _fake_client([json.dumps({"response": ""})])
    world = _world(params, inputs, client, tmp_path, [])
    colors, traffic = params.azure.endpoint.deployment_colors, {"blue": 100}
    result = ro.execute(ro.plan_rollout(params.azure.rollout, colors, traffic), world, params.azure.rollout, colors, traffic)
    assert result.status == "rolled_back" and "empty or malformed answer" in result.reason
    assert client.online_endpoints.updates == [({"blue": 100, "green": 0}, {})]
    assert client.online_deployments.deleted == ["green"]


def test_health_from_monitor_metrics():
    from stages.azure.endpoints import health_from_metrics

    def series(cls, totals):
        return {"metadatavalues": [{"name": {"value": "statusCodeClass"}, "value": cls}],
                "data": [{"total": t} for t in totals]}

    body = {"value": [{"timeseries": [series("2xx", [10, 20, None]), series("4xx", [3]), series("5xx", [1, 1])]}]}
    health = health_from_metrics(body)
    assert (health.requests, health.errors) == (35, 2)


# ---------------------------------------------------------------- two job processes, for real

TRAIN_SCRIPT = """
import os, pathlib, torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
pathlib.Path(f"ranks-{dist.get_rank()}.txt").write_text(os.environ["WORLD_SIZE"])
if dist.get_rank() == 0:
    out = pathlib.Path("model")
    out.mkdir(exist_ok=True)
    (out / "w.txt").write_text(f"{value.item()} {pathlib.Path('prep/data.txt').read_text()}")
dist.destroy_process_group()
"""


def test_two_processes_join_the_distributed_stage(tmp_path):
    """What `distribution: pytorch` with 2 processes does on one node: both run the launcher; rank 0
    drives dvc (prep, train, package, push), rank 1 waits for the prepared inputs and joins train."""
    import socket

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "train.py").write_text(TRAIN_SCRIPT)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prep": {"cmd": "mkdir -p prep && echo prepared > prep/data.txt", "outs": ["prep"]},
        "train": {"cmd": "python train.py", "deps": ["prep", "train.py"], "outs": ["model"]},
        "package": {"cmd": "mkdir -p metrics && cp model/w.txt metrics/w.txt", "deps": ["model"],
                    "metrics": [{"metrics/w.txt": {"cache": False}}]}}}))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for args in (["init", "-q"], ["remote", "add", "-d", "azure", str(tmp_path / "remote")]):  # params' remote name
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, env=env)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(sock.getsockname()[1])
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())   # the secrets step reads it
    procs = []
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stages.azure.launch", "--target", "package", "--results", str(tmp_path / "results")],
            cwd=repo, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(logs)
    assert (repo / "model/w.txt").read_text().startswith("3.0 prepared")     # 1 + 2: both ranks reduced
    assert (repo / "ranks-0.txt").read_text() == (repo / "ranks-1.txt").read_text() == "2"
    assert (tmp_path / "results/metrics/w.txt").is_file() and (tmp_path / "results/dvc.lock").is_file()
    assert "[rank 1] worker_stage train" in logs[1] and "dvc push" not in logs[1]
    assert any((tmp_path / "remote").rglob("*")), "rank 0 pushed nothing"



def test_the_launcher_pulls_from_and_pushes_to_the_remote_params_names(tmp_path):
    """A clone whose default DVC remote is another one: the job still pulls from and pushes to
    azure.storage.dvc_remote_name (here renamed "team" in params.yaml), never to the default."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prep": {"cmd": "mkdir -p prep && echo prepared > prep/data.txt", "outs": ["prep"]}}}))
    params = (ROOT / "params.yaml").read_text()
    assert "dvc_remote_name: azure" in params
    (repo / "params.yaml").write_text(params.replace("dvc_remote_name: azure", "dvc_remote_name: team"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    for args in (["init", "-q"], ["remote", "add", "-d", "elsewhere", str(tmp_path / "elsewhere")],
                 ["remote", "add", "team", str(tmp_path / "team")]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, env=env)
    launch = [sys.executable, "-m", "stages.azure.launch", "--target", "prep", "--results", str(tmp_path / "results")]
    dry = subprocess.run(launch + ["--dry-run"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == ["secrets", "run dvc pull -r team --allow-missing", "run dvc repro prep",
                                       "run dvc push -r team", f"collect {tmp_path / 'results'}"]
    done = subprocess.run(launch, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [p for p in (tmp_path / "team").rglob("*") if p.is_file()], "nothing pushed to the named remote"
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").rglob("*")), \
        "the job pushed to the default remote"
    assert (tmp_path / "results" / "dvc.lock").is_file()

# ---------------------------------------------------------------- submit/deploy paths on a fake MLClient

class _Ops:
    """Records calls; `create_or_update` returns the entity with a version."""

    def __init__(self, log, kind):
        self.log, self.kind = log, kind

    def create_or_update(self, entity):
        self.log.append((self.kind, "create_or_update", getattr(entity, "name", None)))
        if self.kind in ("models", "environments"):
            entity.version = entity.version or "5"
        if self.kind == "jobs":
            self.submitted = entity
            return type("Submitted", (), {"name": "job-123", "studio_url": "https://studio/job-123"})()
        return entity

    def begin_create_or_update(self, entity):
        self.log.append((self.kind, "begin_create_or_update", getattr(entity, "name", None)))
        self.last = entity
        return _Poller(entity)


def test_submit_registers_environment_streams_downloads_and_applies(tmp_path, params, monkeypatch):
    import stages.azure.jobs as jobs

    log = []
    status = {"value": "Completed"}

    class Jobs(_Ops):
        def stream(self, name):
            log.append(("jobs", "stream", name))

        def get(self, name):
            return type("J", (), {"status": status["value"]})()

        def download(self, name, download_path, output_name):
            log.append(("jobs", "download", output_name))
            collect(Path(download_path) / "named-outputs" / output_name,
                    yaml.safe_load((ROOT / "dvc.yaml").read_text()), root=fake_job)

    fake_job = tmp_path / "job"
    (fake_job / "metrics").mkdir(parents=True)
    (fake_job / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (fake_job / "metrics" / "train.json").write_text('{"eval_loss": 1.5}')
    workspace = type("W", (), {"key_vault": "/subscriptions/s/resourceGroups/r/providers/Microsoft.KeyVault/vaults/kv-ws"})()
    client = type("C", (), {"jobs": Jobs(log, "jobs"), "environments": _Ops(log, "environments"),
                            "workspace_name": "ws",
                            "workspaces": type("WS", (), {"get": lambda self, name: workspace})()})()
    for name in WORKSPACE_ENV:
        monkeypatch.setenv(name, "x")
    monkeypatch.setattr(az, "ml_client", lambda workspace=None: client)
    repo = tmp_path / "repo"   # what submit reads: the graph and the pins
    repo.mkdir()
    for name in ("dvc.yaml", "requirements.txt", "requirements.lock", "requirements-gpu.txt"):
        if (ROOT / name).is_file():
            (repo / name).write_text((ROOT / name).read_text())
    rc = jobs.submit(params, tmp_path / "azure" / "train-job.yml", tmp_path / "results", repo_root=repo)
    assert rc == 0
    assert [entry[:2] for entry in log] == [("environments", "create_or_update"), ("jobs", "create_or_update"),
                                            ("jobs", "stream"), ("jobs", "download")]
    job = client.jobs.submitted
    assert job.environment == f"{params.azure.training_job.environment.name}:{yaml.safe_load((tmp_path / 'azure/train-job.yml').read_text())['environment']['version']}"
    assert job.environment_variables["AZURE_KEY_VAULT_URL"] == "https://kv-ws.vault.azure.net/"
    assert (repo / "metrics" / "train.json").read_text() == '{"eval_loss": 1.5}'
    assert (repo / "dvc.lock").read_text().startswith("schema: '2.0'")
    status["value"] = "Failed"
    assert jobs.submit(params, tmp_path / "azure" / "train-job.yml", tmp_path / "results", repo_root=repo) == 1


def test_batch_deploy_registers_then_points_the_endpoint_default(inputs, params, monkeypatch):
    import stages.azure.batch as batch

    log = []

    class Endpoints(_Ops):
        def get(self, name):
            return type("B", (), {"name": name, "defaults": None})()

    client = type("C", (), {"batch_endpoints": Endpoints(log, "batch_endpoints"),
                            "batch_deployments": _Ops(log, "batch_deployments"),
                            "models": _Ops(log, "models"), "environments": _Ops(log, "environments")})()
    monkeypatch.setattr(az, "ml_client", lambda workspace=None: client)
    real = batch.write_batch_specs
    monkeypatch.setattr(batch, "write_batch_specs", lambda p, out, **kw: real(
        p, out, **kw, **{k: v for k, v in inputs.items() if k != "out"}))
    assert batch.deploy(params, inputs["out"]) == 0
    assert [entry[0] for entry in log] == ["batch_endpoints", "models", "environments", "batch_deployments",
                                           "batch_endpoints"]
    deployment = client.batch_deployments.last
    assert deployment.model == f"{params.azure.endpoint.model_name}:5"
    assert client.batch_endpoints.last.defaults == {"deployment_name": params.azure.batch.deployment_name}


def test_first_deploy_creates_endpoint_registers_and_goes_live(inputs, params, monkeypatch):
    from azure.core.exceptions import ResourceNotFoundError

    import stages.azure.endpoints as ep
    from stages.azure import rollout as ro

    log = []

    class Endpoints(_Ops):
        exists = False

        def get(self, name):
            if not self.exists:
                raise ResourceNotFoundError("not found")
            return self.endpoint

        def begin_create_or_update(self, endpoint):
            Endpoints.exists = True
            self.endpoint = endpoint
            log.append(("online_endpoints", "traffic", dict(getattr(endpoint, "traffic", {}) or {})))
            return _Poller(endpoint)

        def invoke(self, endpoint_name, deployment_name, request_file):
            log.append(("online_endpoints", "invoke", deployment_name))
            return json.dumps({"response": "ok"})

    class Deployments(_Ops):
        def begin_delete(self, name, endpoint_name):
            log.append(("online_deployments", "delete", name))
            return _Poller()

    client = type("C", (), {"online_endpoints": Endpoints(log, "online_endpoints"),
                            "online_deployments": Deployments(log, "online_deployments"),
                            "models": _Ops(log, "models"), "environments": _Ops(log, "environments")})()
    for name in WORKSPACE_ENV:
        monkeypatch.setenv(name, "x")
    monkeypatch.setattr(az, "ml_client", lambda workspace=None: client)
    monkeypatch.setattr(ep.AzureWorld, "gate", lambda self: (True, "passed"))
    monkeypatch.setattr(ep, "request_health", lambda *a: ro.Health(100, 0))
    monkeypatch.setattr(ep.time, "sleep", lambda s: None)
    real = ep.write_endpoint_specs
    monkeypatch.setattr(ep, "write_endpoint_specs", lambda p, out, **kw: real(
        p, out, **kw, **{k: v for k, v in inputs.items() if k != "out"}))
    assert ep.deploy(params, inputs["out"]) == 0
    kinds = [entry[:2] for entry in log]
    assert kinds[:3] == [("online_endpoints", "traffic"), ("models", "create_or_update"),
                         ("environments", "create_or_update")]
    assert ("online_deployments", "begin_create_or_update") in kinds
    assert ("online_endpoints", "invoke") in kinds
    assert log[-1] == ("online_endpoints", "traffic", {"blue": 100})
    assert not any(entry[1] == "delete" for entry in log)


def test_every_azure_key_is_documented():
    """docs/azure.md lists every key of the azure: section (the infra and workflow code reads it)."""
    from pydantic import BaseModel

    from stages.core.params import AzureParams

    def keys(model, prefix):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from keys(annotation, f"{prefix}.{name}")
            else:
                yield f"{prefix}.{name}", name

    docs = (ROOT / "docs" / "azure.md").read_text()
    missing = [full for full, leaf in keys(AzureParams, "azure")
               if f"`{full}`" not in docs and f"`{leaf}`" not in docs and f"{leaf}`" not in docs]
    assert not missing, f"not in docs/azure.md: {missing}"


def test_serving_environment_from_the_real_serve_folder(tmp_path, params):
    from azure.ai.ml import load_environment

    from stages.azure.endpoints import SERVE_CONDA, SERVE_REQUIREMENTS, serving_environment_body

    if not (ROOT / SERVE_CONDA).is_file() and not (ROOT / SERVE_REQUIREMENTS).is_file():
        pytest.fail("serve/environment/ has neither conda.yaml nor requirements.txt")
    spec = tmp_path / "serve-environment.yml"
    az.write_spec(spec, "environment", serving_environment_body(params, spec))
    env = load_environment(spec)
    assert env.image == params.azure.endpoint.environment.image
    pip = next(d for d in env.conda_file["dependencies"] if isinstance(d, dict))["pip"]
    assert any(p.startswith("azureml-inference-server-http==") for p in pip)
    assert any(p.startswith("torch==") for p in pip)


@pytest.mark.slow
def test_batch_driver_with_the_real_scoring_script(merged, tmp_path, params, monkeypatch):
    """The batch code folder (serve/ + batch_score.py) scores a JSONL file with serve/score.py and a
    real packaged embedded model: one output row per input line, errors only for the bad lines."""
    import importlib.util

    from stages.azure.batch import build_batch_code_folder

    try:
        code = build_batch_code_folder(params, tmp_path / "code")
        serve = params.serve.model_copy(update={"log_path": "", "max_new_tokens_default": 8})
        (tmp_path / "serve.json").write_text(json.dumps(serve.model_dump()))
        monkeypatch.setenv("SERVE_CONFIG", str(tmp_path / "serve.json"))
        monkeypatch.setenv("AZUREML_MODEL_DIR", str(merged))
        monkeypatch.setenv("BATCH_RECORDS_PER_CALL", "3")
        monkeypatch.syspath_prepend(str(code))
        for name in [m for m in sys.modules if m == "serve" or m.startswith("serve.")]:
            monkeypatch.delitem(sys.modules, name)
        spec = importlib.util.spec_from_file_location("batch_score_under_test", code / "batch_score.py")
        driver = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(driver)
        driver.init()
        part = tmp_path / "part-0.jsonl"
        lines = [json.dumps({"id": i, "instruction": q, "max_new_tokens": 6}) for i, q in
                 enumerate(["What is the PM job code?", "How do I submit an expense report?", "Who approves leave?",
                            "Where is the travel policy?"])]
        lines.insert(2, json.dumps({"id": "too-long", "instruction": "x", "max_new_tokens": 100000}))
        part.write_text("\n".join(lines) + "\n")
        rows = [json.loads(r) for r in driver.run([str(part)])]
    finally:
        for name, module in list(sys.modules.items()):   # forget the code folder's copies of serve/
            if str(getattr(module, "__file__", "") or "").startswith(str(tmp_path)):
                del sys.modules[name]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    bad = rows[2]
    assert bad["id"] == "too-long" and "max_new_tokens" in bad["error"]
    for row in rows[:2] + rows[3:]:
        assert set(row) >= {"file", "line", "id", "response", "prompt_tokens", "completion_tokens"}, row
        assert row["completion_tokens"] <= 6 and row["file"] == "part-0.jsonl"
