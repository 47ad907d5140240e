"""The noise-floor command: its params per seed, its summary, and (slow) two tiny seeds end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evaluate_fixtures import write_data, write_params
from stages import noise
from stages.core.params import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_params_for_seed_sets_the_seed_and_the_overrides_only():
    raw = {"train": {"seed": 42, "epochs": 4, "lora": {"r": 32}}, "evaluate": {"batch_size": 16}}
    out = noise.params_for_seed(raw, 7, [noise.parse_override("train.epochs=1"),
                                         noise.parse_override("train.lora.r=4")])
    assert out == {"train": {"seed": 7, "epochs": 1, "lora": {"r": 4}}, "evaluate": {"batch_size": 16}}
    assert raw["train"]["seed"] == 42                        # the input is not modified
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        noise.parse_override("train.epochs")
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        noise.params_for_seed(raw, 1, [noise.parse_override("train.seed.x=1")])


def test_summary_is_the_spread_over_seeds():
    runs = [{"n_test": 63, "test_set": {"hash": "h"}, "tuned": {"rouge_l": v, "bleu4": 0.1, "fact_recall": None}}
            for v in (0.20, 0.24, 0.22)]
    out = noise.summarise(runs, [1, 2, 3], {"train.epochs": 1}, 30.0, "smollm2-135m")
    assert out["model"] == "smollm2-135m" and out["seeds"] == [1, 2, 3] and out["n_test"] == 63 and out["test_set_hash"] == "h"
    assert out["seconds_per_seed"] == 10.0 and out["overrides"] == {"train.epochs": 1}
    assert out["metrics"]["rouge_l"] == {"mean": 0.22, "sd": 0.02, "min": 0.2, "max": 0.24,
                                         "values": [0.2, 0.24, 0.22]}
    assert out["metrics"]["bleu4"]["sd"] == 0.0 and "fact_recall" not in out["metrics"]
    with pytest.raises(ConfigError, match="different test sets"):
        noise.summarise([{"test_set": {"hash": "a"}}, {"test_set": {"hash": "b"}}], [1, 2], {}, 1.0)


def test_bad_arguments_are_clear_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "stages.evaluate", "noise", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    one = run("--seeds", "1")
    assert one.returncode == 2 and "--seeds must be at least 2" in one.stderr and "Traceback" not in one.stderr
    nodata = run("--data", str(tmp_path))
    assert nodata.returncode == 2 and "has no train.jsonl/test.jsonl" in nodata.stderr


@pytest.mark.slow
def test_two_tiny_seeds_end_to_end(tmp_path):
    data = write_data(tmp_path / "data")
    rows = [json.loads(line) for line in (ROOT / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:8]]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = write_params(ROOT / "params.yaml", tmp_path / "params.yaml")
    out = tmp_path / "noise_floor.json"
    done = subprocess.run([sys.executable, "-m", "stages.evaluate", "noise", "--seeds", "2", "--params", str(params),
                           "--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"),
                           "--set", "train.epochs=1", "--set", "train.batch_size=4",
                           "--set", "train.gradient_accumulation_steps=1", "--set", "train.evals_per_epoch=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["seeds"] == [1, 2] and result["n_test"] == 5 and result["overrides"]["train.epochs"] == 1
    assert set(result["metrics"]) >= {"rouge_l", "bleu4", "val_loss"}
    for entry in result["metrics"].values():
        assert len(entry["values"]) == 2 and entry["sd"] >= 0 and entry["min"] <= entry["mean"] <= entry["max"]
    for seed in (1, 2):   # each seed trained with its own train.seed, into the work folder only
        assert yaml.safe_load((tmp_path / "work" / f"seed_{seed}" / "params.yaml").read_text())["train"]["seed"] == seed
    assert "seed noise (sd): rouge_l ±" in done.stdout
    assert (tmp_path / "work" / "eval_base" / "base.json").is_file()     # the base model evaluated once
    assert done.stdout.count("[noise] python -m stages.evaluate_base") == 1
