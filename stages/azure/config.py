"""Shared plumbing of the Azure commands: workspace identifiers from the environment, params,
YAML specs with `$schema` that the SDK's own loaders read back, lineage facts, and the CLI wrapper
that turns configuration mistakes into one clear line and exit code 2 (never a traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import yaml

from stages.core.io import write_text_atomic
from stages.core.params import ConfigError, Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = Path("build/azure")
# The workspace is never in params.yaml or git: it comes from these (as in the reference template).
WORKSPACE_ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME")
SCHEMA_BASE = "https://azuremlschemas.azureedge.net/latest/"
SCHEMAS = {
    "command_job": SCHEMA_BASE + "commandJob.schema.json",
    "compute": SCHEMA_BASE + "amlCompute.schema.json",
    "environment": SCHEMA_BASE + "environment.schema.json",
    "model": SCHEMA_BASE + "model.schema.json",
    "online_endpoint": SCHEMA_BASE + "managedOnlineEndpoint.schema.json",
    "online_deployment": SCHEMA_BASE + "managedOnlineDeployment.schema.json",
    "batch_endpoint": SCHEMA_BASE + "batchEndpoint.schema.json",
    "batch_deployment": SCHEMA_BASE + "modelBatchDeployment.schema.json",
}
EXIT_FAILED = 1
EXIT_CONFIG = 2


@dataclass(frozen=True)
class Workspace:
    subscription_id: str
    resource_group: str
    workspace_name: str


def workspace_from_env(env: Mapping[str, str] | None = None) -> Workspace:
    """The workspace from AZURE_SUBSCRIPTION_ID / AZURE_RESOURCE_GROUP / AZURE_WORKSPACE_NAME.
    Raises ConfigError naming every missing variable."""
    env = os.environ if env is None else env
    missing = [name for name in WORKSPACE_ENV if not str(env.get(name, "")).strip()]
    if missing:
        raise ConfigError(
            f"missing environment variable{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "export AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and AZURE_WORKSPACE_NAME "
            "(see docs/azure.md), then sign in with `az login`")
    return Workspace(*(str(env[name]).strip() for name in WORKSPACE_ENV))


def has_workspace_env(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(str(env.get(name, "")).strip() for name in WORKSPACE_ENV)


def ml_client(workspace: Workspace | None = None):
    """An MLClient on the default Azure credential chain (az login, managed identity, GitHub OIDC)."""
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    workspace = workspace or workspace_from_env()
    return MLClient(DefaultAzureCredential(), workspace.subscription_id, workspace.resource_group,
                    workspace.workspace_name)


def load_settings(params_path: str | Path = "params.yaml") -> Params:
    return load_params(params_path)


def spec_text(kind: str, body: dict) -> str:
    """YAML of one spec with its `$schema` first (what `az ml ... --file` and the loaders read)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown spec kind {kind!r}")
    return yaml.safe_dump({"$schema": SCHEMAS[kind], **body}, sort_keys=False, width=100)


def write_spec(path: str | Path, kind: str, body: dict) -> Path:
    path = Path(path)
    write_text_atomic(path, spec_text(kind, body))
    return path


def rel(target: str | Path, spec_path: str | Path) -> str:
    """`target` relative to the folder of the spec file: the loaders resolve paths that way."""
    return os.path.relpath(Path(target).resolve(), Path(spec_path).resolve().parent)


# ---------------------------------------------------------------- lineage (git, dvc.lock, data)

def git_commit(repo: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lineage_tags(repo: str | Path = ".", adapter_manifest: str | Path = "models/adapter/manifest.json") -> dict:
    """git commit, sha256 of dvc.lock and the training data hash recorded by the train stage."""
    repo = Path(repo)
    manifest_path = repo / adapter_manifest
    data_hash, method, manifest_commit = "unknown", "unknown", None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            data_hash = str(manifest.get("data_hash", "unknown"))
            method = str(manifest.get("method", "unknown"))
            manifest_commit = manifest.get("git_commit")
        except (OSError, ValueError):
            pass
    tags = {
        "git_commit": git_commit(repo),
        "dvc_lock_sha256": file_sha256(repo / "dvc.lock"),
        "data_hash": data_hash,
        "train_method": method,
    }
    if manifest_commit:
        tags["trained_at_commit"] = str(manifest_commit)
    return tags


# ---------------------------------------------------------------- CLI wrapper

def run_cli(main: Callable[[list[str] | None], int | None], name: str, argv: list[str] | None = None) -> int:
    """Run a command: ConfigError -> one line + exit 2; Azure errors -> one line + exit 1."""
    try:
        return main(argv) or 0
    except ConfigError as exc:
        print(f"[{name}] configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print(f"[{name}] interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the Azure SDK raises many types; report, never dump
        if type(exc).__module__.split(".")[0] not in {"azure", "msrest", "requests", "urllib3"}:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"[{name}] Azure error ({type(exc).__name__}): {message}", file=sys.stderr)
        return EXIT_FAILED
