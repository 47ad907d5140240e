"""A fresh clone without a DVC remote: `dvc exp run preprocess` works (issue 21 item 6).

It failed with `failed to load directory ('reports', 'eval')`: before saving an experiment, DVC
collects the sources of dvc.yaml's top-level plots, and an entry whose id is a path
(`- reports/eval/plots/metrics.png`, an image) makes it ask whether that path is a directory, which
for a path inside a DVC-cached output (reports/eval) means loading that output's .dir object from the
cache. A fresh clone has none, so the whole experiment failed after preprocess had run. Plots drawn
from a `y:` mapping are resolved without that lookup; images can only be path entries, so the image
(the same bars as the headline chart) is not a top-level plot: reports/eval/report.md embeds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cached_outs(dvc_yaml: dict) -> list[str]:
    outs = []
    for stage in dvc_yaml["stages"].values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                path, options = (next(iter(entry.items())) if isinstance(entry, dict) else (entry, None))
                if not (isinstance(options, dict) and options.get("cache") is False):
                    outs.append(path.rstrip("/"))
    return outs


def test_no_top_level_plot_is_a_path_inside_a_cached_output():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    cached = _cached_outs(dvc_yaml)
    assert "reports/eval" in cached
    for plot in dvc_yaml.get("plots") or []:
        plot_id, props = next(iter(plot.items())) if isinstance(plot, dict) else (plot, None)
        if isinstance(props, dict) and isinstance(props.get("y"), dict):
            continue  # resolved from its y sources, no directory lookup
        inside = [o for o in cached if plot_id == o or plot_id.startswith(o + "/")]
        assert not inside, (f"top-level plot {plot_id!r} is a path inside the cached output {inside[0]}: "
                            "`dvc exp run` in a clone without that output's cache fails on it")


def _fresh_copy(dest: Path) -> Path:
    """The tracked files of this working tree, committed in a new repository with an empty DVC cache."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "fresh clone"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.slow
def test_exp_run_preprocess_in_a_fresh_clone_without_a_remote(tmp_path):
    repo = _fresh_copy(tmp_path / "clone")
    assert not (repo / ".dvc" / "cache").exists() and not (repo / "reports").exists()
    env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONPATH="",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               # the converted SmolLM2 tokenizer of this checkout, not a second conversion
               LLAMA_FT_MODEL_CACHE=os.environ.get("LLAMA_FT_MODEL_CACHE", str(ROOT / ".cache" / "models")))
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "preprocess"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert "failed to load directory" not in log, log[-3000:]
    assert out.returncode == 0, log[-3000:]
    assert "Running stage 'preprocess'" in log and "Ran experiment(s)" in log
    assert (repo / "data" / "processed" / "train.jsonl").is_file()
