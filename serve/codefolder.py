"""The endpoint's code folder: what Azure ML uploads as `code_configuration.code`.

Layout of the folder `build_code_folder(dest)` writes (the scoring script is `serve/score.py`
relative to it, i.e. `code_configuration.scoring_script = SCORING_SCRIPT`):

    dest/
      serve/__init__.py, score.py, engine.py, validation.py, monitoring.py, ...   (serve/*.py)
      serve/serve_config.json          params.yaml's `serve:` section, resolved and validated
      stages/__init__.py
      stages/core/__init__.py, chat.py, pii.py, generate.py, determinism.py (imported by stages/__init__.py;
      the endpoint imports torch first, so it keeps the machine's fastest kernels)

Nothing else from the repository goes in: the scoring script needs only these modules, torch,
transformers and the inference server (serve/environment/requirements.txt). The local deploy
stage serves from a folder built by this same function, so local and Azure run identical code.

Usage (the Azure deployment spec):

    from serve.codefolder import build_code_folder, SCORING_SCRIPT, deployment_environment_variables
    code_dir = build_code_folder("build/endpoint_code")        # -> Path
    env_vars = deployment_environment_variables()              # GUNICORN_CMD_ARGS (serve/gunicorn_conf.py), WORKER_COUNT
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCORING_SCRIPT = "serve/score.py"
CONFIG_NAME = "serve_config.json"
# The core modules the scoring script imports (with their packages' __init__ files).
CORE_FILES = ("stages/__init__.py", "stages/core/__init__.py", "stages/core/chat.py",
              "stages/core/pii.py", "stages/core/generate.py", "stages/core/determinism.py")
# serve/ modules that only the repository needs (building this folder).
REPO_ONLY = {"codefolder.py"}


def serve_config(params_path: str | Path | None = None) -> dict:
    """params.yaml's `serve:` section as a plain dict (validated by the typed schema)."""
    from stages.core.params import load_params

    return load_params(params_path or REPO_ROOT / "params.yaml").serve.model_dump()


def build_code_folder(dest: str | Path, serve: dict | None = None, params_path: str | Path | None = None,
                      repo_root: str | Path = REPO_ROOT) -> Path:
    """Write the endpoint's code folder at `dest` (replaced atomically) and return its path.

    `serve` is the `serve:` params section as a dict (or a pydantic ServeParams); by default it is
    read from params.yaml. The result holds serve/*.py, serve/serve_config.json and the core modules.
    """
    repo_root = Path(repo_root)
    if serve is None:
        serve = serve_config(params_path)
    elif hasattr(serve, "model_dump"):
        serve = serve.model_dump()
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        (tmp / "serve").mkdir()
        for source in sorted((repo_root / "serve").glob("*.py")):
            if source.name not in REPO_ONLY:
                shutil.copy2(source, tmp / "serve" / source.name)
        for relative in CORE_FILES:
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / relative, target)
        (tmp / "serve" / CONFIG_NAME).write_text(json.dumps(serve, indent=2) + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def deployment_environment_variables(serve: dict | None = None, params_path: str | Path | None = None) -> dict:
    """Server settings for the deployment: one worker process (one model copy); gunicorn reads
    serve/gunicorn_conf.py (gthread with `serve.threads` request threads, enough for the scoring
    script's dynamic batching to see concurrent requests, and a read deadline against slow clients)."""
    if serve is None:
        serve = serve_config(params_path)
    elif hasattr(serve, "model_dump"):
        serve = serve.model_dump()
    return {"WORKER_COUNT": "1", "GUNICORN_CMD_ARGS": f"--config python:serve.gunicorn_conf --threads {int(serve['threads'])}"}


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "build/endpoint_code"
    print(build_code_folder(target))
