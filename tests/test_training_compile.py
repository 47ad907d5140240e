"""train.compile (issue 22): where it is refused, and that a compiled fit trains as the eager one does."""

from __future__ import annotations

import json

import pytest
import torch

from stages.core.params import ConfigError, validate_params
from stages.core.training import cpp_compiler, select_compile

from test_train import TINY, merged

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_compile_off_is_always_allowed():
    assert select_compile("off", "unsloth", "fsdp", cuda=False).value == "off"


@pytest.mark.parametrize("backend, distributed, message", [
    ("unsloth", "none", "train.compile: on works with the transformers backend; unsloth compiles its own kernels "
                        "(set train.backend: hf, or train.compile: off)"),
    ("hf", "fsdp", "train.compile: on is not supported under FSDP here; use ddp or train.compile: off"),
])
def test_compile_is_refused_where_it_cannot_work(backend, distributed, message):
    with pytest.raises(ConfigError) as info:
        select_compile("on", backend, distributed, cuda=False)
    assert str(info.value) == message


def test_compile_on_a_cpu_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert cpp_compiler() is None
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler on a CPU .* none found \(CXX, g\+\+, clang\+\+, c\+\+\)"):
        select_compile("on", "hf", "none", cuda=False)


def test_a_bare_yaml_on_or_off_is_the_switch(tmp_path):
    import yaml

    from stages.core.params import Params

    for text, expected in (("on", "on"), ("off", "off"), ('"on"', "on")):
        raw = yaml.safe_load(f"train:\n  compile: {text}\n")
        assert Params.model_validate(raw).train.compile == expected


def test_a_wrong_compile_value_is_a_params_error():
    with pytest.raises(ConfigError, match="train.compile"):
        validate_params(merged(TINY, {"train": {"compile": "yes"}}))


@pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_fit_trains_as_the_eager_one_with_one_graph_for_every_row_length():
    from torch._dynamo.utils import counters

    from stages.core.chat import encode_example
    from stages.core.modeling import load_tokenizer
    from stages.core.training import fit, micro_batches, trainable_state
    from stages.train import build_model_hf

    assert select_compile("on", "hf", "none", cuda=False).value == "on"
    raw = merged(TINY, {"train": {"lora": {"dropout": 0.0}, "pack_tokens": 160}})
    params = validate_params(raw)
    tok = load_tokenizer("embedded")
    rows = [json.loads(line) for line in (ROOT / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:14]]
    ex = [encode_example(tok, r["system"], r["instruction"], r["output"]) for r in rows]
    # the rows differ in length, so an uncompiled-per-shape graph would recompile again and again
    lengths = {b.input_ids.shape[1] for b in micro_batches(ex[:10], 2, True, 160, shared_prefix=True)}
    assert len(lengths) >= 3

    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(params.train.seed)
        model = build_model_hf(params, torch.device("cpu"), torch.float32)
        graphs_before = counters["stats"]["unique_graphs"]
        train = params.train.model_copy(update={"compile": mode})
        result = fit(model, ex[:10], ex[10:], train, device=torch.device("cpu"), log=lambda _m: None)
        runs[mode] = (result, trainable_state(model), counters["stats"]["unique_graphs"] - graphs_before)

    (eager, eager_state, eager_graphs), (compiled, compiled_state, compiled_graphs) = runs["off"], runs["on"]
    assert eager_graphs == 0
    # at most one graph per attention-mask kind (plain packed rows, shared-prefix rows), never one per length
    assert 1 <= compiled_graphs <= 2
    assert [p["step"] for p in compiled.history] == [p["step"] for p in eager.history]
    for a, b in zip(eager.history, compiled.history):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)
    assert eager_state.keys() == compiled_state.keys()
    for name in eager_state:
        assert torch.allclose(eager_state[name], compiled_state[name], rtol=1e-3, atol=1e-5), name
    moved = [n for n in eager_state if "lora_B" in n and eager_state[n].abs().sum() > 0]
    assert moved  # the runs trained: LoRA's B matrices left zero
