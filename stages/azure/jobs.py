"""The Azure ML training job: the same `dvc repro` as on a laptop, on the H100 cluster.

    python -m stages.azure.jobs submit --dry-run [--out build/azure/train-job.yml]
    python -m stages.azure.jobs submit [--no-wait] [--results build/azure/results] [--no-apply]
    python -m stages.azure.jobs compute --dry-run [--out build/azure/compute.yml]
    python -m stages.azure.jobs compute            # create/update the cluster (Bicep does it too)

The job: code = this repository (minus .amlignore), the pinned environment of
stages/azure/environments/train (built from requirements.txt + requirements.lock), compute
azure.compute.cluster_name, `distribution: pytorch` with azure.training_job.processes_per_node per
node on instance_count nodes, a time limit and a job tier. Every process runs
`python -m stages.azure.launch`: rank 0 runs `dvc pull -r R`, `dvc repro <repro_target>`, `dvc push -r R`
(R = azure.storage.dvc_remote_name) and
puts dvc.lock plus the metrics and plots into the `results` output. `submit` streams the logs,
downloads `results` and copies those files into the working tree (commit them), and exits non-zero
if the job did not complete. The Hugging Face token comes from the workspace Key Vault inside the job.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from stages.azure import config as az
from stages.azure.launch import copy_tracked_results
from stages.core.io import write_text_atomic
from stages.core.params import ConfigError, Params

TRAIN_ENV_SOURCE = az.REPO_ROOT / "stages/azure/environments/train"
RESULTS_OUTPUT = "results"
REQUIREMENT_FILES = ("requirements.txt", "requirements-gpu.txt")


# ---------------------------------------------------------------- environment

def lock_for_gpu(lock_text: str) -> str:
    """requirements.lock as constraints for the GPU image: drop local version labels (+cpu), so
    pip installs the CUDA build of the same torch version."""
    lines = []
    for line in lock_text.splitlines():
        stripped = line.strip()
        if "==" in stripped and "+" in stripped.split("==", 1)[1] and not stripped.startswith("#"):
            name, version = stripped.split("==", 1)
            line = f"{name}=={version.split('+', 1)[0]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _requirement_name(line: str) -> str:
    import re

    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def filter_requirements(text: str, exclude: list[str]) -> str:
    """`text` without the requirements named in `exclude` (each left as a comment saying why)."""
    excluded = {_requirement_name(name) for name in exclude}
    lines = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#") and _requirement_name(line) in excluded:
            line = f"# excluded by azure.training_job.gpu_requirements_exclude: {line.strip()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def dockerfile_text(image: str, source: Path = TRAIN_ENV_SOURCE / "Dockerfile") -> str:
    text = source.read_text(encoding="utf-8")
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith("ARG BASE_IMAGE=")]
    if len(hits) != 1:
        raise ConfigError(f"{source} must have exactly one 'ARG BASE_IMAGE=' line")
    lines[hits[0]] = f"ARG BASE_IMAGE={image}"
    return "\n".join(lines) + "\n"


def build_training_context(params: Params, dest: str | Path, repo_root: Path = az.REPO_ROOT) -> tuple[Path, str]:
    """Write the Docker build context of the training environment; returns (folder, content hash)."""
    dest = Path(dest)
    files = {"Dockerfile": dockerfile_text(params.azure.training_job.environment.image)}
    for name in REQUIREMENT_FILES:
        if (repo_root / name).is_file():
            files[name] = (repo_root / name).read_text(encoding="utf-8")
    if "requirements-gpu.txt" in files:
        files["requirements-gpu.txt"] = filter_requirements(
            files["requirements-gpu.txt"], params.azure.training_job.gpu_requirements_exclude)
    if "requirements.txt" not in files:
        raise ConfigError(f"{repo_root / 'requirements.txt'} not found: the training environment installs it")
    lock = repo_root / "requirements.lock"
    if not lock.is_file():
        raise ConfigError(f"{lock} not found: the training environment uses it as pip constraints")
    files["requirements.lock"] = lock_for_gpu(lock.read_text(encoding="utf-8"))
    if dest.exists():
        shutil.rmtree(dest)
    digest = hashlib.sha256()
    for name in sorted(files):
        write_text_atomic(dest / name, files[name])
        digest.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return dest, digest.hexdigest()[:16]


def training_environment_body(params: Params, spec_path: Path, context: Path, version: str) -> dict:
    env = params.azure.training_job.environment
    return {
        "name": env.name,
        "version": version,
        "description": "Llama fine-tuning: pinned CUDA image + requirements.txt/requirements.lock",
        "build": {"path": az.rel(context, spec_path), "dockerfile_path": "Dockerfile"},
        "tags": {"base_image": env.image},
    }


# ---------------------------------------------------------------- compute

def compute_body(params: Params) -> dict:
    compute = params.azure.compute
    return {
        "type": "amlcompute",
        "name": compute.cluster_name,
        "location": params.azure.location,
        "size": compute.vm_size,
        "min_instances": compute.min_nodes,
        "max_instances": compute.max_nodes,
        "idle_time_before_scale_down": compute.idle_seconds_before_scale_down,
        "tier": compute.tier,
        "identity": {"type": compute.identity},
    }


# ---------------------------------------------------------------- job

def job_command(params: Params) -> str:
    target = params.azure.training_job.repro_target
    return (f"python -m stages.azure.launch --target {target} "
            f"--results ${{{{outputs.{RESULTS_OUTPUT}}}}}")


def job_environment_variables(params: Params, git_commit: str, key_vault_url: str = "") -> dict:
    env = {
        "GIT_COMMIT": git_commit,
        "HF_TOKEN_SECRET_NAME": params.azure.secrets.hf_token_secret_name,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DVC_NO_ANALYTICS": "1",
        # NCCL over the nodes' InfiniBand when instance_count > 1; harmless on one node.
        "NCCL_DEBUG": "WARN",
    }
    if key_vault_url:
        env["AZURE_KEY_VAULT_URL"] = key_vault_url
    return env


def check_repro_target(params: Params, dvc_yaml_path: Path) -> None:
    import yaml

    if not dvc_yaml_path.is_file():
        raise ConfigError(f"{dvc_yaml_path} not found")
    stages = (yaml.safe_load(dvc_yaml_path.read_text(encoding="utf-8")) or {}).get("stages", {})
    target = params.azure.training_job.repro_target
    if target not in stages:
        raise ConfigError(f"azure.training_job.repro_target: dvc.yaml has no stage {target!r} "
                          f"(stages: {', '.join(stages) or 'none'})")


def training_job_body(params: Params, spec_path: Path, env_body: dict, repo_root: Path = az.REPO_ROOT,
                      git_commit: str | None = None, key_vault_url: str = "") -> dict:
    job = params.azure.training_job
    commit = git_commit or az.git_commit(repo_root)
    return {
        "type": "command",
        "experiment_name": job.experiment_name,
        "display_name": f"dvc repro {job.repro_target} @ {commit[:8]}",
        "description": "dvc pull; dvc repro up to the target stage; dvc push; dvc.lock + metrics as output",
        "code": az.rel(repo_root, spec_path),
        "command": job_command(params),
        "environment": env_body,
        "compute": f"azureml:{params.azure.compute.cluster_name}",
        "resources": {"instance_count": job.instance_count, "shm_size": job.shm_size},
        "distribution": {"type": "pytorch", "process_count_per_instance": job.processes_per_node},
        "limits": {"timeout": job.timeout_minutes * 60},
        "queue_settings": {"job_tier": job.job_tier, "priority": job.priority},
        # The job runs as the cluster's managed identity: DVC (dvc-azure's default credential
        # chain) and the Key Vault read use it; no key or token is passed.
        "identity": {"type": "managed"},
        "environment_variables": job_environment_variables(params, commit, key_vault_url),
        "outputs": {RESULTS_OUTPUT: {"type": "uri_folder", "mode": "rw_mount"}},
        "tags": {"git_commit": commit, "repro_target": job.repro_target,
                 "dvc_lock_sha256": az.file_sha256(repo_root / "dvc.lock")},
    }


def write_training_specs(params: Params, out: str | Path = az.BUILD_DIR / "train-job.yml",
                         repo_root: Path = az.REPO_ROOT, git_commit: str | None = None,
                         key_vault_url: str = "") -> dict[str, Path]:
    """Write train-job.yml (+ the environment context, train-environment.yml, compute.yml) next to `out`."""
    out = Path(out)
    check_repro_target(params, repo_root / "dvc.yaml")
    context, version = build_training_context(params, out.parent / "environments" / "train", repo_root)
    env_spec = out.parent / "train-environment.yml"
    env_body = training_environment_body(params, env_spec, context, version)
    az.write_spec(env_spec, "environment", env_body)
    job_env = training_environment_body(params, out, context, version)
    az.write_spec(out, "command_job", training_job_body(params, out, job_env, repo_root, git_commit, key_vault_url))
    compute_spec = az.write_spec(out.parent / "compute.yml", "compute", compute_body(params))
    return {"job": out, "environment": env_spec, "compute": compute_spec, "context": context}


# ---------------------------------------------------------------- submission

def workspace_key_vault_url(client) -> str:
    from stages.azure.keyvault import key_vault_url_from_id

    workspace = client.workspaces.get(client.workspace_name)
    return key_vault_url_from_id(workspace.key_vault) if workspace.key_vault else ""


def apply_results(downloaded: Path, params_dvc_yaml: dict, repo_root: Path) -> list[str]:
    """Copy dvc.lock and the git-tracked metrics/plots from the downloaded output into the tree."""
    candidates = [p for p in downloaded.rglob("results.json")]
    base = candidates[0].parent if candidates else downloaded
    return copy_tracked_results(params_dvc_yaml, base, repo_root)


# Azure ML job statuses, grouped as a pull-request comment reports them (stages.ci.pr_train).
QUEUED_STATUSES = ("NotStarted", "Starting", "Provisioning", "Preparing", "Queued")
RUNNING_STATUSES = ("Running", "Finalizing")
FAILED_STATUSES = ("Failed", "Canceled", "CancelRequested", "NotResponding")


def status_phase(status: str | None) -> str:
    """queued | running | completed | failed | unknown, from an Azure ML job status."""
    if status == "Completed":
        return "completed"
    if status in QUEUED_STATUSES:
        return "queued"
    if status in RUNNING_STATUSES:
        return "running"
    if status in FAILED_STATUSES:
        return "failed"
    return "unknown"


def submit_job(client, params: Params, out: Path, repo_root: Path = az.REPO_ROOT, git_commit: str | None = None):
    """Register the training environment and submit the job for the code in `repo_root` (at
    `git_commit`, default its HEAD); returns the submitted job (name, studio_url). The one submission
    path: `submit` below (train.yml) and stages.ci.pr_train (a pull request's /train) both call it."""
    from azure.ai.ml import load_environment, load_job

    key_vault_url = workspace_key_vault_url(client)
    specs = write_training_specs(params, out, repo_root, git_commit=git_commit, key_vault_url=key_vault_url)
    environment = client.environments.create_or_update(load_environment(specs["environment"]))
    job = load_job(specs["job"])
    job.environment = f"{environment.name}:{environment.version}"   # the named, registered build
    return client.jobs.create_or_update(job)


def job_status(client, name: str) -> str:
    return str(client.jobs.get(name).status)


def failure_reason(client, name: str) -> str:
    """The error Azure ML records for a failed job (run details), or a line saying there is none."""
    try:
        details = client.jobs._runs_operations.get_run_details(name)   # what jobs.stream prints on failure
        error = details.error.as_dict() if getattr(details, "error", None) is not None else None
    except Exception:  # noqa: BLE001 - a missing detail must not hide the status
        error = None
    inner = (error or {}).get("error") if isinstance(error, dict) else None
    if isinstance(inner, dict) and inner.get("message"):
        code = f"{inner['code']}: " if inner.get("code") else ""
        return f"{code}{str(inner['message']).splitlines()[0]}"
    return "Azure ML recorded no error detail; see the job's logs in the studio"


def download_results(client, name: str, results_dir: Path, repo_root: Path = az.REPO_ROOT,
                     apply: bool = True) -> list[str]:
    """Download the job's `results` output to results_dir/<name> and (apply) copy dvc.lock and the
    git-tracked metrics/plots into repo_root; the paths copied."""
    import yaml

    results_dir = Path(results_dir) / name
    client.jobs.download(name, download_path=str(results_dir), output_name=RESULTS_OUTPUT)
    if not apply:
        return []
    dvc_yaml = yaml.safe_load((Path(repo_root) / "dvc.yaml").read_text(encoding="utf-8"))
    return apply_results(results_dir, dvc_yaml, Path(repo_root))


def submit(params: Params, out: Path, results_dir: Path, wait: bool = True, apply: bool = True,
           repo_root: Path = az.REPO_ROOT) -> int:
    workspace = az.workspace_from_env()          # fails first, naming a missing variable
    client = az.ml_client(workspace)
    job = submit_job(client, params, out, repo_root)
    print(f"submitted {job.name}: {job.studio_url}", flush=True)
    if not wait:
        return 0
    try:
        client.jobs.stream(job.name)
    except Exception as exc:  # stream raises when the job fails; the status below decides
        print(f"job {job.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
    status = job_status(client, job.name)
    if status != "Completed":
        print(f"job {job.name} ended {status}", file=sys.stderr)
        return az.EXIT_FAILED
    applied = download_results(client, job.name, results_dir, repo_root, apply)
    if apply:
        print(f"updated from the job: {', '.join(applied)} (commit them)")
    return 0


def create_compute(params: Params, out: Path) -> int:
    from azure.ai.ml import load_compute

    client = az.ml_client()
    spec = az.write_spec(out, "compute", compute_body(params))
    client.compute.begin_create_or_update(load_compute(spec)).result()
    print(f"compute {params.azure.compute.cluster_name} ready")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.azure.jobs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit the training job (or --dry-run: write its YAML)")
    s.add_argument("--dry-run", action="store_true", help="write the specs, submit nothing (no credentials needed)")
    s.add_argument("--out", type=Path, default=az.BUILD_DIR / "train-job.yml")
    s.add_argument("--results", type=Path, default=az.BUILD_DIR / "results", help="where the job output is downloaded")
    s.add_argument("--no-wait", action="store_true", help="return after submission (no log streaming)")
    s.add_argument("--no-apply", action="store_true", help="do not copy dvc.lock/metrics into the working tree")
    s.add_argument("--params", type=Path, default=Path("params.yaml"))
    c = sub.add_parser("compute", help="create/update the training cluster (or --dry-run: write compute.yml)")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--out", type=Path, default=az.BUILD_DIR / "compute.yml")
    c.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = az.load_settings(args.params)
    if args.command == "compute":
        if args.dry_run:
            print(az.write_spec(args.out, "compute", compute_body(params)))
            return 0
        return create_compute(params, args.out)
    if args.dry_run:
        import os

        specs = write_training_specs(params, args.out, key_vault_url=os.environ.get("AZURE_KEY_VAULT_URL", ""))
        for kind, path in specs.items():
            print(f"{kind}: {path}")
        return 0
    return submit(params, args.out, args.results, wait=not args.no_wait, apply=not args.no_apply)


if __name__ == "__main__":
    sys.exit(az.run_cli(main, "azure.jobs"))
