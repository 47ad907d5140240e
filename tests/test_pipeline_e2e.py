"""The whole DVC graph on a slice of the embedded data, in a temporary copy of the repository.

Asserts the exact outputs and metric keys, that a second `dvc repro` does nothing, and that changing
one training param invalidates train and its dependants but not preprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.ci.proxy import ran_stages, restored_stages

pytestmark = pytest.mark.slow

SLICE = 160  # records: enough for every split to be non-empty


def _sh(args, cwd, env, check=True):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def build_repo(dest: Path, root: Path, records: int, preset: str | None = None, max_new_tokens: int = 24):
    """A git repository with this tree's files, a slice of the data, one epoch, and `dvc repro` run."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for generated in ("metrics", "dvclive", "dvc.lock"):
        target = dest / generated
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    raw = (root / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:records]
    (dest / "data/raw/corporate_qa.jsonl").write_text("\n".join(raw) + "\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           # the converted SmolLM2 model is shared with the test session instead of converted again
           "LLAMA_FT_MODEL_CACHE": str(root / ".cache" / "models")}
    if preset:
        _sh([sys.executable, "-m", "stages.preset", "apply", preset], dest, env)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    params["train"]["min_steps"] = 0  # a pipeline smoke run: one pass over the slice, not a quality run
    params["decoding"]["max_new_tokens"] = max_new_tokens
    params["deploy"]["require_gate"] = False  # a one-epoch slice is not meant to pass the gate
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["git", "init", "-q"], dest, env)
    _sh(["git", "add", "-A"], dest, env)
    _sh(["git", "commit", "-qm", "slice"], dest, env)
    done = _sh([sys.executable, "-m", "dvc", "repro"], dest, env)
    return dest, env, done.stdout


@pytest.fixture(scope="module")
def repo(module_dir, root):
    """The default params (whatever params.yaml selects) on a slice."""
    return build_repo(module_dir("repo"), root, SLICE)


@pytest.fixture(scope="module")
def other_model_repo(module_dir, root):
    """The other model: SmolLM2 when the default is the embedded model, and the other way round."""
    base = yaml.safe_load((root / "params.yaml").read_text())["model"]["base"]
    preset = "smollm2-135m" if base == "embedded" else "embedded"
    return build_repo(module_dir("other"), root, 96, preset, max_new_tokens=16), preset


def test_outputs_exist(repo):
    dest, _, _ = repo
    for path in ("data/processed/train.jsonl", "data/processed/val.jsonl", "data/processed/test.jsonl",
                 "metrics/preprocess.json", "metrics/train.json", "metrics/eval.json", "metrics/package.json",
                 "metrics/deploy.json", "models/adapter/manifest.json", "models/adapter/adapter/adapter_config.json",
                 "models/adapter/tokenizer/tokenizer.json", "models/merged/model.safetensors",
                 "models/merged/chat_template.jinja", "reports/eval/predictions.jsonl", "reports/eval/report.md",
                 "reports/eval/plots/headline.json", "reports/eval/plots/by_category.json",
                 "metrics/eval_records.json", "metrics/eval_summary.json", "reports/eval_base/base.json",
                 "reports/eval_base/answers.jsonl", "dvc.lock"):
        assert (dest / path).exists(), path
    assert list((dest / "dvclive/train/plots/metrics").rglob("*.tsv")), "no loss curves"
    lines = (dest / "reports/eval/predictions.jsonl").read_text().splitlines()
    test_lines = (dest / "data/processed/test.jsonl").read_text().splitlines()
    assert len(lines) == len(test_lines) > 0


def test_metrics_keys_and_ranges(repo):
    dest, _, _ = repo
    pre = json.loads((dest / "metrics/preprocess.json").read_text())
    assert pre["records_in"] == SLICE and sum(pre["splits"].values()) == pre["records_out"]
    train = json.loads((dest / "metrics/train.json").read_text())
    for key in ("final_train_loss", "final_val_loss"):
        assert train[key] > 0, key
    perf = json.loads((dest / "logs/perf/train.json").read_text())  # timings: not in metrics/
    assert perf["real_tokens_per_s"] > 0 and perf["peak_rss_mb"] > 0
    assert train["epochs_run"] == 1 and train["method"] == "lora"
    ev = json.loads((dest / "metrics/eval.json").read_text())
    for model in ("base", "tuned"):
        for metric in ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "fact_recall"):
            assert 0.0 <= ev[model][metric] <= 1.0, (model, metric)
    assert ev["tuned"]["val_loss"] < ev["base"]["val_loss"]  # even one epoch on the slice learns something
    assert isinstance(ev["gate"]["passed"], bool) and isinstance(ev["gate"]["reasons"], list)
    deploy = json.loads((dest / "metrics/deploy.json").read_text())
    assert deploy["target"] == "local" and deploy["passed"] is True


def test_dvc_metrics_show_fits_a_terminal_and_details_stay_reachable(repo):
    dest, env, _ = repo
    shown = _sh([sys.executable, "-m", "dvc", "metrics", "show"], dest, env).stdout
    assert max(len(line) for line in shown.splitlines()) < 200, shown
    assert "metrics/eval_summary.json" in shown and "rouge_l" in shown
    details = _sh([sys.executable, "-m", "dvc", "metrics", "show", "--json", "metrics/preprocess.json",
                   "metrics/train.json"], dest, env).stdout
    files = json.loads(details)[""]["data"]
    assert files["metrics/train.json"]["data"]["final_val_loss"] > 0
    assert files["metrics/preprocess.json"]["data"]["records_in"] == SLICE


def test_second_repro_does_nothing(repo):
    dest, env, _ = repo
    out = _sh([sys.executable, "-m", "dvc", "repro"], dest, env).stdout
    assert "Data and pipelines are up to date" in out, out


def _md5_of(dest: Path, path: str) -> str:
    """The cache path (xx/yyyy...) DVC recorded for a file inside a cached output folder."""
    folder, name = path.rsplit("/", 1)
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == folder:
                listing = json.loads((dest / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).read_text())
                md5 = next(entry["md5"] for entry in listing if entry["relpath"] == name)
                return f"{md5[:2]}/{md5[2:]}"
    raise AssertionError(f"no output {folder} in dvc.lock")


def test_a_clone_holds_each_model_once(repo):
    """.dvc/config's cache type: the workspace's model files are DVC's cached bytes (hard links), not a
    second copy, and the base folder shares the converted SmolLM2 in .cache/models."""
    dest, env, _ = repo
    for path in ("models/base/model.safetensors", "models/merged/model.safetensors"):
        cached = dest / ".dvc/cache/files/md5" / _md5_of(dest, path)
        assert (dest / path).samefile(cached), f"{path} is a copy of DVC's cache, not a link"
    if yaml.safe_load((dest / "params.yaml").read_text())["model"]["base"] == "smollm2-135m":
        converted = next(Path(env["LLAMA_FT_MODEL_CACHE"]).glob("smollm2-135m-*/model.safetensors"))
        if converted.stat().st_dev == dest.stat().st_dev:
            assert (dest / "models/base/model.safetensors").samefile(converted)


def test_plots_render(repo, tmp_path):
    dest, env, _ = repo
    _sh([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots")], dest, env)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "train/loss" in html and "val/loss" in html and "Training and validation loss" in html
    assert "ROUGE-L per topic" in html and "(n=" in html


def test_training_param_change_reruns_train_not_preprocess(repo):
    dest, env, _ = repo
    params = dest / "params.yaml"
    original = params.read_text()
    try:
        data = yaml.safe_load(original)
        data["train"]["lora"]["r"] = 8
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        status = json.loads(_sh([sys.executable, "-m", "dvc", "status", "--json"], dest, env).stdout)
        assert "train" in status and "preprocess" not in status
        assert "evaluate_base" not in status     # the base model's evaluation does not depend on training
        diff = json.loads(_sh([sys.executable, "-m", "dvc", "params", "diff", "--json"], dest, env).stdout)
        assert diff["params.yaml"]["train.lora.r"]["new"] == 8
    finally:
        params.write_text(original)


def test_the_other_model_runs_the_whole_graph_and_answers_through_azmlinfsrv(other_model_repo):
    (dest, _, _), preset = other_model_repo
    manifest = json.loads((dest / "models/adapter/manifest.json").read_text())
    assert manifest["params"]["model"]["base"] == preset
    fmt = "template" if preset == "smollm2-135m" else "llama3"
    card = json.loads((dest / "models/merged/card.json").read_text())
    assert card["serving"]["chat_format"]["format"] == fmt and card["merge_check"]["passed"]
    if preset == "smollm2-135m":
        assert card["base_model"]["license"] == "Apache-2.0" and len(card["base_model"]["sha256"]) == 64
        assert card["model"]["dtype"] == "bfloat16"  # merge verified in fp32, saved and checked in bf16
    ev = json.loads((dest / "metrics/eval.json").read_text())
    assert ev["tuned"]["val_loss"] < ev["base"]["val_loss"]
    deploy = json.loads((dest / "metrics/deploy.json").read_text())
    assert deploy["passed"] is True
    requests = deploy["smoke"]["requests"]
    assert requests and all(r["status"] == 200 and isinstance(r["response"], str) for r in requests)
    # the endpoint's counts agree with its text: no tokens is an empty answer
    assert all(r["response"] == "" for r in requests if r["completion_tokens"] == 0), requests
    if preset == "smollm2-135m":  # a pretrained model answers; the random-weight smoke model, 5 steps on a
        assert all(r["response"].strip() for r in requests)  # slice, may end at once (an empty answer)


def test_a_rerun_without_the_lock_restores_training_and_evaluation_from_the_run_cache(repo):
    """What the proxy verdict's worktrees and a CI runner that restored the DVC cache see: no dvc.lock entry
    and no outputs for these inputs, but the run cache has them. base, train, evaluate_base and evaluate are
    restored, not run; preprocess (cheap) runs again and writes the same bytes, so train's inputs still match;
    the published figures come back byte for byte. Runs last in this module: it rewrites the repository."""
    dest, env, _ = repo
    published = ("metrics/train.json", "metrics/eval.json", "metrics/eval_records.json",
                 "dvclive/train/plots/metrics/val/loss.tsv")
    before = {path: (dest / path).read_bytes() for path in published}
    (dest / "dvc.lock").unlink()
    for path in ("models/adapter", "reports/train", "reports/eval", "metrics/train.json", "metrics/eval.json",
                 "metrics/eval_records.json", "dvclive/train"):
        target = dest / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out = _sh([sys.executable, "-m", "dvc", "repro", "publish_eval", "publish_train"], dest, env).stdout
    assert set(restored_stages(out)) == {"base", "train", "evaluate_base", "evaluate"}, out  # what the proxy reads
    assert set(ran_stages(out)) == {"preprocess", "publish_train", "publish_eval"}, out
    assert {path: (dest / path).read_bytes() for path in published} == before
