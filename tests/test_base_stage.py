"""The base stage (stages/base.py): the base model as a pinned, hashed input of the graph (issue 21 item 1).

- a hub model is fetched at the commit model.revision pins, from a crafted offline Hugging Face cache
  that also holds another commit of the same model (the pinned one must be the one copied);
- a hub id without a revision, a branch as revision, and an offline fetch fail with what to do;
- the embedded model read back from its folder is the model built in memory, tensor for tensor, with
  the same tokenizer; a folder built for other params is refused, naming both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.core import modeling as m
from stages.core.params import ConfigError, ModelParams, load_params

ROOT = Path(__file__).resolve().parents[1]
PINNED = "1" * 40
OTHER = "2" * 40


def _run_base(tmp_path: Path, model: dict, hf_home: Path) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(model)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "stages.base", "--output", "models/base", "--params", "params.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _cached_snapshot(hf_home: Path, repo: str, revision: str, files: dict[str, str]) -> None:
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_hub_model_is_fetched_at_the_pinned_commit_only(tmp_path):
    hf_home = tmp_path / "hf"
    _cached_snapshot(hf_home, "acme/tiny-llama", PINNED, {
        "config.json": '{"model_type": "llama", "pinned": true}', "model.safetensors": "pinned weights",
        "tokenizer.json": "{}", "tokenizer_config.json": "{}", "README.md": "not a model file"})
    _cached_snapshot(hf_home, "acme/tiny-llama", OTHER, {
        "config.json": '{"model_type": "llama", "pinned": false}', "model.safetensors": "other weights"})
    proc = _run_base(tmp_path, {"base": "acme/tiny-llama", "tokenizer": "acme/tiny-llama", "revision": PINNED}, hf_home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "models" / "base"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "source.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert (out / "model.safetensors").read_text() == "pinned weights"
    assert not (out / "config.json").is_symlink()  # the cache's symlinks resolved: DVC hashes the bytes
    # copied, never hard-linked: DVC makes what it caches read-only, which must not reach the hub's cache
    assert all(f.stat().st_nlink == 1 for f in out.iterdir())
    record = json.loads((out / "source.json").read_text())
    assert record == {"base": "acme/tiny-llama", "revision": PINNED, "source": "acme/tiny-llama", "origin": "hub",
                      "files": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]}
    assert proc.stdout.startswith(f"[base] acme/tiny-llama at {PINNED} -> models/base (")


def test_a_hub_id_without_a_revision_or_not_here_fails_with_what_to_do(tmp_path):
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    unpinned = _run_base(tmp_path, {"base": "acme/tiny-llama", "tokenizer": "acme/tiny-llama", "revision": ""}, hf_home)
    assert unpinned.returncode == 2
    assert ("[base] configuration error: model.base 'acme/tiny-llama' is a hub id, so model.revision must pin the "
            "commit to fetch") in unpinned.stderr
    missing = _run_base(tmp_path, {"base": "acme/tiny-llama", "tokenizer": "acme/tiny-llama", "revision": PINNED},
                        hf_home)
    assert missing.returncode == 2
    assert f"model.base: cannot fetch 'acme/tiny-llama' at revision {PINNED}: " in missing.stderr
    assert ("whoever runs it first needs network access and, for a gated model such as Llama, HF_TOKEN with access to "
            "it (`HF_TOKEN=... dvc repro base && dvc push base`); everyone else gets it from the DVC remote "
            "(`dvc pull base`)") in missing.stderr
    assert not (tmp_path / "models" / "base").exists()  # nothing half-written
    assert "Traceback" not in missing.stderr + unpinned.stderr


def test_a_branch_is_not_a_revision():
    with pytest.raises(Exception, match="'main' is not a commit sha: give the full 40-character hex sha"):
        ModelParams(base="acme/tiny-llama", revision="main")


def test_the_embedded_folder_is_the_model_built_in_memory_and_a_stale_folder_is_refused(tmp_path, monkeypatch):
    from stages.base import build_base

    monkeypatch.setattr(m, "_BASE_FOLDERS", {})
    params = load_params(ROOT / "params.yaml").model.model_copy(update={"base": "embedded", "tokenizer": "embedded"})
    built, tokenizer = m.load_base_model(params), m.load_model_tokenizer(params)
    record = build_base(params, tmp_path / "base")
    assert record["embedded"] == params.embedded.model_dump(mode="json") and record["revision"] == ""
    m.use_base_folder(tmp_path / "base", params)
    assert isinstance(m.base_source(params), m.FolderSource)
    loaded, from_folder = m.load_base_model(params), m.load_model_tokenizer(params)
    a, b = built.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "Which job code is part time?"
    assert tokenizer(text)["input_ids"] == from_folder(text)["input_ids"]
    assert tokenizer.chat_template == from_folder.chat_template and from_folder.pad_token == tokenizer.pad_token
    assert m.base_source(params).provenance()["origin"] == "seeded random initialisation (model.embedded in params.yaml)"
    # a folder for another embedded config, or another model, is refused, naming what differs
    other = params.model_copy(update={"embedded": params.embedded.model_copy(update={"seed": 1})})
    with pytest.raises(ConfigError, match=r"was built for other params \(model.embedded: folder .*'seed': 0.*"
                                          r"params.yaml .*'seed': 1.*run `dvc repro base` \(or `dvc pull base`\)"):
        m.use_base_folder(tmp_path / "base", other)
    smol = params.model_copy(update={"base": "smollm2-135m", "tokenizer": "smollm2-135m"})
    with pytest.raises(ConfigError, match=r"\(model.base: folder 'embedded', params.yaml 'smollm2-135m'\)"):
        m.use_base_folder(tmp_path / "base", smol)
    with pytest.raises(ConfigError, match="not a base stage output"):
        m.use_base_folder(tmp_path, params)


def test_the_packaged_model_is_linked_from_the_conversion_cache_and_copied_across_filesystems(tmp_path, monkeypatch):
    """The SmolLM2 conversion is made once into the project's cache and never rewritten: the base
    folder hard-links it (0 bytes more per clone), and copies where a link is impossible."""
    converted = tmp_path / "cache" / "smollm2-135m-0123"
    converted.mkdir(parents=True)
    files = {"config.json": '{"model_type": "llama"}', "model.safetensors": "weights", "tokenizer.json": "{}",
             "source.json": "{}", "notes.md": "not a model file"}
    for name, text in files.items():
        (converted / name).write_text(text)
    source = m.model_source("smollm2-135m")
    monkeypatch.setattr(type(source), "converted", lambda self: converted)
    params = load_params(ROOT / "params.yaml").model

    linked = tmp_path / "linked"
    linked.mkdir()
    source.materialise(params, linked)
    assert sorted(p.name for p in linked.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all((linked / name).samefile(converted / name) for name in ("config.json", "model.safetensors"))

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    copied = tmp_path / "copied"
    copied.mkdir()
    source.materialise(params, copied)
    assert (copied / "model.safetensors").read_text() == "weights"
    assert not (copied / "model.safetensors").samefile(converted / "model.safetensors")


def test_gguf_read_once_memoises_within_the_block_and_restores_after():
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    path = m.model_source("smollm2-135m").gguf_path()
    with m._gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == originals


def test_smollm2_conversion_with_one_gguf_read_is_byte_identical_to_transformers_own(tmp_path, monkeypatch):
    """The memoised conversion (one GGUF parse instead of three) writes the same files, byte for byte,
    as transformers' unpatched path."""
    import contextlib

    source = m.model_source("smollm2-135m")
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    fast.mkdir(), plain.mkdir()
    source._convert(source.gguf_path(), fast)
    monkeypatch.setattr(m, "_gguf_read_once", contextlib.nullcontext)
    source._convert(source.gguf_path(), plain)
    names = sorted(f.name for f in fast.iterdir())
    assert names == sorted(f.name for f in plain.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (fast / name).read_bytes() == (plain / name).read_bytes(), name
