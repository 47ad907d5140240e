"""The dry run's checks and the memory/time/cost estimates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.core.params import ConfigError, validate_params

ROOT = Path(__file__).resolve().parents[1]


def raw_params(**train) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(base="embedded", tokenizer="embedded")  # a tiny random-weight model: no conversion, fast
    raw["model"]["embedded"].update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    raw["train"].update(train)
    return raw


@pytest.fixture(scope="module")
def data_dir(module_dir) -> Path:
    rows = (ROOT / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:40]
    d = module_dir("processed")
    (d / "train.jsonl").write_text("\n".join(rows[:32]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[32:]) + "\n")
    return d


def dry(tmp_path, data_dir, raw, capsys, *extra):
    from stages.dry_run import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    code = main(["--params", str(tmp_path / "params.yaml"), "--data", str(data_dir),
                 "--json", str(tmp_path / "dry.json"), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err, (json.loads((tmp_path / "dry.json").read_text()) if (tmp_path / "dry.json").exists() else None)


def test_dry_run_passes_on_a_good_config(tmp_path, data_dir, capsys, monkeypatch):
    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME"):
        monkeypatch.delenv(name, raising=False)
    code, out, err, report = dry(tmp_path, data_dir, raw_params(), capsys)
    assert code == 0, out + err
    names = [c["name"] for c in report["checks"]]
    for name in ("params", "data:train", "data:val", "tokenizer+chat format", "backend", "method", "model",
                 "training steps", "evaluation components", "azure environment", "azure compute",
                 "memory estimate", "time and cost (Azure)"):
        assert name in names
    assert "WARN  azure environment: not set: AZURE_SUBSCRIPTION_ID" in out
    assert report["estimates"]["memory"]["fits"] is True
    assert report["estimates"]["azure"]["cost_usd"] > 0


def test_azure_variables_are_named_never_printed(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "secret-sub-0000")
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", "secret-rg")
    monkeypatch.setenv("AZURE_WORKSPACE_NAME", "secret-ws")
    code, out, err, _ = dry(tmp_path, data_dir, raw_params(), capsys, "--require-azure")
    assert code == 0 and "PASS  azure environment" in out
    assert "secret" not in out + err + (tmp_path / "dry.json").read_text()


def test_missing_azure_variables_fail_when_required(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.delenv("AZURE_WORKSPACE_NAME", raising=False)
    code, out, err, _ = dry(tmp_path, data_dir, raw_params(), capsys, "--require-azure")
    assert code == 1 and "FAIL  azure environment: not set:" in out and "AZURE_WORKSPACE_NAME" in out


def test_broken_config_fails_helpfully(tmp_path, data_dir, capsys):
    code, out, err, _ = dry(tmp_path, data_dir, raw_params(learning_rate=-1, epochz=3), capsys)
    assert code == 2
    assert "FAIL  params:" in out and "train.learning_rate" in out and "train.epochz: unknown key (did you mean 'epochs'?)" in out


def test_bad_data_and_impossible_memory_fail(tmp_path, data_dir, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"system": "s", "instruction": "q"}\n')
    raw = raw_params()
    raw["model"]["base"] = "meta-llama/Llama-3.1-70B-Instruct"
    raw["train"]["method"] = "full"
    code, out, err, report = dry(tmp_path, bad, raw, capsys)
    assert code == 1
    assert "FAIL  data:train: 1 bad line(s)" in out
    assert "FAIL  memory estimate: does NOT fit" in out
    assert "architecture built on the meta device" in out


# ---- estimates -------------------------------------------------------------------------------

def test_estimate_training_contract():
    from stages.core.estimate import estimate_training

    est = estimate_training(validate_params(raw_params(epochs=4, evals_per_epoch=1)), tokens_per_epoch=60_000)
    for key in ("tokens_per_epoch", "expected_tokens_per_s", "hours", "cost_usd", "vm_size", "nodes"):
        assert key in est
    assert est["vm_size"] == "Standard_NC40ads_H100_v5" and est["nodes"] == 1
    assert est["cost_usd"] == pytest.approx(est["hours"] * 6.0, abs=0.01)
    pinned = estimate_training(validate_params(raw_params(epochs=4, evals_per_epoch=1)), tokens_per_epoch=60_000,
                               tokens_per_s=1000)
    assert pinned["hours"] == pytest.approx((240_000 / 1000 + 120 + 4 * 60_000 * 0.2 / 3 / 1000) / 3600, rel=1e-3)
    assert pinned["throughput_basis"] == "measured (given)"


def test_memory_estimates_for_real_llamas_without_download():
    from stages.core.estimate import estimate_memory, parameter_counts, model_config

    def params(model, **train):
        raw = raw_params(**train)
        raw["model"]["base"] = model
        raw["train"]["lora"].update(modules_to_save=[], r=32, alpha=64)  # the reference template's rank
        return validate_params(raw)

    one_b = params("meta-llama/Llama-3.2-1B-Instruct")
    counts = parameter_counts(model_config(one_b.model), one_b.train)
    assert 1.23e9 < counts["total"] < 1.24e9  # Llama-3.2-1B has 1.236 B parameters (tied head)
    assert 22e6 < counts["trainable"] < 23e6  # LoRA r=32 on all linear layers
    three_b = params("meta-llama/Llama-3.2-3B-Instruct")
    assert 3.2e9 < parameter_counts(model_config(three_b.model), three_b.train)["total"] < 3.22e9
    lora = estimate_memory(one_b, gpu="H100-NVL")
    qlora = estimate_memory(params("meta-llama/Llama-3.2-1B-Instruct", method="qlora"), gpu="H100-NVL")
    full = estimate_memory(params("meta-llama/Llama-3.2-1B-Instruct", method="full"), gpu="H100-NVL")
    assert qlora["weights_gb"] < lora["weights_gb"] < full["total_gb"]
    assert lora["fits"] and full["fits"]
    ckpt = estimate_memory(params("meta-llama/Llama-3.2-3B-Instruct", gradient_checkpointing=True), gpu="T4")
    assert ckpt["activations_gb"] < estimate_memory(three_b, gpu="T4")["activations_gb"]
    with pytest.raises(ConfigError, match="neither 'embedded', a known Llama 3.x name"):
        estimate_memory(params("someone/unknown-model"), gpu="H100-NVL")


def test_the_dry_run_checks_train_compile(tmp_path, data_dir, capsys):
    from stages.core.training import cpp_compiler

    code, out, err, _ = dry(tmp_path, data_dir, raw_params(compile="on", backend="unsloth"), capsys)
    assert ("WARN  compile: train.compile: on works with the transformers backend; unsloth compiles its own "
            "kernels (set train.backend: hf, or train.compile: off) (this machine: CPU only)") in out
    code, out, err, _ = dry(tmp_path, data_dir, raw_params(compile="on"), capsys)
    assert code == 0, out + err
    if cpp_compiler():
        assert "PASS  compile: torch.compile can run here (CPU only)" in out
    code, out, err, report = dry(tmp_path, data_dir, raw_params(), capsys)
    assert "compile" not in [c["name"] for c in report["checks"]]  # off: nothing to check
