"""stages.publish (cached figures copied to git's place) and which stages DVC keeps a run cache for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import publish

ROOT = Path(__file__).resolve().parents[1]


def test_files_and_folders_are_copied_and_a_folder_is_replaced_whole(tmp_path, capsys):
    src = tmp_path / "reports/train"
    (src / "live/plots/metrics/train").mkdir(parents=True)
    (src / "train.json").write_text('{"final_val_loss": 1.5}\n')
    (src / "live/plots/metrics/train/loss.tsv").write_text("step\tloss\n0\t2.0\n")
    for cached in (src / "train.json", src / "live/plots/metrics/train/loss.tsv"):
        cached.chmod(0o444)  # what DVC's hardlink cache type leaves in the workspace
    old = tmp_path / "dvclive/train/plots/metrics/val"
    old.mkdir(parents=True)
    (old / "stale.tsv").write_text("from an earlier run\n")
    rc = publish.main([f"{src / 'train.json'}={tmp_path / 'metrics/train.json'}",
                       f"{src / 'live'}={tmp_path / 'dvclive/train'}"])
    assert rc == 0
    assert json.loads((tmp_path / "metrics/train.json").read_text()) == {"final_val_loss": 1.5}
    copied = sorted(p.relative_to(tmp_path / "dvclive/train").as_posix()
                    for p in (tmp_path / "dvclive/train").rglob("*") if p.is_file())
    assert copied == ["plots/metrics/train/loss.tsv"]  # the stale file of the old folder is gone
    assert sorted(p.name for p in tmp_path.joinpath("dvclive").iterdir()) == ["train"]  # no temp folders left
    assert "(1 files)" in capsys.readouterr().out
    # the copies git tracks are ordinary files, not read-only like their cached sources
    for published in (tmp_path / "metrics/train.json", tmp_path / "dvclive/train/plots/metrics/train/loss.tsv"):
        assert published.stat().st_mode & 0o200, published


def test_a_missing_source_publishes_nothing_and_says_which(tmp_path, capsys):
    (tmp_path / "eval.json").write_text("{}\n")
    dest = tmp_path / "metrics"
    rc = publish.main([f"{tmp_path / 'eval.json'}={dest / 'eval.json'}",
                       f"{tmp_path / 'eval_records.json'}={dest / 'eval_records.json'}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "nothing published" in err and "eval_records.json" in err
    assert not dest.exists()


def test_a_pair_without_a_destination_is_an_error(capsys):
    assert publish.main(["reports/eval/eval.json"]) == 1
    assert "expected SOURCE=DESTINATION" in capsys.readouterr().err
    with pytest.raises(ValueError, match="=metrics/eval.json"):
        publish.parse_pair("=metrics/eval.json")


def _run_cache_stages() -> tuple[set[str], set[str]]:
    """The stages of this repository's dvc.yaml that DVC keeps a run cache for, by DVC's own rule
    (dvc/stage/__init__.py: any `cache: false` out that is not a metric or a plot turns it off)."""
    from dvc.repo import Repo

    keeps, loses = set(), set()
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            no_cache_outs = any(not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot))
            (loses if no_cache_outs else keeps).add(stage.addressing)
    return keeps, loses


def test_the_stages_that_train_or_generate_keep_a_run_cache():
    """The proxy verdict and CI restore these instead of running them again (stages/ci/proxy.py);
    dvc.yaml says why each of the others does not keep one."""
    keeps, loses = _run_cache_stages()
    assert keeps == {"base", "train", "evaluate_base", "evaluate"}
    assert loses == {"preprocess", "publish_train", "publish_eval", "package", "deploy"}
