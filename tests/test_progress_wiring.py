"""Progress where the work is long: the generation hook (stages/core/generate.py), evaluation answers
and scoring, the merge check (stages/package.py) and the one-time GGUF conversion
(stages/core/modeling.py). Output without a terminal (pytest's capture) is the plain-line mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluate_fixtures import SYSTEM, TEST_RECORDS, TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def plain_lines(monkeypatch):
    from stages.core import progress

    monkeypatch.setenv(progress.MODE_ENV, "lines")
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)


def _assert_plain(err: str, prefix: str) -> None:
    """Our lines (those starting with "[prefix") never redraw. (transformers' own bars, e.g. "Loading
    weights", are not ours and may.)"""
    ours = [chunk for line in err.split("\n") for chunk in line.split("\r") if f"[{prefix}" in chunk]
    assert ours, err
    for line in err.split("\n"):
        if f"[{prefix}" in line:
            assert line.startswith(f"[{prefix}") and "\r" not in line and "\x1b[" not in line, line


def test_generation_hook_counts_decoding_steps_and_changes_nothing():
    from stages.core.chat import chat_format
    from stages.core.generate import generate_batch
    from stages.core.modeling import load_base_model, load_tokenizer
    from stages.core.params import ModelParams

    tokenizer = load_tokenizer("embedded")
    fmt = chat_format(tokenizer)
    model = load_base_model(ModelParams.model_validate({**TINY_MODEL, "embedded": {**TINY_MODEL["embedded"],
                                                                                   "init_std": 0.1}}),
                            tokenizer=tokenizer).eval()
    prompts = [fmt.prompt_ids(SYSTEM, q) for q, *_ in TEST_RECORDS[:3]]
    steps: list[int] = []
    plain = generate_batch(model, prompts, 5, fmt)
    hooked = generate_batch(model, prompts, 5, fmt, on_step=steps.append)
    assert hooked == plain
    taken = max(len(g.token_ids) + int(g.finished) for g in plain)   # decoding stops when every row stopped
    assert steps == list(range(1, taken + 1)) and 1 <= taken <= 5


def test_merge_check_shows_each_pass(tmp_path, plain_lines, capsys):
    from test_package import FAST, make_adapter, make_data

    from stages.package import package

    card = package(make_adapter(tmp_path / "adapter"), tmp_path / "merged", FAST, data_dir=make_data(tmp_path / "data"))
    assert card["merge_check"]["passed"]
    err = capsys.readouterr().err
    _assert_plain(err, "merge check")
    total = FAST.check_max_new_tokens + FAST.check_prompts                 # decoding steps + teacher-forced passes
    for name in ("merge check 1/3: adapter model", "merge check 2/3: merged model",
                 "merge check 3/3: saved model (float32)"):
        finals = [line for line in err.splitlines() if line.startswith(f"[{name}] ") and ", done" in line]
        assert len(finals) == 1 and finals[0].startswith(f"[{name}] {total}/{total} step (100%)"), (name, err)
        assert "step/s" in finals[0] or "s/step" in finals[0]


def test_gguf_conversion_shows_its_steps_once(tmp_path, monkeypatch, plain_lines, capsys):
    """The conversion's steps on a stand-in GGUF (transformers' GGUF loaders replaced by a tiny model),
    so that the wiring is tested without dequantising 100 MB."""
    import transformers

    from stages.core import modeling
    from stages.core.params import ModelParams

    gguf = tmp_path / "wheel" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    config = modeling.embedded_config(ModelParams.model_validate(TINY_MODEL))
    tokenizer = modeling.load_tokenizer("embedded")

    class Tokenizers:
        @staticmethod
        def from_pretrained(path, gguf_file):
            assert Path(path) / gguf_file == gguf
            return tokenizer

    class Models:
        @staticmethod
        def from_pretrained(path, gguf_file, dtype):
            return transformers.LlamaForCausalLM(config)

    monkeypatch.setattr(transformers, "AutoTokenizer", Tokenizers)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Models)
    monkeypatch.setenv("LLAMA_FT_MODEL_CACHE", str(tmp_path / "cache"))
    source = modeling.PackagedGGUFSource("tiny-gguf", package="nowhere", filename="tiny.gguf", origin="test",
                                         license="none")
    monkeypatch.setattr(source, "gguf_path", lambda: gguf)
    folder = source.converted()
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "source.json").read_text())["sha256"]
    err = capsys.readouterr().err
    _assert_plain(err, "converting tiny-gguf")
    lines = [line for line in err.splitlines() if line.startswith("[converting tiny-gguf (once, into ")]
    steps = len(modeling.PackagedGGUFSource.CONVERT_STEPS)
    assert len(lines) == 1 and f"] {steps}/{steps} step (100%)" in lines[0] and ", done" in lines[0]
    assert source.converted() == folder                                 # cached: no second conversion
    assert "converting" not in capsys.readouterr().err


def test_evaluation_shows_answers_and_scoring(tmp_path, plain_lines, capsys):
    from stages.core.chat import chat_format
    from stages.core.modeling import load_base_model, load_tokenizer
    from stages.core.params import DecodingParams, ModelParams
    from stages.evaluate_base import generate_answers, score_answers

    tokenizer = load_tokenizer("embedded")
    model = load_base_model(ModelParams.model_validate(TINY_MODEL), tokenizer=tokenizer).eval()
    records = [{"system": SYSTEM, "instruction": q, "output": a} for q, a, *_ in TEST_RECORDS]
    answers, finished, tokens, _ = generate_answers(model, tokenizer, records, DecodingParams(max_new_tokens=3), 2,
                                                    desc="base answers")
    assert chat_format(tokenizer) and len(answers) == len(records) and tokens > 0
    rows = score_answers(answers, [r["output"] for r in records], finished, None, desc="scoring base answers")
    assert len(rows) == len(records)
    err = capsys.readouterr().err
    _assert_plain(err, "base answers")
    _assert_plain(err, "scoring base answers")
    assert any(line.startswith(f"[base answers] {len(records)}/{len(records)} answer (100%)")
               and "tokens_per_s" in line for line in err.splitlines()), err
    assert any(line.startswith("[scoring base answers] 3/3 step (100%)") for line in err.splitlines()), err


def test_a_long_batch_still_reports_its_decoding_step(monkeypatch, plain_lines, capsys):
    """Lines come from within a batch (the generation hook), not only when it ends."""
    from stages.core import progress
    from stages.core.modeling import load_base_model, load_tokenizer
    from stages.core.params import DecodingParams, ModelParams
    from stages.evaluate_base import generate_answers

    monkeypatch.setenv(progress.INTERVAL_ENV, "0")          # every update may print
    tokenizer = load_tokenizer("embedded")
    model = load_base_model(ModelParams.model_validate({**TINY_MODEL, "embedded": {**TINY_MODEL["embedded"],
                                                                                   "init_std": 0.1}}),
                            tokenizer=tokenizer).eval()
    records = [{"system": SYSTEM, "instruction": q, "output": a} for q, a, *_ in TEST_RECORDS[:2]]
    generate_answers(model, tokenizer, records, DecodingParams(max_new_tokens=4), 2, desc="one batch")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[one batch]")]
    assert any(line.startswith("[one batch] 0/2 answer (0%)") and "decoding token 1/4 of a batch of 2" in line
               for line in lines), lines
    assert lines[-1].startswith("[one batch] 2/2 answer (100%)") and "decoding" not in lines[-1]
