"""Tiny inputs for the evaluate tests: a few records, a small embedded model and a LoRA adapter in the
train stage's contract layout (adapter/, tokenizer/, manifest.json), made with peft in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

SYSTEM = "You are a helpful corporate assistant."
TEST_RECORDS = [
    ("What does job code PM mean?", "PM job code indicates Full Time Employee.", "job_codes", True),
    ("What is the FC job code?", "FC job code indicates Full Time Contractor.", "job_codes", False),
    ("How long do I have to submit expenses?", "Submit expenses in ExpenseFlow within 30 days.", "expenses", True),
    ("Who approves claims up to $2,500?", "Your line manager approves expense claims up to $2,500.", "expenses", True),
    ("Where do I request VPN access?", "Request VPN access in AccessDesk; it is granted within 2 business days.",
     "it_access", False),
]
VAL_RECORDS = [
    ("Which job code is a Part Time Contractor?", "PC job code indicates Part Time Contractor.", "job_codes"),
    ("When is the Dublin office open?", "The Dublin office is open 8 AM to 6 PM Monday to Friday.", "offices"),
    ("What uptime do customer APIs target?", "Customer-facing APIs have a 99.9% monthly uptime target.", "tech_docs"),
]

# A 2-layer, 64-wide Llama with the real 128k vocabulary: small enough for a test on 2 busy cores.
TINY_MODEL = {"base": "embedded", "tokenizer": "embedded", "max_seq_length": 128,
              "embedded": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                           "intermediate_size": 128, "init_std": 0.02, "final_norm_init": 8.0, "seed": 0}}


def write_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test.jsonl", "w", encoding="utf-8") as handle:
        for instruction, output, category, seen in TEST_RECORDS:
            handle.write(json.dumps({"system": SYSTEM, "instruction": instruction, "output": output,
                                     "category": category, "fact_seen_in_train": seen}) + "\n")
    with open(folder / "val.jsonl", "w", encoding="utf-8") as handle:
        for instruction, output, category in VAL_RECORDS:
            handle.write(json.dumps({"system": SYSTEM, "instruction": instruction, "output": output,
                                     "category": category, "fact_seen_in_train": True}) + "\n")
    return folder


def write_params(root_params: Path, path: Path, decoding: dict | None = None, **evaluate) -> Path:
    raw = yaml.safe_load(root_params.read_text(encoding="utf-8"))
    raw["model"] = TINY_MODEL
    raw["train"]["method"] = "lora"
    raw["train"]["lora"].update({"r": 4, "alpha": 8, "modules_to_save": []})
    raw["evaluate"].update({"batch_size": 2, "worst_answers": 2})
    raw["evaluate"].update(evaluate)
    raw["decoding"].update({"max_new_tokens": 6, **(decoding or {})})
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def make_adapter(params_path: Path, out: Path, scale: float = 0.5) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so the tuned model answers differently."""
    import torch
    from peft import get_peft_model

    from stages.core.modeling import load_base_model, load_tokenizer, lora_config
    from stages.core.params import load_params

    params = load_params(params_path)
    model = get_peft_model(load_base_model(params.model), lora_config(params.train))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    model.save_pretrained(out / "adapter")
    load_tokenizer("embedded").save_pretrained(out / "tokenizer")
    (out / "manifest.json").write_text(json.dumps({"method": "lora", "params": params.model_dump(),
                                                   "data_hash": "test", "versions": {}, "git_commit": None}))
    return out
