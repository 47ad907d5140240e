"""The package stage: merge into 16-bit weights, the merge check (runs in CI), the model card.

The adapter is a real peft LoRA on the embedded model, saved in the train stage's contract layout
(adapter/, tokenizer/, manifest.json) with non-zero LoRA B matrices so the adapter changes outputs.
`packaged_model(tmp_path_factory)` is shared with tests/test_serve.py and tests/test_deploy.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.core.chat import CHAT_TEMPLATE, PAD_ID, STOP_IDS
from stages.core.params import DecodingParams, PackageParams, Params

SYSTEM = "You are a helpful corporate assistant."
OTHER_SYSTEM = "You are Contoso's help desk."
ROWS = [
    {"system": SYSTEM, "instruction": "How do I submit an expense report?", "output": "Use the Expenses app.", "category": "x"},
    {"system": SYSTEM, "instruction": "What is the PM job code?", "output": "Full-time employee.", "category": "x"},
    {"system": OTHER_SYSTEM, "instruction": "Who approves annual leave?", "output": "Your line manager.", "category": "x"},
]
FAST = PackageParams(check_prompts=3, check_max_new_tokens=8)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_adapter(dest: Path, method: str = "lora", seed: int = 1) -> Path:
    """A LoRA adapter on the embedded model in the train stage's output layout."""
    from peft import get_peft_model

    from stages.core.modeling import load_base_model, load_tokenizer, lora_config

    params = Params()
    model = get_peft_model(load_base_model(params.model), lora_config(params.train))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest / "adapter")
    tokenizer = load_tokenizer("embedded")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(dest / "tokenizer")
    manifest = {"method": method, "params": params.model_dump(mode="json"), "data_hash": "sha256:test-data",
                "versions": {"torch": torch.__version__}, "git_commit": "0" * 40}
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return dest


def make_data(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in ROWS)
    for split in ("train", "test"):
        (dest / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return dest


def packaged_model(tmp_path_factory) -> Path:
    """models/merged built once per test session (adapter -> package), reused by the serving tests."""
    from stages.package import package

    root = tmp_path_factory.getbasetemp() / "packaged-embedded"
    merged = root / "merged"
    if not (merged / "card.json").is_file():
        adapter = make_adapter(root / "adapter")
        package(adapter, merged, FAST, data_dir=make_data(root / "data"))
    return merged


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    adapter = make_adapter(root / "adapter")
    data = make_data(root / "data")
    (root / "eval.json").write_text(json.dumps({
        "base": {"rougeL": 0.05, "bleu4": 0.01}, "tuned": {"rougeL": 0.61, "bleu4": 0.32},
        "gate": {"passed": True, "reasons": []}, "answer_budget": {"max_new_tokens": 40}}), encoding="utf-8")
    (root / "train.json").write_text(json.dumps({"final_train_loss": 1.23, "steps": 40}), encoding="utf-8")
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: python -m stages.train\n    deps:\n    - path: data/processed\n"
        "      md5: aaa111.dir\n    outs:\n    - path: models/adapter\n      md5: bbb222.dir\n", encoding="utf-8")
    return root, adapter, data


def test_package_merges_checks_and_writes_a_servable_model(workdir):
    from stages.package import package

    root, adapter, data = workdir
    out = root / "merged"
    card = package(adapter, out, FAST, data_dir=data, eval_metrics=root / "eval.json",
                   train_metrics=root / "train.json", decoding=DecodingParams(no_repeat_ngram_size=3))

    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "serving.json", "model_card.md", "card.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_*")), "a merged model has no adapter files"

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128009, 128001] == list(STOP_IDS)
    assert generation["pad_token_id"] == PAD_ID == 128004
    # what evaluate measured is what is served: its answer length and the decoding section's guard
    assert generation["max_new_tokens"] == 40 and generation["no_repeat_ngram_size"] == 3
    serving = json.loads((out / "serving.json").read_text())
    assert serving["max_new_tokens"] == 40 and serving["repetition_guard"] == {"no_repeat_ngram_size": 3}

    check = card["merge_check"]
    assert check["passed"] and check["source"].endswith("test.jsonl") and check["prompts"] == 3
    for part in (check["merge"], check["saved"]):  # fp32 merge, and the fp32 model saved and reloaded
        assert part["passed"] and part["greedy_tokens_identical"] and part["greedy_identical"] == 3
        assert part["relative_logit_diff"] < 1e-4  # rounding only
        assert part["logits_tolerance"] == FAST.logits_tolerance

    saved = json.loads((out / "card.json").read_text())
    assert saved["data_hash"] == "sha256:test-data"
    assert saved["params"]["train"]["lora"]["r"] == Params().train.lora.r
    assert saved["metrics"]["eval"]["tuned"]["rougeL"] == 0.61
    assert saved["metrics"]["train"]["steps"] == 40
    # No clock and no git state: the card's bytes are a function of the stage's inputs.
    assert not {"created", "git", "dvc_lock", "seconds"} & set(saved)
    assert saved["serving"]["chat_format"] == {"format": "llama3", "eot": "<|eot_id|>",
                                               "stop": ["<|eot_id|>", "<|end_of_text|>"],
                                               "pad": "<|finetune_right_pad_id|>"}
    assert saved["model"]["dtype"] == "float32" and saved["model"]["method"] == "lora"
    assert json.loads((out / "serving.json").read_text())["default_system"] == SYSTEM  # most used in train

    text = (out / "model_card.md").read_text()
    for needle in ("## Merge check", "3/3", "sha256:test-data", "rougeL", "adapter vs merged, fp32"):
        assert needle in text

    # The saved tokenizer carries the chat template; the merged weights differ from the base model's.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.core.chat import prompt_ids
    from stages.core.modeling import load_base_model

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    base = load_base_model(Params().model)
    ids = torch.tensor([prompt_ids(tokenizer, SYSTEM, "hello")])
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3


def test_a_wrong_merge_fails_the_stage_and_writes_nothing(workdir, monkeypatch):
    """Unloading the adapter instead of merging it must be caught by the merge check."""
    from peft.tuners.lora import LoraModel

    from stages.package import MergeCheckError, package

    root, adapter, data = workdir
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = root / "wrong"
    with pytest.raises(MergeCheckError, match="does not reproduce"):
        package(adapter, out, FAST, data_dir=data)
    assert not out.exists()


def test_logits_tolerance_is_enforced(workdir):
    from stages.package import MergeCheckError, package

    root, adapter, data = workdir
    strict = PackageParams(check_prompts=2, check_max_new_tokens=4, logits_tolerance=1e-12)
    with pytest.raises(MergeCheckError, match="logits_tolerance"):
        package(adapter, root / "strict", strict, data_dir=data)
    assert not (root / "strict").exists()


def test_qlora_adapter_is_merged_into_16_bit_weights(tmp_path):
    """A QLoRA manifest: the base is reloaded in 16-bit (not 4-bit) and the merge is saved in bf16."""
    from safetensors import safe_open

    from stages.package import package

    adapter = make_adapter(tmp_path / "adapter", method="qlora")
    params = PackageParams(dtype="bf16", check_prompts=2, check_max_new_tokens=4)
    card = package(adapter, tmp_path / "merged", params, data_dir=make_data(tmp_path / "data"))
    assert card["model"]["dtype"] == "bfloat16" and card["model"]["method"] == "qlora"
    check = card["merge_check"]
    # The merge is verified in fp32 with the tight tolerance; the bf16 save with the 16-bit one.
    assert check["passed"] and check["merge"]["relative_logit_diff"] < 1e-4 and check["saved_dtype"] == "bfloat16"
    assert check["merge"]["logits_tolerance"] == params.logits_tolerance
    assert check["saved"]["logits_tolerance"] == params.saved_logits_tolerance
    assert not check["saved"]["require_identical"] and check["merge"]["require_identical"]
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"BF16"}


def test_cli_reports_a_missing_adapter_without_traceback(tmp_path, capsys):
    from stages.package import main

    code = main(["--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "out"),
                 "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "manifest.json not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
