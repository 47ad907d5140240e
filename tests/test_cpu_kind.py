"""The CPU kind that a run's bytes depend on, and the note `make pipeline` prints when a run on another
kind rewrites the committed outputs (issue: CI red on AMD)."""

from __future__ import annotations

import json
import subprocess

import pytest

from stages.core import determinism


@pytest.mark.parametrize("vendor, flags, threads, kind", [
    ("AuthenticAMD", {"avx2", "avx512f", "avx512_bf16"}, 2, "AuthenticAMD avx512 avx512_bf16, 2 threads"),
    ("GenuineIntel", {"avx2", "avx512f", "avx512_bf16", "amx_tile"}, 2, "GenuineIntel avx512 avx512_bf16 amx, 2 threads"),
    ("GenuineIntel", {"avx2"}, 1, "GenuineIntel avx2, 1 thread"),
])
def test_cpu_kind_names_vendor_features_and_threads(monkeypatch, vendor, flags, threads, kind):
    monkeypatch.setattr(determinism, "_cpuinfo", lambda: (vendor, flags))
    assert determinism.cpu_kind(threads) == kind


def test_fix_cpu_threads_sets_the_count_on_a_cpu_only():
    import torch

    before = torch.get_num_threads()
    try:
        assert determinism.fix_cpu_threads(1, torch.device("cpu")) == 1
        assert determinism.fix_cpu_threads(0, torch.device("cpu")) == 1      # 0: leave it as it is
        assert determinism.fix_cpu_threads(3, torch.device("meta")) == 1     # not a CPU: untouched
    finally:
        torch.set_num_threads(before)


def _repo(tmp_path, kind: str):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "dvc.lock").write_text("outs: a\n")
    (tmp_path / "metrics/train.json").write_text(json.dumps({"computed_on": kind}))
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "outputs")


def test_a_rewritten_lock_from_another_cpu_kind_is_named_in_one_line(tmp_path):
    _repo(tmp_path, "GenuineIntel avx512 avx512_bf16 amx, 2 threads")
    assert determinism.other_kind_note(tmp_path) is None                       # nothing rewritten
    (tmp_path / "dvc.lock").write_text("outs: b\n")
    (tmp_path / "metrics/train.json").write_text(json.dumps({"computed_on": "AuthenticAMD avx512 avx512_bf16, 2 threads"}))
    note = determinism.other_kind_note(tmp_path)
    assert note is not None and "\n" not in note
    assert "GenuineIntel avx512 avx512_bf16 amx, 2 threads" in note and "AuthenticAMD avx512 avx512_bf16, 2 threads" in note
    assert "python -m stages.ci.pr_comment --base HEAD" in note


def test_no_note_when_the_kind_is_the_same_or_the_folder_is_not_a_repository(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    _repo(repo, "AuthenticAMD avx512, 2 threads")
    (repo / "dvc.lock").write_text("outs: b\n")                                  # a real change, same kind
    assert determinism.other_kind_note(repo) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    assert determinism.other_kind_note(plain) is None
