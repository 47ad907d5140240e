"""The DVC remote on Azure Blob: .dvc/config agrees with params.yaml and holds no secret, dvc-azure
falls back to the default Azure credential chain, and a real round trip (dvc push, wipe the cache
and the outputs, dvc pull, dvc status) works against Azurite for every cached output the graph
declares in dvc.yaml, plus a `dvc add`-tracked file.

Azurite (the Azure Storage emulator, npm) is started by the fixture on a loopback port. Install:
    npm install --prefix .cache/azurite azurite@3.35.0
(or set AZURITE_BLOB to an azurite-blob executable). Without it the test fails, except on a
machine with no Node.js at all and CI unset, where it skips naming that command.
"""

from __future__ import annotations

import configparser
import json
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AZURITE_VERSION = "3.35.0"
INSTALL_HINT = f"npm install --prefix .cache/azurite azurite@{AZURITE_VERSION}"
# Azurite's well-known development account: published in the emulator's documentation, valid only
# against the emulator. It goes into a temporary repository's .dvc/config.local, never the real one.
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DVC = [sys.executable, "-m", "dvc"]
SECRET_KEYS = {"connection_string", "account_key", "sas_token", "client_secret"}


def _azurite_executable() -> str | None:
    candidates = [os.environ.get("AZURITE_BLOB", ""),
                  str(ROOT / ".cache/azurite/node_modules/.bin/azurite-blob"),
                  shutil.which("azurite-blob") or ""]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def azurite(tmp_path_factory):
    """A running Azurite blob service (one per test, empty): yields its connection string."""
    exe = _azurite_executable()
    if exe is None:
        if not os.environ.get("CI") and shutil.which("node") is None:
            pytest.skip(f"Azurite needs Node.js; install Node.js, then: {INSTALL_HINT}")
        pytest.fail(f"Azurite not found: run `{INSTALL_HINT}` (or set AZURITE_BLOB)")
    port = _free_port()
    location = tmp_path_factory.mktemp("azurite")
    log = open(location / "azurite.log", "w")
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
                             "--skipApiVersionCheck", "--loose", "--silent"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"Azurite did not start: {(location / 'azurite.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield (f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _dvc(repo: Path, *args: str, env=None) -> str:
    out = subprocess.run([*DVC, *args], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _entries(stage: dict, key: str):
    for entry in stage.get(key, []) or []:
        if isinstance(entry, dict):
            path, options = next(iter(entry.items()))
            yield path, options or {}
        else:
            yield entry, {}


def cached_outputs(dvc_yaml: dict) -> list[str]:
    """Every output of the graph that DVC stores in its cache (and so in the remote)."""
    paths = []
    for stage in dvc_yaml.get("stages", {}).values():
        for key in ("outs", "metrics", "plots"):
            for path, options in _entries(stage, key):
                if options.get("cache", True) is not False:   # DVC caches outs, metrics, plots by default
                    paths.append(path)
    return paths


def _make_dummy(path: Path, seed: str) -> None:
    """A file for paths that look like files, else a folder with nested files."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'{{"dummy": "{seed}"}}\n' if path.suffix == ".json" else f"{seed}\n")
    else:
        (path / "sub").mkdir(parents=True, exist_ok=True)
        (path / "a.txt").write_text(f"{seed} a\n")
        (path / "sub" / "b.bin").write_bytes(hashlib.sha256(seed.encode()).digest() * 64)


# ---------------------------------------------------------------- the real configuration

def _dvc_config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / ".dvc" / "config")
    return parser


def test_dvc_config_matches_params_and_holds_no_secret():
    storage = _params()["azure"]["storage"]
    config = _dvc_config()
    section = f"'remote \"{storage['dvc_remote_name']}\"'"
    assert section in config.sections(), f".dvc/config has no remote {storage['dvc_remote_name']!r}"
    remote = config[section]
    assert remote["url"] == f"azure://{storage['dvc_container']}"
    assert remote["account_name"] == storage["account_name"]
    # not the default until infra/ is deployed: a fresh clone never waits on Azure credentials
    assert "remote" not in (config["core"] if "core" in config else {}), ".dvc/config has a default remote"
    for name in config.sections():
        assert not SECRET_KEYS & set(config[name]), f".dvc/config [{name}] holds a secret"
    text = (ROOT / ".dvc" / "config").read_text()
    assert "AccountKey=" not in text and "SharedAccessSignature" not in text and "sig=" not in text


def test_remote_uses_default_azure_credential_chain():
    """With only account_name configured, dvc-azure authenticates through DefaultAzureCredential
    (az login, managed identity in jobs, OIDC/environment in GitHub Actions)."""
    from azure.identity.aio import DefaultAzureCredential
    from dvc_azure import AzureFileSystem

    storage = _params()["azure"]["storage"]
    # exactly what the committed .dvc/config gives (a developer's config.local is not consulted)
    remote = dict(_dvc_config()[f"'remote \"{storage['dvc_remote_name']}\"'"])
    fs = AzureFileSystem(**remote)
    assert fs.fs_args["account_name"] == storage["account_name"]
    assert isinstance(fs.fs_args["credential"], DefaultAzureCredential)
    for key in ("connection_string", "account_key", "sas_token", "client_secret"):
        assert not fs.fs_args.get(key), key
    assert fs._login_method.startswith("default credentials")


def test_cached_outputs_helper_reads_dvc_yaml():
    graph = {"stages": {"a": {"outs": ["x", {"y": {"cache": False}}, {"z": {"persist": True}}],
                              "metrics": [{"m.json": {"cache": False}}, {"n.json": {"cache": True}}],
                              "plots": ["p"]}}}
    assert cached_outputs(graph) == ["x", "z", "n.json", "p"]


# ---------------------------------------------------------------- the round trip on Azurite

@pytest.fixture
def temp_repo(tmp_path, azurite):
    """A copy of the repository's DVC setup with dummy content for every declared output."""
    from azure.storage.blob import BlobServiceClient

    params = _params()
    storage = params["azure"]["storage"]
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, repo / name)
    # A container of the same name in the emulator; credentials only in this copy's config.local.
    container = storage["dvc_container"]
    BlobServiceClient.from_connection_string(azurite).create_container(container)
    make_default_as_after_infra_deploy(repo, storage)
    _dvc(repo, "remote", "modify", "--local", storage["dvc_remote_name"], "connection_string", azurite)
    return repo, storage, container


def make_default_as_after_infra_deploy(repo: Path, storage: dict) -> None:
    """What a team runs once infra/ is deployed: the commands infra_report prints."""
    from stages.ci.infra_report import dvc_commands

    commands = dvc_commands({"dvcContainerName": storage["dvc_container"],
                             "storageAccountName": storage["account_name"]}, storage["dvc_remote_name"])
    assert any("--default" in c for c in commands)
    for command in commands:
        _dvc(repo, *command.split()[1:])


def test_push_wipe_pull_status_round_trip(temp_repo, azurite):
    from azure.storage.blob import BlobServiceClient

    repo, storage, container = temp_repo
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    declared = cached_outputs(dvc_yaml)
    assert declared, "dvc.yaml declares no cached output"
    print("round trip covers:", ", ".join(declared))
    # Dependencies that no stage produces (raw data, code) must exist for `dvc commit`.
    produced = {p.rstrip("/") for s in dvc_yaml["stages"].values() for k in ("outs", "metrics", "plots")
                for p, _ in _entries(s, k)}
    for stage in dvc_yaml["stages"].values():
        for dep in stage.get("deps", []) or []:
            if not any(dep == p or dep.startswith(p + "/") for p in produced) and not (repo / dep).exists():
                _make_dummy(repo / dep, f"dep {dep}")
        for path, _ in (*_entries(stage, "outs"), *_entries(stage, "metrics"), *_entries(stage, "plots")):
            if not (repo / path).exists():
                _make_dummy(repo / path, f"out {path}")
    # Files under a declared output folder that a stage dep names (data/processed/train.jsonl).
    for stage in dvc_yaml["stages"].values():
        for dep in stage.get("deps", []) or []:
            if not (repo / dep).exists():
                _make_dummy(repo / dep, f"dep {dep}")
    # A `dvc add`-tracked file too (e.g. raw data kept in the remote rather than git).
    (repo / "extra").mkdir()
    (repo / "extra" / "sample.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    _dvc(repo, "add", "extra/sample.jsonl")
    _dvc(repo, "commit", "--force")
    tracked = [*declared, "extra/sample.jsonl"]
    before = {path: _digest(repo / path) for path in tracked}
    assert all(before.values())

    pushed = _dvc(repo, "push")
    assert "pushed" in pushed.lower()
    blobs = list(BlobServiceClient.from_connection_string(azurite).get_container_client(container).list_blobs())
    assert len(blobs) >= len(tracked), f"only {len(blobs)} objects in the container"

    shutil.rmtree(repo / ".dvc" / "cache")
    for path in tracked:
        target = repo / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert "deleted" in _dvc(repo, "status")

    _dvc(repo, "pull")
    after = {path: _digest(repo / path) for path in tracked}
    assert after == before
    assert "up to date" in _dvc(repo, "status").lower()
    cloud = _dvc(repo, "status", "--cloud")
    assert "up to date" in cloud.lower() or "in sync" in cloud.lower(), cloud


# ---------------------------------------------------------------- the training job's command, locally

def _job_copy(dest: Path) -> Path:
    """What the job's code snapshot holds (.amlignore applied by hand): code, params, graph, raw data."""
    dest.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    shutil.copytree(ROOT / "stages", dest / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw", dest / "data" / "raw")
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_job_launcher_pulls_reproduces_pushes_and_collects(tmp_path, azurite):
    """`python -m stages.azure.launch` (what every job process runs), on one process, for the first
    stage of the graph: the outputs reach the remote and dvc.lock + metrics come back in results;
    a second fresh snapshot pulls them and has nothing to reproduce."""
    from azure.storage.blob import BlobServiceClient

    storage = _params()["azure"]["storage"]
    BlobServiceClient.from_connection_string(azurite).create_container(storage["dvc_container"])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH="", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    stage = "preprocess"
    runs = []
    for attempt in ("first", "second"):
        repo = _job_copy(tmp_path / attempt)
        if runs:  # the caller committed what the first job brought back (dvc.lock, metrics)
            from stages.azure.jobs import apply_results

            applied = apply_results(runs[0][1], yaml.safe_load((repo / "dvc.yaml").read_text()), repo)
            assert applied[0] == "dvc.lock"
        make_default_as_after_infra_deploy(repo, storage)
        _dvc(repo, "remote", "modify", "--local", storage["dvc_remote_name"], "connection_string", azurite)
        results = tmp_path / f"results-{attempt}"
        out = subprocess.run([sys.executable, "-m", "stages.azure.launch", "--target", stage, "--results", str(results)],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs.append((repo, results, out.stdout + out.stderr))
    (first, results, log), (second, results2, log2) = runs
    lock = yaml.safe_load((results / "dvc.lock").read_text())
    assert stage in lock["stages"]
    assert (results / "metrics" / "preprocess.json").is_file()
    assert json.loads((results / "results.json").read_text())["files"][:1] == ["dvc.lock"]
    assert "Running stage 'preprocess'" in log
    # the second snapshot got the outputs from the remote instead of recomputing them
    assert "Running stage 'preprocess'" not in log2, log2[-2000:]
    assert _digest(second / "data" / "processed") == _digest(first / "data" / "processed")
    assert "up to date" in _dvc(second, "status", stage).lower()
